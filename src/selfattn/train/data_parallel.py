"""Data parallel training: which process am I, read from torchrun's environment.

(Not to be confused with `selfattn.ring`, ring attention: one sequence across processes.
Here each process trains on its own rows of the batch, with the same weights.)

    torchrun --standalone --nproc_per_node 2 -m selfattn train --preset shakespeare-char

A single process (the default, and what `from_env` gives without torchrun) is rank 0 of 1: it
writes every file and draws the progress bar. The training loop asks this object only:

    dist.is_main          write files, report progress?
    dist.rank, world_size which rows of each global batch (`selfattn.train.data.Batches`)
    dist.wrap(model)      the module to call in the loop (DistributedDataParallel when W > 1)
    dist.mean(value)      a float averaged over processes (losses and scores for the log)
    dist.any(flag)        whether any process says so (a stop request: all stop together)
    dist.barrier()        wait for every process
    dist.close()          leave the process group

With W processes each one trains on B / W rows of the same global batch of B and DDP averages
their gradients (each rank's loss is the mean over its equal share), so W processes take the
same steps as one process with the whole batch. The process group is gloo for a CPU run and
NCCL for CUDA (each process on GPU LOCAL_RANK), with a timeout of `TIMEOUT_S`: a process whose
peer died or hangs gets an error (`PeerFailure`) instead of waiting forever.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

TIMEOUT_S = 45  # a collective that waits longer for a peer fails (the process group's timeout)


class PeerFailure(RuntimeError):
    """Another process of the run died, hung or left: this one stops too."""


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    timeout_s: float = TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = TIMEOUT_S) -> DataParallel:
        """One process, unless torchrun's WORLD_SIZE says more: then join the process group
        (gloo on CPU, NCCL on CUDA) that RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT name."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device, timeout_s=timeout_s)
        if "RANK" not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world} but no RANK: start the processes with torchrun, which sets "
                "RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
            )
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is available here")
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device == "cuda" else "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(
                backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
            )
        return cls(rank, world, local_rank, device, timeout_s)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.is_parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _all_reduce(self, values: list[float], op) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        try:
            tdist.all_reduce(t, op=op)
        except RuntimeError as err:  # DistBackendError, gloo's and NCCL's errors
            raise self.failure(err) from err
        return t.cpu()

    def mean(self, value: float) -> float:
        if not self.is_parallel:
            return value
        return self._all_reduce([value], tdist.ReduceOp.SUM).item() / self.world_size

    def any(self, flag: bool) -> bool:
        if not self.is_parallel:
            return flag
        return bool(self._all_reduce([float(flag)], tdist.ReduceOp.MAX).item())

    def barrier(self) -> None:
        if self.is_parallel:
            self._all_reduce([0.0], tdist.ReduceOp.SUM)

    def failure(self, err: BaseException) -> PeerFailure:
        """``err`` (a collective that failed) as the error this process stops with."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return PeerFailure(
            f"rank {self.rank} of {self.world_size}: another process of the run died, hung or "
            f"left (no answer within {self.timeout_s:g} s, or a closed connection); stopping. "
            f"Cause: {first}"
        )

    def close(self) -> None:
        if self.is_parallel and tdist.is_initialized():
            # A DistributedDataParallel wrapper keeps the process group (and gloo's worker
            # threads) alive after destroy_process_group: freed only at interpreter exit, its
            # threads then aborted the process ("terminate called without an active
            # exception"). Free every unreachable wrapper first, while Python is whole.
            gc.collect()
            tdist.destroy_process_group()
            gc.collect()


SINGLE = DataParallel()
