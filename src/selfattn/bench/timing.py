"""Clocks, summaries, FLOP counts and the machine's matmul peak.

Timing: ``time.perf_counter`` on a CPU; CUDA events (with a synchronize) on a GPU. A call shorter
than ``min_sample_s`` is looped so that each sample lasts at least that long; the sample's time is
divided by the loop count. Contenders are timed round-robin (`interleaved`): each repeat visits
every one in turn, so that a drift of the machine's speed hits them all alike.

Why not ``torch.utils.benchmark.Timer``, the project's usual clock: its ``timeit(n)`` runs at least
two untimed warm-up calls before every measurement (tripling the cost of a one-second call, and
of a whole sweep), and its ``blocked_autorange`` times one statement to the end before the next
starts, which is exactly what the round-robin avoids. Its clock is the same as ours
(``timeit.default_timer``, i.e. ``perf_counter``, after a device synchronize).

FLOP counts (multiply-adds count 2):
    attention forward     4 · B · H · L² · E          (q kᵀ and weights · v), halved when causal
    projections forward   2 · B · L · d_in · d_out    per Linear
    forward + backward    3.5 × the attention forward (backward ≈ 2.5 × forward)
                          + 3 × the projections (backward: one matmul for dx, one for dW)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from selfattn.bench.results import Case

FLOP_FORMULA = (
    "attention fwd 4·B·H·L²·E (×½ causal); projections 2·B·L·d_in·d_out per Linear; "
    "fwd+bwd = 3.5 × attention fwd + 3 × projections fwd"
)


def attention_flops(case: Case, pass_: str) -> float:
    """FLOPs of the attention proper (scores and weights · v) for one call of ``pass_``."""
    fwd = 4.0 * case.batch * case.heads * case.length**2 * case.head_dim
    if case.causal:
        fwd /= 2
    return fwd * (3.5 if pass_ == "fwd+bwd" else 1.0)


def projection_flops(case: Case, linears: int, pass_: str) -> float:
    """FLOPs of ``linears`` d x d projections over the B · L tokens."""
    fwd = 2.0 * case.batch * case.length * case.d_model * case.d_model * linears
    return fwd * (3.0 if pass_ == "fwd+bwd" else 1.0)


def layer_flops(case: Case, linears: int, pass_: str) -> float:
    return attention_flops(case, pass_) + projection_flops(case, linears, pass_)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(step: Callable[[], object], calls: int, device: str) -> float:
    """Seconds per call of ``step``, over ``calls`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - t0) / calls


def interleaved(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    device: str = "cpu",
    *,
    warmup: int = 1,
    min_sample_s: float = 0.0,
) -> dict[str, list[float]]:
    """Per-call seconds of each step, ``repeats`` samples each, timed round-robin after
    ``warmup`` untimed calls each (the last of which sizes the loop of a call shorter than
    ``min_sample_s``; with no warm-up, every sample is one call)."""
    calls = {}
    for name, step in steps.items():
        call_s = None
        for _ in range(warmup):
            call_s = time_calls(step, 1, device)
        calls[name] = 1 if call_s is None else loop_count(call_s, min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(time_calls(step, calls[name], device))
    return samples


def loop_count(call_s: float, min_sample_s: float) -> int:
    """How many calls make one sample last at least ``min_sample_s``."""
    if call_s <= 0:
        return 1000
    return max(1, min(1000, math.ceil(min_sample_s / call_s)))


def summarize(samples: list[float]) -> dict:
    """Median, quartiles and extremes of per-call times (seconds)."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median_s": statistics.median(ordered),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": ordered[0],
        "max_s": ordered[-1],
    }


def matmul_peak(dtype: torch.dtype, device: str, target_s: float = 0.15) -> dict:
    """The best GFLOP/s of a large square matmul in ``dtype``: this machine's practical peak.

    The size grows until one product takes about ``target_s`` (at most 8192 on a GPU, 4096 on a
    CPU); the best of five timed products counts.
    """
    n, limit = 512, 8192 if device == "cuda" else 4096
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm up
        seconds = time_calls(lambda a=a, b=b: torch.matmul(a, b), 1, device)
        if seconds >= target_s / 2 or n >= limit:
            break
        n *= 2
    calls = 3 if device == "cuda" else 1
    best = min(time_calls(lambda a=a, b=b: torch.matmul(a, b), calls, device) for _ in range(5))
    return {"n": n, "seconds": best, "gflops": 2.0 * n**3 / best / 1e9}


def make_step(fn: Callable, x: torch.Tensor, params: list, pass_: str, grad_out=None):
    """One call of ``pass_``: "fwd" runs ``fn(x)`` under no_grad; "fwd+bwd" runs it with
    autograd and back-propagates ``grad_out`` into x and every parameter."""
    if pass_ == "fwd":

        def forward() -> None:
            with torch.no_grad():
                fn(x)

        return forward
    leaf = x.detach().requires_grad_(True)
    grad = torch.randn_like(x) if grad_out is None else grad_out

    def forward_backward() -> None:
        leaf.grad = None
        for p in params:
            p.grad = None
        fn(leaf).backward(grad)

    return forward_backward
