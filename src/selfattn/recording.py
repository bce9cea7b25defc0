"""The one mechanism that exposes attention's intermediates: a recorder the code writes into.

Modules and the naive engine call `record(name, tensor)` at each step. Outside `recording()` that
is a no-op costing one context-variable lookup; inside, the tensors are kept (detached), and
`selfattn.functional` routes every call to the naive engine, the one that materialises the
weights. `selfattn.trace` builds on this; `explain` and the tests read traces, so there is no
second copy of the forward pass anywhere.

Per-head steps are recorded in the (B, H, L, ·) layout. The records are grouped by **layer**, one
attention module's call:

* recording ``"inputs"``, the first thing every selfattn attention module records, opens a new
  layer; every record after it, the engine's included, belongs to that layer. So a model with
  several attention layers (``nn.Sequential`` of two `MultiHeadAttention`, the MiniLM encoder)
  gives one entry per layer, in the order they ran, never heads of different layers side by side.
* a module made of several single-head modules (the chapter's `MultiHeadAttentionWrapper`) runs
  them inside `one_layer()`: their records are one layer, per-head steps concatenated along the
  head dimension, and for any other step the last record is kept.
* records made before any ``"inputs"`` (a bare `attention()` call) open a layer of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

PER_HEAD_STEPS = (
    "queries",
    "keys",
    "values",
    "scores",
    "scaled_scores",
    "mask",
    "masked_scores",  # derived by selfattn.explain, never recorded
    "weights",
    "dropped_weights",  # derived by selfattn.explain, never recorded
    "context",
)


@dataclass
class _Store:
    layers: list[dict[str, list[Tensor]]] = field(default_factory=list)
    grouping: int = 0  # depth of one_layer() blocks: while > 0, "inputs" opens no new layer


_ACTIVE: ContextVar[_Store | None] = ContextVar("selfattn_recorder", default=None)


def is_recording() -> bool:
    """Whether a `recording()` is active. Never inside code that ``torch.compile`` traces:
    a compiled model records nothing (trace it eagerly), and tracing meets no context
    variable, so the modules compile whole, without graph breaks."""
    return not torch.compiler.is_compiling() and _ACTIVE.get() is not None


def record(name: str, tensor: Tensor) -> None:
    """Keep ``tensor`` under ``name`` if a recording is active; otherwise do nothing.

    ``name == "inputs"`` starts a new layer (outside a `one_layer()` block). A no-op in
    compiled code (see `is_recording`).
    """
    if torch.compiler.is_compiling():
        return
    store = _ACTIVE.get()
    if store is None:
        return
    if not store.layers or (name == "inputs" and not store.grouping):
        store.layers.append({})
    store.layers[-1].setdefault(name, []).append(tensor.detach())


@contextmanager
def one_layer() -> Iterator[None]:
    """Inside this block every record goes to one new layer: the heads of a module made of
    single-head modules. Outside `recording()` it does nothing."""
    store = _ACTIVE.get()
    if store is None:
        yield
        return
    store.layers.append({})
    store.grouping += 1
    try:
        yield
    finally:
        store.grouping -= 1


@contextmanager
def recording() -> Iterator[list[dict[str, Tensor]]]:
    """Collect every recorded step, one dict of steps per layer in the order the layers ran.

    The yielded list is filled in when the block exits. In each layer's dict, per-head steps
    are (B, H, L, ·), a module made of single-head modules having its heads concatenated.
    """
    store = _Store()
    result: list[dict[str, Tensor]] = []
    token = _ACTIVE.set(store)
    try:
        yield result
    finally:
        _ACTIVE.reset(token)
    for layer in store.layers:
        steps = {}
        for name, tensors in layer.items():
            if name in PER_HEAD_STEPS and len(tensors) > 1:
                steps[name] = torch.cat(tensors, dim=1)  # heads side by side
            else:
                steps[name] = tensors[-1]
        result.append(steps)
