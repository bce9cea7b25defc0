"""`--png`: a trace's attention as heatmap panels, one per head, saved as a PNG image.

Keys (the tokens attended to) run along x, queries (the tokens attending) down y, with the tokens
as labels on both axes. Weights use a 0–1 sequential colour scale; raw and scaled scores use a
diverging one centred at 0 (blue negative, white 0, red positive). Masked cells, the keys a query
may not attend to, are grey and hatched, and the legend says so.

Needs matplotlib (the ``plot`` extra), imported only when a figure is drawn; drawing uses the Agg
backend directly, without pyplot, so it works headless and touches no global state.

Shapes: H heads, L tokens; ``tr.steps[step]`` is (H, L, L).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from selfattn._extras import require
from selfattn.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_STEPS: dict[str, str] = {
    "weights": "attention weights  softmax(Q Kᵀ / √d_k)",
    "scores": "raw scores  Q Kᵀ",
    "scaled_scores": "scaled scores  Q Kᵀ / √d_k",
}
_COLOURBAR_LABELS = {
    "weights": "attention weight (each row sums to 1)",
    "scores": "score (0 = white)",
    "scaled_scores": "scaled score (0 = white)",
}
_MASKED_FACE = "#e6e6e6"
_MASKED_HATCH = "#a0a0a0"
_ANNOTATE_UP_TO = 12  # write the value in each cell up to this many tokens


def render_png(
    tr: Trace,
    path: str | os.PathLike[str],
    *,
    step: str = "weights",
    heads: Sequence[int] | None = None,
    dpi: int = 150,
) -> Figure:
    """Draw `attention_figure` and save it to ``path`` as a PNG; returns the figure."""
    fig = attention_figure(tr, step=step, heads=heads)
    fig.savefig(os.fspath(path), dpi=dpi, format="png")
    return fig


def attention_figure(
    tr: Trace, *, step: str = "weights", heads: Sequence[int] | None = None
) -> Figure:
    """One heatmap panel per head in ``heads`` (default: all) of ``tr.steps[step]`` (H, L, L).

    The panels share one colour scale: 0–1 for weights; ±(largest unmasked |score|) for scores.
    Raises `selfattn._extras.MissingExtra` when matplotlib is not installed.
    """
    if step not in PNG_STEPS:
        raise ValueError(f"unknown step {step!r} for --png; expected one of {', '.join(PNG_STEPS)}")
    n_heads = tr.num_heads
    heads = list(range(n_heads)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < n_heads:
            raise ValueError(f"head {h} is out of range: this trace has heads 0..{n_heads - 1}")

    require("matplotlib", "plot", "--png")
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    values = tr.steps[step][heads].float().numpy()  # (h, L, L)
    mask = tr.steps.get("mask")
    allowed = (
        np.ones(values.shape, dtype=bool) if mask is None else mask[heads].numpy()
    )  # (h, L, L), True = may attend
    any_masked = not allowed.all()
    length = values.shape[-1]

    if step == "weights":
        cmap, norm = "Blues", Normalize(0.0, 1.0)
    else:
        limit = float(np.abs(values[allowed]).max()) if allowed.any() else 1.0
        limit = limit if limit > 0 else 1.0
        cmap, norm = "RdBu_r", Normalize(-limit, limit)  # centred: 0 is white

    n_cols = min(len(heads), 4)
    n_rows = math.ceil(len(heads) / n_cols)
    panel = min(max(1.2 + 0.2 * length, 3.4), 9.0)  # inches per panel: ~0.2 in per token
    label_room = 0.1 * max(len(t) for t in tr.tokens) + 0.6  # room for the token labels
    fig = Figure(
        figsize=(n_cols * (panel + label_room) + 1.2, n_rows * (panel + label_room) + 1.0),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    labels = [_label(t) for t in tr.tokens]
    font = 9 if length <= 20 else 7 if length <= 40 else 5

    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(heads):
            ax.set_axis_off()
            continue
        shown = np.ma.masked_array(values[k], mask=~allowed[k])  # masked cells use "bad"
        colours = _colormap(cmap)
        image = ax.imshow(shown, cmap=colours, norm=norm, interpolation="nearest")
        if any_masked:
            cells = [
                Rectangle((j - 0.5, i - 0.5), 1, 1)
                for i, j in zip(*np.nonzero(~allowed[k]), strict=True)
            ]
            ax.add_collection(
                PatchCollection(
                    cells, facecolor="none", edgecolor=_MASKED_HATCH, hatch="///", linewidth=0
                )
            )
        if length <= _ANNOTATE_UP_TO:
            _annotate(ax, values[k], allowed[k], norm, colours)
        ax.set_xticks(range(length), labels, fontsize=font)
        ax.set_yticks(range(length), labels, fontsize=font)
        if length > 6:
            ax.tick_params(axis="x", labelrotation=90)
        else:
            for text in ax.get_xticklabels():
                text.set(rotation=45, ha="right", rotation_mode="anchor")
        if length <= 60:  # thin white lines between cells
            ax.set_xticks([x - 0.5 for x in range(length + 1)], minor=True)
            ax.set_yticks([y - 0.5 for y in range(length + 1)], minor=True)
            ax.grid(which="minor", color="white", linewidth=0.6)
            ax.tick_params(which="minor", length=0)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        if n_heads > 1:
            ax.set_title(f"head {heads[k]}", fontsize=11)

    colourbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=min(0.9, 0.5 + 0.1 * n_rows))
    colourbar.set_label(_COLOURBAR_LABELS[step])
    fig.suptitle(_title(tr, step), fontsize=12)
    if any_masked:
        fig.legend(
            handles=[
                Patch(
                    facecolor=_MASKED_FACE,
                    edgecolor=_MASKED_HATCH,
                    hatch="///",
                    label="masked: the query may not attend to this key (set to −∞ before softmax)",
                )
            ],
            loc="outside lower center",
            frameon=False,
            fontsize=9,
        )
    return fig


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=_MASKED_FACE)


def _annotate(ax, m, allowed, norm, cmap) -> None:
    """The value in each unmasked cell, dark or light to stay readable on its colour."""
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not allowed[i, j]:
                continue
            r, g, b, _ = cmap(norm(m[i, j]))
            dark_cell = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
            ax.text(
                j,
                i,
                f"{m[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark_cell else "#222222",
            )


def _title(tr: Trace, step: str) -> str:
    """Two lines: what is drawn, then where it comes from."""
    where = str(tr.extras.get("model", tr.module))
    if "layer" in tr.extras:
        where += f", layer {tr.extras['layer']}"
    return f"{PNG_STEPS[step]}\n{where}, {len(tr.tokens)} tokens"


def _label(token: str) -> str:
    """A token as a tick label: "$" would start matplotlib's mathtext, control chars become "?"."""
    text = "".join(c if c.isprintable() else "?" for c in token)
    return text.replace("$", r"\$")
