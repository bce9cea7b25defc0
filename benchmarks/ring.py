"""Ring attention benchmarks: P gloo ranks of one thread each against one process of P threads.

    python benchmarks/ring.py [--out docs/bench/ring.txt]    # full size, ~15 minutes on 2 cores
    python benchmarks/ring.py --quick                        # every length / 16: a smoke run

fp32, B=1, E=64, H=1, causal, forward and backward, on the CPU; ranks are local processes in a
gloo group on loopback (`selfattn.ring.run_local`), each measured in a fresh process. The ring
runs ``--backend`` (default "auto": the fused engine's block kernels on CPU); part 3 also times
the tiled blocks beside it.

1. peak memory per rank, its input shards included (the high-water mark of the resident size,
   reset before the inputs are made, minus the resident size then), at L=65,536: the
   single-process tiled engine vs the ring at P=2 and P=4.
      targets: P=2 <= 0.9x single;  P=4 <= 0.65x P=2  (buffers in flight are O(L/P · E))
2. balance at L=16,384, P=2: each rank's compute time (its block kernel calls, waits excluded)
   under a causal mask, zigzag and contiguous layouts.
      target: zigzag's slowest rank <= 1.15x its fastest (contiguous printed beside it)
3. wall time at L=16,384, P=2 (zigzag) vs one process of 2 threads running SDPA, each checked
   first against an exact reference on sampled rows.
      target: ring (--backend) <= 0.9x single; the tiled ring's ratio printed beside it
4. L=262,144, P=2, zigzag: forward and backward complete; time and peak memory per rank.

``--quick`` (= ``--scale 16``) divides every length by 16; targets are judged only at full size.
Exit status 1 when a judged target is missed or a check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import selfattn
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import selfattn

import torch.distributed as dist

from selfattn.bench import machine
from selfattn.bench.checks import row_errors
from selfattn.bench.memory import peak_bytes
from selfattn.engines import BlockKernels
from selfattn.engines.tiled import tiled_attention
from selfattn.ring import attention as ring
from selfattn.ring import run_local, shard_positions, shard_sequence

E = 64
CORES = 2  # the single process gets as many threads as the ring has ranks of one thread
AGREEMENT = 1e-4  # the worst sampled row's relative error against the exact reference
MIB = 2**20


# -------------------------------------------------------------- what runs in each fresh process


def _inputs(heads: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, E, generator=gen) for _ in range(4)]  # q, k, v, dout


def _fwd_bwd_ring(q, k, v, do, layout: str, backend: str = "auto") -> torch.Tensor:
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring.ring_attention(q, k, v, is_causal=True, layout=layout, backend=backend)
    out.backward(do)
    return out


def _fwd_bwd_single(q, k, v, do, backend: str = "tiled") -> torch.Tensor:
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if backend == "tiled":
        out, _ = tiled_attention(q, k, v, is_causal=True)
    else:
        out = selfattn.attention(q, k, v, is_causal=True, backend=backend)
    out.backward(do)
    return out


def memory_single(length: int) -> int:
    """Peak bytes of one fwd+bwd over the whole sequence, inputs included."""
    _fwd_bwd_single(*_inputs(1, 64, 0))  # one-time costs resident before the baseline
    return peak_bytes(lambda: _fwd_bwd_single(*_inputs(1, length, 0)))


def memory_ring(length: int, layout: str, backend: str) -> int:
    """Peak bytes of one ring fwd+bwd on this rank, its shards included (made in place: the
    whole sequence never exists here)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    _fwd_bwd_ring(*_inputs(1, 2 * world, rank), layout, backend)
    dist.barrier()
    return peak_bytes(lambda: _fwd_bwd_ring(*_inputs(1, length // world, rank), layout, backend))


def _timed(fn, spent: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return wrapper


def time_ring(length: int, layout: str, repeats: int, backend: str) -> dict:
    """Check this rank's output on sampled rows, then time fwd+bwd: wall time (from a barrier
    to the last rank's end, taken as this rank's end) and the compute in the block kernels."""
    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, do = _inputs(1, length, 0)  # the whole sequence, to check against
    shards = [shard_sequence(t, rank, world, layout).clone() for t in (q, k, v, do)]
    out = _fwd_bwd_ring(*[t.clone() for t in shards], layout, backend).detach()
    error = _sampled_error(out, q, k, v, shard_positions(rank, world, length, layout))
    spent: list[float] = []
    choose = ring.block_kernels

    def timed_kernels(*args, **kwargs) -> BlockKernels:  # the chosen engine's, with a stopwatch
        blocks = choose(*args, **kwargs)
        return BlockKernels(_timed(blocks.forward, spent), _timed(blocks.backward, spent))

    ring.block_kernels = timed_kernels
    walls, computes = [], []
    try:
        for _ in range(repeats):
            inputs = [t.clone() for t in shards]
            spent.clear()
            dist.barrier()
            start = time.perf_counter()
            _fwd_bwd_ring(*inputs, layout, backend)
            dist.barrier()
            walls.append(time.perf_counter() - start)
            computes.append(sum(spent))
    finally:
        ring.block_kernels = choose
    return {
        "wall": statistics.median(walls),
        "compute": statistics.median(computes),
        "error": error,
    }


def time_single(length: int, repeats: int, backend: str) -> dict:
    q, k, v, do = _inputs(1, length, 0)
    out = _fwd_bwd_single(q.clone(), k.clone(), v.clone(), do, backend).detach()
    error = _sampled_error(out, q, k, v, torch.arange(length))
    walls = []
    for _ in range(repeats):
        inputs = [t.clone() for t in (q, k, v)]
        start = time.perf_counter()
        _fwd_bwd_single(*inputs, do, backend)
        walls.append(time.perf_counter() - start)
    return {"wall": statistics.median(walls), "error": error}


def _sampled_error(out, q, k, v, positions) -> float:
    """The worst relative row error of ``out`` (rows at ``positions`` of the sequence) on 64
    sampled rows, against float64 attention of those queries over every key they see."""
    rows = torch.linspace(0, len(positions) - 1, 64).long()
    pos = positions[rows]
    visible = torch.arange(k.shape[-2])[None, :] <= pos[:, None]  # (64, L): causal, by position
    ref = selfattn.attention(
        q[:, :, pos].double(), k.double(), v.double(), attn_mask=visible, backend="naive"
    )
    return float(row_errors(out[:, :, rows], ref).max())


def long_ring(length: int, backend: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    _fwd_bwd_ring(*_inputs(1, 2 * world, rank), "zigzag", backend)  # one-time costs first
    inputs = _inputs(1, length // world, rank)
    dist.barrier()
    start = time.perf_counter()
    peak = peak_bytes(lambda: _fwd_bwd_ring(*inputs, "zigzag", backend))
    dist.barrier()
    return {"wall": time.perf_counter() - start, "peak": peak}


def nccl_check() -> int:
    """Under torchrun on >= 2 GPUs: the NCCL ring against single-GPU attention, fwd+bwd."""
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    worst = 0.0
    for layout in ("zigzag", "contiguous"):
        for causal in (True, False):
            gen = torch.Generator().manual_seed(0)
            full = [torch.randn(2, 8, 4096, E, generator=gen) for _ in range(4)]
            q, k, v, do = (t.double().cuda().requires_grad_(i < 3) for i, t in enumerate(full))
            ref = selfattn.attention(q, k, v, is_causal=causal)
            ref.backward(do)
            mine = [shard_sequence(t.detach(), rank, world, layout).float() for t in (q, k, v)]
            mine = [t.requires_grad_() for t in mine]
            out = ring.ring_attention(*mine, is_causal=causal, layout=layout)
            out.backward(shard_sequence(do, rank, world, layout).float())
            wants = (ref, q.grad, k.grad, v.grad)
            for got, want in zip((out, *(t.grad for t in mine)), wants, strict=True):
                want = shard_sequence(want, rank, world, layout)
                worst = max(worst, float((got.double() - want).abs().max() / want.abs().max()))
    ok = worst <= AGREEMENT
    print(f"rank {rank} of {world} (NCCL): worst relative error {worst:.1e} "
          f"{'PASS' if ok else 'FAIL'}", flush=True)  # fmt: skip
    dist.destroy_process_group()
    return 0 if ok else 1


# ------------------------------------------------------------------------------- the report


class Report:
    def __init__(self, judged: bool) -> None:
        self.lines: list[str] = []
        self.judged = judged
        self.missed: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def target(self, name: str, value: float, limit: float) -> None:
        ok = value <= limit
        verdict = ("PASS" if ok else "MISS") if self.judged else "not judged at this size"
        self.say(f"    target {name}: {value:.3f} <= {limit}  {verdict}")
        if self.judged and not ok:
            self.missed.append(name)


def run_memory(rep: Report, length: int, backend: str, group_timeout: float) -> None:
    rep.say(f"1. peak memory per rank, fwd+bwd, causal, H=1, E={E}, L={length:,} (fp32), "
            f"ring blocks on {backend!r}")  # fmt: skip
    single = run_local(memory_single, 1, length, threads=CORES, timeout=1800)[0]
    rep.say(f"    single process (tiled, {CORES} threads): {single / MIB:8.1f} MiB")
    peaks = {}
    for world in (2, 4):
        per_rank = run_local(memory_ring, world, length, "zigzag", backend, timeout=1800,
                             group_timeout=group_timeout)  # fmt: skip
        peaks[world] = max(per_rank)
        ranks = ", ".join(f"{p / MIB:.1f}" for p in per_rank)
        rep.say(f"    ring P={world} (zigzag): {peaks[world] / MIB:8.1f} MiB max  (ranks: {ranks})")
    rep.target("P=2 / single", peaks[2] / single, 0.9)
    rep.target("P=4 / P=2", peaks[4] / peaks[2], 0.65)


def run_timing(rep: Report, length: int, repeats: int, backend: str, group_timeout: float):
    rep.say(f"2-3. fwd+bwd, causal, H=1, E={E}, L={length:,}, P=2 ranks of 1 thread (fp32), "
            f"ring blocks on {backend!r}")  # fmt: skip
    single = run_local(time_single, 1, length, repeats, "sdpa", threads=CORES, timeout=1800)[0]
    results, tiled = {}, None
    for layout in ("zigzag", "contiguous"):
        results[layout] = run_local(time_ring, 2, length, layout, repeats, backend, timeout=1800,
                                    group_timeout=group_timeout)  # fmt: skip
    if backend != "tiled":
        tiled = run_local(time_ring, 2, length, "zigzag", repeats, "tiled", timeout=1800,
                          group_timeout=group_timeout)  # fmt: skip
    checked = [single] + [r for rs in results.values() for r in rs] + (tiled or [])
    worst = max(r["error"] for r in checked)
    rep.say(f"    checked: worst sampled row error {worst:.1e} (limit {AGREEMENT:.0e})")
    if not worst <= AGREEMENT:
        rep.missed.append("correctness")
        rep.say("    CHECK FAILED: the results do not agree; timings not judged")
    imbalance = {}
    for layout, ranks in results.items():
        comp = [r["compute"] for r in ranks]
        imbalance[layout] = max(comp) / min(comp)
        rep.say(
            f"    {layout:10s} compute per rank: "
            + ", ".join(f"{c:.2f} s" for c in comp)
            + f"   slowest/fastest {imbalance[layout]:.2f}x   wall {ranks[0]['wall']:.2f} s"
        )
    rep.target("zigzag slowest/fastest rank compute", imbalance["zigzag"], 1.15)
    zig = results["zigzag"][0]["wall"]
    rep.say(f"    wall: single process (sdpa, {CORES} threads) {single['wall']:.2f} s, "
            f"ring {zig:.2f} s")  # fmt: skip
    if tiled is not None:
        ratio = tiled[0]["wall"] / single["wall"]
        rep.say(f"    tiled ring {tiled[0]['wall']:.2f} s: {ratio:.2f}x single (beside it)")
    rep.target("ring wall / single sdpa wall", zig / single["wall"], 0.9)


def run_long(rep: Report, length: int, backend: str, group_timeout: float) -> None:
    rep.say(f"4. fwd+bwd, causal, H=1, E={E}, L={length:,}, P=2 (zigzag), blocks on {backend!r}")
    ranks = run_local(long_ring, 2, length, backend, timeout=3600, group_timeout=group_timeout)
    peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in ranks)
    rep.say(f"    completed in {ranks[0]['wall']:.1f} s; peak memory per rank {peaks} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="divide every length by this")
    parser.add_argument("--quick", action="store_true", help="= --scale 16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="1,2,4", help="which of 1 (memory), 2 (balance and "
                        "wall time) and 4 (long) to run")  # fmt: skip
    parser.add_argument("--backend", default="auto", choices=("auto", "fused", "tiled"),
                        help="the ring blocks' engine (default: auto)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--nccl-check", action="store_true", help="under torchrun on >= 2 "
                        "GPUs: check the NCCL ring against single-GPU attention")  # fmt: skip
    args = parser.parse_args(argv)
    if args.nccl_check:
        return nccl_check()
    scale = 16 if args.quick else args.scale
    parts = set(args.parts.split(","))
    # glibc: freed blocks over 64 KiB go back to the system (inherited by the ranks), so one
    # pass's freed memory cannot hide the next one's growth in the high-water mark.
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    group_timeout = 600.0  # a rank may wait this long on a peer's compute
    rep = Report(judged=scale == 1)
    rep.say(f"ring attention benchmark ({time.strftime('%Y-%m-%d %H:%M')}, scale 1/{scale})")
    rep.say(machine.summary())
    started = time.perf_counter()
    if "1" in parts:
        run_memory(rep, 65536 // scale, args.backend, group_timeout)
    if "2" in parts or "3" in parts:
        run_timing(rep, 16384 // scale, args.repeats, args.backend, group_timeout)
    if "4" in parts:
        run_long(rep, 262144 // scale, args.backend, group_timeout)
    rep.say(f"total {time.perf_counter() - started:.0f} s; load average {machine.load_average()}")
    if rep.missed:
        rep.say("MISSED: " + ", ".join(rep.missed))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rep.lines) + "\n")
    return 1 if rep.missed else 0


if __name__ == "__main__":
    sys.exit(main())
