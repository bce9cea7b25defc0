"""The run's figures (matplotlib, the 'plot' extra), redrawn at each evaluation:

loss.png     the training and validation loss against iterations
scores.png   the evaluation hooks' metrics against iterations, one panel per family: the
             records' "hook/NAME" (a panel of its own) and "hook/FAMILY/MEMBER" (one line per
             member in FAMILY's panel), e.g. the induction task's accuracy, and its
             induction and previous-token scores per head
"""

from __future__ import annotations

import io
from pathlib import Path

from selfattn.train.files import atomic_write_bytes


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_losses(path: Path, metrics: list[dict], title: str) -> None:
    """Write the PNG atomically. ``metrics``: metrics.jsonl's records (a None, a value that was
    not finite, is left out)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    steps = [(m["iter"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
    evals = [(m["iter"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    fig = Figure(figsize=(7, 4), dpi=110)
    # fixed margins that fit the labels at this size: tight_layout would draw the figure an
    # extra time to measure them (about 40% of each redraw)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    if steps:
        ax.plot(*zip(*steps, strict=True), lw=0.8, alpha=0.7, label="train (batch)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", lw=1.5, label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def plot_scores(path: Path, metrics: list[dict], title: str) -> None:
    """Write scores.png atomically: every "hook/..." metric of ``metrics`` against iterations."""
    from matplotlib.figure import Figure

    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for m in metrics:
        for key, value in m.items():
            if key.startswith("hook/") and value is not None:  # None: not finite (metrics.jsonl)
                family, _, member = key[len("hook/") :].partition("/")
                panels.setdefault(family, {}).setdefault(member, []).append((m["iter"], value))
    if not panels:
        return
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (family, lines) in zip(axes, panels.items(), strict=True):
        for member, points in lines.items():
            ax.plot(*zip(*points, strict=True), "o-", ms=2.5, lw=1.2, label=member or family)
        ax.set_title(family)
        ax.set_xlabel("iteration")
        if all(0 <= v <= 1 for points in lines.values() for _, v in points):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
