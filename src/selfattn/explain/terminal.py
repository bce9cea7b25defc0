"""The terminal walkthrough: the computation step by step, the way the chapter explains it.

Reads a `Trace`; prints with rich. Colour and styles appear only on a real terminal without
NO_COLOR; otherwise the output is plain text (rich's own detection, which we do not override).
"""

from __future__ import annotations

import errno
import math
import os

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from torch import Tensor

from selfattn.explain.heatmap import render_heatmaps
from selfattn.explain.jsonout import step_tensor, visible_steps
from selfattn.trace import STEP_MEANINGS, Trace


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """Hand a closed pipe to the caller: rich's own default exits with status 1 on its own."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


def make_console(
    file=None, width: int | None = None, force_terminal: bool | None = None
) -> Console:
    """A console that prints plain text when stdout is not a terminal or NO_COLOR is set.

    rich's own NO_COLOR handling drops colours but keeps bold and dim; here NO_COLOR means no
    escape codes at all. A closed pipe raises BrokenPipeError, which `selfattn.cli` turns into a
    quiet exit.
    """
    plain = bool(os.environ.get("NO_COLOR"))
    return _Console(
        file=file,
        width=width,
        highlight=False,
        soft_wrap=False,
        force_terminal=force_terminal,
        color_system=None if plain else "auto",
        no_color=plain,
    )


def matrix_table(
    m: Tensor,
    row_labels: list[str],
    col_labels: list[str],
    precision: int,
    *,
    title: str | None = None,
    row_sums: bool = False,
    max_cols: int | None = None,
) -> Table:
    """A 2-D tensor as a table with labelled rows and columns; wide matrices are cut with a note."""
    n_cols = m.shape[1]
    shown = n_cols if max_cols is None else min(n_cols, max_cols)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    table.add_column("", style="bold", no_wrap=True)
    for label in col_labels[:shown]:
        table.add_column(Text(label), justify="right", no_wrap=True)
    if shown < n_cols:
        table.add_column(f"… +{n_cols - shown}", justify="left", no_wrap=True)
    if row_sums:
        table.add_column("row sum", justify="right", style="dim", no_wrap=True)
    for i, label in enumerate(row_labels):
        cells = [_fmt(m[i, j].item(), precision) for j in range(shown)]
        if shown < n_cols:
            cells.append("…")
        if row_sums:
            cells.append(_fmt(m[i].sum().item(), precision))
        table.add_row(Text(label, style="bold"), *cells)
    return table


def _fmt(value: float, precision: int) -> str:
    if isinstance(value, bool):
        return "✓" if value else "·"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:.{precision}f}"


def _columns_that_fit(console: Console, precision: int, label_width: int) -> int:
    cell = precision + 5  # sign, digits, point, padding
    return max(1, (console.width - label_width - 12) // cell)


def render_walkthrough(tr: Trace, console: Console, precision: int = 4) -> None:
    """Print every step of ``tr`` with its shape and role, then a closing table of shapes."""
    tokens = tr.tokens
    label_w = max(len(t) for t in tokens) if tokens else 1
    fit = _columns_that_fit(console, precision, label_w)
    heads = tr.num_heads
    d_k = tr.d_k
    steps = visible_steps(tr)
    header = f"{tr.module} on {len(tokens)} tokens: {' '.join(tokens)}"
    if "description" in tr.extras:
        header += f"\n{tr.extras['description']}"
    if "head" in tr.extras:  # a multi-head trace cut to one head
        header += f"\nshowing head {tr.extras['head']} only (--head picks another)"
    console.print(Panel(Text(header), title="selfattn explain", expand=False))

    def show(name: str, number: str, intro: str, cols: list[str] | None, sums: bool = False):
        t = step_tensor(tr, name)
        console.print(Text(f"\n{number} {name}  shape {_shape(t)}", style="bold cyan"))
        console.print(Text(intro))
        per_head = t if t.ndim == 3 else t.unsqueeze(0)
        for h in range(per_head.shape[0]):
            m = per_head[h]
            labels = cols or [f"[{j}]" for j in range(m.shape[1])]
            title = f"head {h}" if per_head.shape[0] > 1 else None
            console.print(
                matrix_table(
                    m.float(), tokens, labels, precision, title=title, row_sums=sums, max_cols=fit
                )
            )
        if per_head.shape[-1] > fit:
            console.print(
                Text(
                    f"(showing {fit} of {per_head.shape[-1]} columns; "
                    "widen the terminal or use --json for all)",
                    style="dim",
                )
            )

    show("inputs", "1.", "Each row is one token's embedding vector x (seq_len × d_in).", None)
    console.print(
        Text("\n2. queries, keys, values: three projections of the same inputs", style="bold cyan")
    )
    for name in ("queries", "keys", "values"):
        show(name, "  ", _sentence(STEP_MEANINGS[name]), None)
    show(
        "scores",
        "3.",
        "Q · Kᵀ: row i holds query i's dot product with every key "
        "(queries as rows, keys as columns).",
        tokens,
    )
    show(
        "scaled_scores",
        "4.",
        f"Scores divided by √d_k = √{d_k} = {math.sqrt(d_k):.4f}, so "
        "softmax does not saturate as d_k grows.",
        tokens,
    )
    if "mask" in steps:
        show(
            "mask",
            "4b.",
            "Mask: which keys each query may attend to (✓). A causal module lets a token see "
            "itself and earlier tokens only; padding is never seen. Masked scores become -inf "
            "before softmax, so their weights are exactly 0.",
            tokens,
        )
    show(
        "weights",
        "5.",
        "Softmax over each row: the attention weights. Each row sums to 1.",
        tokens,
        sums=True,
    )
    console.print(
        Text(
            "\nThe same weights as a heatmap: row = query, column = key; "
            "the stronger the shade, the more that query attends to that key."
        )
    )
    render_heatmaps(tr, console)
    show("context", "6.", "Context vectors: each row is the weighted sum of the value rows.", None)
    if "output" in steps:
        show("output", "6b.", _sentence(STEP_MEANINGS["output"]), None)

    summary = Table(
        title="\n7. Every tensor, its shape and meaning", box=box.SIMPLE_HEAD, title_justify="left"
    )
    summary.add_column("step", style="bold")
    summary.add_column("shape", no_wrap=True)
    summary.add_column("meaning")
    for name in steps:
        summary.add_row(name, _shape(step_tensor(tr, name)), STEP_MEANINGS[name])
    console.print(summary)
    legend = f"seq_len = {len(tokens)}, d_k = {d_k}"
    if heads > 1:
        legend += f", heads = {heads} (per-head steps are heads × seq_len × ·)"
    console.print(Group(Text(legend, style="dim")))


def _shape(t: Tensor) -> str:
    return "(" + " × ".join(str(s) for s in t.shape) + ")"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."
