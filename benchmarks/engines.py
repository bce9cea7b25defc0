"""Engine benchmarks: the tiled (FlashAttention) and fused engines against SDPA and the naive
reference.

    python benchmarks/engines.py [--quick] [--repeats N] [--cases 1,2,3,4,5,6,7] [--out FILE]
    python benchmarks/engines.py --scale 64 --repeats 1     # a smoke test, in seconds

fp32, B=1, E=64, on the CPU. Every case first checks that the contenders agree (on the very
inputs it times), then times them round-robin (so a busy machine slows all alike) and reports
medians. Timing, peak memory and the machine's description come from `selfattn.bench` (its
`timing.interleaved`, `memory.peak_bytes` and `machine.summary`), the harness behind
`selfattn bench`.

1. forward, L=4096, H=8: tiled vs sdpa                          target: tiled >= 0.8x sdpa's speed
2. forward, L=8192, H=8: tiled causal vs tiled full             target: causal >= 1.7x faster
3. forward, L=8192, H=8, window 256: tiled vs sdpa + dense mask target: tiled >= 2x faster
4. peak extra memory of forward + backward, H=1, each in a fresh process (the kernel's
   high-water mark of the resident size, reset just before the call, minus the resident size
   then): tiled at L=16384 vs naive at L=8192 (target <= 1/8) and vs sdpa at L=16384
   (target <= 2x)
5. forward at L=131072, H=1 (causal and full): completes; time and memory
6. forward + backward with the lse, L=4096, H=8, causal: fused (and tiled) vs sdpa's forward +
   backward without the lse                                    target: fused >= 0.95x sdpa's speed
7. case 6 while a second process that this script starts keeps one core busy (it says so)
                                                               target: fused >= 0.85x sdpa's speed,
                                                               tiled's ratio shown beside it

``--scale N`` divides every length (and the window) by N, for a quick check that the script
runs; targets are judged only at full size. Exit status 1 when a judged target is missed or the
contenders disagree. The internal flag ``--memory-case NAME`` runs one memory case and prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

try:
    import selfattn
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import selfattn

from selfattn.bench import machine
from selfattn.bench.checks import row_errors
from selfattn.bench.memory import peak_bytes
from selfattn.bench.timing import interleaved
from selfattn.masks import causal_mask

E = 64
# The worst query row's ||out - out_first|| / ||out_first|| between two engines (fp32).
AGREEMENT = 1e-4


# ------------------------------------------------------------------------------------ helpers


def qkv(length: int, heads: int, *, grad: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, heads, length, E, generator=gen).requires_grad_(grad) for _ in range(3)
    )


def attention(q, k, v, backend: str, **kw):
    return selfattn.attention(q, k, v, backend=backend, **kw)


def flops(heads: int, lq: int, lk: int, *, is_causal=False, window: int | None = None) -> int:
    """Forward FLOPs, 4·E per visible (query, key) pair and head (two matmuls), B=1."""
    seen = lq * lk
    if is_causal:
        last = torch.arange(lq) + (lk - lq)  # bottom-right: the last key each query sees
        first = torch.zeros(lq, dtype=torch.long) if window is None else last - window + 1
        seen = int((last.clamp(max=lk - 1) - first.clamp(min=0) + 1).clamp(min=0).sum())
    return 4 * E * heads * seen


def check_agree(name: str, results: dict[str, torch.Tensor], *, floored: bool = False) -> float:
    """The worst row's relative difference of every result (B, H, L, E) from the first; exits
    with status 1 above AGREEMENT. ``floored``: each row's norm floored at the median row's
    (for gradients, whose early causal rows are near 0, as `selfattn.bench.checks` does)."""
    (first, ref), *others = results.items()
    ref = ref.double()
    floor = torch.linalg.vector_norm(ref, dim=-1).median() if floored else 0.0
    worst = 0.0
    for other, out in others:
        err = float(row_errors(out, ref, floor).max())
        worst = max(worst, err)
        if not err <= AGREEMENT:
            raise SystemExit(f"{name}: {other} differs from {first} by {err:.2e} > {AGREEMENT}")
    return worst


def time_forward(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, check: str | None = None
) -> dict[str, float]:
    """Check that the forward results agree (given a ``check`` name; the call doubles as a
    warm-up), then time the functions round-robin under no_grad. Medians, in seconds."""
    with torch.no_grad():
        if check:
            check_agree(check, {name: fn() for name, fn in fns.items()})
        samples = interleaved(fns, repeats, warmup=0 if check else 1)
    return {name: statistics.median(s) for name, s in samples.items()}


@dataclass
class Row:
    case: str
    contender: str
    seconds: float | None = None
    flops: int | None = None  # for GFLOP/s
    measured: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target, or not judged at this size

    def cells(self) -> list[str]:
        gflops = self.flops / self.seconds / 1e9 if self.flops and self.seconds else None
        verdict = {None: "", True: "[green]PASS[/green]", False: "[red]MISS[/red]"}[self.ok]
        if self.target and self.ok is None:
            verdict = "[dim]not judged[/dim]"
        return [
            self.case,
            self.contender,
            "" if self.seconds is None else f"{self.seconds * 1e3:,.0f} ms",
            "" if gflops is None else f"{gflops:.0f}",
            self.measured,
            self.target,
            verdict,
        ]


@dataclass(frozen=True)
class Size:
    """The lengths of a run: full size, or every length divided by ``scale`` (smoke tests)."""

    scale: int = 1

    def __call__(self, length: int) -> int:
        return max(64, length // self.scale)

    @property
    def window(self) -> int:
        return max(16, 256 // self.scale)

    def judge(self, ok: bool) -> bool | None:
        """Targets hold at full size only: a scaled run reports them without a verdict."""
        return ok if self.scale == 1 else None


# ------------------------------------------------------------------------------ memory cases

MEMORY_CASES = {
    # name: (backend, length, heads, backward, is_causal)
    "tiled-16k": ("tiled", 16384, 1, True, False),
    "naive-8k": ("naive", 8192, 1, True, False),
    "sdpa-16k": ("sdpa", 16384, 1, True, False),
    "tiled-128k-causal": ("tiled", 131072, 1, False, True),
    "tiled-128k": ("tiled", 131072, 1, False, False),
    "tiled-32k": ("tiled", 32768, 1, False, False),
}


def run_memory_case(name: str, size: Size) -> None:
    """In this (fresh) process: warm up at a small size, allocate the inputs, then run the case
    once under `peak_bytes`; print the peak memory growth and the time as one JSON line."""
    backend, length, heads, backward, is_causal = MEMORY_CASES[name]
    # Warm up on a shorter case that still spans several tiles and wakes the thread pool, so
    # that libraries, kernels and thread stacks are resident before the baseline.
    small = qkv(min(size(length), 1024), heads, grad=backward)
    out = attention(*small, backend, is_causal=is_causal)
    if backward:
        out.backward(torch.randn_like(out))
    del small, out

    q, k, v = qkv(size(length), heads, grad=backward)
    grad_out = torch.randn_like(q) if backward else None
    result: dict = {}

    def call() -> None:
        start = time.perf_counter()
        if backward:
            out = attention(q, k, v, backend, is_causal=is_causal)
            out.backward(grad_out)
        else:
            with torch.no_grad():
                out = attention(q, k, v, backend, is_causal=is_causal)
        result["s"] = time.perf_counter() - start
        result["ok"] = bool(out.isfinite().all()) and (
            not backward or bool(q.grad.isfinite().all())
        )

    result["extra_bytes"] = peak_bytes(call)
    print(json.dumps(result))


def memory_case(name: str, size: Size) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", name]
    cmd += ["--scale", str(size.scale)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory case {name} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"memory case {name}: non-finite output or gradient")
    return result


# -------------------------------------------------------------------------------- the cases


def bench_forward(repeats: int, size: Size) -> list[Row]:
    """1. tiled vs sdpa, forward."""
    n = size(4096)
    q, k, v = qkv(n, 8)
    t = time_forward(
        {"sdpa": lambda: attention(q, k, v, "sdpa"), "tiled": lambda: attention(q, k, v, "tiled")},
        repeats,
        check=f"L={n}",
    )
    speed, work = t["sdpa"] / t["tiled"], flops(8, n, n)
    return [
        Row(f"1. fwd L={n} H=8", "sdpa", t["sdpa"], work),
        Row("", "tiled", t["tiled"], work, f"{speed:.2f}x sdpa", ">= 0.8x",
            size.judge(speed >= 0.8)),
    ]  # fmt: skip


def bench_causal(repeats: int, size: Size) -> list[Row]:
    """2. causal vs full, tiled, forward (causal checked against sdpa first)."""
    n = size(8192)
    q, k, v = qkv(n, 8, seed=1)
    with torch.no_grad():
        outs = {b: attention(q, k, v, b, is_causal=True) for b in ("sdpa", "tiled")}
        check_agree(f"causal L={n}", outs)
        del outs
    t = time_forward(
        {
            "full": lambda: attention(q, k, v, "tiled"),
            "causal": lambda: attention(q, k, v, "tiled", is_causal=True),
        },
        repeats,
    )
    speed = t["full"] / t["causal"]
    return [
        Row(f"2. fwd L={n} H=8", "tiled full", t["full"], flops(8, n, n)),
        Row(
            "", "tiled causal", t["causal"], flops(8, n, n, is_causal=True),
            f"{speed:.2f}x faster", ">= 1.7x", size.judge(speed >= 1.7),
        ),
    ]  # fmt: skip


def bench_window(repeats: int, size: Size) -> list[Row]:
    """3. sliding window: tiled skips blocks, sdpa computes everything under a dense mask."""
    n, w = size(8192), size.window
    q, k, v = qkv(n, 8, seed=2)
    dense = causal_mask(n, n, window=w)  # (L, L) bool, built once, outside the timing
    t = time_forward(
        {
            "sdpa": lambda: attention(q, k, v, "sdpa", attn_mask=dense),
            "tiled": lambda: attention(q, k, v, "tiled", is_causal=True, window=w),
        },
        repeats,
        check=f"window {w}",
    )
    speed, work = t["sdpa"] / t["tiled"], flops(8, n, n, is_causal=True, window=w)
    return [
        Row(f"3. fwd L={n} H=8 W={w}", "sdpa + dense mask", t["sdpa"], work),
        Row("", "tiled window", t["tiled"], work, f"{speed:.1f}x faster", ">= 2x",
            size.judge(speed >= 2.0)),
    ]  # fmt: skip


def bench_memory(size: Size) -> list[Row]:
    """4. peak extra memory of forward + backward, each case in a fresh process."""
    mem = {name: memory_case(name, size) for name in ("naive-8k", "sdpa-16k", "tiled-16k")}
    mib = {name: r["extra_bytes"] / 2**20 for name, r in mem.items()}
    vs_naive = mib["tiled-16k"] / max(mib["naive-8k"], 1e-9)
    vs_sdpa = mib["tiled-16k"] / max(mib["sdpa-16k"], 1e-9)
    short, long = size(8192), size(16384)
    return [
        Row("4. fwd+bwd memory H=1", f"naive L={short}", mem["naive-8k"]["s"],
            measured=f"{mib['naive-8k']:,.0f} MiB"),
        Row("", f"sdpa L={long}", mem["sdpa-16k"]["s"], measured=f"{mib['sdpa-16k']:,.0f} MiB"),
        Row("", f"tiled L={long}", mem["tiled-16k"]["s"],
            measured=f"{mib['tiled-16k']:,.0f} MiB"),
        Row("", f"tiled {long} / naive {short}", measured=f"1/{1 / max(vs_naive, 1e-9):.0f}",
            target="<= 1/8", ok=size.judge(vs_naive <= 1 / 8)),
        Row("", f"tiled {long} / sdpa {long}", measured=f"{vs_sdpa:.2f}x", target="<= 2x",
            ok=size.judge(vs_sdpa <= 2.0)),
    ]  # fmt: skip


def bench_long(quick: bool, size: Size) -> list[Row]:
    """5. a long single-head forward (its own process: time and peak extra memory)."""
    rows = []
    for name in ("tiled-32k",) if quick else ("tiled-128k-causal", "tiled-128k"):
        r = memory_case(name, size)
        _, length, _, _, is_causal = MEMORY_CASES[name]
        n = size(length)
        label = "" if rows else f"5. fwd L={n} H=1"
        work = flops(1, n, n, is_causal=is_causal)
        contender = "tiled causal" if is_causal else "tiled full"
        memory = f"{r['extra_bytes'] / 2**20:,.0f} MiB"
        rows.append(Row(label, contender, r["s"], work, memory, "completes", True))
    return rows


def time_forward_backward(fns: dict[str, Callable], repeats: int, check: str) -> dict[str, float]:
    """``fns``: name -> a call returning (out, dq, dk, dv). Check the contenders agree on out
    and dq (the call doubles as a warm-up), then time them round-robin; medians, in seconds."""
    first = {name: fn() for name, fn in fns.items()}
    check_agree(check + " out", {name: r[0].detach() for name, r in first.items()})
    # dq relative to the median row's norm: under the causal mask the first rows see few keys,
    # so their dq is near 0 (row 0's is 0 up to rounding), and a relative error there means
    # nothing.
    check_agree(check + " dq", {name: r[1] for name, r in first.items()}, floored=True)
    del first
    samples = interleaved(fns, repeats, warmup=0)
    return {name: statistics.median(s) for name, s in samples.items()}


def fwd_bwd(q, k, v, grad_out, backend: str, with_lse: bool):
    """One forward (with the lse, or without) and its backward: (out, dq, dk, dv)."""
    if with_lse:
        out, _ = selfattn.attention_with_lse(q, k, v, is_causal=True, backend=backend)
    else:
        out = attention(q, k, v, backend, is_causal=True)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def bench_lse(repeats: int, size: Size, *, busy: bool) -> list[Row]:
    """6 (idle) and 7 (busy): forward + backward with the lse, fused and tiled, vs sdpa's
    forward + backward without it."""
    n = size(4096)
    q, k, v = qkv(n, 8, grad=True, seed=3)
    grad_out = torch.randn_like(q)
    fns = {
        "sdpa": lambda: fwd_bwd(q, k, v, grad_out, "sdpa", False),
        "fused": lambda: fwd_bwd(q, k, v, grad_out, "fused", True),
        "tiled": lambda: fwd_bwd(q, k, v, grad_out, "tiled", True),
    }
    number, target = ("7", 0.85) if busy else ("6", 0.95)
    spinner = _busy_core() if busy else None
    try:
        t = time_forward_backward(fns, repeats, check=f"fwd+bwd L={n}")
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    work = 3 * flops(8, n, n, is_causal=True)  # backward about twice the forward
    fused, tiled = t["sdpa"] / t["fused"], t["sdpa"] / t["tiled"]
    load = "; 2nd process busy on 1 core" if busy else ""
    return [
        Row(f"{number}. fwd+bwd L={n} H=8 causal{load}", "sdpa (no lse)", t["sdpa"], work),
        Row("", "fused + lse", t["fused"], work, f"{fused:.2f}x sdpa", f">= {target}x",
            size.judge(fused >= target)),
        Row("", "tiled + lse", t["tiled"], work, f"{tiled:.2f}x sdpa"),
    ]  # fmt: skip


def _busy_core() -> subprocess.Popen:
    """A second process that keeps one core busy (a Python spin loop) until killed."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    Console(stderr=True).print(
        f"case 7: started a second process (pid {spinner.pid}) that keeps one core busy"
    )
    return spinner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; L=32768 for case 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument(
        "--cases",
        default="1,2,3,4,5,6,7",
        help="which of the numbered cases to run (default: all)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        metavar="N",
        help="divide every length by N (a smoke test; targets are judged at full size only)",
    )
    parser.add_argument("--out", metavar="FILE", help="also write the report as text to FILE")
    parser.add_argument("--memory-case", choices=sorted(MEMORY_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error(f"--scale must be >= 1, got {args.scale}")
    size = Size(args.scale)
    if args.memory_case:
        run_memory_case(args.memory_case, size)
        return 0

    repeats = args.repeats or (3 if args.quick else 7)
    sections = {
        "1": lambda: bench_forward(repeats, size),
        "2": lambda: bench_causal(repeats, size),
        "3": lambda: bench_window(repeats, size),
        "4": lambda: bench_memory(size),
        "5": lambda: bench_long(args.quick, size),
        "6": lambda: bench_lse(repeats, size, busy=False),
        "7": lambda: bench_lse(repeats, size, busy=True),
    }
    chosen = [c.strip() for c in args.cases.split(",")]
    if unknown := [c for c in chosen if c not in sections]:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(sections)}")
    console = Console(record=True, width=100 if args.out else None)
    scaled = f"; lengths / {size.scale}, targets not judged" if size.scale > 1 else ""
    console.print(f"[bold]selfattn engines[/bold]: fp32, B=1, E={E}{scaled}; {machine.summary()}")
    table = Table("case", "contender", "median", "GFLOP/s", "measured", "target", "")
    started = time.perf_counter()
    missed = 0
    for section in (sections[c] for c in chosen):
        for row in section():
            table.add_row(*row.cells())
            missed += row.ok is False
        table.add_section()
    console.print(table)
    console.print(
        "GFLOP/s counts 4·E per visible (query, key) pair. Memory: the peak resident size of one "
        "call beyond the inputs (the kernel's high-water mark), one fresh process per case. "
        f"{time.perf_counter() - started:.0f} s in all."
    )
    if args.out:
        Path(args.out).write_text(console.export_text())
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
