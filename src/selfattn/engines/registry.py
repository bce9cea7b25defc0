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
None when it can serve the request. ``backend="auto"`` walks `auto_order(request)` and takes the
first engine with no reason; when every engine has one, the error lists them all.

An engine may also offer ``blocks``, a forward and a backward kernel outside autograd for ring
attention (`selfattn.ring`): the forward gives one key block's (out, lse), the backward one
block's (dq, dk, dv) from the rows' output and lse merged over every block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
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
    dtype: torch.dtype = torch.float32  # q's dtype: a kernel may lack one on a device


@dataclass
class EngineOutput:
    output: Tensor  # (B, Hq, Lq, Ev)
    lse: Tensor | None = None  # (B, Hq, Lq), float32 or wider; -inf on rows with no key
    weights: Tensor | None = None  # (B, Hq, Lq, Lk), after dropout


EngineFn = Callable[[Tensor, Tensor, Tensor, AttentionRequest], EngineOutput]


@dataclass(frozen=True)
class BlockKernels:
    """Ring attention's per-block kernels (no autograd; results in the compute dtype).

    ``forward(q, k, v, *, is_causal, scale) -> (out (B, Hq, Lq, Ev), lse (B, Hq, Lq))``
    ``backward(q, k, v, out, lse, dout, *, is_causal, scale) -> (dq, dk, dv)``, where out and
    lse are the rows' whole attention (merged over every block), so dk, dv are exactly this
    block's and dq is its share. ``is_causal`` is bottom-right, as everywhere.
    """

    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Engine:
    name: str
    fn: EngineFn
    unsupported: Callable[[AttentionRequest], str | None]
    summary: str
    blocks: BlockKernels | None = None  # for ring attention; None: the ring cannot use it


ENGINES: dict[str, Engine] = {}

# "auto" tries these in order and takes the first that supports the request (`auto_order`).
# sdpa returns neither lse nor weights, so a request for the lse goes to "fused" (PyTorch's own
# kernels with the lse) where it can run (no dropout, cpu or cuda), else "tiled".
AUTO_ORDER: tuple[str, ...] = ("sdpa", "fused", "tiled", "naive")
# A sliding window on CPU: "tiled" skips the blocks the window rules out, where sdpa and fused
# compute them all under a dense mask. (On a GPU the tiled engine is a Python loop over tiles,
# about 100x slower than SDPA on an H200: the kernels with the window's mask run there.)
WINDOWED_CPU_ORDER: tuple[str, ...] = ("tiled", "sdpa", "fused", "naive")
# Ring attention's blocks: the engines with block kernels, fastest first.
RING_ORDER: tuple[str, ...] = ("fused", "tiled")


def auto_order(request: AttentionRequest) -> tuple[str, ...]:
    """The engines "auto" tries for ``request``, in order. Not measured yet on this rule's
    every branch: benchmarks/engines.py has the figures to settle it (fused against tiled for
    lse requests, idle and loaded; windowed CPU calls)."""
    windowed_cpu = request.window is not None and request.device_type == "cpu"
    return WINDOWED_CPU_ORDER if windowed_cpu else AUTO_ORDER


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
