"""selfattn: scaled dot-product self-attention you can read, see and ship.

The public names load on first use (PEP 562): ``import selfattn`` loads neither torch nor any
engine, so the `selfattn` command is handling Ctrl-C before torch starts to load, and
``from selfattn import MultiHeadAttention`` works as always.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time, `__getattr__` below
    from selfattn.engines import available as available_backends
    from selfattn.explain.inline import plot, show
    from selfattn.functional import (
        attention,
        attention_with_lse,
        attention_with_weights,
        merge_partials,
    )
    from selfattn.masks import causal_mask, key_padding_mask, sliding_window_mask
    from selfattn.modules.causal_multihead import (
        CausalAttention,
        MultiHeadAttention,
        MultiHeadAttentionWrapper,
    )
    from selfattn.modules.self_attention import SelfAttention_v1, SelfAttention_v2
    from selfattn.trace import Trace, trace, trace_all

# public name -> (module, name there)
_PUBLIC = {
    "CausalAttention": ("selfattn.modules.causal_multihead", "CausalAttention"),
    "MultiHeadAttention": ("selfattn.modules.causal_multihead", "MultiHeadAttention"),
    "MultiHeadAttentionWrapper": ("selfattn.modules.causal_multihead", "MultiHeadAttentionWrapper"),
    "SelfAttention_v1": ("selfattn.modules.self_attention", "SelfAttention_v1"),
    "SelfAttention_v2": ("selfattn.modules.self_attention", "SelfAttention_v2"),
    "Trace": ("selfattn.trace", "Trace"),
    "attention": ("selfattn.functional", "attention"),
    "attention_with_lse": ("selfattn.functional", "attention_with_lse"),
    "attention_with_weights": ("selfattn.functional", "attention_with_weights"),
    "available_backends": ("selfattn.engines", "available"),
    "causal_mask": ("selfattn.masks", "causal_mask"),
    "key_padding_mask": ("selfattn.masks", "key_padding_mask"),
    "merge_partials": ("selfattn.functional", "merge_partials"),
    "plot": ("selfattn.explain.inline", "plot"),
    "show": ("selfattn.explain.inline", "show"),
    "sliding_window_mask": ("selfattn.masks", "sliding_window_mask"),
    "trace": ("selfattn.trace", "trace"),
    "trace_all": ("selfattn.trace", "trace_all"),
}

__all__ = sorted(_PUBLIC)

# A Trace draws itself inline in Jupyter (`Trace._repr_html_`) through the view that
# selfattn.explain.inline registers: loading a trace name through the package loads it too.
_WITH_VIEW = {"Trace", "trace", "trace_all"}

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """A public name, imported on first use; else a submodule (``selfattn.functional``), as the
    eager package made them attributes too."""
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        value = getattr(importlib.import_module(module), attribute)
        if name in _WITH_VIEW:
            importlib.import_module("selfattn.explain.inline")
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # the submodule exists; something it needs does not
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``selfattn.trace`` the function: importing the submodule of the same name would
    otherwise set the package's attribute to the module."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
