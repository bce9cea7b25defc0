"""The one mechanism that exposes attention's intermediates: a recorder the code writes into.

Modules and the naive engine call `record(name, tensor)` at each step. Outside `recording()` that
is a no-op costing one context-variable lookup; inside, the tensors are kept (detached), and
`selfattn.functional` routes every call to the naive engine, the one that materialises the
weights. `selfattn.trace` builds on this; `explain` and the tests read traces, so there is no
second copy of the forward pass anywhere.

Per-head steps are recorded in the (B, H, L, ·) layout. A module made of several single-head
modules (the chapter's MultiHeadAttentionWrapper) records once per head; those records are
concatenated along the head dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

PER_HEAD_STEPS = (
    "queries",
    "keys",
    "values",
    "scores",
    "scaled_scores",
    "mask",
    "weights",
    "context",
)

_ACTIVE: ContextVar[dict[str, list[Tensor]] | None] = ContextVar("selfattn_recorder", default=None)


def is_recording() -> bool:
    return _ACTIVE.get() is not None


def record(name: str, tensor: Tensor) -> None:
    """Keep ``tensor`` under ``name`` if a recording is active; otherwise do nothing."""
    store = _ACTIVE.get()
    if store is not None:
        store.setdefault(name, []).append(tensor.detach())


@contextmanager
def recording() -> Iterator[dict[str, Tensor]]:
    """Collect every recorded step; the yielded dict is filled in when the block exits."""
    store: dict[str, list[Tensor]] = {}
    result: dict[str, Tensor] = {}
    token = _ACTIVE.set(store)
    try:
        yield result
    finally:
        _ACTIVE.reset(token)
    for name, tensors in store.items():
        if name in PER_HEAD_STEPS and len(tensors) > 1:
            result[name] = torch.cat(tensors, dim=1)  # heads side by side
        else:
            result[name] = tensors[-1]
