"""The engine registry: every engine has one signature and is chosen by name.

(`selfattn.engines` re-exports all of this and registers the built-in engines.)

An engine is a function ``fn(q, k, v, request) -> EngineOutput`` that receives tensors that
`selfattn.functional` has already validated:

    q      (B, Hq, Lq, E)     floating point, same dtype and device as k and v
    k      (B, Hkv, Lk, E)    Hq is a multiple of Hkv (grouped-query attention)
    v      (B, Hkv, Lk, Ev)

and an `AttentionRequest` carrying everything else. The engine returns the output
(B, Hq, Lq, Ev), and, when the request asks for them, the per-row log-sum-exp (B, Hq, Lq)
and the attention weights (B, Hq, Lq, Lk).

Rules every engine keeps (the tests hold them to it):
- ``is_causal`` is aligned to the bottom-right corner (see `selfattn.masks`).
- A query row that may see no key returns zeros, passes zero gradient and has lse = -inf.
- ``attn_mask`` is either None, a bool tensor (True = may attend) or a float tensor added to the
  scores; either is broadcastable to (B, Hq, Lq, Lk).

An engine says what it cannot do through ``unsupported(request) -> str | None``: a reason, or
None when it can serve the request. ``backend="auto"`` walks `AUTO_ORDER` and takes the first
engine with no reason; when every engine has one, the error lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class AttentionRequest:
    """Everything about one attention call except q, k and v (already validated)."""

    attn_mask: Tensor | None = None  # bool (True = keep) or float (added), broadcastable
    is_causal: bool = False  # bottom-right aligned
    window: int | None = None  # sliding window (only with is_causal): W most recent keys
    scale: float = 1.0  # already resolved: 1/sqrt(E) when the caller gave None
    dropout_p: float = 0.0  # already 0.0 when not training
    need_lse: bool = False
    need_weights: bool = False
    device_type: str = "cpu"  # q's device type ("cpu", "cuda", ...): "auto" may choose by it


@dataclass
class EngineOutput:
    output: Tensor  # (B, Hq, Lq, Ev)
    lse: Tensor | None = None  # (B, Hq, Lq), float32 or wider; -inf on rows with no key
    weights: Tensor | None = None  # (B, Hq, Lq, Lk), after dropout


EngineFn = Callable[[Tensor, Tensor, Tensor, AttentionRequest], EngineOutput]


@dataclass(frozen=True)
class Engine:
    name: str
    fn: EngineFn
    unsupported: Callable[[AttentionRequest], str | None]
    summary: str


ENGINES: dict[str, Engine] = {}

# "auto" tries these in order and takes the first that supports the request.
AUTO_ORDER: tuple[str, ...] = ("sdpa", "tiled", "naive")


def register(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    """Look an engine up by name; an unknown name is a ValueError listing the valid ones."""
    if name not in ENGINES:
        valid = ", ".join(repr(n) for n in [*ENGINES, "auto"])
        raise ValueError(f"unknown attention backend {name!r}; expected one of {valid}")
    return ENGINES[name]


def available() -> list[str]:
    return [*ENGINES, "auto"]
