"""Argument checks shared by the modules: one wording for every error."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, or a TypeError / ValueError naming what arrived."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


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
