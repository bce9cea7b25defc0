"""`selfattn explain`: build a module, trace it on some tokens, and render the trace.

The renderers (terminal walkthrough, JSON, and, with extras, PNG and HTML) all read one
`selfattn.Trace`; this package only decides what to trace. It reads `selfattn.minilm_trace` (real
text, a pretrained model) and `selfattn.module_kinds` (modules by name); neither reads it.
"""

from __future__ import annotations

import torch

from selfattn.explain.chapter import add_chapter_steps
from selfattn.explain.inline import plot, show  # also: a Trace draws itself in Jupyter
from selfattn.minilm_trace import trace_minilm, trace_text
from selfattn.module_kinds import MODULE_KINDS, ModuleKind, build_module
from selfattn.trace import Trace, trace

__all__ = [
    "EXAMPLE_INPUTS",
    "EXAMPLE_TOKENS",
    "MODULE_KINDS",
    "ModuleKind",
    "build_module",
    "example_inputs",
    "explain_example",
    "explain_traces",
    "plot",
    "show",
]

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


UNTRAINED_NOTE = (
    "The projections W_query, W_key and W_value are random (untrained), so these weights are "
    "close to uniform and say nothing about the text. For attention a model has learned, use "
    "--model minilm."
)


def explain_example(
    kind: str = "v1",
    *,
    seed: int | None = None,
    d_out: int = 2,
    heads: int = 2,
    dropout: float = 0.0,
) -> Trace:
    """Trace a module kind on the built-in six-token example, with the chapter's derived steps
    (`selfattn.explain.chapter`); ``dropout`` > 0 adds the weights after dropout, seeded."""
    x = example_inputs()
    module = build_module(kind, x.shape[-1], d_out, heads, seed)
    result = trace(module, x, EXAMPLE_TOKENS)
    result.extras["description"] = MODULE_KINDS[kind].description
    return _finish(result, kind, dropout, seed)


def _finish(tr: Trace, kind: str, dropout: float, seed: int | None) -> Trace:
    if kind == "simple":
        tr.extras["scale"] = 1.0  # the chapter's first attention: softmax of the raw scores
    return add_chapter_steps(tr, dropout=dropout, seed=seed)


def explain_traces(
    *,
    module: str | None = None,
    model: str | None = None,
    text: str | None = None,
    seed: int | None = None,
    d_out: int | None = None,
    heads: int = 2,
    truncate: bool = False,
    dropout: float = 0.0,
) -> list[Trace]:
    """What `selfattn explain` renders: one trace, or one per layer for a pretrained model.

    - ``model="minilm"``: all-MiniLM-L6-v2's own attention on ``text`` (the example sentence when
      ``text`` is None; an empty ``text`` is a ValueError, as everywhere).
    - ``text``: a module kind (default "v1") on the text's pretrained token embeddings.
    - otherwise: a module kind on the chapter's six-token example (d_out 2 by default).
    """
    if model is not None:
        if model != "minilm":
            raise ValueError(f"unknown model {model!r}; expected 'minilm'")
        words = " ".join(EXAMPLE_TOKENS) if text is None else text  # "" is refused, not replaced
        return [add_chapter_steps(tr) for tr in trace_minilm(words, truncate=truncate)]
    kind = module or "v1"
    if text is not None:
        sizes = {} if d_out is None else {"d_out": d_out}
        tr = trace_text(text, kind, seed=seed, heads=heads, truncate=truncate, **sizes)
        if kind != "simple":
            tr.extras["note"] = UNTRAINED_NOTE
        return [_finish(tr, kind, dropout, seed)]
    d_out = 2 if d_out is None else d_out
    return [explain_example(kind, seed=seed, d_out=d_out, heads=heads, dropout=dropout)]
