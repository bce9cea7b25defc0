"""The attention engines, chosen by name from one registry (`selfattn.engines.registry`).

Importing this package registers the built-in engines: "naive" (the reference), "sdpa"
(PyTorch's fused kernel behind an adapter), "fused" (PyTorch's private fused kernels that return
the log-sum-exp) and "tiled" (FlashAttention in plain PyTorch).
"""

# The built-in engines register themselves on import (fused after tiled: the order that
# `available` lists them in).
from selfattn.engines import naive, sdpa, tiled  # noqa: F401, I001
from selfattn.engines import fused  # noqa: F401
from selfattn.engines.registry import (
    AUTO_ORDER,
    ENGINES,
    RING_ORDER,
    AttentionRequest,
    BlockKernels,
    Engine,
    EngineFn,
    EngineOutput,
    auto_order,
    available,
    get_engine,
    register,
)

__all__ = [
    "AUTO_ORDER",
    "ENGINES",
    "RING_ORDER",
    "AttentionRequest",
    "BlockKernels",
    "Engine",
    "EngineFn",
    "EngineOutput",
    "auto_order",
    "available",
    "get_engine",
    "register",
]
