"""`--png`: a trace's attention as heatmap panels, one per head, saved as an image (PNG; SVG or
PDF when the file name ends in .svg or .pdf).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfattn import _atomic
from selfattn._extras import require
from selfattn.trace import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_STEPS: dict[str, str] = {
    "weights": "attention weights  softmax(Q Kᵀ / √d_k)",
    "scores": "raw scores  Q Kᵀ",
    "scaled_scores": "scaled scores  Q Kᵀ / √d_k",
}
_SIMPLE_STEPS = {  # --module simple: no projections, no scaling
    "weights": "attention weights  softmax(x xᵀ)",
    "scores": "raw scores  x xᵀ",
    "scaled_scores": "scaled scores  x xᵀ (this first version does not scale)",
}
_COLOURBAR_LABELS = {
    "weights": "attention weight (each row sums to 1)",
    "scores": "score (0 = white)",
    "scaled_scores": "scaled score (0 = white)",
}
_MASKED_FACE = "#e6e6e6"
_MASKED_HATCH = "#a0a0a0"
_ANNOTATE_UP_TO = 12  # write the value in each cell up to this many tokens


IMAGE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
_LABEL_PITCH_PT = 9.0  # a tick label needs about this many points of axis; thinner ones are thinned
_MAX_PIXELS = 5000  # the image's longer side at most: a 12-head 512-token figure stays quick


def image_format(path: str | os.PathLike[str]) -> str:
    """ "png", "svg" or "pdf" from the file name's ending; any other ending is a ValueError."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(
            f"cannot tell the image format of {os.fspath(path)!r}: its name must end in "
            f"{', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def render_png(
    tr: Trace,
    path: str | os.PathLike[str],
    *,
    step: str = "weights",
    heads: Sequence[int] | None = None,
    dpi: int = 150,
) -> Figure:
    """Draw `attention_figure` and save it to ``path``: PNG, or SVG / PDF when the name ends in
    .svg / .pdf (any other ending is a ValueError); returns the figure."""
    fmt = image_format(path)
    fig = attention_figure(tr, step=step, heads=heads)
    dpi = min(dpi, _MAX_PIXELS / max(fig.get_size_inches()))
    _atomic.save_figure(fig, path, dpi=dpi, format=fmt)
    return fig


def attention_figure(
    tr: Trace, *, step: str = "weights", heads: Sequence[int] | None = None
) -> Figure:
    """One heatmap panel per head in ``heads`` (default: all) of ``tr.steps[step]`` (H, L, L).

    Weights share one 0–1 colour scale. Scores get a scale per head, ±(that head's largest
    unmasked |score|), each with its own colourbar, so one head with large scores does not wash
    out the others. Tick labels are thinned to every k-th token when they would overlap, and
    the title says so. Raises `selfattn._extras.MissingExtra` when matplotlib is not installed.
    """
    heads = _checked_heads(tr, step, heads)
    require("matplotlib", "plot", "--png")
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = tr.steps[step][heads].float().numpy()  # (h, L, L)
    mask = tr.steps.get("mask")
    allowed = (
        np.ones(values.shape, dtype=bool) if mask is None else mask[heads].numpy()
    )  # (h, L, L), True = may attend
    labels = [_label(t) for t in tr.tokens]
    grid = _Grid.of(len(heads), labels, per_head_bar=step != "weights" and len(heads) > 1)
    fig = Figure(figsize=grid.figsize(masked=not allowed.all()), layout="constrained")
    FigureCanvasAgg(fig)
    names = [f"head {h}" if tr.num_heads > 1 else "" for h in heads]
    _draw_panels(fig, grid, step, values, allowed, labels, names)
    title = _title(tr, step)
    if grid.every > 1:
        title += f" (every {_ordinal(grid.every)} token labelled)"
    fig.suptitle(title, fontsize=12)
    if not allowed.all():
        _masked_legend(fig)
    _square_cells(fig, grid.n_cols)
    return fig


def _checked_heads(tr: Trace, step: str, heads: Sequence[int] | None) -> list[int]:
    """``heads`` (default: all of ``tr``'s) as a list, after checking it and ``step``."""
    if step not in PNG_STEPS:
        raise ValueError(f"unknown step {step!r} for --png; expected one of {', '.join(PNG_STEPS)}")
    n_heads = tr.num_heads
    heads = list(range(n_heads)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < n_heads:
            raise ValueError(f"head {h} is out of range: this trace has heads 0..{n_heads - 1}")
    return heads


@dataclass(frozen=True)
class _Grid:
    """How the panels are laid out, all sizes in inches: up to four panels a row, each
    ``panel`` square; only the left column names the queries, only the bottom row the keys."""

    n_panels: int
    n_cols: int
    n_rows: int
    panel: float  # a heatmap's side: ~0.2 in per token, 3.4 to 9
    font: float  # tick labels' size in points
    every: int  # label every k-th token
    label_room: float  # room for the longest tick label, beside or below a panel
    per_head_bar: bool  # a colourbar beside each panel, or one for all

    @classmethod
    def of(cls, n_panels: int, labels: list[str], *, per_head_bar: bool) -> _Grid:
        length = len(labels)
        n_cols = min(n_panels, 4)
        panel = min(max(1.2 + 0.2 * length, 3.4), 9.0)
        font = 9 if length <= 20 else 7 if length <= 40 else 6
        label_room = 0.08 * font / 7 * max(len(t) for t in labels) + 0.3
        every = _label_every(length, panel, font)
        rows = math.ceil(n_panels / n_cols)
        return cls(n_panels, n_cols, rows, panel, font, every, label_room, per_head_bar)

    def figsize(self, *, masked: bool) -> tuple[float, float]:
        """(width, height): the panels plus their labels, titles, colourbars and legend, so
        that the constrained layout leaves each panel about square."""
        beside = 1.4 if self.per_head_bar else 0.4  # a panel's own colourbar, or a gap
        width = 0.45 + self.label_room + self.n_cols * (self.panel + beside)
        width += 0.0 if self.per_head_bar else 1.0  # the shared colourbar
        title = 0.3 if self.n_panels > 1 else 0.05  # "head k" over each panel
        height = 0.75 + self.n_rows * (self.panel + title) + self.label_room + 0.35
        return width, height + (0.35 if masked else 0.0)  # the legend under everything


def _draw_panels(fig, grid: _Grid, step, values, allowed, labels, names) -> None:
    """The heatmaps (values and allowed: (h, L, L)) and their colourbars on ``fig``."""
    axes = fig.subplots(grid.n_rows, grid.n_cols, squeeze=False)
    for ax in axes.flat[grid.n_panels :]:
        ax.set_axis_off()
    used = list(axes.flat[: grid.n_panels])
    image = None
    for k, ax in enumerate(used):
        cmap, norm = _scale(step, values[k], allowed[k])
        outer = (k % grid.n_cols == 0, k + grid.n_cols >= grid.n_panels)  # (left col, bottom row)
        image = _panel(ax, values[k], allowed[k], cmap, norm, labels, grid.every, grid.font, outer)
        if names[k]:
            ax.set_title(names[k], fontsize=11)
        if grid.per_head_bar:
            fig.colorbar(image, ax=ax, shrink=0.8).set_label(_COLOURBAR_LABELS[step], fontsize=8)
    if not grid.per_head_bar:
        bar = fig.colorbar(image, ax=used, shrink=min(0.9, 0.5 + 0.1 * grid.n_rows))
        bar.set_label(_COLOURBAR_LABELS[step])


def _square_cells(fig, n_cols: int, passes: int = 2) -> None:
    """Widen or narrow ``fig`` until the constrained layout leaves its panels about square:
    `_Grid.figsize` is a first guess, the layout (text measured, nothing drawn) says how far
    off it is."""
    panel = next(ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>")
    for _ in range(passes):
        fig.get_layout_engine().execute(fig)
        width, height = fig.get_size_inches()
        box = panel.get_position()  # figure fractions
        fig.set_figwidth(width + n_cols * (box.height * height - box.width * width))


def _scale(step: str, values, allowed):
    """(colour map, norm) of one panel: 0–1 for weights; for scores, centred on 0 and as wide as
    this head's largest unmasked |score|."""
    import numpy as np
    from matplotlib.colors import Normalize

    if step == "weights":
        return _colormap("Blues"), Normalize(0.0, 1.0)
    limit = float(np.abs(values[allowed]).max()) if allowed.any() else 1.0
    limit = limit if limit > 0 else 1.0
    return _colormap("RdBu_r"), Normalize(-limit, limit)  # centred: 0 is white


def _panel(ax, values, allowed, cmap, norm, labels, every, font, outer=(True, True)):
    """One head's heatmap on ``ax``: masked cells hatched, thinned tick labels. With several
    panels (every one has the same tokens), only the left column names the queries and only
    the bottom row the keys: ``outer`` = (left column, bottom row)."""
    import numpy as np
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    length = values.shape[-1]
    shown = np.ma.masked_array(values, mask=~allowed)  # masked cells use "bad"
    # aspect "auto": a fixed aspect makes the constrained layout misplace the labels, so the
    # figure is sized for square cells instead (`_Grid.figsize`)
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
    if not allowed.all():
        cells = [Rectangle((j - 0.5, i - 0.5), n, 1) for i, j, n in _masked_runs(allowed)]
        ax.add_collection(
            PatchCollection(
                cells, facecolor="none", edgecolor=_MASKED_HATCH, hatch="///", linewidth=0
            )
        )
    if length <= _ANNOTATE_UP_TO:
        _annotate(ax, values, allowed, norm, cmap)
    ticks = list(range(0, length, every))
    names = [labels[i] for i in ticks]
    left, bottom = outer
    ax.set_xticks(ticks, names if bottom else [], fontsize=font)
    ax.set_yticks(ticks, names if left else [], fontsize=font)
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
    if bottom:
        ax.set_xlabel("key (attended to)")
    if left:
        ax.set_ylabel("query (attending)")
    return image


def _masked_runs(allowed) -> list[tuple[int, int, int]]:
    """(row, first column, length) of every run of masked cells along a row of ``allowed``
    (L, S): one hatched rectangle per run, not per cell (a causal 512-token panel: 512, not
    130,816, which took matplotlib seconds to draw)."""
    import numpy as np

    hidden = np.pad(~allowed, ((0, 0), (1, 1))).astype(np.int8)  # (L, S + 2), False at both ends
    edges = np.diff(hidden, axis=1)  # (L, S + 1): +1 where a run starts, -1 just after it ends
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order: the k-th end closes the k-th start
    return list(zip(rows.tolist(), starts.tolist(), (ends - starts).tolist(), strict=True))


def _masked_legend(fig) -> None:
    from matplotlib.patches import Patch

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


def _label_every(length: int, panel_inches: float, font: float) -> int:
    """Label every k-th token so that neighbouring labels (``font`` points tall) never overlap
    on an axis ``panel_inches`` long."""
    pitch = panel_inches * 72 / max(length, 1)  # points per cell
    return max(1, math.ceil(max(_LABEL_PITCH_PT, font * 1.25) / pitch))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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
    what = _SIMPLE_STEPS[step] if tr.module == "SimpleAttention" else PNG_STEPS[step]
    return f"{what}\n{where}, {len(tr.tokens)} tokens"


def _label(token: str) -> str:
    """A token as a tick label: "$" would start matplotlib's mathtext, control chars become "?"."""
    text = "".join(c if c.isprintable() else "?" for c in token)
    return text.replace("$", r"\$")
