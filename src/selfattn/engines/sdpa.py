"""PyTorch's fused kernel, `torch.nn.functional.scaled_dot_product_attention`, behind an adapter.

The adapter absorbs what SDPA does differently, so callers never see it:
- SDPA's ``is_causal`` is aligned top-left when Lq != Lk; selfattn's is bottom-right. The adapter
  passes ``is_causal=True`` only when Lq == Lk (where both agree) and an explicit bottom-right mask
  otherwise.
- SDPA has no sliding window: the adapter builds the equivalent boolean mask (which costs
  Lq x Lk memory; the "tiled" engine skips those blocks instead).
- Rows with no key to attend to: recent PyTorch on CPU returns zeros there with zero gradient
  (checked once at import). Elsewhere, and on a PyTorch that does not, the adapter lets such
  rows see one key and zeroes their output afterwards. (Seen on an H200: bf16 SDPA with a mask
  returned wrong values on fully masked rows.)
- One query under causal masking (decoding one token with a KV cache) sees every key: no mask.
SDPA returns neither the weights nor the log-sum-exp, so requests that need them go elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn.engines import AttentionRequest, Engine, EngineOutput, register
from selfattn.masks import causal_mask


@torch.enable_grad()
def _zeroes_dead_rows() -> bool:
    q = torch.ones(1, 1, 2, 2, requires_grad=True)
    keep = torch.tensor([[False, False], [True, True]])
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=keep)
    out.sum().backward()
    return bool((out[0, 0, 0] == 0).all() and torch.isfinite(q.grad).all())


SDPA_ZEROES_DEAD_ROWS = _zeroes_dead_rows()


def _merge_masks(request: AttentionRequest, lq: int, lk: int, device) -> Tensor | None:
    """The request's masks as one SDPA attn_mask (bool, or float when attn_mask is float)."""
    mask = request.attn_mask
    if request.is_causal:
        keep = causal_mask(lq, lk, window=request.window, device=device)  # (Lq, Lk)
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    return mask


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    lq, lk = q.shape[-2], k.shape[-2]
    plain_causal = request.is_causal and request.window is None and request.attn_mask is None
    if plain_causal and lq == lk:
        mask, is_causal = None, True  # SDPA's own causal path: no mask materialised
    elif plain_causal and lq == 1:
        mask, is_causal = None, False  # one new token (decoding) sees every key: no mask
    else:
        mask, is_causal = _merge_masks(request, lq, lk, q.device), False

    dead = None
    if mask is not None and (q.device.type != "cpu" or not SDPA_ZEROES_DEAD_ROWS):
        # Rows with no key: CUDA kernels (e.g. memory-efficient attention in bf16) return
        # garbage there. Let such rows see key 0, then zero them: finite, zero gradient.
        keep = mask if mask.dtype == torch.bool else mask > float("-inf")
        dead = ~keep.any(dim=-1, keepdim=True)  # (..., Lq, 1)
        first_key = torch.zeros_like(keep)
        first_key[..., 0] = True
        keep = keep | (dead & first_key)
        mask = keep if mask.dtype == torch.bool else mask.masked_fill(dead & first_key, 0.0)

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
