"""`selfattn explain`: build a module, trace it on some tokens, and render the trace.

The renderers (terminal walkthrough, JSON, and, with extras, PNG and HTML) all read one
`selfattn.Trace`; this package only decides what to trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from selfattn.book import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper
from selfattn.seed import SelfAttention_v1, SelfAttention_v2
from selfattn.trace import Trace, trace

# The founding text's example: "Your journey starts with one step", one 3-d embedding per word.
EXAMPLE_TOKENS = ["Your", "journey", "starts", "with", "one", "step"]
EXAMPLE_INPUTS = (
    (0.43, 0.15, 0.89),  # Your     (x^1)
    (0.55, 0.87, 0.66),  # journey  (x^2)
    (0.57, 0.85, 0.64),  # starts   (x^3)
    (0.22, 0.58, 0.33),  # with     (x^4)
    (0.77, 0.25, 0.10),  # one      (x^5)
    (0.05, 0.80, 0.55),  # step     (x^6)
)


def example_inputs() -> torch.Tensor:
    """The chapter's (6, 3) input embeddings."""
    return torch.tensor(EXAMPLE_INPUTS)


@dataclass(frozen=True)
class ModuleKind:
    """A module `explain` can build: its constructor and the chapter's seed for it."""

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
    """Seed torch, then build the module kind (in eval mode: no dropout in a walkthrough)."""
    if kind not in MODULE_KINDS:
        raise ValueError(f"unknown module {kind!r}; expected one of {', '.join(MODULE_KINDS)}")
    spec = MODULE_KINDS[kind]
    torch.manual_seed(spec.default_seed if seed is None else seed)
    return spec.build(d_in, d_out, heads, 1024).eval()


def explain_example(
    kind: str = "v1", *, seed: int | None = None, d_out: int = 2, heads: int = 2
) -> Trace:
    """Trace a module kind on the built-in six-token example."""
    x = example_inputs()
    module = build_module(kind, x.shape[-1], d_out, heads, seed)
    result = trace(module, x, EXAMPLE_TOKENS)
    result.extras["description"] = MODULE_KINDS[kind].description
    return result


def explain_traces(
    *,
    module: str | None = None,
    model: str | None = None,
    text: str | None = None,
    seed: int | None = None,
    d_out: int | None = None,
    heads: int = 2,
    truncate: bool = False,
) -> list[Trace]:
    """What `selfattn explain` renders: one trace, or one per layer for a pretrained model.

    - ``model="minilm"``: all-MiniLM-L6-v2's own attention on ``text`` (or the example sentence).
    - ``text``: a module kind (default "v1") on the text's pretrained token embeddings.
    - otherwise: a module kind on the chapter's six-token example (d_out 2 by default).
    """
    if model is not None:
        if model != "minilm":
            raise ValueError(f"unknown model {model!r}; expected 'minilm'")
        from selfattn.text import trace_minilm

        return trace_minilm(text or " ".join(EXAMPLE_TOKENS), truncate=truncate)
    kind = module or "v1"
    if text is not None:
        from selfattn.text import trace_text

        sizes = {} if d_out is None else {"d_out": d_out}
        return [trace_text(text, kind, seed=seed, heads=heads, truncate=truncate, **sizes)]
    return [explain_example(kind, seed=seed, d_out=2 if d_out is None else d_out, heads=heads)]
