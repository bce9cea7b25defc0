"""Masks, all boolean with True = "this query may attend to this key".

Causal alignment
----------------
selfattn aligns the causal mask to the **bottom-right** corner: query ``i`` (of ``Lq``) may see
keys ``j <= i + (Lk - Lq)``. The last query always sees the last key, which is what decoding with a
KV cache needs: the new tokens are the *last* ``Lq`` of ``Lk`` positions.

Lq = 2, Lk = 5 (two new tokens after three cached ones):

    bottom-right (selfattn)     top-left (SDPA's is_causal when Lq != Lk)
       k0 k1 k2 k3 k4              k0 k1 k2 k3 k4
    q0  1  1  1  1  0           q0  1  0  0  0  0
    q1  1  1  1  1  1           q1  1  1  0  0  0

With Lq > Lk the first ``Lq - Lk`` queries see no key at all: their rows are "dead" and every
engine returns zeros there (and passes zero gradient).

Sliding window
--------------
``window=W`` (always together with causal) keeps the ``W`` most recent keys of each query, itself
included: ``i + off - W < j <= i + off`` with ``off = Lk - Lq``. Lq = Lk = 5, W = 2:

       k0 k1 k2 k3 k4
    q0  1  0  0  0  0
    q1  1  1  0  0  0
    q2  0  1  1  0  0
    q3  0  0  1  1  0
    q4  0  0  0  1  1
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfattn._checks import check_window


def causal_mask(
    lq: int, lk: int, *, window: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Bottom-right causal mask (Lq, Lk), optionally limited to a sliding window of W keys."""
    return causal_block(0, lq, 0, lk, lq, lk, window, device=device)


def causal_block(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    lq: int,
    lk: int,
    window: int | None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Block [q_start:q_end, k_start:k_end] of `causal_mask(lq, lk, window=window)`, built
    without the whole (Lq, Lk) mask: the one place selfattn writes the causal rule."""
    q_pos = torch.arange(q_start, q_end, device=device).unsqueeze(-1) + (lk - lq)  # (bq, 1)
    k_pos = torch.arange(k_start, k_end, device=device).unsqueeze(0)  # (1, bk)
    keep = k_pos <= q_pos  # (bq, bk)
    if window is not None:
        keep &= k_pos > q_pos - window
    return keep


def sliding_window_mask(
    lq: int, lk: int, window: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Causal sliding-window mask (Lq, Lk): each query sees its ``window`` most recent keys."""
    return causal_mask(lq, lk, window=check_window(window, True), device=device)


def merge_masks(
    attn_mask: Tensor | None,
    is_causal: bool,
    window: int | None,
    lq: int,
    lk: int,
    *,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """The causal (window) rule and ``attn_mask`` as one mask broadcastable to (B, H, Lq, Lk).

    Bool (True = may attend) when ``attn_mask`` is None or bool; float (added to the scores,
    -inf where the causal rule hides a key) when ``attn_mask`` is float. None if nothing is
    masked. Costs Lq x Lk memory when causal: the tiled engine never calls it.
    """
    if not is_causal:
        return attn_mask
    keep = causal_mask(lq, lk, window=window, device=device)  # (Lq, Lk)
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def float_mask_shift(mask: Tensor) -> Tensor:
    """Each row's largest entry of a float mask (..., Lq, Lk) -> (..., Lq, 1), 0 where the row
    has no finite entry; detached.

    Every engine adds ``mask - shift`` to the scores instead of ``mask``. Softmax does not
    change (a constant per row cancels), but the arithmetic stays exact: Hugging Face's
    ``torch.finfo(dtype).min`` for "hidden" would otherwise round a fully hidden row's scores
    away (s + finfo.min == finfo.min), overflow to -inf in base 2, and turn the kernels' stored
    log-sum-exp into finfo.min (their backward would see weights of 1 instead of 1/Lk).
    With the shift, a row held entirely at finfo.min (or -1e9) weighs its keys by their
    scores, as softmax(s + c) = softmax(s) says. The shift is added back to the lse.
    """
    if mask.shape[-1] == 0:  # no keys: nothing to shift
        return mask.new_zeros(*mask.shape[:-1], 1)
    row_max = mask.detach().amax(dim=-1, keepdim=True)  # (..., Lq, 1)
    return row_max.masked_fill(~row_max.isfinite(), 0.0)


def key_padding_mask(lengths: Tensor | list[int], max_len: int | None = None) -> Tensor:
    """Mask (B, 1, 1, Lk) from per-sequence lengths: key j of batch b is kept iff j < lengths[b].

    Broadcasts against scores of shape (B, H, Lq, Lk).
    """
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got {lengths.dtype}")
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    max_len = longest if max_len is None else max_len
    if max_len < longest:
        raise ValueError(f"max_len={max_len} is shorter than the longest length {longest}")
    keep = torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(-1)  # (B, Lk)
    return keep[:, None, None, :]


def block_is_empty(
    q_start: int, q_end: int, k_start: int, k_end: int, lq: int, lk: int, window: int | None
) -> bool:
    """True when the causal (windowed) mask rules out all of block [q_start:q_end, k_start:k_end].

    Used by block-wise engines to skip blocks instead of computing and discarding them.
    """
    off = lk - lq
    # The block's latest query sees keys up to q_end - 1 + off: any later key is out for all.
    if k_start > q_end - 1 + off:
        return True
    # The block's earliest query sees keys from q_start + off - window + 1 on: earlier ones are out.
    return window is not None and k_end - 1 <= q_start + off - window


def block_is_full(
    q_start: int, q_end: int, k_start: int, k_end: int, lq: int, lk: int, window: int | None
) -> bool:
    """True when the causal (windowed) mask keeps every cell of the block: no masking needed."""
    off = lk - lq
    if k_end - 1 > q_start + off:
        return False
    return window is None or k_start > q_end - 1 + off - window
