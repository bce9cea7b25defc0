"""The reference engine: attention written out one step per line.

This is the text `selfattn explain` shows and the oracle the tests compare against. It
materialises the (Lq, Lk) score and weight matrices, so it is the one engine that can hand back
the attention weights.

Shapes: B batch, Hq query heads, Hkv key/value heads, Lq queries, Lk keys, E head dim,
Ev value head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn.engines import AttentionRequest, Engine, EngineOutput, register
from selfattn.masks import causal_mask
from selfattn.recording import is_recording, record


def score_bias(request: AttentionRequest, lq: int, lk: int, device, dtype) -> Tensor | None:
    """One additive bias (0 = keep, -inf = masked) that combines causal, window and attn_mask.

    Returns None when nothing is masked. Broadcastable to (B, Hq, Lq, Lk).
    """
    bias = None
    if request.is_causal:
        keep = causal_mask(lq, lk, window=request.window, device=device)  # (Lq, Lk)
        bias = torch.zeros(lq, lk, device=device, dtype=dtype).masked_fill(~keep, float("-inf"))
    mask = request.attn_mask
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(
                ~mask, float("-inf")
            )
        bias = mask.to(dtype) if bias is None else bias + mask.to(dtype)
    return bias


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim, written out; a row whose scores are all -inf gives zeros.

    Returns (weights, lse) where lse is the per-row log-sum-exp (-inf on such rows).
    """
    row_max = scores.amax(dim=-1, keepdim=True)  # (..., Lq, 1)
    row_max = torch.where(row_max.isfinite(), row_max, 0.0).detach()  # dead rows: shift by 0
    exp = torch.exp(scores - row_max)  # (..., Lq, Lk), masked cells are exactly 0
    row_sum = exp.sum(dim=-1, keepdim=True)  # (..., Lq, 1), 0 on dead rows
    weights = exp / torch.where(row_sum > 0, row_sum, 1.0)  # rows sum to 1 (dead rows: 0)
    lse = (row_max + row_sum.log()).squeeze(-1)  # (..., Lq), -inf on dead rows
    return weights, lse


def naive_attention(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hkv, Lk, E) -> (B, Hq, Lk, E)
    v = v.repeat_interleave(groups, dim=1)  # (B, Hkv, Lk, Ev) -> (B, Hq, Lk, Ev)
    scores = q @ k.transpose(-2, -1)  # (B, Hq, Lq, E) x (B, Hq, E, Lk) -> (B, Hq, Lq, Lk)
    scaled = scores * request.scale  # (B, Hq, Lq, Lk)
    bias = score_bias(request, q.shape[-2], k.shape[-2], q.device, scaled.dtype)
    masked = scaled if bias is None else scaled + bias  # (B, Hq, Lq, Lk), -inf where masked
    weights, lse = safe_softmax(masked)  # (B, Hq, Lq, Lk), (B, Hq, Lq)
    if request.dropout_p > 0.0:
        weights = F.dropout(weights, p=request.dropout_p)  # kept weights scaled by 1/(1-p)
    out = weights @ v  # (B, Hq, Lq, Lk) x (B, Hq, Lk, Ev) -> (B, Hq, Lq, Ev)

    if is_recording():  # for selfattn.trace: every intermediate, True = may attend in "mask"
        keep = torch.ones_like(scaled, dtype=torch.bool)
        record("scores", scores)
        record("scaled_scores", scaled)
        record("mask", keep if bias is None else keep & (bias > float("-inf")))
        record("weights", weights)
        record("context", out)
    return EngineOutput(
        output=out,
        lse=lse if request.need_lse else None,
        weights=weights if request.need_weights else None,
    )


register(
    Engine(
        name="naive",
        fn=naive_attention,
        unsupported=lambda request: None,
        summary="reference: plain torch, materialises the weights; supports everything",
    )
)
