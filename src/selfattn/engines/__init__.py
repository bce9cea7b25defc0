"""The attention engines, chosen by name from one registry (`selfattn.engines.registry`).

Importing this package registers the built-in engines: "naive" (the reference), "sdpa"
(PyTorch's fused kernel behind an adapter) and "tiled" (FlashAttention in plain PyTorch).
"""

# The built-in engines register themselves on import.
from selfattn.engines import naive, sdpa, tiled  # noqa: F401
from selfattn.engines.registry import (
    AUTO_ORDER,
    ENGINES,
    AttentionRequest,
    Engine,
    EngineFn,
    EngineOutput,
    available,
    get_engine,
    register,
)

__all__ = [
    "AUTO_ORDER",
    "ENGINES",
    "AttentionRequest",
    "Engine",
    "EngineFn",
    "EngineOutput",
    "available",
    "get_engine",
    "register",
]
