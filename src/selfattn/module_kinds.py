"""Attention modules built by name: ``v1``, ``v2``, ``causal``, ``wrapper``, ``mha``.

One registry, read by `selfattn explain` (``--module``) and by `selfattn.text.trace_text`; an
unknown name is a ValueError that lists the valid ones. Each kind keeps the founding chapter's
seed, so a walkthrough reproduces the chapter's numbers.

Every module maps (L, d_in) -> (L, d_out); the multi-head kinds split d_out over their heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from selfattn.book import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper
from selfattn.seed import SelfAttention_v1, SelfAttention_v2

CONTEXT_LENGTH = 1024  # the causal modules' mask size: longer than any input explained


@dataclass(frozen=True)
class ModuleKind:
    """A module that can be built by name: its constructor and the chapter's seed for it."""

    name: str
    default_seed: int
    build: Callable[[int, int, int, int], nn.Module]  # (d_in, d_out, heads, context_length)
    description: str


MODULE_KINDS: dict[str, ModuleKind] = {
    kind.name: kind
    for kind in (
        ModuleKind(
            "v1",
            123,
            lambda d_in, d_out, h, ctx: SelfAttention_v1(d_in, d_out),
            "SelfAttention_v1: raw parameter matrices",
        ),
        ModuleKind(
            "v2",
            789,
            lambda d_in, d_out, h, ctx: SelfAttention_v2(d_in, d_out),
            "SelfAttention_v2: nn.Linear projections",
        ),
        ModuleKind(
            "causal",
            123,
            lambda d_in, d_out, h, ctx: CausalAttention(d_in, d_out, ctx, 0.0),
            "CausalAttention: single head, future tokens masked",
        ),
        ModuleKind(
            "wrapper",
            123,
            lambda d_in, d_out, h, ctx: MultiHeadAttentionWrapper(d_in, d_out, ctx, 0.0, h),
            "MultiHeadAttentionWrapper: stacked causal heads",
        ),
        ModuleKind(
            "mha",
            123,
            lambda d_in, d_out, h, ctx: MultiHeadAttention(d_in, d_out, ctx, 0.0, h),
            "MultiHeadAttention: causal, heads split from one projection",
        ),
    )
}


def build_module(kind: str, d_in: int, d_out: int, heads: int, seed: int | None) -> nn.Module:
    """Seed torch, then build the module kind (in eval mode: no dropout in a walkthrough).

    ``seed=None`` uses the kind's chapter seed (123; 789 for ``v2``).
    """
    if kind not in MODULE_KINDS:
        raise ValueError(f"unknown module {kind!r}; expected one of {', '.join(MODULE_KINDS)}")
    spec = MODULE_KINDS[kind]
    torch.manual_seed(spec.default_seed if seed is None else seed)
    return spec.build(d_in, d_out, heads, CONTEXT_LENGTH).eval()
