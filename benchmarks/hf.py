"""selfattn inside Hugging Face transformers: a forward pass of a Llama-shaped model on the CPU.

    python benchmarks/hf.py --out docs/bench/hf.txt      # the full run (minutes, ~20 GiB free)
    python benchmarks/hf.py --quick                      # a smoke test (about a minute)

A randomly initialised decoder (no download): 2 layers, hidden 512, 8 query heads and 2
key/value heads of 64 (GQA), fp32, batch 1, no padding, under ``torch.no_grad()``. Two shapes:

    llama     full causal attention
    mistral   the same with a 1,024-token sliding window (selfattn_tiled skips the blocks
              outside it; eager and sdpa get transformers' dense (L, L) mask)

at 4,096 and 16,384 tokens, each with attn_implementation "eager", "sdpa" and "selfattn_tiled".

First the implementations must agree: at a check length (2,048 tokens, or the quick length),
each one's logits are compared with "eager"'s (max abs difference <= 1e-4, else exit 1). Then
every (shape, length, implementation) runs in a fresh process (``--one``), so one case's memory
cannot blur another's: a tiny forward first (thread pools and lazy imports become resident),
then the measured forward, whose peak resident memory beyond what was resident just before it
(the model and the input) comes from `selfattn.bench.memory.peak_bytes` (VmHWM after resetting
it, or ru_maxrss), then ``--repeats`` timed forwards (median). A process that passes
``--limit-gib`` of extra address space fails there and is reported as out of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from a config

import torch

IMPLEMENTATIONS = ("eager", "sdpa", "selfattn_tiled")
SHAPES = ("llama", "mistral")
CHECK_ATOL = 1e-4


@dataclass(frozen=True)
class Size:
    """The model's dimensions and the lengths a run measures."""

    lengths: tuple[int, ...] = (4096, 16384)
    window: int = 1024
    check_length: int = 2048
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    layers: int = 2
    vocab: int = 1024


QUICK = Size(lengths=(256,), window=64, check_length=160, hidden=128, heads=4, layers=2)


def build_model(shape: str, size: Size, implementation: str):
    """A random Llama (or Mistral, with the sliding window) of ``size``, in eval mode."""
    import transformers

    import selfattn.integrations.transformers  # noqa: F401  (registers "selfattn_tiled")

    common = dict(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.hidden * 11 // 4,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(*size.lengths, size.check_length),
    )
    if shape == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.MistralConfig(sliding_window=size.window, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=implementation
    )
    return model.eval()


def input_ids(size: Size, length: int) -> torch.Tensor:
    return torch.randint(0, size.vocab, (1, length), generator=torch.Generator().manual_seed(1))


def check_agreement(size: Size) -> list[str]:
    """Each implementation's logits against eager's at the check length: one line per shape."""
    lines = []
    ids = input_ids(size, size.check_length)
    for shape in SHAPES:
        model = build_model(shape, size, "eager")
        with torch.no_grad():
            reference = model(input_ids=ids).logits  # (1, L, V)
            worst = {}
            for implementation in IMPLEMENTATIONS[1:]:
                model.set_attn_implementation(implementation)
                worst[implementation] = (model(input_ids=ids).logits - reference).abs().max().item()
        diffs = ", ".join(f"{name} {d:.1e}" for name, d in worst.items())
        lines.append(f"check {shape} L={size.check_length}: max |logits - eager| {diffs}")
        if max(worst.values()) > CHECK_ATOL:
            raise SystemExit("\n".join([*lines, f"disagreement above {CHECK_ATOL}: no timing"]))
    return lines


def measure_one(shape: str, length: int, implementation: str, size: Size, repeats: int) -> dict:
    """In a fresh process: peak extra memory of one forward, then the median of ``repeats``."""
    from selfattn.bench.memory import peak_bytes

    model = build_model(shape, size, implementation)
    with torch.no_grad():
        model(input_ids=input_ids(size, 16))  # one-time costs, before the baseline
        ids = input_ids(size, length)
        peak = peak_bytes(lambda: model(input_ids=ids))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {"status": "ok", "peak_bytes": peak, "median_s": statistics.median(times)}


def run_case(shape: str, length: int, implementation: str, args) -> dict:
    """`measure_one` in a child process under an address-space limit; its JSON, or why not."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", shape, str(length)]
    cmd += [implementation, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--limit-gib", str(args.limit_gib)] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0 and done.stdout.strip():
        return json.loads(done.stdout.strip().splitlines()[-1])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    oom = "memory" in tail.lower() or done.returncode in (-9, 137)
    return {"status": "oom" if oom else "error", "reason": tail[:160]}


def child(args) -> int:
    """``--one SHAPE LENGTH IMPLEMENTATION``: print one JSON line."""
    shape, length, implementation = args.one[0], int(args.one[1]), args.one[2]
    if args.limit_gib:
        limit = _vm_size() + int(args.limit_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else Size()
    try:
        result = measure_one(shape, length, implementation, size, args.repeats)
    except (MemoryError, RuntimeError) as err:
        result = {"status": "oom", "reason": str(err).splitlines()[0][:160]}
    print(json.dumps(result))
    return 0


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def table(results: list[dict]) -> list[str]:
    """One row per case, with time and memory as ratios to eager's on the same shape and L."""
    rows = [f"{'shape':<8} {'L':>6}  {'implementation':<15} {'time':>9} {'peak MiB':>9}  vs eager"]
    eager = {(r["shape"], r["length"]): r for r in results if r["implementation"] == "eager"}
    for r in results:
        head = f"{r['shape']:<8} {r['length']:>6}  {r['implementation']:<15}"
        if r["status"] != "ok":
            rows.append(f"{head} {r['status']}: {r.get('reason', '')}")
            continue
        base = eager.get((r["shape"], r["length"]), {})
        ratios = ""
        if base.get("status") == "ok":
            speed = base["median_s"] / r["median_s"]
            memory = r["peak_bytes"] / max(base["peak_bytes"], 1)
            ratios = f"{speed:5.2f}x speed, {memory:5.2f}x memory"
        rows.append(f"{head} {r['median_s']:8.3f}s {r['peak_bytes'] / 2**20:9.0f}  {ratios}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths: a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--limit-gib", type=float, default=32.0, help="per-case memory cap")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument(
        "--one", nargs=3, metavar=("SHAPE", "LENGTH", "IMPL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        return child(args)
    return report(args)


def report(args) -> int:
    from selfattn.bench.machine import summary

    size = QUICK if args.quick else Size()
    lines = [
        f"selfattn in transformers: forward of a random {size.layers}-layer model, hidden "
        f"{size.hidden}, {size.heads} query / {size.kv_heads} key-value heads (GQA), fp32, "
        f"batch 1, CPU; mistral = sliding window {size.window}",
        f"{summary()}, transformers {_transformers_version()}",
        *check_agreement(size),
    ]
    print("\n".join(lines), flush=True)
    results = []
    for shape in SHAPES:
        for length in size.lengths:
            for implementation in IMPLEMENTATIONS:
                case = {"shape": shape, "length": length, "implementation": implementation}
                results.append({**case, **run_case(shape, length, implementation, args)})
                print(table(results)[-1], flush=True)
    lines += table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
