"""Training speed: selfattn's GPT beside a plain-PyTorch GPT of the same shape, in one run.

    python benchmarks/train.py --out docs/bench/train.txt --png docs/bench/train.png
    python benchmarks/train.py --quick                 # a smoke test, in seconds
    python benchmarks/train.py --whole --rounds 4 --out docs/bench/train_whole.txt
    python benchmarks/train.py --whole --compile --rounds 2 --out docs/bench/train_whole_compile.txt

``--whole`` times two whole commands instead, each in a fresh process from start to exit, one
after the other (``--rounds`` times, alternating; medians): ``selfattn train --preset
shakespeare-char`` (start-up, data, training, evaluations, samples, plots, probes,
checkpoints: everything a user waits for) and ``benchmarks/nanogpt_style.py``, nanoGPT's
``train.py`` on its CPU recipe for the same model (its data prepared before the clock starts,
as nanoGPT's ``prepare.py`` runs apart), and ``selfattn train ... --sample-tokens 0`` (what the
sample written at each evaluation costs). Target: selfattn's wall time <= 0.9x nanoGPT-style's,
at an equal or lower final validation loss (each over its own 20 evaluation batches). The
report also gives each run's median iteration (selfattn's from its metrics.jsonl, nanoGPT-style's
from its log lines), to show the machine's drift, and splits each contender's median wall time
into its iterations and the rest (start-up, evaluations, samples, plots, checkpoints, exit).
``--whole --compile`` adds ``selfattn train ... --compile`` twice per round: with inductor's
compiled-code cache empty (cold: the first compiled run on a machine) and then kept (warm), and
reads from each run's metrics.jsonl how long its first iteration took (the compilation) and its
median later iteration, so the report says after how many iterations --compile pays.

The recipe is the ``shakespeare-char`` preset (4 layers, 4 heads, emb 128, context 64, batch 12,
2000 iterations, AdamW 1e-3 with warm-up and cosine decay, clipping 1.0, fp32, dropout 0) for
both contenders:

    selfattn   selfattn.models.gpt.GPT: the chapter's GPT on selfattn's MultiHeadAttention
    plain      `PlainGPT` below: the same architecture written directly in PyTorch, one fused
               qkv Linear, nn.LayerNorm, F.gelu, and F.scaled_dot_product_attention

Both start from the same weights (the plain model loads selfattn's initial ones), see the same
batches and use the same optimizer and schedule (selfattn.train's), so the first loss must agree
(checked before any timing) and the curves should stay close. They train in alternating chunks of
``--chunk`` iterations (round-robin: a busy moment of the machine slows both alike); only the
training steps are timed, not the evaluations.

Reported: ms per iteration (total time / iterations) and the ratio selfattn / plain (target
<= 1.10), tokens/s, achieved GFLOP/s and % of the machine's fp32 matmul peak (FLOPs per token
6·N + 12·n_layers·T·E, N the non-embedding parameters, as nanoGPT's MFU estimate), the
validation loss every ``eval_every`` iterations and at the end over ``--final-eval-iters``
batches (target for selfattn <= 1.90), and a sample from the trained selfattn model. Targets
are judged only for the full recipe (not with --quick or --iters); exit status 1 when one is
missed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import selfattn  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfattn.bench import machine
from selfattn.bench.timing import matmul_peak
from selfattn.models.gpt import GPT
from selfattn.train.data import Batches, CharTokenizer, encode_splits, read_corpus
from selfattn.train.loop import make_optimizer, sample
from selfattn.train.presets import PRESETS
from selfattn.train.schedule import learning_rate

TARGET_RATIO = 1.10  # selfattn's time per iteration / plain's
TARGET_VAL_LOSS = 1.90  # selfattn's final validation loss
FIRST_LOSS_TOLERANCE = 1e-4  # the two models' first loss, same weights and batch


# ------------------------------------------------------------------------------ the plain model


class PlainBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x)). x (B, T, E) -> (B, T, E)."""

    def __init__(self, emb: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(emb)
        self.qkv = nn.Linear(emb, 3 * emb, bias=False)
        self.proj = nn.Linear(emb, emb)
        self.ln2 = nn.LayerNorm(emb)
        self.fc = nn.Linear(emb, 4 * emb)
        self.out = nn.Linear(4 * emb, emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(E, dim=-1)  # (B, T, E) each
        q, k, v = (t.view(B, T, self.heads, E // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, E))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """idx (B, T) -> logits (B, T, V): token + position embeddings, blocks, LayerNorm, head."""

    def __init__(self, vocab: int, context: int, emb: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, emb)
        self.pos = nn.Embedding(context, emb)
        self.blocks = nn.ModuleList([PlainBlock(emb, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(emb)
        self.head = nn.Linear(emb, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def load_from(self, gpt: GPT) -> None:
        """Copy selfattn GPT's weights (the same maths, other names; q, k, v fused)."""
        self.tok.weight.copy_(gpt.tok_emb.weight)
        self.pos.weight.copy_(gpt.pos_emb.weight)
        for mine, theirs in zip(self.blocks, gpt.trf_blocks, strict=True):
            att = theirs.att
            mine.qkv.weight.copy_(
                torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
            )
            mine.proj.load_state_dict(att.out_proj.state_dict())
            mine.fc.load_state_dict(theirs.ff.layers[0].state_dict())
            mine.out.load_state_dict(theirs.ff.layers[2].state_dict())
            for ln, norm in ((mine.ln1, theirs.norm1), (mine.ln2, theirs.norm2)):
                ln.weight.copy_(norm.scale)
                ln.bias.copy_(norm.shift)
        self.ln_f.weight.copy_(gpt.final_norm.scale)
        self.ln_f.bias.copy_(gpt.final_norm.shift)
        self.head.weight.copy_(gpt.out_head.weight)


# ------------------------------------------------------------------------------------ training


@dataclass
class Contender:
    name: str
    model: nn.Module
    batches: Batches
    optimizer: torch.optim.Optimizer = None
    iteration: int = 0
    seconds: float = 0.0
    chunks: list[float] = field(default_factory=list)  # seconds per iteration, per chunk
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iter, val loss)
    first_loss: float | None = None


def train_chunk(c: Contender, cfg, n: int) -> None:
    """``n`` training steps of ``c``: batch, forward, backward, clip, step (timed)."""
    c.model.train()
    start = time.perf_counter()
    for _ in range(n):
        lr = learning_rate(
            c.iteration, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
            decay_iters=cfg.lr_decay_iters,
        )  # fmt: skip
        for group in c.optimizer.param_groups:
            group["lr"] = lr
        x, y = c.batches.next_train()  # (B, T) each
        loss = F.cross_entropy(c.model(x).flatten(0, 1), y.flatten())
        c.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(c.model.parameters(), cfg.grad_clip)
        c.optimizer.step()
        if c.first_loss is None:
            c.first_loss = loss.item()
        c.iteration += 1
    elapsed = time.perf_counter() - start
    c.seconds += elapsed
    c.chunks.append(elapsed / n)


@torch.no_grad()
def val_loss(c: Contender, iters: int, seed: int) -> float:
    c.model.eval()
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(iters):
        x, y = c.batches.eval_batch("val", generator)
        total += F.cross_entropy(c.model(x).flatten(0, 1), y.flatten()).item()
    c.model.train()
    return total / iters


def flops_per_iteration(model: GPT, cfg) -> float:
    """nanoGPT's estimate: 6·N per token (N without the embeddings) + 12·n_layers·T·E."""
    n = sum(p.numel() for p in model.parameters())
    n -= model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    per_token = 6 * n + 12 * cfg.n_layers * cfg.block_size * cfg.emb_dim
    return per_token * cfg.batch_size * cfg.block_size


# ------------------------------------------------------------------------------------- the run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--whole", action="store_true", help="time the whole commands (see above)")
    p.add_argument("--rounds", type=int, default=1, help="--whole: runs of each, alternating")
    p.add_argument("--compile", action="store_true",
                   help="--whole: also time selfattn train --compile (torch.compile)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smoke test: 40 iterations, no targets")
    p.add_argument("--iters", type=int, default=None, help="default: the preset's 2000")
    p.add_argument("--chunk", type=int, default=50, help="iterations per round-robin turn")
    p.add_argument("--final-eval-iters", type=int, default=200, help="batches of the final loss")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=None, help="write the report here too")
    p.add_argument("--png", type=Path, default=None, help="draw both loss curves (matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.whole:
        return whole_commands(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PRESETS["shakespeare-char"].config.replace(seed=args.seed)
    if args.quick:
        cfg = cfg.replace(iters=40, eval_every=20, eval_iters=2, warmup_iters=5)
        args.chunk, args.final_eval_iters = 10, 4
    if args.iters:
        cfg = cfg.replace(iters=args.iters)
    corpus = read_corpus(None)
    tokenizer = CharTokenizer.from_text(corpus.text)
    splits = encode_splits(corpus, tokenizer, cfg.block_size)

    def batches() -> Batches:
        return Batches(splits, cfg.batch_size, cfg.block_size, cfg.seed)

    torch.manual_seed(cfg.seed)
    gpt = GPT(cfg.model_config(tokenizer.vocab_size))
    plain = PlainGPT(
        tokenizer.vocab_size, cfg.block_size, cfg.emb_dim, cfg.n_heads, cfg.n_layers
    )  # fmt: skip
    plain.load_from(gpt)
    contenders = [Contender("selfattn", gpt, batches()), Contender("plain", plain, batches())]
    for c in contenders:
        c.optimizer = make_optimizer(c.model, cfg)[0]

    check = check_first_step(contenders, cfg)
    peak = matmul_peak(torch.float32, "cpu")["gflops"]
    started = time.perf_counter()
    while contenders[0].iteration < cfg.iters:
        n = min(args.chunk, cfg.iters - contenders[0].iteration)
        for c in contenders:
            train_chunk(c, cfg, n)
        it = contenders[0].iteration
        if it % cfg.eval_every == 0 or it == cfg.iters:
            iters = args.final_eval_iters if it == cfg.iters else cfg.eval_iters
            for c in contenders:
                c.losses.append((it, val_loss(c, iters, cfg.seed + it)))
    wall = time.perf_counter() - started
    peak = max(peak, matmul_peak(torch.float32, "cpu")["gflops"])  # the best of before and after
    text = report(args, cfg, contenders, check, peak, wall, flops_per_iteration(gpt, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    text += "\nA sample of the trained selfattn model (temperature 1):\n\n"
    text += sample(gpt, tokenizer, 60 if args.quick else 300, generator) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.png:
        draw(args.png, contenders)
    return 0 if args.quick or "MISSED" not in text else 1


def check_first_step(contenders: list[Contender], cfg) -> str:
    """Same weights, same batch: the two forward passes must give the same loss."""
    losses = []
    for c in contenders:
        x, y = Batches(c.batches.splits, cfg.batch_size, cfg.block_size, cfg.seed).next_train()
        with torch.no_grad():
            losses.append(F.cross_entropy(c.model(x).flatten(0, 1), y.flatten()).item())
    gap = abs(losses[0] - losses[1])
    if gap > FIRST_LOSS_TOLERANCE:
        raise SystemExit(f"the contenders disagree before training: losses {losses}")
    return f"first batch, same weights: losses {losses[0]:.6f} / {losses[1]:.6f} (|gap| {gap:.1e})"


def report(args, cfg, contenders, check, peak, wall, flops) -> str:
    tokens = cfg.batch_size * cfg.block_size
    rows = []
    for c in contenders:
        per_iter = c.seconds / c.iteration
        gflops = flops / per_iter / 1e9
        rows.append(
            f"{c.name:<9} {per_iter * 1e3:9.2f} {tokens / per_iter:11,.0f} {gflops:9.2f} "
            f"{100 * gflops / peak:7.1f}% {c.losses[-1][1]:9.4f} {c.seconds:8.1f}"
        )
    ratio = contenders[0].seconds / contenders[1].seconds
    chunk_ratios = sorted(
        a / b for a, b in zip(contenders[0].chunks, contenders[1].chunks, strict=True)
    )
    median_ratio = chunk_ratios[len(chunk_ratios) // 2]
    final = contenders[0].losses[-1][1]
    lines = [
        "selfattn train benchmark: shakespeare-char, selfattn's GPT vs a plain-PyTorch GPT",
        f"machine: {machine.summary()}",
        f"fp32 matmul peak: {peak:.1f} GFLOP/s; wall time {wall:.1f} s (both, with evaluations)",
        f"recipe: {cfg.n_layers} layers, {cfg.n_heads} heads, emb {cfg.emb_dim}, context "
        f"{cfg.block_size}, batch {cfg.batch_size}, {cfg.iters} iterations, lr {cfg.lr:g} -> "
        f"{cfg.min_lr:g}, round-robin chunks of {args.chunk}",
        f"check: {check}",
        f"FLOPs per iteration: {flops / 1e9:.3f} GFLOP (6·N + 12·n_layers·T·E per token)",
        "",
        "contender  ms/iter    tokens/s  GFLOP/s  % peak  val loss  train s",
        *rows,
        "",
        f"time per iteration, selfattn / plain: {ratio:.3f} (median over chunks "
        f"{median_ratio:.3f})",
    ]
    if args.quick or cfg.iters != PRESETS["shakespeare-char"].config.iters:
        lines.append("targets not judged: not the full recipe")
    else:
        ok_ratio = "ok" if ratio <= TARGET_RATIO else "MISSED"
        ok_loss = "ok" if final <= TARGET_VAL_LOSS else "MISSED"
        lines += [
            f"target: ratio <= {TARGET_RATIO:.2f}: {ok_ratio}",
            f"target: selfattn final validation loss <= {TARGET_VAL_LOSS:.2f} "
            f"({args.final_eval_iters} batches): {final:.4f} {ok_loss}",
        ]
    lines += ["", "validation loss   iter  selfattn     plain"]
    for (it, a), (_, b) in zip(contenders[0].losses, contenders[1].losses, strict=True):
        lines.append(f"{'':17} {it:5d} {a:9.4f} {b:9.4f}")
    return "\n".join(lines) + "\n"


def draw(path: Path, contenders: list[Contender]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), dpi=110)
    ax = fig.add_subplot()
    for c in contenders:
        ax.plot(*zip(*c.losses, strict=True), "o-", ms=3, label=c.name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss")
    ax.set_title("shakespeare-char: selfattn GPT vs plain PyTorch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------ the whole commands

TARGET_WHOLE = 0.90  # selfattn's whole command / the nanoGPT-style script's, wall time
COLD = "selfattn --compile, cold"  # inductor's cache empty: the first compiled run on a machine
WARM = "selfattn --compile, warm"  # a second run: the compiled kernels come from the cache
NO_SAMPLES = "selfattn --sample-tokens 0"  # what the samples at each evaluation cost


def whole_commands(args) -> int:
    """``--whole``: both commands from process start to exit, alternating; medians."""
    import json
    import subprocess
    import tempfile

    from nanogpt_style import prepare  # beside this file

    iters = 40 if args.quick else (args.iters or PRESETS["shakespeare-char"].config.iters)
    compiled = [COLD, WARM] if args.compile else []
    names = ["selfattn", "nanogpt-style", NO_SAMPLES, *compiled]
    walls: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in names if "selfattn" in name}
    nanogpt_steps: list[float] = []  # each nanoGPT-style run's median iteration, from its log
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(read_corpus(None).text, tmp / "data")  # not timed: nanoGPT's prepare.py
        for r in range(args.rounds):
            selfattn = [sys.executable, "-m", "selfattn", "train", "--preset", "shakespeare-char",
                        "--quiet", "--iters", str(iters)]  # fmt: skip
            runs = {
                "selfattn": [*selfattn, "--out", str(tmp / f"run{r}")],
                "nanogpt-style": [sys.executable, str(Path(__file__).with_name("nanogpt_style.py")),
                                  "--data", str(tmp / "data"), "--out", str(tmp / f"ng{r}"),
                                  "--iters", str(iters)],
                NO_SAMPLES: [*selfattn, "--sample-tokens", "0", "--out", str(tmp / f"plain{r}")],
                COLD: [*selfattn, "--compile", "--out", str(tmp / f"cold{r}")],
                WARM: [*selfattn, "--compile", "--out", str(tmp / f"warm{r}")],
            }  # fmt: skip
            # inductor's compiled-code cache: new for each round's first compiled run (cold),
            # kept for its second (warm), as a user's second run on one machine finds it
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / f"inductor{r}"))
            for name in names:
                start = time.perf_counter()
                done = subprocess.run(runs[name], capture_output=True, text=True, check=True,
                                      env=env)  # fmt: skip
                walls[name].append(time.perf_counter() - start)
                if name in steps:
                    records = [json.loads(line) for line in (Path(runs[name][-1]) /
                               "metrics.jsonl").read_text().splitlines()]  # fmt: skip
                    losses[name].append(records[-1]["val_loss"])
                    steps[name].append(step_times(records))
                else:
                    losses[name].append(float(done.stdout.split()[-1]))
                    nanogpt_steps.append(nanogpt_step_time(done.stdout))
                print(f"round {r + 1} {name}: {walls[name][-1]:.1f} s", file=sys.stderr)
    text = whole_report(args, iters, walls, losses, steps, nanogpt_steps, load_before)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0 if args.quick or "MISSED" not in text else 1


def step_times(records: list[dict]) -> tuple[float, float]:
    """(seconds to the end of the first iteration, median seconds per later iteration that
    ends without an evaluation), from a run's metrics.jsonl: elapsed_s is counted from the
    start of the loop, so the first covers torch.compile's compilation when there is one."""
    pairs = itertools.pairwise(records)  # an evaluation runs after its record
    plain = [b["elapsed_s"] - a["elapsed_s"] for a, b in pairs if "val_loss" not in a]
    return records[0]["elapsed_s"], statistics.median(plain)


def nanogpt_step_time(stdout: str) -> float:
    """The median seconds of the nanoGPT-style script's iterations that run no evaluation, from
    its log lines ``iter N: loss X, time Yms`` (an evaluation runs at the start of iteration N
    when N is a multiple of the interval; its time counts in that iteration's line)."""
    from nanogpt_style import EVAL_INTERVAL  # beside this file

    times = []
    for line in stdout.splitlines():
        if line.startswith("iter "):
            it, _, rest = line[len("iter ") :].partition(":")
            if int(it) % EVAL_INTERVAL:
                times.append(float(rest.rpartition("time ")[2].removesuffix("ms")) / 1e3)
    return statistics.median(times)


def whole_report(args, iters, walls, losses, steps, nanogpt_steps, load_before) -> str:
    med = {name: statistics.median(w) for name, w in walls.items()}
    ratio = med["selfattn"] / med["nanogpt-style"]
    per_iter = statistics.median(s[1] for s in steps["selfattn"])
    nanogpt_iter = statistics.median(nanogpt_steps)
    lines = [
        "whole commands: selfattn train --preset shakespeare-char vs a nanoGPT-style train.py",
        f"machine: {machine.summary()}",
        f"load average before: {load_before}; after: {machine.load_average()}",
        f"{iters} iterations each, {args.rounds} round(s), alternating, medians",
        "",
        "contender                  wall s (median)  runs                        final val loss",
    ]
    for name, w in walls.items():
        runs = ", ".join(f"{x:.1f}" for x in w)
        vals = ", ".join(f"{x:.4f}" for x in losses[name])
        lines.append(f"{name:<26} {med[name]:15.1f}  {runs:<27} {vals}")
    lines += [
        "",
        f"wall time, selfattn / nanoGPT-style: {ratio:.3f}",
        f"wall time, {NO_SAMPLES} / nanoGPT-style: {med[NO_SAMPLES] / med['nanogpt-style']:.3f}"
        f" (the samples at the evaluations: {med['selfattn'] - med[NO_SAMPLES]:.1f} s)",
        "each round's selfattn / nanoGPT-style (the runs side by side): "
        + ", ".join(
            f"{a / b:.3f}" for a, b in zip(walls["selfattn"], walls["nanogpt-style"], strict=True)
        ),
        "the machine's drift, each run's median iteration (ms; selfattn's metrics.jsonl, "
        "nanoGPT-style's log): "
        + "; ".join(
            f"{name} " + ", ".join(f"{s[1] * 1e3:.1f}" for s in runs)
            for name, runs in steps.items()
        )
        + "; nanogpt-style "
        + ", ".join(f"{s * 1e3:.1f}" for s in nanogpt_steps),
        f"per iteration (the median of those): selfattn {per_iter * 1e3:.1f} ms, nanoGPT-style "
        f"{nanogpt_iter * 1e3:.1f} ms: {per_iter / nanogpt_iter:.3f}x; the rest of the wall time "
        "(start-up, evaluations, samples, plots, checkpoints, exit): "
        f"selfattn {med['selfattn'] - iters * per_iter:.1f} s, nanoGPT-style "
        f"{med['nanogpt-style'] - iters * nanogpt_iter:.1f} s",
    ]
    if COLD in med:
        first = {name: statistics.median(s[0] for s in runs) for name, runs in steps.items()}
        step = {name: statistics.median(s[1] for s in runs) for name, runs in steps.items()}
        lines += [
            *(f"wall time, {name} / nanoGPT-style: {med[name] / med['nanogpt-style']:.3f}"
              for name in (COLD, WARM)),
            "",
            "from metrics.jsonl          first iteration s  later iterations ms (median)",
            *(f"{name:<27} {first[name]:17.2f}  {step[name] * 1e3:28.2f}" for name in steps),
        ]  # fmt: skip
        for name in (COLD, WARM):
            saved = step["selfattn"] - step[name]
            cost = first[name] - first["selfattn"]
            pays = f"it pays after about {cost / saved:,.0f} iterations" if saved > 0 else "never"
            lines.append(
                f"{name}: {cost:.1f} s to compile, {step[name] / step['selfattn']:.2f}x the "
                f"time per iteration: {pays}"
            )
    if args.quick or iters != PRESETS["shakespeare-char"].config.iters:
        lines.append("targets not judged: not the full recipe")
    else:
        val_ok = statistics.median(losses["selfattn"]) <= statistics.median(losses["nanogpt-style"])
        lines += [
            f"target: wall <= {TARGET_WHOLE:.2f}x: {'ok' if ratio <= TARGET_WHOLE else 'MISSED'}",
            f"target: validation loss <= nanoGPT-style's: {'ok' if val_ok else 'MISSED'}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
