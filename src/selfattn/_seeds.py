"""Seeds derived from several integers: a leaf module (it imports nothing from selfattn)."""

from __future__ import annotations


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a polynomial hash): the seed of a generator that
    must depend on, say, a run's seed and an iteration, or a call's seed and a tile, and on
    nothing else."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % 2**63
    return seed
