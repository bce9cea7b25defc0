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

from selfattn._checks import compute_dtype
from selfattn.engines.registry import AttentionRequest, Engine, EngineOutput, register
from selfattn.masks import float_mask_shift, merge_masks
from selfattn.recording import is_recording, record


def apply_mask(scaled: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Scores with the merged mask applied, -inf where masked whatever the score was, and the
    float mask's row shift (to add back to the lse), or None.

    A bool mask fills (never adds), so a hidden key holding +inf cannot make -inf + inf = NaN.
    A float mask is shifted so each row peaks at 0 (`selfattn.masks.float_mask_shift`), added,
    and its -inf cells are then filled the same way.
    """
    if mask is None:
        return scaled, None
    if mask.dtype == torch.bool:
        return scaled.masked_fill(~mask, float("-inf")), None
    mask = mask.to(scaled.dtype)
    shift = float_mask_shift(mask)  # (..., Lq, 1)
    added = scaled + (mask - shift)  # (B, Hq, Lq, Lk)
    return added.masked_fill(mask == float("-inf"), float("-inf")), shift


def safe_softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim, written out; a row whose scores are all -inf gives zeros.

    Returns (weights, lse) where lse is the per-row log-sum-exp (-inf on such rows). Such a
    "dead" row passes zero gradient, through the weights and through lse alike.
    """
    row_max = scores.amax(dim=-1, keepdim=True)  # (..., Lq, 1)
    row_max = torch.where(row_max.isfinite(), row_max, 0.0).detach()  # dead rows: shift by 0
    exp = torch.exp(scores - row_max)  # (..., Lq, Lk), masked cells are exactly 0
    row_sum = exp.sum(dim=-1, keepdim=True)  # (..., Lq, 1), 0 on dead rows
    alive = row_sum > 0  # (..., Lq, 1)
    safe_sum = torch.where(alive, row_sum, 1.0)  # never 0: no 1/0 and no log 0 in the gradient
    weights = exp / safe_sum  # rows sum to 1 (dead rows: 0)
    lse = torch.where(alive, row_max + safe_sum.log(), float("-inf")).squeeze(-1)  # (..., Lq)
    return weights, lse


def naive_attention(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    dtype = q.dtype
    q, k, v = (t.to(compute_dtype(dtype)) for t in (q, k, v))  # float32 (float64 stays)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hkv, Lk, E) -> (B, Hq, Lk, E)
    v = v.repeat_interleave(groups, dim=1)  # (B, Hkv, Lk, Ev) -> (B, Hq, Lk, Ev)
    scores = q @ k.transpose(-2, -1)  # (B, Hq, Lq, E) x (B, Hq, E, Lk) -> (B, Hq, Lq, Lk)
    scaled = scores * request.scale  # (B, Hq, Lq, Lk)
    mask = merge_masks(
        request.attn_mask, request.is_causal, request.window, q.shape[-2], k.shape[-2],
        device=q.device,
    )  # fmt: skip
    masked, shift = apply_mask(scaled, mask)  # (B, Hq, Lq, Lk), -inf where masked
    weights, lse = safe_softmax(masked)  # (B, Hq, Lq, Lk), (B, Hq, Lq)
    if shift is not None:
        lse = lse + shift.squeeze(-1)  # the float mask's row shift, back in: (B, Hq, Lq)
    if request.dropout_p > 0.0:
        weights = F.dropout(weights, p=request.dropout_p)  # kept weights scaled by 1/(1-p)
    out = weights @ v  # (B, Hq, Lq, Lk) x (B, Hq, Lk, Ev) -> (B, Hq, Lq, Ev)

    if is_recording():  # for selfattn.trace: every intermediate, True = may attend in "mask"
        record("scores", scores)
        record("scaled_scores", scaled)
        keep = torch.ones_like(scaled, dtype=torch.bool)  # (B, Hq, Lq, Lk)
        if mask is not None:
            keep &= mask if mask.dtype == torch.bool else mask > float("-inf")
        record("mask", keep)
        record("weights", weights)
        record("context", out)
    return EngineOutput(
        output=out.to(dtype),
        lse=lse if request.need_lse else None,
        weights=weights.to(dtype) if request.need_weights else None,
    )


register(
    Engine(
        name="naive",
        fn=naive_attention,
        unsupported=lambda request: None,
        summary="reference: plain torch, materialises the weights; supports everything",
    )
)
