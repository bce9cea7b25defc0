"""Attention over a sequence split across processes: ring attention on torch.distributed.

* `ring_attention(q, k, v, *, group, is_causal, scale, layout, backend)`: each rank passes its
  shard of the sequence and gets its shard of the exact output; differentiable; each block runs
  on an engine's block kernels, "fused" or "tiled" (see `attention`).
* `shard_sequence` / `unshard_sequence`: full tensor <-> shards, in the ``"zigzag"`` (balanced
  under a causal mask) or ``"contiguous"`` layout (see `layouts`).
* `run_local(fn, P, ...)`: run ``fn`` on P local gloo processes, to try it on one machine.

Works on gloo (CPU) and NCCL (GPU). ``MultiHeadAttention(..., context_parallel_group=group)``
runs the chapter's module on a sharded sequence.
"""

from selfattn.ring.attention import ring_attention
from selfattn.ring.layouts import (
    LAYOUTS,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from selfattn.ring.local import LocalRunError, run_local

__all__ = [
    "LAYOUTS",
    "LocalRunError",
    "ring_attention",
    "run_local",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
