"""The correctness gate: every contender against a float64 reference, before it is timed.

The error is measured per query row, so that it can fail. A causal row 0 attends only to itself
(its context is v₀, whatever the attention does), and it has the largest output: measured as the
largest absolute error over the largest value, it gave the same figure for ten implementations.

    output    for each checked row (batch b, position i) that sees at least 2 keys:
                  err(b, i) = ||out[b, i] - ref[b, i]|| / ||ref[b, i]||     (norms over d)
              max_error = the worst row's; the contender is WRONG above TOLERANCE[dtype]
    gradient  (fwd+bwd) the loss <g, out[:, R]>, g fixed random on a few spread rows R (the last
              included), back-propagated by the contender itself; for each row j of dL/dx:
                  err(b, j) = ||dx[b, j] - ref[b, j]|| / max(||ref[b, j]||, median row norm)
              grad_error = the worst row's; WRONG above GRAD_TOLERANCE[dtype]

The reference runs in float64 on the same rounded inputs and weights the contender saw, a few
rows at a time, so that a long sequence never holds an (L, L) matrix. A contender that is WRONG
is never timed; one whose gradient alone is wrong is timed forward only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattn.bench.contenders import Built, Weights
from selfattn.bench.results import Case

# The worst row's relative error allowed against the float64 reference, per dtype.
# Measured on a CPU at L=128..256 (quick preset): fp32 about 4e-7 (output) and 6e-7 (dL/dx),
# bf16 about 4e-3 and 6e-3, for every implementation; the limits leave 5-50x for longer rows.
TOLERANCE = {"fp32": 2e-5, "bf16": 2e-2}
GRAD_TOLERANCE = {"fp32": 1e-4, "bf16": 4e-2}
ERROR_RULE = (
    "worst query row's ||out - ref|| / ||ref|| over rows that see >= 2 keys, vs float64; "
    "fwd+bwd also dL/dx per row (norm floored at the median row's), "
    "L = <g, out[:, R]> for fixed random g on spread rows R"
)


def check_rows(length: int, limit: int = 1024) -> Tensor:
    """The query rows checked: all of them up to ``limit``, else ``limit`` evenly spread
    (first and last included)."""
    if length <= limit:
        return torch.arange(length)
    return torch.linspace(0, length - 1, limit).round().long().unique()


def grad_rows(case: Case) -> Tensor:
    """The rows R the gradient's loss reads: as many as keep the float64 reference's (B, H, R, L)
    scores near 64 MiB (8 to 256), evenly spread, the last included."""
    fit = (1 << 23) // (case.batch * case.heads * case.length)
    return check_rows(case.length, limit=max(8, min(256, fit)))


def reference_rows(case: Case, w: Weights, x: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 context and output of query rows ``rows`` (r,): ((B, r, d), (B, r, d)).

    Plain softmax(q kᵀ / sqrt(E)) v per head, 64 rows at a time. ``x`` and ``w`` are already the
    rounded values the contender saw; autograd follows ``x`` when it requires grad.
    """
    b, length, d = x.shape
    h, e = case.heads, case.head_dim
    x = x.to(device="cpu", dtype=torch.float64)

    def heads(t: Tensor) -> Tensor:  # (B, n, d) -> (B, H, n, E)
        return t.view(b, -1, h, e).transpose(1, 2)

    k = heads(x @ w.wk.T)  # (B, H, L, E)
    v = heads(x @ w.wv.T)  # (B, H, L, E)
    contexts = []
    for chunk in rows.split(64):
        q = heads(x[:, chunk] @ w.wq.T)  # (B, H, r, E)
        scores = q @ k.transpose(-2, -1) / math.sqrt(e)  # (B, H, r, L)
        if case.causal:  # Lq == Lk: row i sees keys j <= i
            future = torch.arange(length) > chunk.unsqueeze(-1)  # (r, L)
            scores = scores.masked_fill(future, float("-inf"))
        context = torch.softmax(scores, dim=-1) @ v  # (B, H, r, L) x (B, H, L, E) -> (B, H, r, E)
        contexts.append(context.transpose(1, 2).reshape(b, -1, d))  # (B, r, d)
    context = torch.cat(contexts, dim=1)  # (B, r, d)
    return context, context @ w.wo.T + w.bo


def row_errors(got: Tensor, ref: Tensor, floor: Tensor | float = 0.0) -> Tensor:
    """||got - ref|| / max(||ref||, floor) per row, norms over the last dim: (B, r, d) -> (B, r).
    NaN or inf anywhere in a row makes its error inf."""
    got = got.to(device="cpu", dtype=torch.float64)
    diff = torch.linalg.vector_norm(got - ref, dim=-1)
    scale = torch.linalg.vector_norm(ref, dim=-1).clamp_min(floor).clamp_min(1e-30)
    return torch.nan_to_num(diff / scale, nan=math.inf)


def output_error(case: Case, got: Tensor, ref: Tensor, rows: Tensor) -> float:
    """The worst relative error among ``rows`` (r,) of ``got`` and ``ref`` (B, r, d) that see
    at least 2 keys (every row of a full mask; rows 1 ... of a causal one)."""
    seen = rows + 1 if case.causal else torch.full_like(rows, case.length)
    informative = seen >= 2
    if not informative.any():  # L = 1: nothing else to compare
        informative = torch.ones_like(rows, dtype=torch.bool)
    return float(row_errors(got, ref)[:, informative].max())


def reference_grad(case: Case, w: Weights, x: Tensor, rows: Tensor, g: Tensor, produces: str):
    """Float64 dL/dx (B, L, d) for L = <g, y[:, rows]>, y the context or the output."""
    leaf = x.detach().to(device="cpu", dtype=torch.float64).requires_grad_(True)
    context, out = reference_rows(case, w, leaf, rows)
    y = context if produces == "context" else out
    (grad,) = torch.autograd.grad(y, leaf, g.to(torch.float64))
    return grad


def contender_grad(built: Built, x: Tensor, rows: Tensor, g: Tensor) -> Tensor:
    """dL/dx (B, L, d) as the contender's own backward computes it, L = <g, y[:, rows]>: the same
    call as a timed fwd+bwd step, with the output gradient zero outside ``rows``."""
    leaf = x.detach().requires_grad_(True)
    y = built.fn(leaf)
    grad_out = torch.zeros_like(y)
    grad_out[:, rows.to(y.device)] = g.to(device=y.device, dtype=y.dtype)
    y.backward(grad_out)
    for p in built.params():
        p.grad = None
    return leaf.grad


def grad_error(got: Tensor, ref: Tensor) -> float:
    """The worst row's relative error of dL/dx (B, L, d), each row's norm floored at the median
    row norm (rows that receive almost no gradient would otherwise divide by almost nothing)."""
    median = torch.linalg.vector_norm(ref, dim=-1).median()
    return float(row_errors(got, ref, floor=median).max())
