"""The terminal walkthrough: the computation step by step, the way the chapter explains it.

Reads a `Trace` (with the steps `selfattn.explain.chapter` derives); prints with rich. Colour and
styles appear only on a real terminal without NO_COLOR; otherwise the output is plain text
(rich's own detection, which we do not override).

A printed number is always whole: a table that does not fit the console's width drops whole
columns from the right and says so in one line; it never lets rich shorten a cell to "-0.17…".
"""

from __future__ import annotations

import errno
import math
import os

import torch
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from torch import Tensor

from selfattn.explain.chapter import add_chapter_steps, renormalise_route
from selfattn.explain.heatmap import render_heatmaps
from selfattn.explain.jsonout import step_tensor, visible_steps
from selfattn.trace import STEP_MEANINGS, Trace

MAX_PRECISION = 8
_MAX_ROW_LABEL = 16  # row labels (tokens) are cut to this many cells, with "…"
_MAX_COL_LABEL = 8  # a column header is at most this wide, or as wide as its numbers
_MASK_CELLS = {True: "✓", False: "·"}
# The chapter's first attention (--module simple) has no projections and no scaling: every token
# is its own query, key and value, scores = x xᵀ, weights = softmax(scores), context = weights x.
SIMPLE_MEANINGS = {
    **STEP_MEANINGS,
    "queries": "x itself: this first version has no projections",
    "keys": "x itself, matched against each query",
    "values": "x itself, mixed by the weights",
    "scores": "x xᵀ: each token's dot product with every token",
    "scaled_scores": "the scores unchanged: this first version does not scale them",
    "context": "weights @ x: each token's weighted mix of the inputs",
}
_BHLD = "(b, num_heads, num_tokens, head_dim)"
_BLHD = "(b, num_tokens, num_heads, head_dim)"


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


# ---- tables that never cut a number ---------------------------------------------------------


def fmt(value: float | bool, precision: int) -> str:
    """One cell: ✓ / · for a mask, -inf / inf, else ``precision`` decimals."""
    if isinstance(value, bool):
        return _MASK_CELLS[value]
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:.{precision}f}"


def table_width(widths: list[int]) -> int:
    """The width rich gives a `box.SIMPLE_HEAD` table without edge padding, for these column
    widths (label column included): each column's text, one space either side, one divider."""
    return sum(widths) + 3 * len(widths) - 1


class MatrixTables:
    """The tables of one step, one per head, all with the same columns: as many whole columns as
    the console's width holds (the rest dropped, with a note)."""

    def __init__(
        self,
        per_head: Tensor,
        row_labels: list[str],
        col_labels: list[str],
        precision: int,
        width: int,
        *,
        row_sums: bool = False,
    ) -> None:
        self.cells = [[[fmt(v, precision) for v in row] for row in m.tolist()] for m in per_head]
        self.sums = (
            [[fmt(s, precision) for s in m.sum(dim=-1).tolist()] for m in per_head]
            if row_sums
            else None
        )
        self.rows = [_cut(label, _MAX_ROW_LABEL) for label in row_labels]
        n_cols = per_head.shape[-1]
        number_w = [
            max((len(m[i][j]) for m in self.cells for i in range(len(m))), default=1)
            for j in range(n_cols)
        ]
        self.col_w = [
            max(w, min(cell_len(c), _MAX_COL_LABEL))
            for w, c in zip(number_w, col_labels, strict=True)
        ]
        self.cols = [_cut(c, w) for c, w in zip(col_labels, self.col_w, strict=True)]
        self.n_cols = n_cols
        self.width = width
        self.shown = self._fit(width)

    def _fit(self, width: int) -> int:
        """How many whole columns fit; at the narrowest, the row sums go too."""
        labels = max((cell_len(r) for r in self.rows), default=1)
        for with_sums in (True, False):
            fixed = [labels]
            if self.sums is not None and with_sums:
                fixed.append(max(len("row sum"), *(len(s) for m in self.sums for s in m)))
            for shown in range(self.n_cols, -1, -1):
                more = [len(f"… +{self.n_cols - shown}")] if shown < self.n_cols else []
                if table_width(fixed + self.col_w[:shown] + more) <= width:
                    if shown or not with_sums or self.sums is None:
                        if not with_sums:
                            self.sums = None
                        return shown
                    break  # not even one column beside the sums: drop the sums instead
        self.sums = None
        return 0

    def table(self, h: int, title: str | None = None) -> Table:
        shown, cut = self.shown, self.n_cols - self.shown
        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        table.add_column("", style="bold", no_wrap=True)
        for label, w in zip(self.cols[:shown], self.col_w, strict=False):
            table.add_column(Text(label), justify="right", no_wrap=True, min_width=w)
        if cut:
            table.add_column(f"… +{cut}", justify="left", no_wrap=True)
        if self.sums is not None:
            table.add_column("row sum", justify="right", style="dim", no_wrap=True)
        for i, label in enumerate(self.rows):
            cells = self.cells[h][i][:shown] + (["…"] if cut else [])
            if self.sums is not None:
                cells.append(self.sums[h][i])
            table.add_row(Text(label, style="bold"), *cells)
        return table

    def note(self) -> str:
        if self.shown == self.n_cols:
            return ""
        which = (
            f"columns 0–{self.shown - 1} of {self.n_cols} shown"
            if self.shown
            else f"none of {self.n_cols} columns fits"
        )
        full = f"({which}; --json has all)"
        return full if len(full) <= self.width else f"({which})"  # one line, always


def _cut(label: str, width: int) -> str:
    text = Text("".join(c if c.isprintable() else "?" for c in label))
    text.truncate(max(width, 1), overflow="ellipsis")
    return text.plain


# ---- the walkthrough ------------------------------------------------------------------------


def render_walkthrough(tr: Trace, console: Console, precision: int = 4) -> None:
    """Print every step of ``tr`` with its shape and role, then a closing table of shapes."""
    if not 0 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be 0..{MAX_PRECISION}, got {precision}")
    tr = Trace(tr.module, tr.tokens, dict(tr.steps), dict(tr.extras))  # a copy to add steps to
    _Walkthrough(add_chapter_steps(tr), console, precision).run()


class _Walkthrough:
    def __init__(self, tr: Trace, console: Console, precision: int) -> None:
        self.tr, self.console, self.precision = tr, console, precision
        self.steps = visible_steps(tr)
        self.simple = tr.module == "SimpleAttention"
        self.meanings = SIMPLE_MEANINGS if self.simple else STEP_MEANINGS

    def say(self, text: str, style: str = "") -> None:
        self.console.print(Text(text, style=style))

    def matrix(self, m: Tensor, cols: list[str] | None, *, sums: bool = False, title=None):
        """Print a matrix (L, ·) or one per head (H, L, ·), never cutting a number."""
        per_head = m if m.ndim == 3 else m.unsqueeze(0)
        if per_head.dtype != torch.bool:
            per_head = per_head.float()
        labels = cols or [f"[{j}]" for j in range(per_head.shape[-1])]
        tables = MatrixTables(
            per_head, self.tr.tokens, labels, self.precision, self.console.width, row_sums=sums
        )
        for h in range(per_head.shape[0]):
            head_title = f"head {h}" if per_head.shape[0] > 1 else None
            self.console.print(tables.table(h, title or head_title))
        if tables.note():
            self.say(tables.note(), "dim")

    def show(self, name: str, number: str, intro: str, keys: bool = False, sums: bool = False):
        t = step_tensor(self.tr, name)
        self.say(f"\n{number} {name}  shape {_shape(t)}", "bold cyan")
        self.say(intro)
        self.matrix(t, self.tr.tokens if keys else None, sums=sums)

    def run(self) -> None:
        tr = self.tr
        self.header()
        self.show("inputs", "1.", "Each row is one token's embedding vector x (seq_len × d_in).")
        self.projections()
        if tr.num_heads > 1:
            self.split()
        self.show(
            "scores",
            "3.",
            "Q · Kᵀ: row i holds query i's dot product with every key "
            "(queries as rows, keys as columns).",
            keys=True,
        )
        self.scaling()
        if "mask" in self.steps:
            self.masking()
        self.show(
            "weights",
            "5.",
            "Softmax over each row: the attention weights. Each row sums to 1.",
            keys=True,
            sums=True,
        )
        if "masked_scores" in self.steps:
            self.renormalise()
        if "dropped_weights" in self.steps:
            self.dropout()
        self.say(
            "\nThe same weights as a heatmap: row = query, column = key; "
            "the stronger the shade, the more that query attends to that key."
        )
        render_heatmaps(tr, self.console)
        self.show(
            "context", "6.", "Context vectors: each row is the weighted sum of the value rows."
        )
        if "merged" in self.steps:
            self.merge()
        if "output" in self.steps:
            self.show("output", "6c.", self.output_intro())
        self.summary()

    def header(self) -> None:
        tr = self.tr
        header = f"{tr.module} on {len(tr.tokens)} tokens: {' '.join(tr.tokens)}"
        for key in ("description", "note"):
            if key in tr.extras:
                header += f"\n{tr.extras[key]}"
        if "head" in tr.extras:  # a multi-head trace cut to one head
            header += f"\nshowing head {tr.extras['head']} only (--head picks another)"
        self.console.print(Panel(Text(header), title="selfattn explain", expand=False))

    def projections(self) -> None:
        if self.simple:
            self.say(
                "\n2. queries, keys, values: no projections yet. This first version has no "
                "trainable weights: every token's query, key and value are its input x itself.",
                "bold cyan",
            )
            return
        self.say("\n2. queries, keys, values: three projections of the same inputs", "bold cyan")
        for name in ("queries", "keys", "values"):
            self.show(name, "  ", _sentence(self.meanings[name]))

    def split(self) -> None:
        """2b: how one projection becomes H heads, with the chapter's view and transpose."""
        tr = self.tr
        heads, length, d = tr.steps["queries"].shape
        self.say(f"\n2b. split into {heads} heads  (head_dim = {d})", "bold cyan")
        if tr.module == "MultiHeadAttentionWrapper":
            self.say(
                f"The wrapper holds {heads} separate CausalAttention modules, each with its own "
                f"W_query, W_key, W_value: every head projects x to (1, {length}, {d}) itself."
            )
            return
        d_out = heads * d
        rows = [
            ("queries = self.W_query(x)", (1, length, d_out), "(b, num_tokens, d_out)"),
            (
                f"queries.view(1, {length}, {heads}, {d})",
                (1, length, heads, d),
                _BLHD,
            ),
            (
                "queries.transpose(1, 2)",
                (1, heads, length, d),
                "(b, num_heads, num_tokens, head_dim)",
            ),
        ]
        self.code_table(rows)
        self.say(
            "Keys and values are split the same way; each head then runs steps 3-6 on its own "
            f"slice of head_dim = {d} (b = 1 here: one sequence)."
        )

    def code_table(self, rows: list[tuple[str, tuple[int, ...], str]]) -> None:
        """Lines of code with the shape each gives; long lines wrap, never cut."""
        width = max(len(code) for code, _, _ in rows)
        for code, shape, meaning in rows:
            line = Text(f"  {code.ljust(width)}  ")
            line.append("(" + "×".join(map(str, shape)) + ")")  # no spaces: never wrapped apart
            if meaning:
                line.append(f"  {meaning}", style="dim")
            self.console.print(line)

    def scaling(self) -> None:
        tr = self.tr
        if self.simple:
            self.say(
                "\n4. scaled_scores: no scaling in this first version: the softmax below reads "
                "the raw scores (the scaled versions divide by √d_k).",
                "bold cyan",
            )
            return
        d_k = tr.d_k
        self.show(
            "scaled_scores",
            "4.",
            f"Scores divided by √d_k = √{d_k} = {math.sqrt(d_k):.4f}, so "
            "softmax does not saturate as d_k grows.",
            keys=True,
        )

    def masking(self) -> None:
        self.show(
            "mask",
            "4b.",
            "Mask: ✓ = the query may attend to that key, · = hidden. A causal module lets a token "
            "see itself and earlier tokens only; padding is never seen. The chapter's `mask` "
            "buffer stores the opposite: 1 (True) for hidden, torch.triu(ones, diagonal=1), so "
            "✓ here is 0 there.",
            keys=True,
        )
        self.show(
            "masked_scores",
            "4c.",
            "The chapter's trick: hidden scores become -inf before the softmax "
            "(scores.masked_fill(mask.bool(), -torch.inf)), so their weights are exactly 0 and "
            "each row still sums to 1.",
            keys=True,
        )

    def renormalise(self) -> None:
        every_key, renormalised, diff = renormalise_route(self.tr)
        one = self.tr.num_heads == 1
        self.say("\n5b. the same weights by the older route", "bold cyan")
        self.say("Softmax over every key, the hidden ones included:")
        self.matrix(every_key[0] if one else every_key, self.tr.tokens, sums=True)
        self.say("Zero the hidden keys, then divide each row by its new sum:")
        self.matrix(renormalised[0] if one else renormalised, self.tr.tokens, sums=True)
        same = diff < 1e-6
        self.say(
            f"Largest difference from step 5: {diff:.1e}"
            + (" ✓ both routes give the same weights." if same else " ✗ the routes differ!"),
            "bold" if same else "bold red",
        )

    def dropout(self) -> None:
        p = float(self.tr.extras.get("dropout", 0.0))
        self.show(
            "dropped_weights",
            "5c.",
            f"Dropout in training mode (p = {p:g}, seeded): each weight is set to 0 with "
            f"probability {p:g}, and the kept ones are scaled by 1 / (1 − p) = {1 / (1 - p):.4g}, "
            "so a row's expected sum stays 1. Training computes the context from these; "
            "evaluation (and the steps below) uses the weights of step 5.",
            keys=True,
            sums=True,
        )

    def merge(self) -> None:
        tr = self.tr
        heads, length, d = tr.steps["context"].shape
        self.say(f"\n6b. merge the {heads} heads  shape ({length} × {heads * d})", "bold cyan")
        if tr.module == "MultiHeadAttentionWrapper":
            self.code_table(
                [("torch.cat([head(x) for head in self.heads], dim=-1)", (length, heads * d), "")]
            )
        else:
            self.code_table(
                [
                    ("context_vec (per head)", (1, heads, length, d), _BHLD),
                    ("context_vec.transpose(1, 2)", (1, length, heads, d), _BLHD),
                    (
                        f"context_vec.contiguous().view(1, {length}, {heads * d})",
                        (1, length, heads * d),
                        "(b, num_tokens, d_out)",
                    ),
                ]
            )  # fmt: skip
        self.show("merged", "  ", "Each row: the heads' context vectors side by side.")

    def output_intro(self) -> str:
        if self.tr.module == "MultiHeadAttentionWrapper":
            return "The module's output: the merged heads, with no output projection."
        if self.tr.num_heads > 1:
            return (
                "output = self.out_proj(context_vec): a Linear(d_out, d_out) that mixes the "
                "merged heads; this is what the module returns."
            )
        return _sentence(self.meanings["output"])

    def summary(self) -> None:
        tr = self.tr
        summary = Table(
            title="\n7. Every tensor, its shape and meaning",
            box=box.SIMPLE_HEAD,
            title_justify="left",
        )
        summary.add_column("step", style="bold", no_wrap=True)
        summary.add_column("shape", no_wrap=True)
        summary.add_column("meaning")
        for name in self.steps:
            summary.add_row(name, _shape(step_tensor(tr, name)), self.meanings[name])
        self.console.print(summary)
        legend = f"seq_len = {len(tr.tokens)}, d_k = {tr.d_k}"
        if tr.num_heads > 1:
            legend += f", heads = {tr.num_heads} (per-head steps are heads × seq_len × ·)"
        self.say(legend, "dim")


def _shape(t: Tensor) -> str:
    return _shape_of(tuple(t.shape))


def _shape_of(shape: tuple[int, ...]) -> str:
    return "(" + " × ".join(str(s) for s in shape) + ")"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."
