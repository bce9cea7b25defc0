"""The chapter's in-between steps, derived from a `Trace`: what the modules do in one fused call.

* `masked_scores`: the scaled scores with -inf where the mask hides a key, the chapter's trick
  before the softmax (``masked_fill`` with -inf).
* `renormalise_route`: the chapter's older route to the same weights: softmax over every key,
  zero the hidden ones, divide each row by its new sum. Returns its max difference from the
  trace's weights, which is the check that both routes agree.
* `with_dropout`: the weights after ``nn.Dropout(p)`` in training mode, seeded: about p of them
  set to 0, the kept ones scaled by 1 / (1 - p).
* `merged`: the heads' context vectors side by side, the input of ``out_proj``.

Shapes: H heads, L queries, S keys, Dv value width; per-head steps are (H, L, ·).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn.trace import Trace

CHAPTER_DROPOUT_SEED = 123  # the chapter seeds its dropout example with 123


def add_chapter_steps(tr: Trace, *, dropout: float = 0.0, seed: int | None = None) -> Trace:
    """``tr`` with the derived steps added (in place, and returned): ``masked_scores`` when
    anything is masked, ``dropped_weights`` when ``dropout`` > 0, ``merged`` for several heads.
    """
    steps = tr.steps
    if "mask" in steps and tr.masked and "masked_scores" not in steps:
        steps["masked_scores"] = masked_scores(tr)
    if dropout > 0.0:
        steps["dropped_weights"] = with_dropout(
            steps["weights"], dropout, CHAPTER_DROPOUT_SEED if seed is None else seed
        )
        tr.extras["dropout"] = dropout
    if tr.num_heads > 1 and "context" in steps and "merged" not in steps:
        steps["merged"] = merged(steps["context"])
    return tr


def masked_scores(tr: Trace) -> Tensor:
    """Scaled scores (H, L, S) with -inf where the mask hides a key."""
    return tr.steps["scaled_scores"].masked_fill(~tr.steps["mask"], float("-inf"))


def renormalise_route(tr: Trace) -> tuple[Tensor, Tensor, float]:
    """The chapter's "softmax, zero the future, renormalise" route: (softmax over every key,
    renormalised weights, max |difference| from the trace's weights). Each tensor (H, L, S)."""
    scaled, mask = tr.steps["scaled_scores"].double(), tr.steps["mask"]
    every_key = torch.softmax(scaled, dim=-1)  # (H, L, S): the future included
    kept = every_key * mask  # zero the hidden keys
    renormalised = kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # rows sum to 1 again
    diff = (renormalised - tr.steps["weights"].double()).abs().max().item()
    return every_key.float(), renormalised.float(), diff


def with_dropout(weights: Tensor, p: float, seed: int) -> Tensor:
    """``nn.Dropout(p)`` in training mode on ``weights``, after ``torch.manual_seed(seed)`` as
    in the chapter; the global random state is left as it was."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return F.dropout(weights, p=p, training=True)  # kept weights scaled by 1 / (1 - p)


def merged(context: Tensor) -> Tensor:
    """(H, L, Dv) -> (L, H * Dv): ``context.transpose(1, 2).contiguous().view(b, L, d_out)``."""
    heads, length, width = context.shape
    return context.transpose(0, 1).reshape(length, heads * width)  # (L, H, Dv) -> (L, H * Dv)
