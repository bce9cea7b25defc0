"""Attention in a Jupyter notebook: `show` draws the interactive view of ``explain --html`` in a
cell's output; `plot` returns the PNG renderer's matplotlib ``Figure``.

    selfattn.show(module, x, tokens)     # the module's attention on x: every layer it runs
    selfattn.show(trace)                 # a Trace, or a list of them (one per layer)
    selfattn.show(run_dir, timeline=True)  # a training run's heads forming, evaluation by one
    selfattn.plot(module, x, tokens)     # one heatmap per head, as a matplotlib Figure

`show` returns a `View`, which Jupyter draws through its ``_repr_html_``: the step selector, the
heatmaps with their values on hover, the head and layer selectors and the line view, in plain
HTML and JavaScript with everything inline. It needs no extension and no network (JupyterLab,
classic Notebook, VS Code). Each time it is drawn, the view gets a fresh id and lives in its own
shadow root (`selfattn.explain.html.render_view`), so any number of views share a notebook
without clashing. Importing this module also gives every `Trace` that view
(``Trace._repr_html_``, through `selfattn.trace.set_html_view`).

Shapes: ``x`` as the module's forward takes it, (L, d_in) or (B, L, d_in) (sample 0 is shown),
or token ids (1, L) for a GPT; ``tokens``, L labels (default "0", "1", ...).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from selfattn import _atomic
from selfattn._extras import require
from selfattn.explain.chapter import add_chapter_steps
from selfattn.explain.html import PAGE_STEPS, render_view, write_html
from selfattn.explain.png import PNG_STEPS, attention_figure
from selfattn.explain.timeline import render_timeline_html, render_timeline_view, timeline_data
from selfattn.trace import Trace, set_html_view, trace_all

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TimelineView", "View", "plot", "show"]


class View:
    """The interactive view of one trace per layer, drawn by Jupyter; what `show` returns.

    ``layer``, ``head`` and ``step`` are the ones shown first; all stay selectable in the view.
    """

    def __init__(self, traces: list[Trace], *, layer: int, head: int, step: str) -> None:
        self.traces = traces
        self.layer = layer
        self.head = head
        self.step = step

    def _repr_html_(self) -> str:
        """The view as an HTML fragment, with an id of its own each time it is drawn."""
        view_id = f"selfattn-{uuid.uuid4().hex}"
        return render_view(
            self.traces, view_id=view_id, layer=self.layer, head=self.head, step=self.step
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """The same view as one self-contained page (``explain --html``'s), to open anywhere."""
        write_html(self.traces, path, layer=self.layer, head=self.head, step=self.step)

    def __repr__(self) -> str:
        first = self.traces[0]
        layers = len(self.traces)
        heads = sorted({tr.num_heads for tr in self.traces})
        count = f"{heads[0]}" if len(heads) == 1 else f"{heads[0]}-{heads[-1]}"
        return (
            f"<selfattn view of {first.extras.get('model', first.module)}: "
            f"{len(first.tokens)} tokens, {layers} layer{'s' * (layers != 1)}, "
            f"{count} head{'s' * (heads != [1])}>"
        )


class TimelineView:
    """A training run's timeline (``explain --timeline``'s page), drawn by Jupyter; what
    ``show(run_dir, timeline=True)`` returns. The run's files are read once, when it is made."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = run_dir
        self.data = timeline_data(run_dir)

    def _repr_html_(self) -> str:
        return render_timeline_view(self.data, view_id=f"selfattn-{uuid.uuid4().hex}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """The same timeline as one self-contained page: the one shown (the run's files as
        they were read then), written atomically."""
        _atomic.write_text(path, render_timeline_html(self.data))

    def __repr__(self) -> str:
        d = self.data
        return (
            f"<selfattn timeline of {self.run_dir}: {len(d['iterations'])} evaluations, "
            f"{d['layers']} layers x {d['heads']} heads on {d['size']} tokens>"
        )


def show(
    source: nn.Module | Trace | Sequence[Trace] | str | os.PathLike[str],
    x: Tensor | None = None,
    tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    step: str | None = None,
    timeline: bool = False,
) -> View | TimelineView:
    """The interactive view of ``source``'s attention, for a notebook cell to display.

    ``source`` is a module (or a whole model such as the GPT) run once on ``x`` and traced,
    every attention layer it runs; or a `Trace`; or a list of traces, one per layer. ``layer``,
    ``head`` (default 0 each) and ``step`` (default "weights"; any of
    `selfattn.explain.html.PAGE_STEPS`) pick what the view shows first. Bad arguments are a
    TypeError or ValueError saying what was expected.

    ``timeline=True``: ``source`` is the folder of a `selfattn train` run, and the view is its
    timeline (`TimelineView`): a slider over the evaluations driving every head's attention on
    the probe the run recorded, beside the loss and score curves.
    """
    if timeline:
        return _timeline(source, x, tokens, layer, head, step)
    traces = _traces("show", source, x, tokens)
    layer = _index("layer", layer, len(traces))
    head = _index("head", head, traces[layer].num_heads)
    return View(traces, layer=layer, head=head, step=_step("show", step, PAGE_STEPS))


def _timeline(source, x, tokens, layer, head, step) -> TimelineView:
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"show(run_dir, timeline=True) expects the folder of a selfattn train run (a str or "
            f"path); got {_describe(source)}"
        )
    given = [n for n, v in (("x", x), ("tokens", tokens), ("layer", layer), ("head", head),
                            ("step", step)) if v is not None]  # fmt: skip
    if given:
        raise TypeError(
            f"show(run_dir, timeline=True) takes no {', '.join(given)}: the timeline shows every "
            "layer and head of the run's probe"
        )
    return TimelineView(source)


def plot(
    source: nn.Module | Trace | Sequence[Trace],
    x: Tensor | None = None,
    tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    step: str | None = None,
) -> Figure:
    """``explain --png``'s figure of one layer (default 0): a heatmap per head, or of ``head``
    alone; ``step`` is "weights" (default), "scores" or "scaled_scores". Arguments as `show`'s.
    Needs matplotlib (the ``plot`` extra). In a notebook, a cell that returns the Figure shows
    it as an image.
    """
    traces = _traces("plot", source, x, tokens)
    layer = _index("layer", layer, len(traces))
    heads = None if head is None else [_index("head", head, traces[layer].num_heads)]
    step = _step("plot", step, tuple(PNG_STEPS))
    require("matplotlib", "plot", "selfattn.plot")
    _figures_show_in_ipython()
    return attention_figure(traces[layer], step=step, heads=heads)


def _figures_show_in_ipython() -> None:
    """In IPython (a Jupyter kernel), draw a cell's returned matplotlib Figure as a PNG, as
    ``%matplotlib inline`` does; `plot`'s Figure is not pyplot's, so without this a notebook
    would print ``<Figure size ...>``. Where Figures have an image formatter already (the user's
    own, or the inline backend's), or outside IPython, nothing changes."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    formatters = shell.display_formatter.formatters
    for mime in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        try:
            formatters[mime].lookup_by_type(Figure)
            return
        except KeyError:
            continue
    formatters["image/png"].for_type(
        Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight")
    )


def _traces(caller: str, source: object, x: object, tokens: Sequence[str] | None) -> list[Trace]:
    """One trace per layer, each a copy with the chapter's derived steps (the merged heads)."""
    if isinstance(source, nn.Module):
        if x is None:
            raise TypeError(
                f"{caller}(module, x): x, the input to run {type(source).__name__} on, is missing"
            )
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        traces = trace_all(source, x, _labels(tokens))
    elif isinstance(source, Trace) or (
        isinstance(source, (list, tuple)) and source and all(isinstance(t, Trace) for t in source)
    ):
        if x is not None or tokens is not None:
            raise TypeError(
                f"{caller}(trace) takes no x or tokens: a Trace already holds its steps and tokens"
            )
        traces = [source] if isinstance(source, Trace) else list(source)
    else:
        run = " (a training run's folder: show(run_dir, timeline=True))"
        raise TypeError(
            f"{caller} expects an nn.Module and its input x, a Trace, or a non-empty list of "
            f"Traces (one per layer); got {_describe(source)}"
            f"{run if caller == 'show' and isinstance(source, str | os.PathLike) else ''}"
        )
    return [
        add_chapter_steps(Trace(t.module, t.tokens, dict(t.steps), dict(t.extras))) for t in traces
    ]


def _labels(tokens: Sequence[str] | None) -> list[str] | None:
    if tokens is None:
        return None
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(
            f"tokens must be a list of str, one label per position; got {_describe(tokens)} "
            "(for one label per character of a text, pass list(text))"
        )
    return list(tokens)


def _index(name: str, value: int | None, count: int) -> int:
    """``value`` (None: 0) if it is an int in 0..count-1, else a TypeError or ValueError."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {_describe(value)}")
    if not 0 <= value < count:
        valid = f"there is only {name} 0" if count == 1 else f"valid {name}s are 0..{count - 1}"
        raise ValueError(f"{name} {value} is out of range: {valid}")
    return value


def _step(caller: str, step: str | None, valid: tuple[str, ...]) -> str:
    if step is None:
        return "weights"
    if not isinstance(step, str) or step not in valid:
        raise ValueError(f"{caller}: unknown step {step!r}; expected one of {', '.join(valid)}")
    return step


def _describe(value: object) -> str:
    text = repr(value)
    return type(value).__name__ + (f" {text}" if len(text) <= 40 else "")


def _trace_html(tr: Trace) -> str:
    return show(tr)._repr_html_()


set_html_view(_trace_html)
