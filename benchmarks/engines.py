"""Engine benchmarks: the tiled (FlashAttention) engine against SDPA and the naive reference.

    python benchmarks/engines.py [--quick] [--repeats N] [--cases 1,2,3,4,5]

fp32, B=1, E=64, on the CPU. Every case first checks that the contenders agree (on the very
inputs it times), then times them interleaved (so a busy machine slows all alike) and reports
medians:

1. forward, L=4096, H=8: tiled vs sdpa                          target: tiled >= 0.8x sdpa's speed
2. forward, L=8192, H=8: tiled causal vs tiled full             target: causal >= 1.7x faster
3. forward, L=8192, H=8, window 256: tiled vs sdpa + dense mask target: tiled >= 2x faster
4. peak extra memory of forward + backward, H=1, each in a fresh process (ru_maxrss after the
   inputs exist, subtracted): tiled at L=16384 vs naive at L=8192 (target <= 1/8) and vs sdpa at
   L=16384 (target <= 2x)
5. forward at L=131072, H=1 (causal and full): completes; time and memory

The internal flag ``--memory-case NAME`` runs one memory case and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
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

from selfattn.masks import causal_mask

E = 64
FP32_TOL = 2e-4  # max abs difference between engines on the benchmark inputs (|out| ~ 1)


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


def check_close(name: str, results: dict[str, torch.Tensor]) -> float:
    """Max abs difference of every result against the first; raises when above FP32_TOL."""
    (first, ref), *others = results.items()
    worst = 0.0
    for other, out in others:
        err = (out - ref).abs().max().item()
        worst = max(worst, err)
        if not err <= FP32_TOL:
            raise SystemExit(f"{name}: {other} differs from {first} by {err:.2e} > {FP32_TOL}")
    return worst


def time_interleaved(
    fns: dict[str, Callable[[], torch.Tensor]], repeats: int, check: str | None = None
) -> dict[str, float]:
    """Warm up (and, given a ``check`` name, check that the results agree), then time the
    functions round-robin, so that a busy machine slows all of them alike. Medians, in s."""
    with torch.no_grad():
        warm = {name: fn() for name, fn in fns.items()}
        if check:
            check_close(check, warm)
        del warm
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


@dataclass
class Row:
    case: str
    contender: str
    seconds: float | None = None
    flops: int | None = None  # for GFLOP/s
    measured: str = ""
    target: str = ""
    ok: bool | None = None

    def cells(self) -> list[str]:
        gflops = self.flops / self.seconds / 1e9 if self.flops and self.seconds else None
        return [
            self.case,
            self.contender,
            "" if self.seconds is None else f"{self.seconds * 1e3:,.0f} ms",
            "" if gflops is None else f"{gflops:.0f}",
            self.measured,
            self.target,
            {None: "", True: "[green]PASS[/green]", False: "[red]MISS[/red]"}[self.ok],
        ]


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


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (getrusage)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    """Resident memory now (Linux); elsewhere the peak so far, which may overstate it."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return max_rss_bytes()


def anon_rss_bytes() -> int | None:
    """Resident anonymous memory now (Linux): the tensors, without the mapped library code."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return int(kib) * 1024 or None


class PeakSampler(threading.Thread):
    """Samples anonymous RSS every millisecond (torch ops release the GIL) and keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = anon_rss_bytes() or 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, anon_rss_bytes() or 0)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, anon_rss_bytes() or 0)


def run_memory_case(name: str) -> None:
    """In this (fresh) process: warm up at a small size, allocate the inputs, then run the case
    once; print the peak memory growth and the time as one JSON line.

    ``extra_bytes`` is ru_maxrss after the case minus the resident memory just before it. Where
    /proc gives it (Linux), the peak of *anonymous* memory is sampled as well, and is the number
    reported: the plain peak RSS also counts library code paged in (or back in) while the case
    runs, which made it swing by hundreds of MiB between runs on a busy machine.
    """
    backend, length, heads, backward, is_causal = MEMORY_CASES[name]
    small = qkv(64, heads, grad=backward)  # load kernels and libraries before the baseline
    out = attention(*small, backend, is_causal=is_causal)
    if backward:
        out.sum().backward()
    del small, out

    q, k, v = qkv(length, heads, grad=backward)
    grad_out = torch.randn(1, heads, length, E) if backward else None
    rss_before, anon_before = rss_bytes(), anon_rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if backward:
        out = attention(q, k, v, backend, is_causal=is_causal)
        out.backward(grad_out)
    else:
        with torch.no_grad():
            out = attention(q, k, v, backend, is_causal=is_causal)
    seconds = time.perf_counter() - start
    anon_peak = sampler.stop()
    rss_extra = max_rss_bytes() - rss_before
    anon_extra = None if anon_before is None else anon_peak - anon_before
    finite = bool(out.isfinite().all()) and (not backward or bool(q.grad.isfinite().all()))
    result = {
        "extra_bytes": rss_extra if anon_extra is None else anon_extra,
        "maxrss_extra_bytes": rss_extra,
        "s": seconds,
        "ok": finite,
    }
    print(json.dumps(result))


def memory_case(name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory case {name} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"memory case {name}: non-finite output or gradient")
    return result


# -------------------------------------------------------------------------------- the report


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load}"
    )


def bench_forward(repeats: int) -> list[Row]:
    """1. tiled vs sdpa, forward."""
    q, k, v = qkv(4096, 8)
    t = time_interleaved(
        {"sdpa": lambda: attention(q, k, v, "sdpa"), "tiled": lambda: attention(q, k, v, "tiled")},
        repeats,
        check="L=4096",
    )
    speed, n = t["sdpa"] / t["tiled"], flops(8, 4096, 4096)
    return [
        Row("1. fwd L=4096 H=8", "sdpa", t["sdpa"], n),
        Row("", "tiled", t["tiled"], n, f"{speed:.2f}x sdpa", ">= 0.8x", speed >= 0.8),
    ]


def bench_causal(repeats: int) -> list[Row]:
    """2. causal vs full, tiled, forward (causal checked against sdpa first)."""
    q, k, v = qkv(8192, 8, seed=1)
    with torch.no_grad():
        causal = {b: attention(q, k, v, b, is_causal=True) for b in ("sdpa", "tiled")}
        check_close("causal L=8192", causal)
        del causal
    t = time_interleaved(
        {
            "full": lambda: attention(q, k, v, "tiled"),
            "causal": lambda: attention(q, k, v, "tiled", is_causal=True),
        },
        repeats,
    )
    speed = t["full"] / t["causal"]
    return [
        Row("2. fwd L=8192 H=8", "tiled full", t["full"], flops(8, 8192, 8192)),
        Row(
            "", "tiled causal", t["causal"], flops(8, 8192, 8192, is_causal=True),
            f"{speed:.2f}x faster", ">= 1.7x", speed >= 1.7,
        ),
    ]  # fmt: skip


def bench_window(repeats: int) -> list[Row]:
    """3. sliding window: tiled skips blocks, sdpa computes everything under a dense mask."""
    q, k, v = qkv(8192, 8, seed=2)
    dense = causal_mask(8192, 8192, window=256)  # (L, L) bool, built once, outside the timing
    t = time_interleaved(
        {
            "sdpa": lambda: attention(q, k, v, "sdpa", attn_mask=dense),
            "tiled": lambda: attention(q, k, v, "tiled", is_causal=True, window=256),
        },
        repeats,
        check="window 256",
    )
    speed, n = t["sdpa"] / t["tiled"], flops(8, 8192, 8192, is_causal=True, window=256)
    return [
        Row("3. fwd L=8192 H=8 W=256", "sdpa + dense mask", t["sdpa"], n),
        Row("", "tiled window", t["tiled"], n, f"{speed:.1f}x faster", ">= 2x", speed >= 2.0),
    ]


def bench_memory() -> list[Row]:
    """4. peak extra memory of forward + backward, each case in a fresh process."""
    mem = {name: memory_case(name) for name in ("naive-8k", "sdpa-16k", "tiled-16k")}
    mib = {name: r["extra_bytes"] / 2**20 for name, r in mem.items()}
    vs_naive = mib["tiled-16k"] / max(mib["naive-8k"], 1e-9)
    vs_sdpa = mib["tiled-16k"] / max(mib["sdpa-16k"], 1e-9)
    return [
        Row("4. fwd+bwd memory H=1", "naive L=8192", mem["naive-8k"]["s"],
            measured=f"{mib['naive-8k']:,.0f} MiB"),
        Row("", "sdpa L=16384", mem["sdpa-16k"]["s"], measured=f"{mib['sdpa-16k']:,.0f} MiB"),
        Row("", "tiled L=16384", mem["tiled-16k"]["s"], measured=f"{mib['tiled-16k']:,.0f} MiB"),
        Row("", "tiled 16k / naive 8k", measured=f"1/{1 / max(vs_naive, 1e-9):.0f}",
            target="<= 1/8", ok=vs_naive <= 1 / 8),
        Row("", "tiled 16k / sdpa 16k", measured=f"{vs_sdpa:.2f}x", target="<= 2x",
            ok=vs_sdpa <= 2.0),
    ]  # fmt: skip


def bench_long(quick: bool) -> list[Row]:
    """5. a long single-head forward (its own process: time and peak extra memory)."""
    rows = []
    for name in ("tiled-32k",) if quick else ("tiled-128k-causal", "tiled-128k"):
        r = memory_case(name)
        _, length, _, _, is_causal = MEMORY_CASES[name]
        label = "" if rows else f"5. fwd L={length} H=1"
        n = flops(1, length, length, is_causal=is_causal)
        contender = "tiled causal" if is_causal else "tiled full"
        memory = f"{r['extra_bytes'] / 2**20:,.0f} MiB"
        rows.append(Row(label, contender, r["s"], n, memory, "completes", True))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; L=32768 for case 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender")
    parser.add_argument(
        "--cases", default="1,2,3,4,5", help="which of the numbered cases to run (default: all)"
    )
    parser.add_argument("--memory-case", choices=sorted(MEMORY_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        run_memory_case(args.memory_case)
        return 0

    repeats = args.repeats or (3 if args.quick else 7)
    console = Console()
    console.print(f"[bold]selfattn engines[/bold]: fp32, B=1, E={E}; {machine()}")
    table = Table("case", "contender", "median", "GFLOP/s", "measured", "target", "")
    sections = {
        "1": lambda: bench_forward(repeats),
        "2": lambda: bench_causal(repeats),
        "3": lambda: bench_window(repeats),
        "4": bench_memory,
        "5": lambda: bench_long(args.quick),
    }
    chosen = [c.strip() for c in args.cases.split(",")]
    if unknown := [c for c in chosen if c not in sections]:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(sections)}")
    missed = 0
    for section in (sections[c] for c in chosen):
        for row in section():
            table.add_row(*row.cells())
            missed += row.ok is False
        table.add_section()
    console.print(table)
    console.print(
        "GFLOP/s counts 4·E per visible (query, key) pair. Memory: peak RSS growth over the "
        "inputs, one fresh process per case."
    )
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
