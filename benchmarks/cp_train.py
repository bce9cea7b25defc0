"""Context-parallel training: one char GPT's training iterations, split across C processes.

    python benchmarks/cp_train.py --out docs/bench/cp_train.txt   # context 8,192: minutes
    python benchmarks/cp_train.py --quick                         # context 1,024: a smoke run

The model is the shakespeare-char preset's (4 layers, 4 heads, emb 128, fp32, dropout 0) at a
context of ``--context`` tokens, batch 1, on tiny Shakespeare; each run is selfattn.train's own
loop (`selfattn.train.loop.train`) in fresh local processes (`selfattn.ring.run_local`, gloo on
loopback): one process with 2 threads (C=1, the engine "auto" picks), and C = 2 and 4 ranks of
one thread each, every attention layer on ring attention (`ContextParallel`: the ("data",
"context") mesh, zigzag shards, DDP over all ranks), as ``torchrun ... selfattn train
--context-parallel C`` runs it.

1. peak memory per rank during a training iteration (forward, backward, gradient all-reduce,
   clip, AdamW step): the kernel's high-water mark of the resident size over the iteration
   minus the resident size at its start (weights, optimizer state and batch are resident
   then), the largest over iterations 2..N-1 (the last one ends with an evaluation) and ranks.
      targets: C=2 <= 0.6x one process;  C=4 <= 0.6x C=2
2. time per iteration, median over iterations 2..N: C=2 (2 ranks of 1 thread, 2 cores) against
   one process of 2 threads. The two run ``--rounds`` times (default 3), alternating, and the
   ratio is that of their medians over the rounds: a machine whose speed drifts over minutes
   (a shared one) slows both alike.
      target: C=2 <= 1.0x one process
3. the first ``--iters`` (20) iterations' training losses: C=2 against one process.
      target: every |difference| <= 1e-4

Exit status 1 when a target is missed. The machine's load is printed: the figures are one run's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import selfattn  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from selfattn.bench import machine
from selfattn.bench.memory import reset_high_water_mark, status_bytes
from selfattn.ring import run_local

MIB = 2**20
LOSS_AGREEMENT = 1e-4
CORES = 2


# -------------------------------------------------------------- what runs in each fresh process


def _mark() -> int:
    """Reset the kernel's high-water mark to the resident size, and return that size."""
    if not reset_high_water_mark():
        raise SystemExit("cp_train.py measures memory through Linux's /proc/self/clear_refs")
    return status_bytes("VmRSS")


def train_run(context: int, iters: int, context_parallel: int | None) -> dict:
    """(In each rank.) ``iters`` iterations of selfattn.train's loop; this rank's losses, the
    wall time at the end of each iteration and each iteration's peak memory."""
    import torch.distributed as dist

    from selfattn.models.gpt import GPT
    from selfattn.train.config import TrainConfig
    from selfattn.train.context_parallel import ContextParallel
    from selfattn.train.data import Batches, CharTokenizer, encode_splits, read_corpus
    from selfattn.train.data_parallel import SINGLE
    from selfattn.train.loop import Hooks, Run, train

    cfg = TrainConfig(
        block_size=context, batch_size=1, n_layers=4, n_heads=4, emb_dim=128, dropout=0.0,
        iters=iters, warmup_iters=2, eval_every=10**6, eval_iters=1, sample_tokens=0,
    )  # fmt: skip
    if context_parallel is None:
        run_dist = SINGLE
    else:  # what torchrun's environment gives `selfattn train` (the group is already joined)
        os.environ.update(RANK=str(dist.get_rank()), WORLD_SIZE=str(dist.get_world_size()))
        run_dist = ContextParallel.from_env("cpu", context_parallel)
    corpus = read_corpus(None)
    tokenizer = CharTokenizer.from_text(corpus.text)
    splits = encode_splits(corpus, tokenizer, context)
    batches = run_dist.shard(
        Batches(splits, 1, context, cfg.seed, "cpu", run_dist.data_rank, run_dist.data_size)
    )
    torch.manual_seed(cfg.seed)
    model = GPT(
        cfg.model_config(tokenizer.vocab_size), context_parallel_group=run_dist.context_group
    )
    marks = {"times": [], "peaks": [], "base": 0}

    def on_step(record: dict) -> None:  # the end of an iteration: its time and peak
        marks["times"].append(time.perf_counter())
        marks["peaks"].append(status_bytes("VmHWM") - marks["base"])
        marks["base"] = _mark()

    with tempfile.TemporaryDirectory(prefix="cp_train_") as out:
        run = Run(cfg, model, tokenizer, batches, Path(out), title="cp_train")
        dist.barrier()
        marks["base"] = _mark()
        marks["times"].append(time.perf_counter())
        result = train(run, hooks=Hooks(on_step=[on_step]), dist=run_dist)
    dist.barrier()
    steps = [b - a for a, b in zip(marks["times"], marks["times"][1:], strict=False)]
    return {
        "losses": [r["train_loss"] for r in result.records],
        "steps": steps,
        "peaks": marks["peaks"],
    }


# ------------------------------------------------------------------------------- the report


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.missed: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def target(self, name: str, value: float, limit: float, unit: str = "x") -> None:
        ok = value <= limit
        self.say(
            f"    target {name}: {value:.3g}{unit} <= {limit:g}{unit}  {'MET' if ok else 'MISS'}"
        )
        if not ok:
            self.missed.append(name)


def _peak(ranks: list[dict]) -> int:
    """The largest peak over iterations 2..N-1 (N: an evaluation) and ranks."""
    return max(max(r["peaks"][1:-1]) for r in ranks)


def _step_time(ranks: list[dict]) -> float:
    """Median time per iteration over iterations 2..N, the slowest rank's."""
    return max(statistics.median(r["steps"][1:] or r["steps"]) for r in ranks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--iters", type=int, default=20, help="iterations of C=1 and C=2")
    parser.add_argument("--c4-iters", type=int, default=3, help="iterations of C=4 (memory; >= 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of C=1 and C=2")
    parser.add_argument("--quick", action="store_true", help="context 1,024, 6 iterations")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.iters, args.c4_iters, args.rounds = 1024, 6, 3, 1
    if min(args.iters, args.c4_iters) < 3:  # the first allocates gradients and AdamW's state
        parser.error("--iters and --c4-iters must be >= 3: iteration 2 is the first measured")
    # glibc: freed blocks over 64 KiB go back to the system (inherited by the ranks), so one
    # iteration's freed memory cannot hide the next one's growth in the high-water mark.
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rep = Report()
    rep.say(f"context-parallel training benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    rep.say(machine.summary())
    rep.say(f"char GPT: 4 layers, 4 heads, emb 128, context {args.context:,}, batch 1, fp32, "
            "dropout 0; selfattn.train's loop")  # fmt: skip
    started = time.perf_counter()
    kw = dict(timeout=3600.0, group_timeout=900.0)
    rounds: dict[int, list[list[dict]]] = {1: [], 2: []}
    for _ in range(max(1, args.rounds)):
        rounds[1].append(
            run_local(train_run, 1, args.context, args.iters, None, threads=CORES, **kw)
        )
        rounds[2].append(run_local(train_run, 2, args.context, args.iters, 2, **kw))
    single, c2 = rounds[1][0], rounds[2][0]  # memory and losses: the same in every round
    c4 = run_local(train_run, 4, args.context, args.c4_iters, 4, **kw)

    rep.say("1. peak memory per rank during a training iteration")
    peaks = {1: _peak(single), 2: _peak(c2), 4: _peak(c4)}
    for c, ranks in ((1, single), (2, c2), (4, c4)):
        per_rank = ", ".join(f"{_peak([r]) / MIB:.1f}" for r in ranks)
        who = "one process (2 threads)" if c == 1 else f"C={c} ({c} ranks of 1 thread)"
        rep.say(f"    {who:26s} {peaks[c] / MIB:8.1f} MiB max  (ranks: {per_rank})")
    rep.target("C=2 / one process", peaks[2] / peaks[1], 0.6)
    rep.target("C=4 / C=2", peaks[4] / peaks[2], 0.6)

    rep.say(f"2. time per iteration (median of iterations 2..N; {len(rounds[1])} alternating "
            "rounds, their median)")  # fmt: skip
    times = {c: [_step_time(ranks) for ranks in runs] for c, runs in rounds.items()}
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    each = {c: ", ".join(f"{t:.2f}" for t in ts) for c, ts in times.items()}
    rep.say(f"    one process, 2 threads: {t1:.2f} s ({each[1]});  C=2, 2 ranks of 1 thread: "
            f"{t2:.2f} s ({each[2]})")  # fmt: skip
    if args.c4_iters > 1:
        rep.say(f"    (C=4, 4 ranks on {os.cpu_count()} cores: {_step_time(c4):.2f} s, not judged)")
    rep.target("C=2 / one process", t2 / t1, 1.0)

    rep.say(f"3. the first {args.iters} iterations' training losses, C=2 against one process")
    one, two = single[0]["losses"], c2[0]["losses"]
    worst = max(abs(a - b) for a, b in zip(one, two, strict=True))
    rep.say(f"    one process: {one[0]:.4f} .. {one[-1]:.4f};  C=2: {two[0]:.4f} .. {two[-1]:.4f}")
    rep.target("largest |difference|", worst, LOSS_AGREEMENT, unit="")
    rep.say(f"total {time.perf_counter() - started:.0f} s; load average {machine.load_average()}")
    if rep.missed:
        rep.say("MISSED: " + ", ".join(rep.missed))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rep.lines) + "\n")
    return 1 if rep.missed else 0


if __name__ == "__main__":
    sys.exit(main())
