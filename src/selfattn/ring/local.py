"""Run a function on P fresh local processes joined in a gloo process group: try ring attention
on one machine, and test and benchmark it.

`run_local` starts P processes (multiprocessing's "spawn": each a fresh interpreter), joins
them in a gloo group over loopback (a file store in a temporary directory, the sockets on the
loopback interface only), runs ``fn(*args)`` on each and returns every rank's result. It never
hangs: a rank still running after ``timeout`` seconds is killed, and the process group's own
``group_timeout`` makes a rank waiting on a dead or absent peer raise well before that.

    from selfattn.ring.local import run_local

    def work(seed):  # module-level, so the children can import it
        ...          # torch.distributed is initialised here: ring_attention(q, k, v)
        return result

    results = run_local(work, 2, 0)  # [rank 0's result, rank 1's result]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class RankOutcome:
    """What one rank did: ``ok`` with its ``value``, or the ``error`` (a traceback or a reason)."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = 0.0


class LocalRunError(RuntimeError):
    """One or more ranks raised, crashed or timed out; ``outcomes`` has every rank's story."""

    def __init__(self, outcomes: list[RankOutcome]) -> None:
        self.outcomes = outcomes
        lines = []
        for o in outcomes:
            if o.ok:
                lines.append(f"rank {o.rank}: ok ({o.seconds:.1f} s)")
            else:
                lines.append(f"rank {o.rank}: FAILED after {o.seconds:.1f} s\n{o.error.rstrip()}")
        failed = sum(not o.ok for o in outcomes)
        super().__init__(f"{failed} of {len(outcomes)} ranks failed:\n" + "\n".join(lines))


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    group_timeout: float = 30.0,
    threads: int = 1,
) -> list[Any]:
    """``fn(*args)`` on ``world_size`` local gloo ranks; the list of their return values.

    Args:
        fn: a picklable (module-level) function; it runs after ``init_process_group`` and may
            use the default group. Its return value must be picklable.
        world_size: the number of processes P.
        timeout: seconds the whole run may take; ranks still running then are killed.
        group_timeout: the process group's timeout: how long a rank waits on a peer before its
            collective or send/receive raises.
        threads: ``torch.set_num_threads`` in each rank.

    Raises:
        LocalRunError: a rank raised, died or was killed at ``timeout``; its ``outcomes`` (and
            its message) give each rank's result or traceback.
    """
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="selfattn_ring_") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, args, rank, world_size, store, threads, group_timeout, results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        start = time.monotonic()
        for p in procs:
            p.start()
        outcomes = _collect(procs, results, start, timeout)
        for p in procs:  # every rank has answered, died or been killed: let them go
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    if not all(o.ok for o in outcomes):
        raise LocalRunError(outcomes)
    return [o.value for o in outcomes]


def _collect(procs, results, start: float, timeout: float) -> list[RankOutcome]:
    """Each rank's outcome, as it arrives; a rank that dies silently or outlives ``timeout``
    gets a failed one (and is killed)."""
    outcomes: dict[int, RankOutcome] = {}
    exited_at: dict[int, float] = {}
    while len(outcomes) < len(procs):
        now = time.monotonic()
        if now - start > timeout:
            break
        try:
            outcome = results.get(timeout=0.1)
            outcomes[outcome.rank] = outcome
            continue
        except queue_module.Empty:
            pass
        for rank, p in enumerate(procs):  # an exit without an answer: crashed (after a grace
            if rank in outcomes or p.exitcode is None:  # period for the answer in the pipe)
                continue
            exited_at.setdefault(rank, now)
            if now - exited_at[rank] > 2.0:
                outcomes[rank] = RankOutcome(
                    rank, False, error=f"exited with code {p.exitcode} and no answer",
                    seconds=now - start,
                )  # fmt: skip
    for rank, p in enumerate(procs):
        if rank not in outcomes:
            p.kill()
            outcomes[rank] = RankOutcome(
                rank, False, error=f"still running after {timeout:.0f} s: killed", seconds=timeout
            )
    return [outcomes[rank] for rank in range(len(procs))]


def _rank_main(fn, args, rank, world_size, store, threads, group_timeout, results) -> None:
    """One rank: join the group, run ``fn``, answer, leave."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    start = time.monotonic()
    ok = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=group_timeout),
        )
        value = fn(*args)
        dist.barrier()  # nobody leaves while a peer may still read from them
        ok = True
        results.put(RankOutcome(rank, True, value=value, seconds=time.monotonic() - start))
    except BaseException:
        error = traceback.format_exc()
        results.put(RankOutcome(rank, False, error=error, seconds=time.monotonic() - start))
    finally:
        if ok and dist.is_initialized():
            dist.destroy_process_group()
