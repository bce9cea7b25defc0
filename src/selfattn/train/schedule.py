"""The learning-rate schedule: linear warm-up, then cosine decay, then a floor (nanoGPT's)."""

from __future__ import annotations

import math


def learning_rate(
    iteration: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int
) -> float:
    """The learning rate for step ``iteration`` (0-based).

    iteration < warmup_iters:            lr * (iteration + 1) / (warmup_iters + 1)
    warmup_iters <= iteration <= decay:  cosine from lr down to min_lr
    iteration > decay_iters:             min_lr
    """
    if iteration < warmup_iters:
        return lr * (iteration + 1) / (warmup_iters + 1)
    if iteration > decay_iters:
        return min_lr
    span = max(decay_iters - warmup_iters, 1)
    ratio = (iteration - warmup_iters) / span  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
