"""Which process am I: the context of a run across processes, read from torchrun's environment.

A single process (the default, and what `from_env` gives without torchrun) is rank 0 of 1: it
writes every file and draws the progress bar. The training loop asks this object only:

    dist.is_main          write files, report progress?
    dist.rank, world_size which slice of each global batch (`selfattn.train.data.Batches`)
    dist.wrap(model)      the module to call in the loop (DistributedDataParallel under torchrun)
    dist.mean(value)      a float averaged over processes (losses for the log)
    dist.close()          leave the process group

Several processes (``torchrun --nproc_per_node N -m selfattn train``) are not implemented
yet: `from_env` refuses them with a clear error instead of training N unsynchronised copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """One process unless torchrun's WORLD_SIZE says more (then a ValueError, for now)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise ValueError(
                f"WORLD_SIZE={world}: training across processes (torchrun) is not implemented "
                "yet; run one process"
            )
        return cls()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def mean(self, value: float) -> float:
        return value

    def close(self) -> None:
        pass


SINGLE = Distributed()
