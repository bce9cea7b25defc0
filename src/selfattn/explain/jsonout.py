"""`--json`: a trace as plain data.

``{"module": ..., "tokens": [...], "steps": [{"name", "shape", "values"}, ...]}``. Single-head
modules give each step for the one head, (L, ·); multi-head modules keep the head axis, (H, L, ·).
``mask`` appears when the module masks anything, ``output`` when it differs from ``context``
(a module with an output projection or several heads).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from selfattn.recording import PER_HEAD_STEPS
from selfattn.trace import Trace


def visible_steps(tr: Trace) -> list[str]:
    """The steps worth showing for this trace, in computation order."""
    names = tr.step_names()
    if not tr.masked and "mask" in names:
        names.remove("mask")
    if tr.num_heads == 1 and "output" in names and _same(tr, "output", "context"):
        names.remove("output")
    return names


def step_tensor(tr: Trace, name: str) -> Tensor:
    """The step as shown: per-head steps lose the head axis for single-head modules."""
    t = tr.steps[name]
    return t[0] if name in PER_HEAD_STEPS and tr.num_heads == 1 else t


def to_json(tr: Trace) -> dict[str, Any]:
    steps = []
    for name in visible_steps(tr):
        t = step_tensor(tr, name)
        values = t.tolist() if t.dtype.is_floating_point else t.bool().tolist()
        steps.append({"name": name, "shape": list(t.shape), "values": values})
    data: dict[str, Any] = {"module": tr.module, "tokens": tr.tokens}
    data["num_heads"] = tr.num_heads
    data["d_k"] = tr.d_k
    data.update({k: v for k, v in tr.extras.items() if isinstance(v, str | int | float)})
    data["steps"] = steps
    return data


def _same(tr: Trace, a: str, b: str) -> bool:
    x, y = tr.steps[a], tr.steps[b]
    y = y[0] if y.ndim == 3 else y
    return x.shape == y.shape and bool((x == y).all())
