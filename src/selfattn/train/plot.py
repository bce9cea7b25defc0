"""loss.png: the training and validation loss against iterations (matplotlib, the 'plot' extra)."""

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
    """Write the PNG atomically. ``metrics``: metrics.jsonl's records."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    steps = [(m["iter"], m["train_loss"]) for m in metrics if "train_loss" in m]
    evals = [(m["iter"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig = Figure(figsize=(7, 4), dpi=110)
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
