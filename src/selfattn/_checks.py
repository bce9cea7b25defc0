"""Argument checks, one wording for every error: a leaf module that the functional core, the
engines and the modules all import (it imports nothing from selfattn)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---- numbers: one wording and one set of accepted values for the API (the modules,
# TrainConfig) and the command line (`selfattn._argtypes`, whose converters pass name=None).
# bool is never a number here, and a float must be finite.


def check_device(device: str, name: str = "device") -> str:
    """``device`` ("cpu" or "cuda"), or a ValueError when it is neither or no CUDA device is
    available here."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} 'cuda' asked for, but torch sees no CUDA device here")
    return device


# ---- numbers ----


def positive_int(name: str | None, value: object) -> int:
    """``value`` as an int >= 1, or a TypeError / ValueError naming what arrived."""
    return _int_within(name, value, 1, None, "a positive integer")


def non_negative_int(name: str | None, value: object) -> int:
    return _int_within(name, value, 0, None, "an integer >= 0")


def int_in_range(name: str | None, value: object, low: int, high: int) -> int:
    return _int_within(name, value, low, high, f"an integer {low}..{high}")


def seed(name: str | None, value: object) -> int:
    """A ``torch.manual_seed`` value: an integer in [0, 2**64)."""
    return _int_within(name, value, 0, 2**64 - 1, "a seed in [0, 2**64)")


def positive_float(name: str | None, value: object) -> float:
    return _finite_where(name, value, lambda x: x > 0, "a finite number > 0")


def non_negative_float(name: str | None, value: object) -> float:
    return _finite_where(name, value, lambda x: x >= 0, "a finite number >= 0")


def probability(name: str | None, value: object) -> float:
    """A probability such as a dropout rate: 0 <= P < 1."""
    return _finite_where(name, value, lambda x: 0 <= x < 1, "a number in [0, 1)")


def _int_within(name: str | None, value: object, low: int, high: int | None, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(_must_be(name, expected, _shown(value)))
    if value < low or (high is not None and value > high):
        raise ValueError(_must_be(name, expected, value))
    return value


def _finite_where(name: str | None, value: object, ok, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(_must_be(name, expected, _shown(value)))
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(_must_be(name, expected, value))
    return float(value)


def _shown(value: object) -> str:
    """A value of the wrong type: text as typed ('1.5'), anything else with its type (bool True)."""
    return repr(value) if isinstance(value, str) else f"{type(value).__name__} {value!r}"


def _must_be(name: str | None, expected: str, got: object) -> str:
    return f"{name} must be {expected}, got {got}" if name else f"expected {expected}, got {got}"


# ---- tensors ------------------------------------------------------------------------------------


def token_input(x: object, d_in: int, module: str) -> Tensor:
    """Check ``x`` is a float tensor of shape (..., seq_len, d_in) and return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{module} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{module} expects a floating-point tensor (..., seq_len, {d_in}), got dtype {x.dtype}"
        )
    if x.ndim < 2 or x.shape[-1] != d_in:
        raise ValueError(
            f"{module} expects input of shape (..., seq_len, {d_in}), got {tuple(x.shape)}"
        )
    return x


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(..., L, H * D) -> (N, H, L, D), with N the product of the leading dims."""
    *lead, length, width = t.shape
    n = math.prod(lead)  # explicit, not -1: works for empty sequences too
    t = t.reshape(n, length, num_heads, width // num_heads)  # (N, L, H, D)
    return t.transpose(1, 2)  # (N, H, L, D)


def merge_heads(t: Tensor, lead: torch.Size | tuple[int, ...]) -> Tensor:
    """(N, H, L, D) -> (..., L, H * D), restoring the leading dims ``lead``."""
    _, h, length, d = t.shape
    t = t.transpose(1, 2)  # (N, L, H, D)
    return t.reshape(*lead, length, h * d)


# ---------------------------------------------------------------------- attention() arguments


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every engine computes scores, softmax, sums and lse in: float64 for float64
    inputs, float32 otherwise (bf16 or fp16 scores would round the softmax's inputs to 2-3
    significant digits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_mask(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """``attn_mask`` checked and made 4-D: broadcastable to (B, Hq, Lq, Lk), on q's device, and
    (when float) in the compute dtype (`compute_dtype`), never narrower: a float32 mask of
    finfo(float32).min or -1e9 would become -inf in bf16 or fp16. A 0-D to 3-D mask gains
    leading size-1 dims, a view."""
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
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # (1|B, 1|Hq, 1|Lq, 1|Lk)
    if mask.is_floating_point() and mask.dtype != compute_dtype(q.dtype):
        mask = mask.to(compute_dtype(q.dtype))
    return mask.to(q.device)


def check_flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_window(window: int | None, is_causal: bool, causal_name: str = "is_causal") -> int | None:
    """A sliding window: None, or an int >= 1 that comes with causal masking."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not is_causal:
        raise ValueError(f"window={window} needs {causal_name}=True (a sliding window looks back)")
    return window


def check_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: 1/sqrt(E) for None, else a finite float > 0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (or None for 1/sqrt(E)), got {scale}")
    return float(scale)
