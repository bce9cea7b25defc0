"""Attention modules built by name: ``simple``, ``v1``, ``v2``, ``causal``, ``wrapper``, ``mha``.

One registry, read by `selfattn explain` (``--module``) and by
`selfattn.minilm_trace.trace_text`; an unknown name is a ValueError that lists the valid ones.
Each kind keeps the founding chapter's seed, so a walkthrough reproduces the chapter's numbers.

Every module maps (L, d_in) -> (L, d_out); the multi-head kinds split d_out over their heads.
``simple`` has no weights at all: it maps (L, d_in) -> (L, d_in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfattn._checks import merge_heads, positive_int, split_heads, token_input
from selfattn.functional import attention
from selfattn.modules.causal_multihead import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
)
from selfattn.modules.self_attention import SelfAttention_v1, SelfAttention_v2
from selfattn.recording import record

CONTEXT_LENGTH = 1024  # the causal modules' mask size: longer than any input explained


class SimpleAttention(nn.Module):
    """The chapter's starting point: attention without trainable weights.

    Every token is its own query, key and value: scores = x xᵀ (no scaling yet), weights =
    softmax over each row, context = weights · x. x (..., L, d_in) -> (..., L, d_in).
    """

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.d_in = positive_int("d_in", d_in)

    def forward(self, x: Tensor) -> Tensor:
        x = token_input(x, self.d_in, type(self).__name__)
        record("inputs", x)
        q = split_heads(x, 1)  # (..., L, d_in) -> (N, 1, L, d_in): queries = keys = values = x
        for name in ("queries", "keys", "values"):
            record(name, q)
        context = attention(q, q, q, scale=1.0)  # softmax(x xᵀ) x: (N, 1, L, d_in)
        out = merge_heads(context, x.shape[:-2])  # (..., L, d_in)
        record("output", out)
        return out

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}"


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
            "simple",
            123,
            lambda d_in, d_out, h, ctx: SimpleAttention(d_in),
            "simplified self-attention: no trainable weights, softmax(x xᵀ) x",
        ),
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
