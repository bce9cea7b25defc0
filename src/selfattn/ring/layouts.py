"""How a sequence is split across the P ranks of a ring, and which key blocks a query block sees.

Two layouts. Both cut the sequence of L tokens into equal chunks and give every rank the same
number of tokens, L / P, in increasing position order:

* ``"contiguous"``: P chunks, rank r holds chunk r, tokens [r·L/P, (r+1)·L/P).
* ``"zigzag"``: 2P chunks of L / 2P tokens, rank r holds chunk r followed by chunk 2P−1−r.

Under a causal mask the contiguous layout gives rank P−1 P times the work of rank 0 (its
queries see every key); zigzag pairs an early chunk with a late one so that every rank does the
same work (Brandon et al. 2023, Striped Attention, https://arxiv.org/abs/2311.09431, and the
zigzag variant of zhuzilin/ring-flash-attention). P = 2, L = 8::

    tokens       0 1 2 3 4 5 6 7
    contiguous   0 0 0 0 1 1 1 1      rank 0: [0 1 2 3]   rank 1: [4 5 6 7]
    zigzag       0 0 1 1 1 1 0 0      rank 0: [0 1 6 7]   rank 1: [2 3 4 5]

Which keys a rank's queries see in the key/value block of rank s (`visible_pieces`), by
positions, never by a mask:

* s = r: the same tokens on both sides, in increasing order, so causal over positions is causal
  over local indices: one causal piece with Lq = Lk (the diagonal).
* s ≠ r: no chunk is shared, so a query chunk sees a whole key chunk or none of it; and since a
  shard's chunks increase, the key chunks it sees are a prefix of the block. Query chunks that
  see the same prefix form one piece, computed with no mask at all. Zigzag, 2P chunks::

        s < r: every query sees the block's first chunk      (q all,         kv first half)
        s > r: only the late query chunk sees, all of it     (q second half, kv all)

  Either way half a block's work, so each of a zigzag rank's P steps costs the same.

Shapes: L tokens in all, P ranks (world size), n = L / P tokens per rank, c tokens per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


class Piece(NamedTuple):
    """A part of one ring step: local query rows ``q`` against key rows ``kv`` of the block in
    hand, with a causal mask (Lq = Lk, the diagonal) or with none."""

    q: slice
    kv: slice
    is_causal: bool


def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a str, one of {LAYOUTS}, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def rank_chunks(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chunk indices rank ``rank`` holds, in order (chunks of L / (P · chunks_per_rank))."""
    if chunks_per_rank(layout) == 1:
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def check_length(length: int, world_size: int, layout: str) -> int:
    """The per-rank length n = L / P of a sequence of ``length`` tokens, or a ValueError that
    says which lengths the layout can split."""
    parts = world_size * chunks_per_rank(layout)
    if length % parts != 0:
        cut = "2P" if layout == "zigzag" else "P"
        raise ValueError(
            f"layout {layout!r} cannot split a sequence of {length} tokens across "
            f"{world_size} ranks: L must be a multiple of {cut} = {parts} "
            f"(e.g. {_nearby(length, parts)})"
        )
    return length // world_size


def check_local_length(local: int, world_size: int, layout: str) -> None:
    """Each rank's own length n = L / P must itself split into the layout's chunks."""
    per = chunks_per_rank(layout)
    if local % per != 0:
        raise ValueError(
            f"layout {layout!r} needs an even per-rank length (L a multiple of 2P = "
            f"{2 * world_size}), got {local} tokens per rank (L = {local * world_size}); "
            f"e.g. L = {_nearby(local * world_size, 2 * world_size)}"
        )


def _nearby(length: int, multiple: int) -> str:
    below = length // multiple * multiple
    options = [x for x in (below, below + multiple) if x > 0]
    return " or ".join(str(x) for x in options)


def shard_positions(rank: int, world_size: int, length: int, layout: str = "zigzag") -> Tensor:
    """The global positions of rank ``rank``'s tokens, (n,) int64, in the order it holds them."""
    per = chunks_per_rank(layout)
    c = check_length(length, world_size, layout) // per
    return torch.cat(
        [torch.arange(i * c, (i + 1) * c) for i in rank_chunks(rank, world_size, layout)]
    )


def shard_sequence(
    x: Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = -2
) -> Tensor:
    """Rank ``rank``'s shard of a full sequence: x (..., L, ...) -> (..., L / P, ...) along
    ``dim`` (default -2, the L of (B, H, L, E)). A copy for zigzag, a view for contiguous."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    length = x.shape[dim]
    c = check_length(length, world_size, layout) // chunks_per_rank(layout)
    parts = [x.narrow(dim, i * c, c) for i in rank_chunks(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(shards: Sequence[Tensor], layout: str = "zigzag", dim: int = -2) -> Tensor:
    """The full sequence from every rank's shard (``shards[r]`` from rank r): the inverse of
    `shard_sequence`, (..., L / P, ...) x P -> (..., L, ...)."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_sequence needs at least one shard, got none")
    per = chunks_per_rank(layout)
    sizes = [s.shape[dim] for s in shards]
    if len(set(sizes)) != 1 or sizes[0] % per != 0:
        raise ValueError(
            f"layout {layout!r} needs {world_size} shards of one length divisible by {per}, "
            f"got lengths {sizes}"
        )
    c = sizes[0] // per
    chunks: dict[int, Tensor] = {}
    for rank, shard in enumerate(shards):
        for j, index in enumerate(rank_chunks(rank, world_size, layout)):
            chunks[index] = shard.narrow(dim, j * c, c)
    return torch.cat([chunks[i] for i in range(len(chunks))], dim=dim)


def visible_pieces(
    q_rank: int, kv_rank: int, world_size: int, local: int, layout: str, is_causal: bool
) -> list[Piece]:
    """What rank ``q_rank``'s queries compute against rank ``kv_rank``'s key/value block (both n
    = ``local`` tokens long): a list of `Piece`, empty when the causal mask hides the whole block.
    See the module's docstring for why these are the only cases."""
    whole = slice(0, local)
    if not is_causal:
        return [Piece(whole, whole, False)]
    if q_rank == kv_rank:  # the same tokens in the same increasing order: the diagonal
        return [Piece(whole, whole, True)]
    q_chunks = rank_chunks(q_rank, world_size, layout)
    kv_chunks = rank_chunks(kv_rank, world_size, layout)
    c = local // len(q_chunks)
    pieces: list[Piece] = []
    for i, a in enumerate(q_chunks):
        seen = sum(b < a for b in kv_chunks)  # key chunks wholly before query chunk a: a prefix
        if seen == 0:
            continue
        rows, keys = slice(i * c, (i + 1) * c), slice(0, seen * c)
        if pieces and pieces[-1].kv == keys and pieces[-1].q.stop == rows.start:
            rows = slice(pieces.pop().q.start, rows.stop)  # the same prefix: one piece
        pieces.append(Piece(rows, keys, False))
    return pieces
