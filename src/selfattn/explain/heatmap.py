"""Attention weights as a heatmap in the terminal: queries as rows, keys as columns, one per head.

    head 0          Y j s w o s     <- key tokens, written downwards
                    o o t i n t
                    ...
    Your            ██· · · · ·     <- query "Your" attends only to itself (causal)
    journey         ▓▓▓▓· · · ·

On a colour terminal each cell is a block coloured by its weight; under NO_COLOR, or when stdout
is not a terminal, the cells are shade characters (" ░▒▓█", darker = more weight), so plain text
still shows the pattern. Masked cells (a query may not attend to that key) are "·".

Width-aware: a heatmap never has a line wider than the console. Cells shrink from two characters
to one, then the keys that do not fit are cut, with a note saying how many are shown.
"""

from __future__ import annotations

import math

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text
from torch import Tensor

from selfattn.trace import Trace

SHADES = " ░▒▓█"  # level k: sqrt(weight / scale) rounds to k / 4, so ░ ≈ 1/16 of the scale
MASKED = "·"
# viridis, five stops: dark purple (low) -> yellow (high); readable on dark and light terminals
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_MAX_LABEL = 14  # row labels (query tokens) are cut to this many cells
_MAX_KEY_LABEL = 7  # column labels (key tokens) are written downwards, cut to this many lines
_GAP = 3  # spaces between heatmaps placed side by side


def is_plain(console: Console) -> bool:
    """True when the console prints no colour (NO_COLOR, or not a terminal)."""
    return console.no_color or console.color_system is None


def render_heatmaps(
    tr: Trace,
    console: Console,
    *,
    step: str = "weights",
    heads: list[int] | None = None,
) -> None:
    """Print one heatmap of ``tr.steps[step]`` (H, L, L) per head, side by side where they fit."""
    console.print(
        heatmaps(tr, width=console.width, plain=is_plain(console), step=step, heads=heads)
    )


def heatmaps(
    tr: Trace,
    *,
    width: int,
    plain: bool,
    step: str = "weights",
    heads: list[int] | None = None,
) -> RenderableType:
    """The heatmaps of ``heads`` (default: all) of a trace, laid out in rows no wider than width.

    All heads share one scale: the largest unmasked value among them is the darkest shade.
    """
    values = tr.steps[step].float()  # (H, L, L)
    mask = tr.steps.get("mask")  # (H, L, L) bool, True = may attend
    heads = list(range(values.shape[0])) if heads is None else heads
    shown = values[heads] if mask is None else values[heads].masked_fill(~mask[heads], 0.0)
    scale = float(shown.max()) if shown.numel() and float(shown.max()) > 0 else 1.0

    maps = [
        heatmap(
            values[h],
            tr.tokens,
            tr.tokens,
            mask=None if mask is None else mask[h],
            scale=scale,
            width=width,
            plain=plain,
            title=f"head {h}" if values.shape[0] > 1 else None,
        )
        for h in heads
    ]
    map_width = max(cell_len(line) for m in maps for line in m.plain.split("\n"))
    per_row = max(1, (width + _GAP) // (map_width + _GAP))
    parts: list[RenderableType] = []
    for start in range(0, len(maps), per_row):
        row = maps[start : start + per_row]
        if len(row) == 1:
            parts.append(row[0])
            continue
        grid = Table.grid(padding=(0, _GAP, 0, 0))
        for _ in row:
            grid.add_column(no_wrap=True)
        grid.add_row(*row)
        parts.append(grid)
    parts.append(legend(scale, plain=plain, causal=mask is not None and not bool(mask.all())))
    note = _cut_note(len(tr.tokens), _keys_that_fit(tr.tokens, width))
    if note:
        parts.append(Text(note, style="dim"))
    return Group(*parts)


def heatmap(
    m: Tensor,
    row_labels: list[str],
    col_labels: list[str],
    *,
    mask: Tensor | None = None,
    scale: float = 1.0,
    width: int = 80,
    plain: bool = False,
    title: str | None = None,
) -> Text:
    """One (Lq, Lk) matrix as lines of text no wider than ``width``; values in [0, scale].

    Rows are labelled with ``row_labels`` (queries), columns with ``col_labels`` (keys) written
    downwards above them. Returns one `Text` (lines joined by newlines, never wrapped).
    """
    n_rows, n_cols = m.shape
    label_w = _label_width(row_labels)
    cell_w, shown = _layout(n_cols, label_w, width)
    lines: list[Text] = []
    if title:
        lines.append(Text(title, style="bold"))
    for line in _key_header(col_labels[:shown], cell_w):
        lines.append(Text(" " * (label_w + 1) + line, style="dim"))
    for i in range(n_rows):
        line = Text(_fit(row_labels[i], label_w) + " ", style="bold")
        for j in range(shown):
            if mask is not None and not bool(mask[i, j]):
                line.append(MASKED.ljust(cell_w), style="dim")
            else:
                line.append(*_cell(float(m[i, j]) / scale, cell_w, plain))
        if shown < n_cols:
            line.append("…", style="dim")
        lines.append(line)
    text = Text("\n").join(lines)
    text.no_wrap = True
    text.overflow = "crop"
    return text


def legend(scale: float, *, plain: bool, causal: bool = False) -> Text:
    """What the shades (or colours) mean, for a heatmap drawn with ``scale``."""
    text = Text()
    text.append("weight: ", style="dim")
    if plain:
        bounds = shade_bounds(scale)
        for level, char in enumerate(SHADES[1:], start=1):
            text.append(f"{char} {_num(bounds[level - 1])}–{_num(bounds[level])}  ")
        note = f"blank < {_num(bounds[0])}" + (f", {MASKED} masked" if causal else "")
        text.append(f"\n        {note}", style="dim")
    else:
        text.append("0 ")
        for step in range(10):  # evenly spaced in sqrt(weight), as the cells are
            text.append("█", style=Style(color=_colour(step / 9)))
        text.append(f" {_num(scale)}")
        text.append(f"  (square-root scale{f', {MASKED} masked' if causal else ''})", style="dim")
    return text


def shade_bounds(scale: float) -> list[float]:
    """Where each shade starts and ends: a weight w gets shade k when round(4 sqrt(w / scale))
    is k, so the five shades cover [0, b0), [b0, b1), ... [b3, scale]."""
    return [((level + 0.5) / 4) ** 2 * scale for level in range(4)] + [scale]


def _num(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"


def _cell(value: float, cell_w: int, plain: bool) -> tuple[str, Style | str]:
    value = math.sqrt(min(max(value, 0.0), 1.0))  # sqrt: small weights stay visible
    if plain:
        return SHADES[round(value * 4)] * cell_w, ""
    return "█" * cell_w, Style(color=_colour(value))


def _colour(t: float) -> str:
    """A point on the viridis ramp, t in [0, 1], as a hex colour."""
    pos = t * (len(_RAMP) - 1)
    i = min(int(pos), len(_RAMP) - 2)
    frac = pos - i
    r, g, b = (round(a + (b - a) * frac) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _label_width(labels: list[str]) -> int:
    return min(max((cell_len(_printable(s)) for s in labels), default=1), _MAX_LABEL)


def _layout(n_cols: int, label_w: int, width: int) -> tuple[int, int]:
    """(cell width, columns shown): two-character cells if they fit, else one, else cut."""
    room = width - label_w - 2  # label, its space, and one cell for the "…" of a cut row
    for cell_w in (2, 1):
        if n_cols * cell_w <= room + 1:
            return cell_w, n_cols
    return 1, max(1, room)


def _keys_that_fit(tokens: list[str], width: int) -> int:
    return _layout(len(tokens), _label_width(tokens), width)[1]


def _cut_note(n_keys: int, shown: int) -> str:
    if shown >= n_keys:
        return ""
    return (
        f"(keys 0–{shown - 1} of {n_keys} shown: the terminal is too narrow; "
        "widen it, or use --png / --html for the whole matrix)"
    )


def _key_header(labels: list[str], cell_w: int) -> list[str]:
    """Column labels written downwards: line k holds character k of every label."""
    cut = [_printable(s, single_cells=True) for s in labels]
    cut = [s if len(s) <= _MAX_KEY_LABEL else s[: _MAX_KEY_LABEL - 1] + "…" for s in cut]
    height = max((len(s) for s in cut), default=0)
    return [
        "".join(s[k].ljust(cell_w) if k < len(s) else " " * cell_w for s in cut)
        for k in range(height)
    ]


def _fit(label: str, width: int) -> str:
    """``label`` cut or padded to exactly ``width`` terminal cells."""
    text = Text(_printable(label))
    text.truncate(width, overflow="ellipsis", pad=True)
    return text.plain


def _printable(label: str, *, single_cells: bool = False) -> str:
    """Control characters (and, for column labels, wide characters) become "?"."""
    return "".join(
        c if c.isprintable() and (not single_cells or cell_len(c) == 1) else "?" for c in label
    )
