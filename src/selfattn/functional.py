"""The functional core: `attention()` checks its arguments once, then hands them to an engine.

Shape legend (PyTorch SDPA's layout and vocabulary):
    B   batch size
    Hq  query heads; Hkv key/value heads, Hq a multiple of Hkv (GQA; Hkv = 1 is MQA)
    Lq  target (query) length; Lk source (key/value) length
    E   query/key head dim; Ev value head dim

    q (B, Hq, Lq, E)   k (B, Hkv, Lk, E)   v (B, Hkv, Lk, Ev)   ->   out (B, Hq, Lq, Ev)

``is_causal`` is aligned to the **bottom-right** corner: query i may see keys j <= i + Lk - Lq.
For Lq = 2, Lk = 5 (two new tokens after three cached ones)::

       k0 k1 k2 k3 k4
    q0  1  1  1  1  0
    q1  1  1  1  1  1

(`torch.nn.functional.scaled_dot_product_attention`'s own ``is_causal`` is top-left there:
q0 would see only k0.) See `selfattn.masks` for the sliding window and more pictures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattn._checks import probability
from selfattn.engines import AUTO_ORDER, AttentionRequest, Engine, EngineOutput, get_engine
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
        backend: "naive", "sdpa", "tiled" or "auto" (the fastest engine that supports the call).

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


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple:
    """Combine attention over two disjoint key sets into attention over their union.

    out_* (..., Lq, Ev), lse_* (..., Lq) as returned by `attention_with_lse`.
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (..., Lq), -inf only if both are
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # (..., Lq, 1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a + w_b * out_b, lse


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
    )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return _empty_output(q, k, v, request)
    # While a trace is recording, every call runs on the reference engine, whose weights exist.
    engine = get_engine("naive") if is_recording() else select_engine(backend, request)
    return engine.fn(q, k, v, request)


def _empty_output(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    """No queries, or no keys (every row dead): zeros, still attached to the inputs' graph."""
    b, hq, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    anchor = (q.sum() + k.sum() + v.sum()) * 0.0  # keeps autograd's graph; gradient is zero
    return EngineOutput(
        output=q.new_zeros(b, hq, lq, v.shape[-1]) + anchor,
        lse=q.new_full((b, hq, lq), float("-inf")) if request.need_lse else None,
        weights=q.new_zeros(b, hq, lq, lk) if request.need_weights else None,
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
    # The tiled engine skips the blocks a sliding window rules out; SDPA would compute them all.
    order = ("tiled", "sdpa", "naive") if request.window is not None else AUTO_ORDER
    reasons = []
    for name in order:
        engine = get_engine(name)
        reason = engine.unsupported(request)
        if reason is None:
            return engine
        reasons.append(f"{name}: {reason}")
    raise ValueError("no attention engine supports this call (" + "; ".join(reasons) + ")")


# ----------------------------------------------------------------------------- argument checks


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.ndim != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, L, E), got {t.ndim}-D with shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads: {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}): "
            f"{shapes}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim E: {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length Lk: {shapes}")


def check_mask(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got dtype {mask.dtype}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        fits = mask.ndim <= 4 and torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} cannot broadcast to (B, Hq, Lq, Lk) = {target}"
        )
    if mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return mask.to(q.device)


def check_flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_window(window: int | None, is_causal: bool) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not is_causal:
        raise ValueError(f"window={window} needs is_causal=True (a sliding window looks back)")
    return window


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)
