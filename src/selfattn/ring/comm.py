"""The ring's communication: one object that passes blocks to the next rank, asynchronously.

`RingComm.exchange` posts, for each tensor, a send to the next rank and a receive from the
previous one, and returns at once: the caller computes on the block in hand while the next one
travels, then calls `Pending.wait`. On gloo every request object is waited on, one by one
(`torch.distributed.batch_isend_irecv` is known to hang there); on NCCL the operations are
posted together with `batch_isend_irecv`, the documented way to pair sends and receives between
the same two GPUs without deadlock.

A failure in transit (a peer that raised and exited, or one that never arrives before the
process group's timeout) becomes a RuntimeError that names this rank, the peer and what was
being passed, with the backend's own message after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from selfattn._errors import first_line


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) when ``group`` is None and
    no process group has been initialised (a ring of one, nothing to pass)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class RingComm:
    """Sends to rank r + 1 and receives from rank r − 1 (mod P) of ``group``."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank, self.world_size = rank_and_size(group)
        nxt, prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        self.next, self.prev = nxt, prev  # group ranks, for messages
        if self.world_size > 1:
            self._next_global = dist.get_global_rank(self._pg(), nxt)
            self._prev_global = dist.get_global_rank(self._pg(), prev)
            self._batched = dist.get_backend(group) == "nccl"

    def _pg(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def exchange(self, tensors: list[Tensor], what: str, tag: int) -> Pending:
        """Send ``tensors`` to the next rank and receive same-shaped ones from the previous;
        returns at once. Tensor i goes with tag ``tag + i``: exchanges in flight at the same
        time need tags that do not overlap (gloo matches messages on them)."""
        sent = [t.contiguous() for t in tensors]
        received = [t.new_empty(t.shape) for t in sent]
        pg, nxt, prev = self.group, self._next_global, self._prev_global
        if self._batched:
            ops = [dist.P2POp(dist.isend, t, nxt, pg, tag + i) for i, t in enumerate(sent)]
            ops += [dist.P2POp(dist.irecv, t, prev, pg, tag + i) for i, t in enumerate(received)]
            works = dist.batch_isend_irecv(ops)
        else:  # gloo: plain isend / irecv, each waited on
            works = [dist.isend(t, nxt, group=pg, tag=tag + i) for i, t in enumerate(sent)]
            works += [dist.irecv(t, prev, group=pg, tag=tag + i) for i, t in enumerate(received)]
        return Pending(self, works, sent, received, what)


@dataclass
class Pending:
    """An exchange in flight. Keeps the sent tensors alive until it is waited on."""

    comm: RingComm
    works: list
    sent: list[Tensor]
    received: list[Tensor]
    what: str

    def wait(self) -> list[Tensor]:
        """Block until every send and receive has completed; the received tensors."""
        for work in self.works:
            try:
                work.wait()
            except RuntimeError as err:
                c = self.comm
                raise RuntimeError(
                    f"ring_attention: rank {c.rank} of {c.world_size} failed passing "
                    f"{self.what} around the ring (sending to rank {c.next}, receiving from "
                    f"rank {c.prev}); a peer rank has probably raised, exited or not called "
                    f"ring_attention. The backend said: {first_line(err)}"
                ) from err
        self.sent = []
        return self.received
