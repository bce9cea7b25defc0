"""`selfattn explain --checkpoint RUN --timeline --html page.html`: watch the heads form.

A `selfattn train` run records, at each evaluation, every head's attention on one fixed probe
(RUN/probes.safetensors, `selfattn.probe_file`). This page plays them back, in one offline file
(its CSS, JavaScript and data inline; it loads nothing):

* a slider (``<input type="range">``) over the evaluated iterations, with play and step buttons;
* every head's weights on the probe as small multiples, layers as rows, heads as columns (value,
  query and key on hover), at the slider's iteration;
* beside them the loss curves (metrics.jsonl: train at each iteration, validation at each
  evaluation) and each head's induction and previous-token score on the probe
  (`selfattn.train.induction`), with a marker at the slider's iteration, and the first iteration
  where a head's induction score reaches `FORMED_AT` marked on every curve: the moment the
  induction heads form.

`render_timeline_view` gives the same view as a fragment for a notebook cell (its own shadow root,
as `selfattn.explain.html.render_view`); ``selfattn.show(run_dir, timeline=True)`` draws it.

The weights travel as one byte each (0..255 for 0..1, shown to +-0.002), so a page of 20
evaluations of 2 layers x 4 heads on 64 tokens holds 650 KB of them. Past `MAX_CELLS` bytes the
page keeps evenly spaced evaluations (the first, the last and the formation's always) and says so.
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from selfattn import _atomic
from selfattn.explain.html import fill_page, fill_view
from selfattn.metrics_file import METRICS, read_metrics
from selfattn.probe_file import Probes, read_probes

FORMED_AT = 0.5  # an induction head: over half of its attention on the token after the earlier one
MAX_CELLS = 6_000_000  # bytes of weights a page holds (8 MB once in base64)
_CONFIG = "config.json"


def timeline_data(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What the page embeds: the probe, every kept evaluation's weights and scores, the losses.
    A ValueError naming what was expected when the folder holds no probes."""
    folder = Path(run_dir)
    probes = read_probes(folder)
    records = read_metrics(folder / METRICS)
    formed = _formed(probes)
    keep, note = _kept(probes, formed)
    _, layers, heads, t, _ = probes.attention.shape
    weights = (probes.attention[keep].float().clamp(0, 1) * 255).round().to(torch.uint8)
    preset = _preset(folder / _CONFIG)
    return {
        "title": f"{folder.resolve().name}: attention through training",
        "about": f"{preset}{layers} layers x {heads} heads. Probe: {probes.about}.",
        "kind": probes.kind,
        "tokens": probes.labels,
        "layers": layers,
        "heads": heads,
        "size": t,
        "iterations": probes.iterations[keep].tolist(),
        "weights": base64.b64encode(weights.numpy().tobytes()).decode("ascii"),
        "induction": _finite(probes.induction[keep]),
        "previous": _finite(probes.previous_token[keep]),
        "train": [[r["iter"], r["train_loss"]] for r in records if _number(r.get("train_loss"))],
        "val": [[r["iter"], r["val_loss"]] for r in records if _number(r.get("val_loss"))],
        "formed": formed,
        "formed_at": FORMED_AT,
        "note": note,
    }


def _preset(path: Path) -> str:
    try:
        preset = json.loads(path.read_text(encoding="utf-8")).get("preset")
    except (OSError, ValueError, AttributeError):
        return ""
    return f"Preset {preset}, " if isinstance(preset, str) else ""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _finite(t: torch.Tensor) -> list:
    """Nested lists, 4 decimals, NaN as None (JSON null)."""
    rows = t.double().round(decimals=4).tolist()

    def clean(x):
        return [clean(v) for v in x] if isinstance(x, list) else (x if math.isfinite(x) else None)

    return clean(rows)


def _formed(probes: Probes) -> dict | None:
    """The first evaluation where a head's induction score on the probe reaches `FORMED_AT`:
    {"iteration", "layer", "head", "score"} (the best head then), or None."""
    scores = probes.induction.nan_to_num(0.0)  # (N, layers, H)
    for i, iteration in enumerate(probes.iterations.tolist()):
        best = int(scores[i].argmax())
        layer, head = divmod(best, scores.shape[-1])
        score = float(scores[i, layer, head])
        if score >= FORMED_AT:
            return {"iteration": iteration, "layer": layer, "head": head, "score": score}
    return None


def _kept(probes: Probes, formed: dict | None) -> tuple[list[int], str]:
    """The evaluations the page keeps (indices) and a note when that is not all of them."""
    n = len(probes)
    per = probes.attention[0].numel() if n else 0
    room = max(2, MAX_CELLS // max(per, 1))
    if n <= room:
        return list(range(n)), ""
    keep = {round(i * (n - 1) / (room - 1)) for i in range(room - 1)} | {n - 1}
    if formed is not None:
        keep.add(probes.iterations.tolist().index(formed["iteration"]))
    keep = sorted(keep)
    return keep, f"This page keeps {len(keep)} of the {n} evaluations, evenly spaced."


# --- the page -----------------------------------------------------------------------------------


def render_timeline_html(data: dict[str, Any]) -> str:
    """The whole page for ``data`` (`timeline_data`), as a string."""
    return fill_page(_BODY, _CSS, _JS, data)


def render_timeline_view(data: dict[str, Any], *, view_id: str) -> str:
    """The view as a fragment for another page (a notebook cell): one ``<div id=view_id>`` whose
    shadow root the script fills, so several views share no ids, globals or styles."""
    return fill_view(view_id, "selfattn-timeline", "timeline", _BODY, _CSS, _JS, data)


def write_timeline(run_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """The timeline page of the run in ``run_dir``, written to ``path`` (UTF-8, atomically)."""
    _atomic.write_text(path, render_timeline_html(timeline_data(run_dir)))


_BODY = """<header>
  <p class="kicker">selfattn timeline</p>
  <h1 id="title"></h1>
  <p id="about" class="muted"></p>
  <p id="formed" class="formed"></p>
  <p id="note" class="note" hidden></p>
</header>
<nav id="controls">
  <button id="play" type="button" aria-label="play">&#9654;</button>
  <button id="prev" type="button" aria-label="previous evaluation">&#8249;</button>
  <input id="slider" type="range" min="0" max="0" step="1" value="0"
         aria-label="evaluated iteration">
  <button id="next" type="button" aria-label="next evaluation">&#8250;</button>
  <span id="where" class="where"></span>
</nav>
<main>
  <section class="card" id="heads-card">
    <h2>Every head on the probe</h2>
    <p class="explain">Each square is one head's attention weights on the probe: queries down,
      keys across, dark for weight near 1. A previous-token head draws the line just below the
      diagonal; an induction head, on a repeated segment, a line one segment-length further left.
      Hover a square for its values.</p>
    <div id="grid" class="grid"></div>
    <div id="tokens" class="tokens" aria-label="the probe's tokens"></div>
  </section>
  <section class="card" id="curves-card">
    <h2>Loss</h2>
    <svg id="loss" class="chart" role="img" aria-label="loss against iteration"></svg>
    <div id="loss-legend" class="legend"></div>
    <h2>Induction score on the probe</h2>
    <svg id="induction" class="chart" role="img" aria-label="induction scores"></svg>
    <h2>Previous-token score on the probe</h2>
    <svg id="previous" class="chart" role="img" aria-label="previous-token scores"></svg>
    <div id="head-legend" class="legend"></div>
  </section>
</main>
<div id="tip" role="tooltip" hidden></div>
<script type="application/json" id="selfattn-timeline-data">__DATA__</script>
"""

_CSS = """
:root, :host {
  --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f6f7f9; --card: #ffffff;
  --accent: #2f6fdf; --hot: #d9480f;
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  --mono: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace;
}
* { box-sizing: border-box; }
body, :host { margin: 0; background: var(--bg); color: var(--ink); font: 15px/1.5 var(--font); }
header { padding: 22px 28px 8px; }
.kicker { margin: 0; color: var(--accent); font-weight: 600; letter-spacing: .06em;
  text-transform: uppercase; font-size: 12px; }
h1 { margin: 2px 0 4px; font-size: 24px; }
h2 { margin: 10px 0 4px; font-size: 16px; }
.muted { color: var(--muted); margin: 0 0 6px; }
.formed { margin: 0 0 6px; font-weight: 600; color: var(--hot); }
.note { font-size: 13px; color: var(--hot); }
#controls { position: sticky; top: 0; z-index: 2; display: flex; gap: 10px; align-items: center;
  padding: 10px 28px; background: rgba(246, 247, 249, .95); border-bottom: 1px solid var(--line); }
#controls button { font: 600 15px var(--font); border: 1px solid #c5ccd8; background: #fff;
  border-radius: 6px; min-width: 34px; padding: 3px 8px; cursor: pointer; }
#slider { flex: 1; min-width: 160px; accent-color: var(--accent); }
.where { font: 600 14px var(--mono); min-width: 22ch; }
main { display: grid; grid-template-columns: minmax(0, 1fr) minmax(320px, 460px); gap: 18px;
  padding: 18px 28px; align-items: start; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 18px; min-width: 0; }
.explain { margin: 0 0 12px; color: #384152; max-width: 75ch; font-size: 14px; }
.grid { display: grid; gap: 10px 12px; align-items: end; justify-content: start;
  overflow-x: auto; }
.grid .rowlabel { font: 600 13px var(--font); color: var(--muted); writing-mode: vertical-rl;
  transform: rotate(180deg); text-align: center; }
.head { text-align: center; font-size: 12px; color: var(--muted); }
.head canvas { display: block; width: 148px; height: 148px; image-rendering: pixelated;
  border: 1px solid var(--line); cursor: crosshair; }
.head .score { font: 11px var(--mono); }
.head.hot .score { color: var(--hot); font-weight: 700; }
.tokens { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 2px; }
.tok { font: 11px var(--mono); background: var(--bg); border: 1px solid var(--line);
  border-radius: 4px; padding: 0 4px; white-space: pre; }
.chart { display: block; width: 100%; height: 170px; }
.chart text { font: 11px var(--font); fill: var(--muted); }
.chart .axis { stroke: #b8bfcc; }
.chart .grid-line { stroke: #eef0f4; }
.chart .marker { stroke: var(--ink); stroke-width: 1.5; }
.chart .formed-line { stroke: var(--hot); stroke-dasharray: 4 3; }
.chart .formed-text { fill: var(--hot); font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 12px; color: var(--muted); }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle;
  margin-right: 4px; }
#tip { position: fixed; z-index: 5; pointer-events: none; background: #1d2330; color: #fff;
  padding: 6px 9px; border-radius: 6px; font-size: 13px; line-height: 1.4; max-width: 320px; }
footer { padding: 4px 28px 24px; color: var(--muted); font-size: 13px; }
@media (max-width: 1000px) { main { grid-template-columns: 1fr; } }
:host { display: block; container-type: inline-size; }
@container (max-width: 1000px) { main { grid-template-columns: 1fr; } }
"""

_JS = r"""
function (root) {
  "use strict";
  const D = JSON.parse(root.getElementById("selfattn-timeline-data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const T = D.size, L = D.layers, H = D.heads, N = D.iterations.length;
  const raw = atob(D.weights);
  const W = new Uint8Array(raw.length);  // (N, L, H, T, T), 0..255
  for (let i = 0; i < raw.length; i++) W[i] = raw.charCodeAt(i);
  const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  const COLOURS = ["#2f6fdf", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#e67700",
    "#5c940d", "#862e9c", "#1864ab", "#a61e4d", "#495057"];
  const $ = (id) => root.getElementById(id);
  const tip = $("tip");
  let at = N - 1, timer = null;

  function h(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function s(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function blue(v) {  // v in 0..255 -> [r, g, b]
    const x = v / 255 * (BLUES.length - 1), i = Math.min(Math.floor(x), BLUES.length - 2);
    const f = x - i, a = BLUES[i], b = BLUES[i + 1];
    return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f));
  }
  const colour = (l, hd) => COLOURS[(l * H + hd) % COLOURS.length];
  const name = (l, hd) => "L" + l + "H" + hd;
  const offset = (n, l, hd) => (((n * L + l) * H + hd) * T * T);
  const fmt = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));

  // ---- header --------------------------------------------------------------------------
  $("title").textContent = D.title;
  $("about").textContent = D.about;
  if (D.formed) {
    $("formed").textContent = "Induction head " + name(D.formed.layer, D.formed.head) +
      " forms by iteration " + D.formed.iteration + ": its induction score on the probe reaches " +
      D.formed.score.toFixed(2) + " (marked on the curves).";
  } else {
    $("formed").textContent = "No head's induction score on the probe reached " + D.formed_at +
      " by the last evaluation.";
  }
  if (D.note) { $("note").textContent = D.note; $("note").hidden = false; }
  D.tokens.forEach((t) => $("tokens").appendChild(h("span", { class: "tok" }, t)));

  // ---- the heads' heatmaps -------------------------------------------------------------
  const grid = $("grid");
  grid.style.gridTemplateColumns = "max-content repeat(" + H + ", max-content)";
  const canvases = [];
  for (let l = 0; l < L; l++) {
    grid.appendChild(h("div", { class: "rowlabel" }, "layer " + l));
    for (let hd = 0; hd < H; hd++) {
      const box = h("div", { class: "head", "data-layer": l, "data-head": hd });
      box.appendChild(h("div", {}, "head " + hd));
      const c = h("canvas", { width: T, height: T, "data-layer": l, "data-head": hd });
      c.addEventListener("mousemove", (e) => hover(e, c, l, hd));
      c.addEventListener("mouseleave", () => { tip.hidden = true; });
      box.appendChild(c);
      const score = h("div", { class: "score" });
      box.appendChild(score);
      grid.appendChild(box);
      canvases.push({ c, l, hd, score, box });
    }
  }
  function drawHeads() {
    for (const { c, l, hd, score, box } of canvases) {
      const ctx = c.getContext("2d"), img = ctx.createImageData(T, T), base = offset(at, l, hd);
      for (let i = 0; i < T * T; i++) {
        const [r, g, b] = blue(W[base + i]);
        img.data.set([r, g, b, 255], 4 * i);
      }
      ctx.putImageData(img, 0, 0);
      const ind = D.induction[at][l][hd], prev = D.previous[at][l][hd];
      score.textContent = "ind " + fmt(ind) + " · prev " + fmt(prev);
      box.classList.toggle("hot", ind !== null && ind >= D.formed_at);
    }
  }
  function hover(e, c, l, hd) {
    const r = c.getBoundingClientRect();
    const j = Math.min(T - 1, Math.floor((e.clientX - r.left) / r.width * T));
    const i = Math.min(T - 1, Math.floor((e.clientY - r.top) / r.height * T));
    const v = W[offset(at, l, hd) + i * T + j] / 255;
    tip.replaceChildren(h("div", {}, name(l, hd) + " at iteration " + D.iterations[at]),
      h("div", {}, "query " + i + " '" + D.tokens[i] + "' → key " + j + " '" + D.tokens[j] + "'"),
      h("div", {}, "weight " + v.toFixed(3)));
    tip.hidden = false;
    tip.style.left = (e.clientX + 14) + "px";
    tip.style.top = (e.clientY + 14) + "px";
  }

  // ---- the curves ----------------------------------------------------------------------
  const most = (v) => v.reduce((a, b) => Math.max(a, b), -Infinity);
  const least = (v) => v.reduce((a, b) => Math.min(a, b), Infinity);
  const lastIter = Math.max(D.iterations[N - 1], most(D.train.map((p) => p[0])), 1);
  function chart(svg, series, lo, hi) {
    const w = svg.clientWidth || 420, ht = svg.clientHeight || 170;
    const m = { l: 42, r: 10, t: 8, b: 22 };
    svg.setAttribute("viewBox", "0 0 " + w + " " + ht);
    svg.replaceChildren();
    const x = (it) => m.l + (w - m.l - m.r) * it / lastIter;
    const y = (v) => ht - m.b - (ht - m.t - m.b) * (v - lo) / ((hi - lo) || 1);
    for (let k = 0; k <= 4; k++) {
      const v = lo + (hi - lo) * k / 4;
      svg.appendChild(s("line", { class: "grid-line", x1: m.l, x2: w - m.r, y1: y(v), y2: y(v) }));
      svg.appendChild(s("text", { x: m.l - 4, y: y(v) + 4, "text-anchor": "end" },
        Math.abs(hi - lo) < 0.1 ? v.toFixed(3) : v.toFixed(2)));
    }
    for (let k = 0; k <= 4; k++) {
      const it = Math.round(lastIter * k / 4);
      svg.appendChild(s("text", { x: x(it), y: ht - 6, "text-anchor": "middle" }, String(it)));
    }
    svg.appendChild(s("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: ht - m.b }));
    for (const sr of series) {
      const pts = sr.points.filter((p) => p[1] !== null);
      if (!pts.length) continue;
      const d = pts.map((p, k) => (k ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1));
      svg.appendChild(s("path", { d: d.join(""), fill: "none", stroke: sr.colour,
        "stroke-width": sr.width || 1.6, opacity: sr.opacity || 1, "data-series": sr.name }));
    }
    if (D.formed) {
      const fx = x(D.formed.iteration);
      svg.appendChild(s("line", { class: "formed-line", x1: fx, x2: fx, y1: m.t, y2: ht - m.b }));
      const label = { class: "formed-text", x: fx + 4, y: m.t + 10 };
      svg.appendChild(s("text", label, "induction head"));
    }
    const marker = s("line", { class: "marker", x1: 0, x2: 0, y1: m.t, y2: ht - m.b });
    svg.appendChild(marker);
    svg.onclick = (e) => {  // jump to the evaluation nearest the click
      const r = svg.getBoundingClientRect();
      const it = (e.clientX - r.left) / r.width * w;
      let best = 0;
      D.iterations.forEach((v, k) => {
        if (Math.abs(x(v) - it) < Math.abs(x(D.iterations[best]) - it)) best = k;
      });
      go(best);
    };
    return { marker, x };
  }
  function range(values, floor, ceil) {
    const v = values.filter((a) => a !== null && isFinite(a));
    let lo = floor !== undefined ? floor : least(v), hi = ceil !== undefined ? ceil : most(v);
    if (!v.length) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    return [lo, hi];
  }
  const charts = [];
  function drawCurves() {
    charts.length = 0;
    const lossValues = D.train.map((p) => p[1]).concat(D.val.map((p) => p[1]));
    const [lo, hi] = range(lossValues);
    charts.push(chart($("loss"), [
      { name: "train", points: D.train, colour: "#9aa3b2", width: 1.2 },
      { name: "val", points: D.val, colour: "#d9480f", width: 2 },
    ], lo, hi));
    for (const [id, key] of [["induction", "induction"], ["previous", "previous"]]) {
      const series = [];
      for (let l = 0; l < L; l++) {
        for (let hd = 0; hd < H; hd++) {
          series.push({ name: name(l, hd), colour: colour(l, hd),
            points: D.iterations.map((it, n) => [it, D[key][n][l][hd]]) });
        }
      }
      charts.push(chart($(id), series, 0, 1));
    }
    moveMarkers();
  }
  function moveMarkers() {
    for (const c of charts) {
      const x = c.x(D.iterations[at]);
      c.marker.setAttribute("x1", x);
      c.marker.setAttribute("x2", x);
    }
  }
  function legend(box, text, c) {
    const e = h("span", {}, text);
    e.prepend(h("i", { style: "background:" + c }));
    box.appendChild(e);
  }
  legend($("loss-legend"), "train loss", "#9aa3b2");
  legend($("loss-legend"), "validation loss", "#d9480f");
  for (let l = 0; l < L; l++) {
    for (let hd = 0; hd < H; hd++) legend($("head-legend"), name(l, hd), colour(l, hd));
  }

  // ---- the slider ----------------------------------------------------------------------
  const slider = $("slider");
  slider.max = String(N - 1);
  function go(k) {
    at = Math.max(0, Math.min(N - 1, k));
    slider.value = String(at);
    $("where").textContent = "iteration " + D.iterations[at] + " (" + (at + 1) + "/" + N + ")";
    drawHeads();
    moveMarkers();
  }
  slider.addEventListener("input", () => go(Number(slider.value)));
  $("prev").addEventListener("click", () => go(at - 1));
  $("next").addEventListener("click", () => go(at + 1));
  function pause() {
    clearInterval(timer);
    timer = null;
    $("play").textContent = "\u25B6";
  }
  $("play").addEventListener("click", () => {
    if (timer) { pause(); return; }
    if (at === N - 1) go(0);
    $("play").textContent = "\u275A\u275A";
    timer = setInterval(() => (at >= N - 1 ? pause() : go(at + 1)), 400);
  });
  drawCurves();
  go(at);
  let drawnWidth = $("loss").clientWidth;
  if (typeof ResizeObserver !== "undefined") {  // redraw the curves when their width changes
    new ResizeObserver(() => requestAnimationFrame(() => {
      if ($("loss").clientWidth === drawnWidth) return;
      drawnWidth = $("loss").clientWidth;
      drawCurves();
    })).observe($("curves-card"));
  }
}
"""
