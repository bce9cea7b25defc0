"""Context parallelism for `selfattn train`: each sequence split across processes (ring attention).

    torchrun --standalone --nproc_per_node 4 -m selfattn train --context-parallel 2 ...

P processes (torchrun's WORLD_SIZE) form a two-dimensional ``torch.distributed`` device mesh,
("data", "context") of shape (P / C, C), built once by `ContextParallel.from_env`; the model
asks the mesh for its group and never counts ranks by hand. Rank g sits at (g // C, g % C):

    data      the D = P / C replicas: replica d trains on rows d·B/D .. (d+1)·B/D of each
              global batch of B sequences (as data parallelism does, `selfattn.train.data`)
    context   the C ranks of one replica share each of its sequences: rank c holds zigzag chunks
              c and 2C-1-c of 2C (`ContextShards`), T / C tokens of every row, P = 4, C = 2:

                  tokens of a row   0 .. T/4   T/4 .. T/2   T/2 .. 3T/4   3T/4 .. T
                  context rank      0          1            1             0

Each rank embeds its tokens at their global positions and every attention layer runs ring
attention over its context group (`GPT(config, context_parallel_group=...)`): each rank holds
the activations of T / C tokens, and the attention it computes is exact. The loss of a rank is
the mean over its B/D x T/C tokens; every rank holds as many tokens, so the mean of the P
ranks' losses is the mean over every token of the global batch, and DDP over all P ranks
(averaging their gradients) gives that loss's gradients: with dropout 0, the steps of one
process on the same global batch.

What stays as in one process: the checkpoints (rank 0 saves the whole model, the same files),
the batches' stream (every rank draws the same global batch), evaluation (the same sharded
forward on every rank, its losses averaged), and the sample at each evaluation (rank 0 alone,
on the whole model: `GPT.stream`). Dropout draws per rank, from (seed, rank, iteration), over
the rank's own tokens; ring attention has no attention-weight dropout, so under context
parallelism ``--dropout`` acts on the embeddings and the shortcuts only. The number of
processes and C are not part of the run: a run resumes with another P or C, or in one process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

from selfattn.ring.attention import kernels_for
from selfattn.ring.layouts import shard_sequence
from selfattn.train.config import TrainConfig
from selfattn.train.data import RandomBatches
from selfattn.train.data_parallel import DataParallel, check_device

LAYOUT = "zigzag"
_CONTEXT_STREAMS = 2**62  # dropout streams of context-parallel ranks start here


def start(cfg: TrainConfig, context_parallel: int | None) -> DataParallel:
    """This process's place in the run: `DataParallel` (one process, or torchrun's data
    parallelism) without ``context_parallel``, else `ContextParallel` with C =
    ``context_parallel``, every setting checked first (a ValueError, before any process group)."""
    if context_parallel is None:
        return DataParallel.from_env(cfg.device)
    check_context_parallel(cfg, context_parallel, _torchrun_world())
    dist = ContextParallel.from_env(cfg.device, context_parallel)
    if dist.is_main:
        print(describe(dist, cfg), file=sys.stderr)
    return dist


def describe(dist: ContextParallel, cfg: TrainConfig) -> str:
    """One line on how the run is split (and what dropout does under it)."""
    c, d, p = dist.context_size, dist.data_size, dist.world_size
    line = (
        f"selfattn train: context parallel: {_count(p, 'process', 'processes')} = "
        f"{_count(d, 'data-parallel replica', 'data-parallel replicas')} x "
        f"{_count(c, 'rank', 'ranks')} per sequence; each rank holds "
        f"{cfg.batch_size // d} x {cfg.block_size // c} tokens of every batch"
    )
    if cfg.dropout > 0:
        line += (
            f"; --dropout {cfg.dropout} acts on the embeddings and shortcuts only (ring "
            "attention has no dropout on its weights)"
        )
    return line


def _torchrun_world() -> int | None:
    """WORLD_SIZE when torchrun started this process (it sets RANK too), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def check_context_parallel(cfg: TrainConfig, c: int, world_size: int | None) -> None:
    """ValueError when --context-parallel ``c`` cannot run these settings on ``world_size``
    processes (None: not started by torchrun)."""
    if world_size is None:
        raise ValueError(
            f"--context-parallel {c} splits each sequence across processes: start them with "
            f"torchrun, e.g. torchrun --standalone --nproc_per_node {c} -m selfattn train "
            f"--context-parallel {c} ..."
        )
    if world_size % c != 0:
        divisors = [str(d) for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"--context-parallel {c} must divide the {world_size} processes torchrun started "
            f"(the rest is data parallel): use one of {', '.join(divisors)}"
        )
    parts = 2 * c
    if cfg.block_size % parts != 0:
        below = cfg.block_size // parts * parts
        sizes = " or ".join(str(n) for n in (below, below + parts) if n > 0)
        raise ValueError(
            f"--block-size {cfg.block_size} cannot be cut into the 2C = {parts} zigzag chunks "
            f"of --context-parallel {c}: use a multiple of {parts} (e.g. {sizes})"
        )
    data = world_size // c
    if cfg.batch_size % data != 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by the {data} data-parallel "
            f"replicas ({world_size} processes / --context-parallel {c})"
        )
    if cfg.compile:
        raise ValueError(
            "--context-parallel does not run under --compile: ring attention's send and "
            "receive between ranks are not something torch.compile traces; leave --compile out"
        )
    if cfg.data == "induction":
        raise ValueError(
            "--context-parallel does not run the induction task: its scores read each head's "
            "whole attention matrix, which ring attention never forms"
        )
    check_backend(cfg)


def check_backend(cfg: TrainConfig) -> None:
    """ValueError when ``cfg.backend`` cannot compute ring attention's blocks (it must return
    the log-sum-exp) on the run's device and dtype."""
    check_device(cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    try:  # no tensor: a CUDA context now would land on GPU 0, before each rank picks its own
        kernels_for(cfg.backend, cfg.device, dtype)
    except ValueError as err:
        raise ValueError(
            f"--context-parallel runs every attention layer as ring attention, whose blocks "
            f"need an engine that returns the log-sum-exp; --backend {cfg.backend} cannot "
            f"({err}); pass --backend auto (fused or tiled), also on a resume"
        ) from None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


@dataclass(frozen=True)
class ContextParallel(DataParallel):
    """`DataParallel` over a ("data", "context") device mesh: what the loop asks of it is the
    same (rank 0 writes, DDP over all P ranks, losses averaged over all P), and the batches and
    the model take the mesh's coordinates and context group."""

    context_size: int = 1
    mesh: Any = field(default=None, compare=False, repr=False)  # a DeviceMesh (P / C, C)

    @classmethod
    def from_env(  # type: ignore[override]
        cls, device: str = "cpu", context_size: int = 1, timeout_s: float | None = None
    ) -> ContextParallel:
        """Join torchrun's process group (as `DataParallel.from_env`) and build the mesh."""
        from torch.distributed.device_mesh import init_device_mesh

        base = DataParallel.from_env(device, timeout_s)
        if not tdist.is_initialized():  # one process under torchrun: a group of one
            backend = "nccl" if device == "cuda" else "gloo"
            timeout = timedelta(seconds=base.timeout_s)
            tdist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
        world = base.world_size
        mesh = init_device_mesh(
            device, (world // context_size, context_size), mesh_dim_names=("data", "context")
        )
        return cls(
            base.rank, world, base.local_rank, device, base.timeout_s,
            context_size=context_size, mesh=mesh,
        )  # fmt: skip

    @property
    def data_rank(self) -> int:
        return self.mesh.get_local_rank("data")

    @property
    def data_size(self) -> int:
        return self.mesh.size(0)

    @property
    def context_rank(self) -> int:
        return self.mesh.get_local_rank("context")

    @property
    def context_group(self) -> tdist.ProcessGroup:
        return self.mesh.get_group("context")

    @property
    def dropout_stream(self) -> int:
        """A dropout stream of each rank's own, never one that a process without context
        parallelism draws (its rank, < 2**62): a shard's masks are not one process's masks on
        the same tokens."""
        return _CONTEXT_STREAMS + self.context_size * 2**20 + self.rank

    def shard(self, batches: RandomBatches) -> ContextShards:
        return ContextShards(batches, self.context_rank, self.context_size)

    def close(self) -> None:
        super().close()
        if tdist.is_initialized():  # the group of one that `from_env` made
            tdist.destroy_process_group()


class ContextShards:
    """A batch source whose every batch is cut to this rank's zigzag shard: x, y (B_local, T)
    -> (B_local, T / C), chunks r and 2C-1-r of 2C along T. The stream, its state and the
    other attributes are the wrapped source's (every rank draws the same global batch)."""

    def __init__(self, batches: RandomBatches, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def _cut(self, pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = pair  # (B_local, T) each
        return tuple(shard_sequence(t, self.rank, self.size, LAYOUT, dim=1) for t in (x, y))

    def next_train(self) -> tuple[Tensor, Tensor]:
        return self._cut(self.batches.next_train())

    def eval_batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._cut(self.batches.eval_batch(split, generator))

    def state(self) -> Tensor:
        return self.batches.state()

    def load_state(self, state: Tensor) -> None:
        self.batches.load_state(state)

    def __getattr__(self, name: str):
        return getattr(self.batches, name)  # batch_size, block_size, device, ...
