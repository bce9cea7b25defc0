"""The functional core: `attention()` checks its arguments once, then hands them to an engine.

Shape legend (PyTorch SDPA's layout and vocabulary):

    B   batch size
    Hq  query heads; Hkv key/value heads, Hq a multiple of Hkv (GQA; Hkv = 1 is MQA)
    Lq  target (query) length; Lk source (key/value) length
    E   query/key head dim; Ev value head dim

    q (B, Hq, Lq, E)   k (B, Hkv, Lk, E)   v (B, Hkv, Lk, Ev)   ->   out (B, Hq, Lq, Ev)

``is_causal`` is aligned to the **bottom-right** corner: query i may see keys j <= i + Lk - Lq.
For Lq = 2, Lk = 5 (two new tokens after three cached ones):

       k0 k1 k2 k3 k4
    q0  1  1  1  1  0
    q1  1  1  1  1  1

(`torch.nn.functional.scaled_dot_product_attention`'s own ``is_causal`` is top-left there:
q0 would see only k0.) See `selfattn.masks` for the sliding window and more pictures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfattn._checks import (
    check_flag,
    check_mask,
    check_qkv,
    check_scale,
    check_window,
    compute_dtype,
    probability,
)
from selfattn.engines import AttentionRequest, Engine, EngineOutput, auto_order, get_engine
from selfattn.recording import is_recording


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention: softmax(q kᵀ · scale + mask) v.

    Args:
        q: (B, Hq, Lq, E) queries.
        k: (B, Hkv, Lk, E) keys; Hq must be a multiple of Hkv (grouped-query attention).
        v: (B, Hkv, Lk, Ev) values.
        attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
            (B, Hq, Lq, Lk).
        is_causal: mask future keys, aligned bottom-right (see the module docstring).
        window: with ``is_causal``, keep only the ``window`` most recent keys (itself included).
        scale: multiplies the scores; default 1/sqrt(E).
        dropout_p: dropout on the attention weights. Applied whenever > 0: pass 0.0 in eval.
        backend: "naive", "sdpa", "fused", "tiled" or "auto" (the fastest engine that supports
            the call).

    Returns:
        (B, Hq, Lq, Ev). A query row that may see no key returns zeros (and zero gradient).
    """
    return run(q, k, v, **_kwargs(locals())).output


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Like `attention`, also returning each row's log-sum-exp of the scaled, masked scores.

    Returns ``(out (B, Hq, Lq, Ev), lse (B, Hq, Lq))``; lse is -inf on rows with no key. Two
    partial results over disjoint key sets merge exactly with it (see `merge_partials`).
    """
    result = run(q, k, v, **_kwargs(locals()), need_lse=True)
    return result.output, result.lse


def attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Like `attention`, also returning the weights (B, Hq, Lq, Lk) (after dropout).

    Only engines that materialise the weights can serve this ("naive"); "auto" picks it.
    """
    result = run(q, k, v, **_kwargs(locals()), need_weights=True)
    return result.output, result.weights


def merge_partials(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    out_* (..., Lq, Ev), lse_* (..., Lq) as returned by `attention_with_lse`. Returns
    (out (..., Lq, Ev) in out_a's dtype, lse (..., Lq)). A row that saw no key in either part
    (lse -inf in both) stays zeros with lse -inf, and passes zero gradient, never NaN.

    Exact as long as each lse holds its row's information: a row whose float mask holds it near
    ``torch.finfo(dtype).min`` has lse = finfo.min + (a few), which rounds to finfo.min in any
    float dtype, so the two parts' relative weight is lost there.
    """
    dead = (lse_a == float("-inf")) & (lse_b == float("-inf"))  # (..., Lq)
    # logaddexp(-inf, -inf) is -inf but its gradient is NaN: give dead rows finite stand-ins.
    lse = torch.logaddexp(lse_a.masked_fill(dead, 0.0), lse_b.masked_fill(dead, 0.0))
    lse = lse.masked_fill(dead, float("-inf"))  # (..., Lq)
    safe = lse.masked_fill(dead, 0.0)  # (..., Lq), finite
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # (..., Lq, 1), 0 where part a saw no key
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = w_a * out_a + w_b * out_b  # (..., Lq, Ev)
    return out.to(out_a.dtype), lse


def _kwargs(local_vars: dict) -> dict:
    return {name: local_vars[name] for name in _KEYWORDS}


_KEYWORDS = ("attn_mask", "is_causal", "window", "scale", "dropout_p", "backend")


def run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
    need_lse: bool = False,
    need_weights: bool = False,
) -> EngineOutput:
    """Validate, build the request, pick the engine and run it. The one path every call takes."""
    check_qkv(q, k, v)
    request = AttentionRequest(
        attn_mask=check_mask(attn_mask, q, k),
        is_causal=check_flag("is_causal", is_causal),
        window=check_window(window, is_causal),
        scale=check_scale(scale, q.shape[-1]),
        dropout_p=probability("dropout_p", dropout_p),
        need_lse=need_lse,
        need_weights=need_weights,
        device_type=q.device.type,
        dtype=q.dtype,
    )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return _empty_output(q, k, v, request)
    # While a trace is recording, every call runs on the reference engine, whose weights exist.
    engine = get_engine("naive") if is_recording() else select_engine(backend, request)
    return engine.fn(q, k, v, request)


def _empty_output(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    """No queries, or no keys (every row dead): zeros, still attached to the inputs' graph."""
    b, hq, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    # Sums over empty slices: exactly 0 in the graph of q, k and v, whatever values they hold
    # (q.sum() * 0 would be NaN for a q holding inf); their gradient is zero.
    anchor = q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum()
    return EngineOutput(
        output=q.new_zeros(b, hq, lq, v.shape[-1]) + anchor,
        lse=q.new_full((b, hq, lq), float("-inf"), dtype=compute_dtype(q.dtype)) + anchor
        if request.need_lse
        else None,
        weights=q.new_zeros(b, hq, lq, lk) + anchor if request.need_weights else None,
    )


def select_engine(backend: str, request: AttentionRequest) -> Engine:
    """The engine that runs ``request``: the named one, or for "auto" the first that can.

    A named engine that cannot serve the request is an error, never a silent substitute.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        engine = get_engine(backend)
        reason = engine.unsupported(request)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
        return engine
    reasons = []
    for name in auto_order(request):  # the rule and its reasons: selfattn.engines.registry
        engine = get_engine(name)
        reason = engine.unsupported(request)
        if reason is None:
            return engine
        reasons.append(f"{name}: {reason}")
    raise ValueError("no attention engine supports this call (" + "; ".join(reasons) + ")")
