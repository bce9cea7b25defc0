"""What `selfattn explain` does once its arguments are parsed: check, trace, render.

Every check that can fail fast (options that do not apply, output paths, optional dependencies,
a pretrained model's layer and head, the text's length) runs before any tracing. An option that
does not apply to the run asked for is a ValueError naming the reason (exit 2), never ignored.

``--checkpoint`` reads a `selfattn train` run (or a GPT-2 folder) through the `CheckpointTraces`
function its caller passes (`selfattn.cli` passes `selfattn.train.traces.trace_run`), and
``--induction-scores`` through `CheckpointScores` (`selfattn.train.head_scores`): explain and
train are side by side under the CLI, and neither imports the other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from selfattn._argtypes import check_writable, int_in_range
from selfattn.explain import explain_traces
from selfattn.explain.jsonout import to_json
from selfattn.explain.terminal import MAX_PRECISION, make_console, render_walkthrough
from selfattn.minilm_trace import check_head, check_layer
from selfattn.trace import Trace

CheckpointTraces = Callable[[str, str], list[Trace]]
"""(a `selfattn train` run's folder, the text) -> the trained model's traces, one per block."""

CheckpointScores = Callable[[str, "int | None"], dict]
"""(a checkpoint folder, the probe's seed or None) -> every head's induction and previous-token
scores (the data `selfattn.explain.scores` renders)."""

MULTI_HEAD_KINDS = ("wrapper", "mha")
DEFAULT_HEADS = 2
DEFAULT_PRECISION = 4
IMAGE_FORMATS = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class ExplainRequest:
    """One `selfattn explain` run; the fields are the command's options."""

    module: str | None = None
    model: str | None = None
    text: str | None = None
    truncate: bool = False
    seed: int | None = None
    d_out: int | None = None
    heads: int | None = None  # None: not given (2 for a multi-head kind)
    dropout: float | None = None
    layer: int | None = None  # None: not given (layer 0)
    head: int | None = None
    precision: int | None = None  # None: not given (4)
    json: bool = False
    png: str | None = None
    html: str | None = None
    step: str | None = None  # None: not given (weights)
    checkpoint: str | None = None  # a run of `selfattn train` or a GPT-2 folder: its GPT on --text
    induction_scores: bool = False  # every head's scores on the probe, instead of --text
    timeline: bool = False  # --checkpoint's probes through training, as a page (--html)


def precision(text: str) -> int:
    """``--precision``: decimals shown, 0..8."""
    return int_in_range(text, 0, MAX_PRECISION)


def check_options(req: ExplainRequest) -> None:
    """Refuse an option that does not apply to the run ``req`` asks for, saying why."""
    kind = req.module or "v1"
    model = f"--model {req.model}"
    problems = [
        (
            req.heads is not None and req.model is not None,
            f"--heads does not apply to {model}: its heads are fixed (pick one with --head)",
        ),
        (
            req.heads is not None
            and req.model is None
            and req.checkpoint is None
            and kind not in MULTI_HEAD_KINDS,
            f"--heads applies to --module wrapper or mha; --module {kind} has one head",
        ),
        (
            req.d_out is not None and req.model is not None,
            f"--d-out does not apply to {model}: its sizes are fixed",
        ),
        (
            req.d_out is not None and kind == "simple",
            "--d-out does not apply to --module simple: with no projections, its output is as "
            "wide as its input",
        ),
        (
            req.seed is not None and req.model is not None,
            f"--seed does not apply to {model}: its weights are pretrained",
        ),
        (
            req.seed is not None and kind == "simple" and req.dropout is None,
            "--seed does not apply to --module simple: it has no random weights "
            "(it seeds --dropout when given)",
        ),
        (
            req.dropout is not None and req.model is not None,
            f"--dropout does not apply to {model}: it runs in evaluation mode",
        ),
        *_timeline_problems(req),
        *_scores_problems(req),
        (
            req.layer is not None and req.model is None and req.checkpoint is None,
            "--layer applies to --model minilm only (or a --checkpoint): a --module is one layer",
        ),
        *_checkpoint_problems(req),
        (req.truncate and req.text is None, "--truncate applies to --text only"),
        (
            req.step is not None and req.png is None and req.html is None,
            "--step picks what --png draws and where --html opens; give --png or --html",
        ),
        (
            req.precision is not None and (req.json or req.png is not None or req.html is not None),
            "--precision sets the terminal walkthrough's decimals, which --json, --png and "
            "--html do not print",
        ),
    ]
    for wrong, reason in problems:
        if wrong:
            raise ValueError(reason)
    if req.png is not None and not req.png.lower().endswith(IMAGE_FORMATS):
        raise ValueError(
            f"--png {req.png}: the name must end in .png, .svg or .pdf (the format written)"
        )


def run_explain(
    req: ExplainRequest,
    out: TextIO | None = None,
    *,
    checkpoint_traces: CheckpointTraces | None = None,
    checkpoint_scores: CheckpointScores | None = None,
) -> None:
    """Trace what ``req`` names and render it: terminal walkthrough, JSON, PNG and/or HTML.
    ``checkpoint_traces`` reads the run of ``req.checkpoint``; it is needed only then, as
    ``checkpoint_scores`` only for ``req.induction_scores``."""
    out = out or sys.stdout
    check_before_tracing(req)
    if req.timeline:
        _timeline(req, out)
        return
    if req.induction_scores:
        _induction_scores(req, out, checkpoint_scores)
        return
    traces = _traces(req, checkpoint_traces)  # one per layer (a module: one)
    layer = req.layer or 0
    _check_index("--layer", layer, len(traces), "layers")
    if req.head is not None:
        _check_index("--head", req.head, traces[layer].num_heads, "heads")
    said = sys.stderr if req.json else out  # keep stdout pure JSON under --json
    _write_files(req, traces, layer, said)
    tr = traces[layer]
    # a pretrained model has 12 heads: its walkthrough and JSON show one unless told otherwise
    trained = req.model is not None or req.checkpoint is not None
    one_head = req.head if req.head is not None or not trained else 0
    if one_head is not None:
        tr = tr.select_head(one_head)
    if req.json:
        json.dump(to_json(tr), out)
        out.write("\n")
    elif req.png is None and req.html is None:
        decimals = DEFAULT_PRECISION if req.precision is None else req.precision
        render_walkthrough(tr, make_console(file=out), precision=decimals)


def check_before_tracing(req: ExplainRequest) -> None:
    """Everything that can be refused before a model runs: the options (`check_options`), the
    output paths, the plot extra, MiniLM's layer and head, the text's length."""
    check_options(req)
    for flag, path in (("--png", req.png), ("--html", req.html)):
        if path is not None:
            check_writable(flag, path)
    if req.png is not None:
        from selfattn._extras import require

        require("matplotlib", "plot", "--png")
    if req.model == "minilm":  # its sizes are known without running it
        check_layer(req.layer or 0)
        if req.head is not None:
            check_head(req.head)
    if req.text is not None and not req.truncate and req.checkpoint is None:
        _check_text_length(req.text)


def _traces(req: ExplainRequest, checkpoint_traces: CheckpointTraces | None) -> list[Trace]:
    """What ``req`` asks to trace: a training run's blocks, MiniLM's layers, or one module."""
    if req.checkpoint is not None:
        return _checkpoint_traces(req, checkpoint_traces)
    return explain_traces(
        module=req.module,
        model=req.model,
        text=req.text,
        seed=req.seed,
        d_out=req.d_out,
        heads=DEFAULT_HEADS if req.heads is None else req.heads,
        truncate=req.truncate,
        dropout=req.dropout or 0.0,
    )


def _write_files(req: ExplainRequest, traces: list[Trace], layer: int, said: TextIO) -> None:
    """--png (the layer's heads, or --head) and --html (every layer), each said on ``said``."""
    step = req.step or "weights"
    if req.png is not None:
        from selfattn.explain.png import render_png

        heads = None if req.head is None else [req.head]
        render_png(traces[layer], req.png, step=step, heads=heads)
        print(f"wrote {req.png}: {step}, {_count(heads, traces[layer].num_heads)}", file=said)
    if req.html is not None:
        from selfattn.explain.html import write_html

        write_html(traces, req.html, layer=layer, head=req.head or 0, step=step)
        print(f"wrote {req.html}: open it in a browser (works offline)", file=said)


def _scores_problems(req: ExplainRequest) -> list[tuple[bool, str]]:
    """The options that do not apply to --induction-scores, each with why."""
    if not req.induction_scores:
        return []
    what = "--induction-scores"
    table = f"{what} prints every layer's and head's scores"
    return [
        (req.checkpoint is None, f"{what} applies to --checkpoint DIR only: a trained model"),
        (req.text is not None, f"--text does not apply to {what}: its probe is random tokens "
         "repeated"),
        (req.layer is not None or req.head is not None, f"--layer and --head do not apply to "
         f"{what}: {table}"),
        (req.png is not None or req.html is not None, f"--png and --html do not apply to {what}: "
         f"{table} (--json gives them as data)"),
    ]  # fmt: skip


def _timeline_problems(req: ExplainRequest) -> list[tuple[bool, str]]:
    """The options that do not apply to --timeline, each with why: it draws one page of the
    probes a run recorded, every layer and head at every evaluation."""
    if not req.timeline:
        return []
    what = "--timeline (the probes' attention through training, every layer and head)"
    return [
        (req.checkpoint is None, "--timeline needs --checkpoint RUN: the folder of a selfattn "
         "train run, whose probes it plays back"),
        (req.html is None, "--timeline draws a web page: give --html FILE"),
        (req.png is not None, f"--png does not apply to {what}: it is a page; give --html FILE"),
        (req.json, f"--json does not apply to {what}: it is a page; its data is the run's "
         "probes.safetensors and metrics.jsonl"),
        (req.induction_scores, "--induction-scores does not apply to --timeline: the page "
         "already has every head's scores at each evaluation"),
        (req.text is not None, f"--text does not apply to {what}: the run recorded its probe "
         "while it trained"),
        (req.layer is not None or req.head is not None or req.step is not None,
         f"--layer, --head and --step do not apply to {what}"),
        (req.seed is not None, f"--seed does not apply to {what}: the probe is the run's"),
    ]  # fmt: skip


def _timeline(req: ExplainRequest, out: TextIO) -> None:
    """--timeline: the run's probes through training, as one page."""
    from selfattn.explain.timeline import write_timeline

    write_timeline(req.checkpoint, req.html)
    print(f"wrote {req.html}: open it in a browser (works offline)", file=out)


def _induction_scores(req: ExplainRequest, out: TextIO, read: CheckpointScores | None) -> None:
    """--induction-scores: the table of every head's scores, or its data with --json."""
    from selfattn.explain.scores import render_head_scores

    if read is None:
        raise TypeError(
            "run_explain needs checkpoint_scores= for --induction-scores, e.g. "
            "selfattn.train.head_scores.checkpoint_head_scores; got None"
        )
    data = read(req.checkpoint, req.seed)
    if req.json:
        json.dump(data, out)
        out.write("\n")
        return
    decimals = DEFAULT_PRECISION if req.precision is None else req.precision
    render_head_scores(data, make_console(file=out), precision=decimals)


def _checkpoint_problems(req: ExplainRequest) -> list[tuple[bool, str]]:
    """The options that do not apply to --checkpoint, each with why (see `check_options`)."""
    if req.checkpoint is None:
        return []
    where = f"--checkpoint {req.checkpoint}"
    scores = req.induction_scores
    return [
        (
            req.text is None and not scores and not req.timeline,
            f"{where} needs --text (the text to run the model on), or --induction-scores",
        ),
        (req.heads is not None, f"--heads does not apply to {where}: its heads are trained"),
        (req.d_out is not None, f"--d-out does not apply to {where}: its sizes are trained"),
        (
            req.seed is not None and not scores,
            f"--seed does not apply to {where}: its weights are trained (it seeds "
            "--induction-scores' probe)",
        ),
        (req.dropout is not None, f"--dropout does not apply to {where}: it runs in eval mode"),
        (req.truncate, f"--truncate does not apply to {where}: the text must fit its context"),
    ]


def _checkpoint_traces(req: ExplainRequest, read: CheckpointTraces | None) -> list[Trace]:
    """The trained GPT of a `selfattn train` run on --text: one trace per block."""
    from selfattn.explain.chapter import add_chapter_steps

    if read is None:
        raise TypeError(
            "run_explain needs checkpoint_traces= for --checkpoint, e.g. "
            "selfattn.train.traces.trace_run; got None"
        )
    return [add_chapter_steps(tr) for tr in read(req.checkpoint, req.text)]


def _check_text_length(text: str) -> None:
    """``--text`` longer than the model's limit, in the command's own words."""
    from selfattn.minilm_trace import MAX_TOKENS
    from selfattn.models.minilm import MODEL_NAME, load_tokenizer

    if not text.strip():
        return  # tokenize refuses it with its own message
    count = len(load_tokenizer().encode(text).ids)
    if count > MAX_TOKENS:
        raise ValueError(
            f"--text is {count} tokens long ([CLS] and [SEP] included), over {MODEL_NAME}'s "
            f"limit of {MAX_TOKENS}; shorten it, or add --truncate to keep the first {MAX_TOKENS}"
        )


def _check_index(flag: str, value: int, count: int, what: str) -> None:
    if not 0 <= value < count:
        valid = f"there is only {what[:-1]} 0" if count == 1 else f"valid {what} are 0..{count - 1}"
        raise ValueError(f"{flag} {value} is out of range: {valid}")


def _count(heads: list[int] | None, n_heads: int) -> str:
    if heads is not None:
        return f"head {heads[0]}"
    return "1 head" if n_heads == 1 else f"{n_heads} heads"
