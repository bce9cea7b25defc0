"""Data parallel training: which process am I, read from torchrun's environment.

(Not to be confused with `selfattn.ring`, ring attention: one sequence across processes.
Here each process trains on its own rows of the batch, with the same weights.)

    torchrun --standalone --nproc_per_node 2 -m selfattn train --preset shakespeare-char

A single process (the default, and what `from_env` gives without torchrun) is rank 0 of 1: it
writes every file and draws the progress bar. The training loop asks this object only:

    dist.is_main          write files, report progress?
    dist.data_rank, data_size  which rows of each global batch (`selfattn.train.data.Batches`):
                          rank and world_size here
    dist.shard(batches)   the batch source to draw from: ``batches`` here
    dist.context_group    the group that shares each sequence (the model's): None here
    dist.dropout_stream   whose dropout masks to draw (`loop.dropout_seed`): the rank here
    dist.wrap(model)      the module to call in the loop (DistributedDataParallel when W > 1)
    dist.mean(value)      a float averaged over processes (losses and scores for the log)
    dist.barrier()        wait for every process
    dist.solo(work)       rank 0 works alone (a checkpoint, a sample, plots), the others wait
    dist.close()          leave the process group

`selfattn.train.context_parallel.ContextParallel` answers the same questions for a run that
also splits each sequence across processes (``--context-parallel``).

With W processes each one trains on B / W rows of the same global batch of B and DDP averages
their gradients (each rank's loss is the mean over its equal share), so W processes take the
same steps as one process with the whole batch. The process group is gloo for a CPU run and
NCCL for CUDA (each process on GPU LOCAL_RANK), with a timeout of `TIMEOUT_S`: a process whose
peer died or hangs gets an error (`PeerFailure`) instead of waiting forever.

Work that rank 0 does alone must not look like a hang: a checkpoint on a slow disk or a long
sample can take longer than the timeout. During `solo` the other processes wait on the process
group's key-value store, not in a collective: rank 0 adds a beat to a counter there every
`BEAT_S` seconds while its work runs, and a waiting process fails (`PeerFailure`) only when the
counter has not moved for `TIMEOUT_S` seconds (rank 0 died, or its process stopped answering:
frozen, or stopped by SIGSTOP), or when rank 0's work raised. Healthy work, however slow, never
trips it.

A stop (Ctrl-C, SIGTERM) uses no collective: torchrun passes the signal to every process, each
drops its unfinished iteration and leaves, and rank 0 saves its last complete one (a peer may
be inside one long operation, or inside a collective, and cannot be waited for). A signal sent
to one process alone stops that one; the others then report it gone (`PeerFailure`).
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from selfattn._checks import check_device
from selfattn._errors import first_line

TIMEOUT_S = 45  # a collective that waits longer for a peer fails (the process group's timeout)
BEAT_S = 1.0  # rank 0's beats during its solo work
POLL_S = 0.05  # how often a waiting process looks at the store
_SOLO_OK, _SOLO_FAILED = 1, 2  # what rank 0 leaves in the store when its solo work ends


class PeerFailure(RuntimeError):
    """Another process of the run died, hung or left: this one stops too."""


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    timeout_s: float = TIMEOUT_S
    _rounds: itertools.count = field(default_factory=itertools.count, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    # Which rows of each global batch this process trains on, and the group that shares each
    # sequence: here every process is a replica of its own, holding whole sequences (context
    # parallelism, `selfattn.train.context_parallel`, splits them).
    @property
    def data_rank(self) -> int:
        return self.rank

    @property
    def data_size(self) -> int:
        return self.world_size

    @property
    def context_group(self) -> tdist.ProcessGroup | None:
        return None

    @property
    def dropout_stream(self) -> int:
        """Whose dropout masks this process draws (`selfattn.train.loop.dropout_seed`): its
        rank's, so one process and rank 0 of several draw alike."""
        return self.rank

    def shard(self, batches):
        """The batch source this process draws from: ``batches`` itself (whole sequences)."""
        return batches

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float | None = None) -> DataParallel:
        """One process, unless torchrun's WORLD_SIZE says more: then join the process group
        (gloo on CPU, NCCL on CUDA) that RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT name.
        ``timeout_s`` defaults to `TIMEOUT_S`."""
        check_device(device)
        timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
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

    def barrier(self) -> None:
        if self.is_parallel:
            self._all_reduce([0.0], tdist.ReduceOp.SUM)

    def failure(self, err: BaseException) -> PeerFailure:
        """``err`` (a collective that failed) as the error this process stops with."""
        return PeerFailure(
            f"rank {self.rank} of {self.world_size}: another process of the run died, hung or "
            f"left (no answer within {self.timeout_s:g} s, or a closed connection); stopping. "
            f"Cause: {first_line(err)}"
        )

    def solo(self, work: Callable[[], None], interrupted: Callable[[], bool] = bool) -> None:
        """Rank 0 runs ``work`` while the other processes wait for it, beat by beat (see the
        module's notes). A waiting process returns early when ``interrupted()`` says so (its
        own stop request); it raises `PeerFailure` when rank 0's beats stop for the timeout or
        when ``work`` raised there."""
        if not self.is_parallel:
            work()
            return
        store = tdist.distributed_c10d._get_default_store()
        prefix = f"selfattn/solo/{next(self._rounds)}"
        if self.is_main:
            self._work_alone(work, store, prefix)
        else:
            self._wait_for_main(store, prefix, interrupted)

    def _work_alone(self, work: Callable[[], None], store, prefix: str) -> None:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(BEAT_S):
                try:
                    store.add(f"{prefix}/beats", 1)
                except RuntimeError:  # the store is gone: the others learn it on their side
                    return

        beater = threading.Thread(target=beat, name="selfattn-solo-beats", daemon=True)
        beater.start()
        status = _SOLO_FAILED
        try:
            work()
            status = _SOLO_OK
        finally:
            done.set()
            beater.join()
            try:
                store.add(f"{prefix}/done", status)
            except RuntimeError as err:
                if status == _SOLO_OK:
                    raise self.failure(err) from err

    def _wait_for_main(self, store, prefix: str, interrupted: Callable[[], bool]) -> None:
        # The store is read on a helper thread: a store that rank 0 hosts (a run started
        # without torchrun) does not answer while rank 0 is frozen, and the wait must end.
        seen = {"status": 0, "moved": time.monotonic(), "error": None, "quit": False}

        def poll() -> None:
            beats = -1
            while not seen["quit"]:
                try:
                    status = store.add(f"{prefix}/done", 0)  # add 0: read without blocking
                    now = store.add(f"{prefix}/beats", 0)
                except RuntimeError as err:  # rank 0 held the store and died
                    seen["error"] = err
                    return
                if now != beats:
                    beats, seen["moved"] = now, time.monotonic()
                seen["status"] = status
                if status:
                    return
                time.sleep(POLL_S)

        threading.Thread(target=poll, name="selfattn-solo-wait", daemon=True).start()
        try:
            while not interrupted():
                if seen["error"] is not None:
                    raise self.failure(seen["error"])
                if seen["status"] == _SOLO_OK:
                    return
                if seen["status"] == _SOLO_FAILED:
                    raise PeerFailure(
                        f"rank {self.rank} of {self.world_size}: rank 0 failed while writing "
                        "the run's files alone; stopping"
                    )
                if time.monotonic() - seen["moved"] > self.timeout_s:
                    silent = TimeoutError(f"no beat from rank 0 for {self.timeout_s:g} s")
                    raise self.failure(silent)
                time.sleep(POLL_S)
        finally:
            seen["quit"] = True

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
