"""What `selfattn explain` does once its arguments are parsed: check, trace, render.

Every check that can fail fast (output paths, optional dependencies, a pretrained model's layer
and head) runs before any tracing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TextIO

from selfattn._argtypes import check_writable
from selfattn.explain import explain_traces
from selfattn.explain.jsonout import to_json
from selfattn.explain.terminal import make_console, render_walkthrough
from selfattn.text import check_head, check_layer


@dataclass(frozen=True)
class ExplainRequest:
    """One `selfattn explain` run; the fields are the command's options."""

    module: str | None = None
    model: str | None = None
    text: str | None = None
    truncate: bool = False
    seed: int | None = None
    d_out: int | None = None
    heads: int = 2
    layer: int = 0
    head: int | None = None
    precision: int = 4
    json: bool = False
    png: str | None = None
    html: str | None = None
    step: str = "weights"


def run_explain(req: ExplainRequest, out: TextIO | None = None) -> None:
    """Trace what ``req`` names and render it: terminal walkthrough, JSON, PNG and/or HTML."""
    out = out or sys.stdout
    for flag, path in (("--png", req.png), ("--html", req.html)):
        if path is not None:
            check_writable(flag, path)
    if req.png is not None:
        from selfattn._extras import require

        require("matplotlib", "plot", "--png")
    if req.model == "minilm":  # before the model runs: its sizes are known
        check_layer(req.layer)
        if req.head is not None:
            check_head(req.head)

    traces = explain_traces(
        module=req.module,
        model=req.model,
        text=req.text,
        seed=req.seed,
        d_out=req.d_out,
        heads=req.heads,
        truncate=req.truncate,
    )  # one per layer
    _check_index("--layer", req.layer, len(traces), "layers")
    tr = traces[req.layer]
    if req.head is not None:
        _check_index("--head", req.head, tr.num_heads, "heads")
    # a pretrained model has 12 heads: its walkthrough and JSON show one unless told otherwise
    one_head = req.head if req.head is not None or req.model is None else 0

    said = sys.stderr if req.json else out  # keep stdout pure JSON under --json
    if req.png is not None:
        from selfattn.explain.png import render_png

        heads = None if req.head is None else [req.head]
        render_png(tr, req.png, step=req.step, heads=heads)
        print(f"wrote {req.png}: {req.step}, {_count(heads, tr.num_heads)}", file=said)
    if req.html is not None:
        from selfattn.explain.html import write_html

        write_html(traces, req.html, layer=req.layer, head=req.head or 0, step=req.step)
        print(f"wrote {req.html}: open it in a browser (works offline)", file=said)
    if one_head is not None:
        tr = tr.select_head(one_head)
    if req.json:
        json.dump(to_json(tr), out)
        out.write("\n")
    elif req.png is None and req.html is None:
        render_walkthrough(tr, make_console(file=out), precision=req.precision)


def _check_index(flag: str, value: int, count: int, what: str) -> None:
    if not 0 <= value < count:
        valid = f"there is only {what[:-1]} 0" if count == 1 else f"valid {what} are 0..{count - 1}"
        raise ValueError(f"{flag} {value} is out of range: {valid}")


def _count(heads: list[int] | None, n_heads: int) -> str:
    if heads is not None:
        return f"head {heads[0]}"
    return "1 head" if n_heads == 1 else f"{n_heads} heads"
