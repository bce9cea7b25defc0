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


def describe_schedule(cfg, start: int = 0) -> str:
    """One line saying which schedule a run follows, e.g. "schedule: warm-up 100, cosine to
    0.0001 at iteration 2000, then 0.0001". ``cfg``: a `TrainConfig`; ``start``: the iteration
    a resumed run starts from (the line then says where in the schedule that is)."""
    end = cfg.lr_decay_iters
    warmup = f"warm-up {cfg.warmup_iters}" if cfg.warmup_iters > 0 else "no warm-up"
    line = f"schedule: {warmup}, cosine to {cfg.min_lr:g} at iteration {end}, then {cfg.min_lr:g}"
    if start > end:
        line += f" (resumed at iteration {start}, past the decay: {cfg.min_lr:g} from here on)"
    elif start > 0:
        kw = dict(lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters, decay_iters=end)
        line += f" (resumed at iteration {start}, lr {learning_rate(start, **kw):.3g})"
    return line
