"""`--html`: one self-contained web page to explore a trace, step by step, head by head.

The page is a single file: its CSS and JavaScript are inline and the traces are embedded as JSON,
so it works offline and loads nothing from anywhere (no CDN, no fonts, no network). It shows

* a step selector, x → Q/K/V → scores → scaled → softmax → context, with a short explanation of
  each step and its matrices as heatmaps (value and row/column on hover);
* head and layer selectors where the traces have several (a plain module: one layer; MiniLM:
  6 layers × 12 heads), and a clickable overview of every head's weights;
* a token-to-token line view like bertviz's head view: queries on the left, keys on the right,
  each line as opaque as its attention weight; hovering a token isolates its lines.

Token text only ever reaches the page as JSON (with ``<``, ``>`` and ``&`` escaped) and is put
into the document with ``textContent``, so tokens like ``<script>`` show as text.

Shapes per layer: L tokens, H heads, D head width; per-head steps are (H, L, ·).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from selfattn import _atomic
from selfattn.explain.jsonout import visible_steps
from selfattn.trace import Trace

PAGE_STEPS = (
    "inputs",
    "queries",
    "keys",
    "values",
    "scores",
    "scaled_scores",
    "weights",
    "context",
    "merged",
    "output",
)
# A page holds at most this many numbers (~8 bytes each). Past it, a long input's page keeps
# fewer layers or steps (see `_plan`) and says so.
MAX_NUMBERS = 2_000_000
_DECIMALS = 4
# one view shows Q, K and V; another the merged heads and out_proj's output
_STEP_VIEWS = {"queries": "qkv", "keys": "qkv", "values": "qkv", "merged": "output"}
_VIEW_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def render_html(
    traces: Trace | Sequence[Trace],
    *,
    layer: int = 0,
    head: int = 0,
    step: str = "weights",
    title: str | None = None,
) -> str:
    """The page for ``traces``, one per layer (a plain module gives one), as a string.

    ``layer``, ``head`` and ``step`` are the ones shown first; all stay selectable.
    """
    data = page_data(traces, layer=layer, head=head, step=step, title=title)
    return fill_page(_BODY, _CSS, _JS, data)


def fill_page(body: str, css: str, js: str, data: dict[str, Any]) -> str:
    """One self-contained page: ``body``, ``css`` and ``js`` (a function of the root it draws
    in) with ``data`` (its ``"title"`` the page's) as JSON. Shared by every selfattn page."""
    return (
        _TEMPLATE.replace("__BODY__", body)
        .replace("__TITLE__", html.escape(data["title"]))
        .replace("__CSS__", css)
        .replace("__JS__", js)
        .replace("__DATA__", _script_json(data))
    )


def render_view(
    traces: Trace | Sequence[Trace],
    *,
    view_id: str,
    layer: int = 0,
    head: int = 0,
    step: str = "weights",
    title: str | None = None,
) -> str:
    """The page's view as an HTML fragment to embed in another page: a notebook cell's output.

    The fragment is one ``<div id=view_id>`` and the script that draws the view into that div's
    shadow root, so several views on one page share no element ids and no globals, and the
    page's styles and theirs do not touch. ``view_id`` must be unique on the page that shows it
    (letters, digits, ``-`` and ``_``, starting with a letter). Like the page, it loads nothing.
    Where scripts do not run (an untrusted notebook), the div says so instead.
    """
    data = page_data(traces, layer=layer, head=head, step=step, title=title)
    return fill_view(view_id, "selfattn-view", "view", _BODY, _CSS, _JS, data)


def fill_view(
    view_id: str, css_class: str, what: str, body: str, css: str, js: str, data: dict[str, Any]
) -> str:
    """A page's view as a fragment for another page (see `render_view`): the host div of class
    ``css_class``, its markup in a shadow root; ``what`` names it in the no-JavaScript note."""
    if not isinstance(view_id, str) or not _VIEW_ID.fullmatch(view_id):
        raise ValueError(
            f"view_id must be letters, digits, '-' and '_', starting with a letter; got {view_id!r}"
        )
    return (
        _VIEW.replace("__ID__", view_id)
        .replace("__CLASS__", css_class)
        .replace("__WHAT__", what)
        .replace("__BODY__", body)
        .replace("__CSS__", css)
        .replace("__JS__", js)
        .replace("__DATA__", _script_json(data))
    )


def _script_json(data: dict[str, Any]) -> str:
    """``data`` as JSON to place inside a ``<script>`` element."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # Inside <script>, "</script>" or "<!--" in a token must not end the element: escape < > &.
    return (
        payload.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def write_html(
    traces: Trace | Sequence[Trace],
    path: str | os.PathLike[str],
    *,
    layer: int = 0,
    head: int = 0,
    step: str = "weights",
    title: str | None = None,
) -> None:
    """`render_html` written to ``path`` (UTF-8, atomically)."""
    _atomic.write_text(path, render_html(traces, layer=layer, head=head, step=step, title=title))


def page_data(
    traces: Trace | Sequence[Trace],
    *,
    layer: int = 0,
    head: int = 0,
    step: str = "weights",
    title: str | None = None,
) -> dict[str, Any]:
    """The JSON the page embeds: tokens, and per layer every step as nested lists."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not traces:
        raise ValueError("render_html needs at least one trace")
    first = traces[0]
    for tr in traces[1:]:
        if tr.tokens != first.tokens:
            raise ValueError("every layer's trace must have the same tokens")
    if not 0 <= layer < len(traces):
        raise ValueError(
            f"layer {layer} is out of range: the traces have layers 0..{len(traces) - 1}"
        )
    if not 0 <= head < traces[layer].num_heads:
        raise ValueError(
            f"head {head} is out of range: layer {layer} has heads 0..{traces[layer].num_heads - 1}"
        )
    if step not in PAGE_STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(PAGE_STEPS)}")
    kept, note = _plan(traces, layer)
    model = first.extras.get("model")
    if title is None:
        title = f"{model or first.module}: self-attention, step by step"
    return {
        "title": title,
        "module": first.module,
        "model": model,
        "tokens": first.tokens,
        "initial": {
            "layer": [i for i, _ in kept].index(layer),
            "head": head,
            "step": _STEP_VIEWS.get(step, step),
        },
        "note": note,
        "layers": [_layer_data(traces[i], i, full=full) for i, full in kept],
    }


def _plan(traces: list[Trace], layer: int) -> tuple[list[tuple[int, bool]], str]:
    """Which layers the page keeps, each with every step (True) or its weights only (False).

    Everything when it fits in `MAX_NUMBERS`; else, for long inputs, less, with a note saying
    what is left out.
    """
    full = [_numbers(tr) for tr in traces]
    weights = [tr.steps["weights"].numel() for tr in traces]
    others = [i for i in range(len(traces)) if i != layer]
    name = traces[layer].extras.get("layer", layer)
    plans = [
        ([(i, True) for i in range(len(traces))], ""),
        (
            sorted([(layer, True)] + [(i, False) for i in others]),
            f"Long input: only layer {name} keeps every step here; the other layers keep "
            "their attention weights. Rerun with --layer to see another layer's steps.",
        ),
        (
            [(layer, True)],
            f"Long input: this page holds layer {name} only. Rerun with --layer for another.",
        ),
    ]
    for kept, note in plans:
        if sum(full[i] if f else weights[i] for i, f in kept) <= MAX_NUMBERS:
            return kept, note
    return [(layer, False)], (
        f"Long input: this page holds layer {name}'s attention weights only; "
        "use --png for the scores."
    )


def _layer_data(tr: Trace, index: int, *, full: bool) -> dict[str, Any]:
    shown = visible_steps(tr)  # no "output" where it only repeats a single head's context
    names = [n for n in PAGE_STEPS if n in shown and (full or n == "weights")]
    mask = tr.steps.get("mask")
    masked = mask is not None and not bool(mask.all())
    return {
        "label": f"layer {tr.extras.get('layer', index)}",
        "description": str(tr.extras.get("description", "")),
        "num_heads": tr.num_heads,
        "d_k": tr.d_k,
        "scale": tr.scale,
        "simple": tr.module == "SimpleAttention",  # no projections, no scaling
        "causal": masked,
        "complete": full,
        # (H, L, L) as H lists of L strings of "1" (may attend) / "0" (masked)
        "mask": [["".join("1" if a else "0" for a in row) for row in h.tolist()] for h in mask]
        if masked
        else None,
        "steps": {name: _numbers_of(tr.steps[name]) for name in names},
    }


def _numbers_of(t: Tensor) -> Any:
    """Nested lists rounded to a few decimals; a non-finite value becomes null."""
    rounded = t.double().round(decimals=_DECIMALS)
    if bool(rounded.isfinite().all()):
        return rounded.tolist()
    return _finite_or_none(rounded.tolist())


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def _numbers(tr: Trace) -> int:
    return sum(tr.steps[n].numel() for n in PAGE_STEPS if n in tr.steps)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
__BODY__
<footer>Made by <b>selfattn</b>. This page is one self-contained file: it works offline and
  loads nothing from the network.</footer>
<script>(__JS__)(document);</script>
</body>
</html>
"""

# A view in someone else's page: the host div, with the view's markup kept inert in a <template>
# until the script moves it into the div's shadow root (light-DOM children of a shadow host are
# not drawn, so the note shows only where the script never ran). The script finds the div by its
# id, or, where the output is not in the document yet, as the element just before itself.
_VIEW = """<div id="__ID__" class="__CLASS__"><template><style>__CSS__</style>
__BODY__</template><p style="font-style: italic">selfattn: this interactive __WHAT__ needs
JavaScript. Run the cell again (in a trusted notebook) to see it.</p></div>
<script>
(function () {
  "use strict";
  const me = document.currentScript;
  const host = document.getElementById("__ID__") || (me && me.previousElementSibling);
  if (!host || host.shadowRoot) return;
  const root = host.attachShadow({ mode: "open" });
  root.appendChild(host.querySelector("template").content.cloneNode(true));
  (__JS__)(root);
})();
</script>
"""

# The view itself: the page's body, and a notebook cell's view (`render_view`) inside its shadow
# root. The script finds every element of it by id inside its own root.
_BODY = """<svg id="svg-ns" width="0" height="0" aria-hidden="true"></svg>
<header>
  <p class="kicker">selfattn explain</p>
  <h1 id="title"></h1>
  <p id="description" class="muted"></p>
  <div id="sentence" class="sentence" aria-label="tokens"></div>
  <p id="note" class="note" hidden></p>
</header>
<nav id="controls">
  <label id="layer-box">Layer <select id="layer"></select></label>
  <label id="head-box">Head <select id="head"></select></label>
  <div id="steps" class="steps" role="group" aria-label="step"></div>
</nav>
<main>
  <section class="card" id="step-card">
    <h2 id="step-title"></h2>
    <p id="step-text" class="explain"></p>
    <div id="panels" class="panels"></div>
  </section>
  <section class="card" id="lines-card">
    <h2>Who attends to whom</h2>
    <p class="explain">Queries on the left, keys on the right. Each line is as opaque as the
      attention weight. Hover a token to see only its lines and their weights.</p>
    <div id="lines"></div>
  </section>
  <section class="card" id="heads-card">
    <h2>Every head of this layer</h2>
    <p class="explain">The attention weights of each head, side by side. Heads learn different
      patterns: click one to explore it.</p>
    <div id="thumbs" class="thumbs"></div>
  </section>
</main>
<div id="tip" role="tooltip" hidden></div>
<script type="application/json" id="selfattn-data">__DATA__</script>
"""

_CSS = """
:root, :host {
  --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f6f7f9; --card: #ffffff;
  --accent: #2f6fdf; --accent-soft: #e7effd; --hot: #d9480f;
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  --mono: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace;
}
* { box-sizing: border-box; }
body, :host { margin: 0; background: var(--bg); color: var(--ink); font: 15px/1.5 var(--font); }
header { padding: 22px 28px 8px; }
.kicker { margin: 0; color: var(--accent); font-weight: 600; letter-spacing: .06em;
  text-transform: uppercase; font-size: 12px; }
h1 { margin: 2px 0 4px; font-size: 24px; }
h2 { margin: 0 0 6px; font-size: 17px; }
.muted { color: var(--muted); margin: 0 0 10px; }
.sentence { display: flex; flex-wrap: wrap; gap: 4px; }
.tok { font: 13px var(--mono); background: var(--card); border: 1px solid var(--line);
  border-radius: 5px; padding: 1px 6px; white-space: pre; }
#controls { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 10px 18px;
  align-items: center; padding: 10px 28px; background: rgba(246, 247, 249, .95);
  border-bottom: 1px solid var(--line); backdrop-filter: blur(4px); }
#controls label { font-weight: 600; font-size: 14px; }
select { font: 14px var(--font); padding: 3px 6px; border-radius: 6px; border: 1px solid #c5ccd8;
  background: #fff; margin-left: 4px; }
.steps { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; }
.steps button { font: 600 13px var(--font); border: 1px solid #c5ccd8; background: #fff;
  color: var(--ink); border-radius: 16px; padding: 4px 12px; cursor: pointer; }
.steps button:hover { border-color: var(--accent); }
.steps button:disabled { background: #eef0f4; color: #a3abb8; border: 1px dashed #c5ccd8;
  cursor: not-allowed; pointer-events: none; }
.panel .thin { margin: 2px 0 0; font-size: 12px; color: var(--muted); }
.steps button[aria-pressed="true"] { background: var(--accent); border-color: var(--accent);
  color: #fff; }
.steps .arrow { color: #9aa3b2; font-size: 13px; }
main { display: grid; grid-template-columns: minmax(0, 1fr) minmax(300px, 420px); gap: 18px;
  padding: 18px 28px; align-items: start; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 18px; min-width: 0; }
#heads-card { grid-column: 1 / -1; }
.explain { margin: 0 0 12px; color: #384152; max-width: 70ch; }
.explain b { color: var(--ink); }
.panels { display: flex; flex-wrap: wrap; gap: 22px; overflow-x: auto; }
.panel h3 { margin: 0 0 4px; font-size: 14px; }
.panel .shape { color: var(--muted); font: 12px var(--mono); margin-left: 6px; }
svg text { font-family: var(--font); }
svg .label { fill: #384152; }
svg .label.hot { fill: var(--hot); font-weight: 700; }
svg .axis { fill: var(--muted); font-size: 11px; font-style: italic; }
svg .cell:hover { stroke: var(--ink); stroke-width: 1.5; }
svg .val { pointer-events: none; font-size: 11px; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted);
  margin-top: 6px; flex-wrap: wrap; }
.legend .swatch { width: 16px; height: 12px; border: 1px solid #bbb; display: inline-block;
  vertical-align: middle; background: repeating-linear-gradient(45deg, #e8e8e8 0 3px,
  #a8a8a8 3px 4px); }
#lines svg text { cursor: default; }
#lines .weight { font: 11px var(--mono); fill: var(--hot); }
.thumbs { display: flex; flex-wrap: wrap; gap: 12px; }
.thumb { border: 2px solid transparent; border-radius: 8px; padding: 4px; background: none;
  cursor: pointer; font: 12px var(--font); color: var(--muted); text-align: center; }
.thumb canvas { display: block; width: 84px; height: 84px; image-rendering: pixelated;
  border: 1px solid var(--line); }
.thumb[aria-pressed="true"] { border-color: var(--accent); background: var(--accent-soft);
  color: var(--ink); font-weight: 600; }
#tip { position: fixed; z-index: 5; pointer-events: none; background: #1d2330; color: #fff;
  padding: 6px 9px; border-radius: 6px; font-size: 13px; line-height: 1.4; max-width: 320px;
  box-shadow: 0 4px 14px rgba(0, 0, 0, .2); }
#tip .v { font: 600 14px var(--mono); }
.note { font-size: 13px; color: var(--hot); }
footer { padding: 4px 28px 24px; color: var(--muted); font-size: 13px; }
@media (max-width: 900px) { main { grid-template-columns: 1fr; } }
/* a view in a notebook: as narrow as its output area, whatever the window's width */
:host { display: block; container-type: inline-size; }
@container (max-width: 900px) { main { grid-template-columns: 1fr; } }
"""

_JS = r"""
function (root) {
  "use strict";
  const DATA = JSON.parse(root.getElementById("selfattn-data").textContent);
  const NS = root.getElementById("svg-ns").namespaceURI;  // the SVG namespace
  const FONT = getComputedStyle(root.getElementById("title")).fontFamily;
  const measure = document.createElement("canvas").getContext("2d");
  const BLUES = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5",
    "#08519c", "#08306b"];
  const RDBU = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582",
    "#d6604d", "#b2182b"];
  const HEAD_COLOURS = ["#2f6fdf", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285",
    "#e67700", "#5c940d", "#862e9c", "#1864ab", "#a61e4d", "#495057"];
  const STEPS = [
    { id: "inputs", label: "x", title: "Inputs x" },
    { id: "qkv", label: "Q / K / V", title: "Queries, keys and values" },
    { id: "scores", label: "scores", title: "Attention scores  Q Kᵀ" },
    { id: "scaled_scores", label: "scaled", title: "Scaled scores  Q Kᵀ / √d_k" },
    { id: "weights", label: "softmax", title: "Attention weights  softmax(Q Kᵀ / √d_k)" },
    { id: "context", label: "context", title: "Context vectors  weights · V" },
    { id: "output", label: "out_proj", title: "Output  out_proj(heads merged)" },
  ];
  // --module simple, the chapter's first attention: Q = K = V = x and no scaling
  const SIMPLE_TITLES = {
    scores: "Attention scores  x xᵀ",
    scaled_scores: "Scores, not scaled  x xᵀ",
    weights: "Attention weights  softmax(x xᵀ)",
    context: "Context vectors  weights · x",
  };
  const state = Object.assign({}, DATA.initial);
  const tip = root.getElementById("tip");
  const tokens = DATA.tokens;
  let uid = 0;

  // ---- small helpers -------------------------------------------------------------------
  function el(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function h(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function hex(c) { return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)); }
  function ramp(stops, t) {
    t = Math.min(1, Math.max(0, t));
    const x = t * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    const a = hex(stops[i]), b = hex(stops[i + 1]);
    return a.map((v, k) => Math.round(v + (b[k] - v) * f));
  }
  function rgb(c) { return "rgb(" + c.join(",") + ")"; }
  function dark(c) { return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 140; }
  function textWidth(s, size) {
    measure.font = size + "px " + FONT;
    return measure.measureText(s).width;
  }
  function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }
  function fmt(v, d) { return v === null ? "n/a" : v.toFixed(d === undefined ? 4 : d); }
  function fmtCell(v) {
    const a = Math.abs(v);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  }
  function layer() { return DATA.layers[state.layer]; }
  function allowed(i, j) {
    const m = layer().mask;
    return !m || m[state.head][i][j] === "1";
  }
  function headOf(name) {
    const t = layer().steps[name];
    return name === "inputs" ? t : t[state.head];
  }

  // ---- tooltip --------------------------------------------------------------------------
  function showTip(event, lines) {
    tip.replaceChildren();
    lines.forEach(([text, cls]) => tip.appendChild(h("div", cls ? { class: cls } : {}, text)));
    tip.hidden = false;
    const pad = 14, r = tip.getBoundingClientRect();
    let x = event.clientX + pad, y = event.clientY + pad;
    if (x + r.width > innerWidth) x = event.clientX - r.width - pad;
    if (y + r.height > innerHeight) y = event.clientY - r.height - pad;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function hideTip() { tip.hidden = true; }

  // ---- one heatmap ----------------------------------------------------------------------
  // spec: {name, matrix, rows, cols, square, diverging, masked, tipFor(i, j, v)}
  function heatmap(spec) {
    const m = spec.matrix, nr = m.length, nc = m[0].length;
    // up to 160 rows, each row is tall enough for its own label (the page scrolls instead)
    const rowH = Math.max(nr <= 160 ? 11 : 4, Math.min(54, Math.floor(640 / nr)));
    const colW = spec.square ? rowH : Math.max(2, Math.min(rowH, Math.floor(560 / nc)));
    const size = rowH >= 16 ? 12 : rowH >= 11 ? 10 : 8;
    const rowEvery = Math.ceil((size + 1) / rowH);  // on tiny rows, label every k-th one
    const rowText = spec.rows.map((s) => short(s, 16));
    const colText = spec.cols.map((s) => short(s, 16));
    const left = 14 + Math.max(...rowText.map((s) => textWidth(s, size)));
    const colLen = Math.max(...colText.map((s) => textWidth(s, size)));
    // square: labels rotated by 60°, so neighbours are colW·sin 60° apart; else side by side
    const colEvery = spec.square ? Math.ceil((size + 1) / (colW * 0.87))
      : Math.max(1, Math.ceil((colLen + 4) / colW));
    const top = 22 + (spec.square ? colLen * 0.87 : size + 4);
    const right = spec.square ? colLen * 0.5 + 8 : 8;
    const colAxis = spec.square ? "keys →" : "dim →";
    const width = Math.max(left + nc * colW + right, left + textWidth(colAxis, 11) + 60);
    const height = top + nr * rowH + 4;
    const svg = el("svg", { width: Math.ceil(width), height: Math.ceil(height),
      class: "heatmap", "data-name": spec.name });
    const hatch = (root.host ? root.host.id + "-" : "") + "hatch-" + (++uid);
    const defs = el("defs");
    const pat = el("pattern", { id: hatch, width: 5, height: 5, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" });
    pat.appendChild(el("rect", { width: 5, height: 5, fill: "#e8e8e8" }));
    pat.appendChild(el("line", { x1: 0, y1: 0, x2: 0, y2: 5, stroke: "#a8a8a8",
      "stroke-width": 1.5 }));
    defs.appendChild(pat);
    svg.appendChild(defs);

    let lo = 0, hi = 1;
    if (spec.diverging) {
      let big = 0;
      m.forEach((row, i) => row.forEach((v, j) => {
        if (v !== null && (!spec.masked || allowed(i, j))) big = Math.max(big, Math.abs(v));
      }));
      hi = big || 1; lo = -hi;
    }
    const colour = (v) => ramp(spec.diverging ? RDBU : BLUES, (v - lo) / (hi - lo));

    const rowAxis = spec.square ? "queries ↓" : "tokens ↓";
    svg.appendChild(el("text", { x: 2, y: 12, class: "axis" }, rowAxis));
    svg.appendChild(el("text", { x: Math.max(left, textWidth(rowAxis, 11) + 12), y: 12,
      class: "axis" }, colAxis));
    const rowLabels = rowText.map((s, i) => {
      if (i % rowEvery) return null;
      const t = el("text", { x: left - 6, y: top + i * rowH + rowH / 2, "text-anchor": "end",
        "dominant-baseline": "central", "font-size": size, class: "label" }, s);
      svg.appendChild(t);
      return t;
    });
    const colLabels = colText.map((s, j) => {
      if (j % colEvery) return null;
      const x = left + j * colW + colW / 2, y = top - 6;
      const t = el("text", spec.square
        ? { x: x, y: y, transform: "rotate(-60 " + x + " " + y + ")", "font-size": size,
          class: "label" }
        : { x: x, y: y, "text-anchor": "middle", "font-size": size, class: "label" }, s);
      svg.appendChild(t);
      return t;
    });
    const gap = rowH >= 8 && colW >= 8 ? 1 : 0;
    const showValues = rowH >= 28 && colW >= 34;
    const cells = el("g");
    m.forEach((row, i) => row.forEach((v, j) => {
      const masked = spec.masked && !allowed(i, j);
      const c = v === null ? [200, 200, 200] : colour(v);
      const r = el("rect", { x: left + j * colW, y: top + i * rowH, width: colW - gap,
        height: rowH - gap, fill: masked ? "url(#" + hatch + ")" : rgb(c),
        class: masked ? "cell masked" : "cell", "data-i": i, "data-j": j,
        "data-v": v === null ? "" : v });
      cells.appendChild(r);
      if (showValues && !masked && v !== null) {
        cells.appendChild(el("text", { x: left + j * colW + (colW - gap) / 2,
          y: top + i * rowH + (rowH - gap) / 2, "text-anchor": "middle",
          "dominant-baseline": "central", class: "val", fill: dark(c) ? "#fff" : "#1d2330" },
        fmtCell(v)));
      }
    }));
    svg.appendChild(cells);

    let hot = [];
    cells.addEventListener("mousemove", (event) => {
      const r = event.target;
      if (!r.classList || !r.classList.contains("cell")) return;
      const i = +r.dataset.i, j = +r.dataset.j;
      hot.forEach((t) => t && t.classList.remove("hot"));
      hot = [rowLabels[i - (i % rowEvery)], colLabels[j - (j % colEvery)]];
      hot.forEach((t) => t && t.classList.add("hot"));
      showTip(event, spec.tipFor(i, j, m[i][j], spec.masked && !allowed(i, j)));
    });
    cells.addEventListener("mouseleave", () => {
      hot.forEach((t) => t && t.classList.remove("hot"));
      hideTip();
    });

    const panel = h("div", { class: "panel" });
    panel.style.width = Math.max(Math.ceil(width), 170) + "px";
    const title = h("h3", {}, spec.name);
    title.appendChild(h("span", { class: "shape" }, "(" + nr + " × " + nc + ")"));
    panel.appendChild(title);
    panel.appendChild(svg);
    if (rowEvery > 1 || colEvery > 1) {
      const every = (k) => (k === 2 ? "every 2nd" : k === 3 ? "every 3rd" : "every " + k + "th");
      const parts = [];
      if (rowEvery > 1) parts.push(every(rowEvery) + " row");
      if (colEvery > 1) parts.push(every(colEvery) + " column");
      panel.appendChild(h("p", { class: "thin" }, "Labels: " + parts.join(", ")
        + " (they would overlap); hover a cell for its own."));
    }
    panel.appendChild(legend(spec, lo, hi));
    return panel;
  }

  function legend(spec, lo, hi) {
    const box = h("div", { class: "legend" });
    const bar = el("svg", { width: 80, height: 12 });
    for (let k = 0; k < 16; k++) {
      bar.appendChild(el("rect", { x: k * 5, y: 0, width: 5, height: 12,
        fill: rgb(ramp(spec.diverging ? RDBU : BLUES, k / 15)) }));
    }
    box.appendChild(h("span", {}, fmt(lo, 2)));
    box.appendChild(bar);
    box.appendChild(h("span", {}, fmt(hi, 2)));
    if (spec.masked && layer().causal) {
      box.appendChild(h("span", { class: "swatch" }));
      box.appendChild(h("span", {}, "masked: may not attend"));
    }
    return box;
  }

  // ---- the step panels ------------------------------------------------------------------
  function vectorTip(name) {
    return (i, j, v) => [[name + ", token “" + tokens[i] + "” (row " + i + "), dim " + j],
      [fmt(v), "v"]];
  }
  function pairTip(what, extra) {
    return (i, j, v, masked) => {
      const lines = [
        ["query “" + tokens[i] + "” (" + i + ") → key “" + tokens[j] + "” (" + j + ")"],
        [what + " " + fmt(v), "v"],
      ];
      if (masked) lines.push(["masked: set to −∞ before softmax, so its weight is 0"]);
      if (extra) lines.push(extra(i, j));
      return lines;
    };
  }
  function dims(n) { return Array.from({ length: n }, (_, k) => String(k)); }
  function vectors(name, label) {
    const m = headOf(name);
    return { name: label, matrix: m, rows: tokens, cols: dims(m[0].length),
      diverging: true, tipFor: vectorTip(label) };
  }
  function squares(name, label, diverging, extra) {
    return { name: label, matrix: headOf(name), rows: tokens, cols: tokens, square: true,
      diverging: diverging, masked: true, tipFor: pairTip(label, extra) };
  }

  const SIMPLE_TEXTS = {
    qkv: "No projections yet: this first version has no trainable weights, so every token's "
      + "query, key and value are its input x itself (Q = K = V = x).",
    scores: "<b>x xᵀ</b>: row i, column j is the dot product of token i with token j, how "
      + "similar they are. Blue is negative, red positive.",
    scaled_scores: "Not scaled: this first version feeds the raw scores x xᵀ straight to the "
      + "softmax; the later modules scale them first.",
    weights: "<b>softmax</b> of each row of x xᵀ: the attention weights. Each lies between 0 "
      + "and 1 and each row sums to 1.",
    context: "<b>weights · x</b>: each token's context vector is the weighted average of the "
      + "input rows, weighted by its row of attention weights.",
  };
  function explanation(step) {
    const L = tokens.length, lay = layer(), dk = lay.d_k;
    const sq = Math.sqrt(dk).toFixed(2);
    const masked = lay.causal ? " Hatched cells are masked: a query may not look at those keys "
      + "(for a causal module, the future tokens)." : "";
    const dIn = lay.steps.inputs ? lay.steps.inputs[0].length : "d_in";
    if (lay.simple && SIMPLE_TEXTS[step]) return SIMPLE_TEXTS[step] + masked;
    return {
      inputs: "<b>x</b>: one embedding vector per token, " + L + " × " + dIn + ". Everything "
        + "below is computed from these rows.",
      qkv: "Three learned projections of the same inputs: <b>Q = x W<sub>q</sub></b>, what each "
        + "token is looking for; <b>K = x W<sub>k</sub></b>, what each token offers to be "
        + "matched on; <b>V = x W<sub>v</sub></b>, what each token passes on. For this head "
        + "each is " + L + " × " + dk + " (blue negative, red positive).",
      scores: "<b>Q Kᵀ</b>: row i, column j is the dot product of query i with key j, how well "
        + "they match. Scores can be any size; blue is negative, red positive." + masked,
      scaled_scores: "<b>Q Kᵀ / √d_k</b>: every score divided by √d_k = √" + dk + " ≈ " + sq
        + ". Without it, dot products of long vectors grow large and softmax would put nearly "
        + "all the weight on one key." + masked,
      weights: "<b>softmax</b> of each row" + (lay.causal ? " (masked scores set to −∞ first)"
        : "") + ": the attention weights. Each lies between 0 and 1 and each row sums to 1: "
        + "row i says how query i spreads its attention over the keys.",
      context: "<b>weights · V</b>: each token's context vector is the weighted average of the "
        + "value rows, weighted by its row of attention weights. This is what attention hands "
        + "on to the next layer.",
      output: "<b>out_proj</b>: every head's context vectors side by side (transpose the heads "
        + "next to the tokens, then view as " + L + " × d_out), and a Linear(d_out, d_out) that "
        + "mixes the heads. This is what the module returns; it is the same for every head.",
    }[step];
  }

  function panelsFor(step) {
    if (step === "inputs") {
      const m = layer().steps.inputs;
      return [{ name: "x", matrix: m, rows: tokens, cols: dims(m[0].length), diverging: true,
        tipFor: vectorTip("x") }];
    }
    if (step === "qkv") {
      return [vectors("queries", "Q"), vectors("keys", "K"), vectors("values", "V")];
    }
    const simple = layer().simple;
    if (step === "scores") return [squares("scores", simple ? "x xᵀ" : "Q Kᵀ", true)];
    if (step === "scaled_scores") {
      return [squares("scaled_scores", simple ? "x xᵀ, not scaled" : "Q Kᵀ / √d_k", true)];
    }
    if (step === "weights") {
      return [squares("weights", "weight", false, (i) =>
        ["row " + i + " sums to " + fmt(headOf("weights")[i].reduce((a, b) => a + b, 0), 3)])];
    }
    if (step === "output") {
      const s = layer().steps, out = [];
      if (s.merged) out.push(whole(s.merged, "heads merged"));
      out.push(whole(s.output, "out_proj output"));
      return out;
    }
    return [vectors("values", "V"), vectors("context", "context")];
  }
  function whole(m, label) {
    return { name: label, matrix: m, rows: tokens, cols: dims(m[0].length), diverging: true,
      tipFor: vectorTip(label) };
  }
  function available(step) {
    const s = layer().steps;
    return step === "qkv" ? "queries" in s : step in s;
  }

  // ---- the line view (bertviz-style head view) ------------------------------------------
  function lineView() {
    const box = root.getElementById("lines");
    box.replaceChildren();
    const w = headOf("weights"), L = tokens.length, colour = HEAD_COLOURS[state.head % 12];
    const rowH = L > 60 ? 14 : L > 30 ? 17 : L > 12 ? 22 : 28, size = rowH >= 20 ? 13 : 11;
    const text = tokens.map((s) => short(s, 14));
    const tw = Math.max(...text.map((s) => textWidth(s, size))) + 8;
    const x1 = tw + 6, x2 = x1 + 150, width = x2 + tw + 44, height = 26 + L * rowH;
    const svg = el("svg", { width: Math.ceil(width), height: height, id: "line-view" });
    svg.appendChild(el("text", { x: x1 - 4, y: 12, "text-anchor": "end", class: "axis" },
      "queries"));
    svg.appendChild(el("text", { x: x2 + 4, y: 12, class: "axis" }, "keys"));
    const y = (i) => 26 + i * rowH + rowH / 2;
    const lines = el("g");
    const all = [];
    for (let i = 0; i < L; i++) {
      for (let j = 0; j < L; j++) {
        if (w[i][j] < 0.005) continue;
        const line = el("line", { x1: x1, y1: y(i), x2: x2, y2: y(j), stroke: colour,
          "stroke-width": 2, "stroke-opacity": w[i][j] });
        all.push([line, i, j]);
        lines.appendChild(line);
      }
    }
    svg.appendChild(lines);
    const weightsText = [];
    const focus = (side, k) => {
      all.forEach(([line, i, j]) => {
        const on = side === null || (side === "q" ? i === k : j === k);
        const opacity = side === null ? w[i][j] : Math.max(w[i][j], 0.08);
        line.setAttribute("stroke-opacity", on ? opacity : 0);
      });
      weightsText.forEach((t, j) => {
        t.textContent = side === "q" ? fmt(w[k][j], 2) : side === "k" ? fmt(w[j][k], 2) : "";
      });
    };
    const label = (s, i, side) => {
      const t = el("text", side === "q"
        ? { x: x1 - 6, y: y(i), "text-anchor": "end", "dominant-baseline": "central",
          "font-size": size, class: "label", "data-i": i }
        : { x: x2 + 6, y: y(i), "dominant-baseline": "central", "font-size": size,
          class: "label", "data-j": i }, s);
      t.addEventListener("mouseenter", () => { t.classList.add("hot"); focus(side, i); });
      t.addEventListener("mouseleave", () => { t.classList.remove("hot"); focus(null); });
      svg.appendChild(t);
    };
    text.forEach((s, i) => label(s, i, "q"));
    text.forEach((s, j) => label(s, j, "k"));
    text.forEach((s, j) => {
      const t = el("text", { x: x2 + tw + 10, y: y(j), "dominant-baseline": "central",
        class: "weight" }, "");
      weightsText.push(t);
      svg.appendChild(t);
    });
    box.appendChild(svg);
    const note = h("p", { class: "explain" });
    const which = [];
    if (DATA.layers.length > 1) which.push(layer().label);
    if (layer().num_heads > 1) which.push("head " + state.head);
    note.appendChild(h("span", {}, (which.length ? "Showing " + which.join(", ") + ". " : "")
      + "On the left, a query's lines fan out to the keys it attends to; the weights are "
      + "listed on the right while you hover."));
    box.appendChild(note);
  }

  // ---- head overview --------------------------------------------------------------------
  function thumbs() {
    const box = root.getElementById("thumbs");
    box.replaceChildren();
    const lay = layer(), L = tokens.length;
    root.getElementById("heads-card").hidden = lay.num_heads < 2;
    for (let hd = 0; hd < lay.num_heads; hd++) {
      const button = h("button", { class: "thumb", "data-head": hd,
        "aria-pressed": String(hd === state.head), title: "show head " + hd });
      const canvas = h("canvas", { width: L, height: L });
      const ctx = canvas.getContext("2d"), img = ctx.createImageData(L, L);
      const w = lay.steps.weights[hd];
      for (let i = 0; i < L; i++) {
        for (let j = 0; j < L; j++) {
          const masked = lay.mask && lay.mask[hd][i][j] === "0";
          const c = masked ? [232, 232, 232] : ramp(BLUES, Math.sqrt(w[i][j]));
          img.data.set([c[0], c[1], c[2], 255], 4 * (i * L + j));
        }
      }
      ctx.putImageData(img, 0, 0);
      button.appendChild(canvas);
      button.appendChild(h("span", {}, "head " + hd));
      button.addEventListener("click", () => { state.head = hd; render(); });
      box.appendChild(button);
    }
  }

  // ---- controls and the whole page ------------------------------------------------------
  function options(select, n, prefix, labels) {
    select.replaceChildren();
    for (let k = 0; k < n; k++) select.appendChild(h("option", { value: k },
      labels ? labels[k] : prefix + k));
  }
  function controls() {
    const layerBox = root.getElementById("layer-box");
    const layerSel = root.getElementById("layer"), headSel = root.getElementById("head");
    layerBox.hidden = DATA.layers.length < 2;
    options(layerSel, DATA.layers.length, "", DATA.layers.map((l) => l.label));
    layerSel.addEventListener("change", () => {
      state.layer = +layerSel.value;
      state.head = Math.min(state.head, layer().num_heads - 1);
      if (!available(state.step)) state.step = "weights";
      render();
    });
    headSel.addEventListener("change", () => { state.head = +headSel.value; render(); });
    const steps = root.getElementById("steps");
    const anyOutput = DATA.layers.some((l) => "output" in l.steps);
    STEPS.filter((s) => s.id !== "output" || anyOutput).forEach((s, k) => {
      if (k) steps.appendChild(h("span", { class: "arrow", "aria-hidden": "true" }, "→"));
      const b = h("button", { type: "button", "data-step": s.id, "aria-pressed": "false" },
        s.label);
      b.addEventListener("click", () => { state.step = s.id; render(); });
      steps.appendChild(b);
    });
  }

  function render() {
    const lay = layer();
    root.getElementById("layer").value = String(state.layer);
    const headSel = root.getElementById("head");
    if (headSel.options.length !== lay.num_heads) options(headSel, lay.num_heads, "head ");
    headSel.value = String(state.head);
    root.getElementById("head-box").hidden = lay.num_heads < 2;
    root.querySelectorAll("#steps button").forEach((b) => {
      b.setAttribute("aria-pressed", String(b.dataset.step === state.step));
      b.disabled = !available(b.dataset.step);
    });
    const step = STEPS.find((s) => s.id === state.step);
    root.getElementById("step-title").textContent
      = (lay.simple && SIMPLE_TITLES[step.id]) || step.title
      + (lay.num_heads > 1 && step.id !== "inputs" && step.id !== "output"
        ? " — head " + state.head : "")
      + (DATA.layers.length > 1 ? " — " + lay.label : "");
    root.getElementById("step-text").innerHTML = explanation(step.id);
    const panels = root.getElementById("panels");
    panels.replaceChildren(...panelsFor(step.id).map(heatmap));
    root.getElementById("description").textContent = lay.description;
    lineView();
    thumbs();
    hideTip();
  }

  root.getElementById("title").textContent = DATA.title;
  root.getElementById("note").textContent = DATA.note;
  root.getElementById("note").hidden = !DATA.note;
  const sentence = root.getElementById("sentence");
  tokens.forEach((t) => sentence.appendChild(h("span", { class: "tok" }, t)));
  controls();
  if (!available(state.step)) state.step = "weights";
  render();
  const api = { state: state, render: render };
  if (root === document) window.selfattnPage = api;
  else root.host.selfattnView = api;  // in a notebook: no globals, each view's host holds its own
}
"""
