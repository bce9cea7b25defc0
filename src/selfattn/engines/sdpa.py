"""PyTorch's fused kernel, `torch.nn.functional.scaled_dot_product_attention`, behind an adapter.

The adapter absorbs what SDPA does differently, so callers never see it:
- SDPA's ``is_causal`` is aligned top-left when Lq != Lk; selfattn's is bottom-right. The adapter
  passes ``is_causal=True`` only when Lq == Lk (where both agree) and an explicit bottom-right mask
  otherwise.
- SDPA has no sliding window: the adapter builds the equivalent boolean mask (which costs
  Lq x Lk memory; the "tiled" engine skips those blocks instead).
- Rows with no key to attend to: what SDPA returns there depends on kernel, dtype and version
  (seen on an H200: bf16 SDPA with a mask returned wrong values on fully masked rows). The
  adapter lets such rows see one key and zeroes their output afterwards, on every device; no
  probe runs at import (one would fail under ``torch.inference_mode()``).
- One query under causal masking (decoding one token with a KV cache) sees every key: no mask.
- A float mask is shifted so that each row's largest entry is 0 (`selfattn.masks.float_mask_shift`):
  a row held at finfo.min keeps its scores, and SDPA's backward its true log-sum-exp.
SDPA returns neither the weights nor the log-sum-exp, so requests that need them go elsewhere.

Known difference: SDPA adds a mask to the scores, so a key holding +inf that the mask hides
(inf + -inf = NaN) turns every row that hides it to NaN, where "naive" and "tiled" fill masked
cells and give NaN only in the rows that may see it. Non-finite q and k are garbage in either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn.engines.registry import AttentionRequest, Engine, EngineOutput, register
from selfattn.masks import float_mask_shift, merge_masks


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    lq, lk = q.shape[-2], k.shape[-2]
    plain_causal = request.is_causal and request.window is None and request.attn_mask is None
    if plain_causal and lq == lk:
        mask, is_causal = None, True  # SDPA's own causal path: no mask materialised
    elif plain_causal and lq == 1:
        mask, is_causal = None, False  # one new token (decoding) sees every key: no mask
    else:
        mask = merge_masks(
            request.attn_mask, request.is_causal, request.window, lq, lk, device=q.device
        )  # 4-D (from the checks) or (Lq, Lk), bool or float
        is_causal = False

    dead = None
    if mask is not None:
        # Rows with no key: what SDPA returns there depends on the kernel, dtype and version
        # (zeros on recent CPU builds; wrong values in bf16 on an H200). Let such rows see
        # key 0, then zero them: finite, zero gradient, the same on every device.
        keep = mask if mask.dtype == torch.bool else mask > float("-inf")
        dead = ~keep.any(dim=-1, keepdim=True)  # (..., Lq, 1); no .any() here: no host sync
        first_key = torch.zeros(keep.shape[-1], dtype=torch.bool, device=q.device)  # (Lk,)
        first_key[0] = True
        rescue = dead & first_key  # (..., Lq, Lk): key 0 of dead rows only
        mask = keep | rescue if mask.dtype == torch.bool else mask.masked_fill(rescue, 0.0)
    if mask is not None and mask.is_floating_point():
        mask = mask - float_mask_shift(mask)  # each row peaks at 0: see selfattn.masks
        # In q's dtype, as every SDPA kernel accepts: after the shift, an entry that bf16 or
        # fp16 cannot hold (below about -3.4e38 or -65504) is one softmax weighs 0 anyway.
        mask = mask.to(q.dtype)

    out = F.scaled_dot_product_attention(
        q,  # (B, Hq, Lq, E)
        k,  # (B, Hkv, Lk, E)
        v,  # (B, Hkv, Lk, Ev)
        attn_mask=mask,  # broadcastable to (B, Hq, Lq, Lk)
        dropout_p=request.dropout_p,
        is_causal=is_causal,
        scale=request.scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (B, Hq, Lq, Ev)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return EngineOutput(output=out)


def _unsupported(request: AttentionRequest) -> str | None:
    if request.need_weights:
        return "sdpa does not return the attention weights"
    if request.need_lse:
        return "sdpa does not return the log-sum-exp"
    return None


register(
    Engine(
        name="sdpa",
        fn=sdpa_attention,
        unsupported=_unsupported,
        summary="torch.nn.functional.scaled_dot_product_attention with a bottom-right adapter",
    )
)
