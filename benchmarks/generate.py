"""Decoding's prefill: the logits of the last position alone, against a forward's logits of every
position, in the chapter's GPT at GPT-2 124M's size.

    python benchmarks/generate.py --out docs/bench/generate.txt
    python benchmarks/generate.py --quick          # a smoke test, in seconds

`GPT.generate` (and `stream`) run the blocks over the prompt, and over the whole window at each
step once it has slid past ``context_length``, but put only the last position through the
output head, a (50257, 768) matrix: the head's work over the other positions is not needed to
pick the next token. The contenders, on the same prompt and weights (random, seed 123; the
chapter's ``GPT_CONFIG_124M``, fp32, eval mode, no gradients):

    generate   ``model.generate(prompt, 1, temperature=0)``: the prefill and the first token
    forward    ``model(prompt)[:, -1].argmax(-1)``: every position's logits, then the last row's
               most likely token (what generate did before)

They must pick the same token (checked before timing). Timed round-robin with
`selfattn.bench.timing.interleaved`, medians, at a 512-token prompt and at the full context of
1,024 (the cost of each step past the context). No target: the report gives the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

try:
    import selfattn  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfattn.bench import machine
from selfattn.bench.timing import interleaved
from selfattn.models.gpt import GPT, GPTConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each contender")
    p.add_argument("--quick", action="store_true", help="a 2-layer model, 2 repeats")
    p.add_argument("--out", type=Path, help="write the report here too")
    args = p.parse_args(argv)
    cfg = GPTConfig(n_layers=2) if args.quick else GPTConfig()
    repeats = 2 if args.quick else args.repeats
    torch.manual_seed(123)
    model = GPT(cfg).eval()
    load_before = machine.load_average()
    lines = [
        "decoding's prefill: the head on the last position (generate) vs on every position",
        f"machine: {machine.summary()}",
        f"model: the chapter's GPT, {cfg.n_layers} layers, emb {cfg.emb_dim}, vocabulary "
        f"{cfg.vocab_size}, fp32, random weights (seed 123); {repeats} calls each, round-robin, "
        "medians",
        "",
        "prompt tokens  generate ms  forward ms  generate / forward",
    ]
    with torch.no_grad():
        for length in (512, cfg.context_length):
            prompt = torch.randint(
                0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)
            )
            steps = {
                "generate": lambda p=prompt: model.generate(p, 1, temperature=0.0)[:, -1],
                "forward": lambda p=prompt: model(p)[:, -1].argmax(-1),
            }
            picked = {name: step().item() for name, step in steps.items()}
            if picked["generate"] != picked["forward"]:
                print(f"the contenders disagree at {length} tokens: {picked}", file=sys.stderr)
                return 1
            ms = {
                name: statistics.median(samples) * 1e3
                for name, samples in interleaved(steps, repeats).items()
            }
            ratio = ms["generate"] / ms["forward"]
            lines.append(
                f"{length:13d}  {ms['generate']:11.1f}  {ms['forward']:10.1f}  {ratio:18.2f}"
            )
    lines.append(f"load average before: {load_before}; after: {machine.load_average()}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
