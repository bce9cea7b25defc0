"""Attention in Jupyter: `selfattn.show`, `selfattn.plot` and `Trace._repr_html_`, and the
notebooks in notebooks/, run in a real Jupyter kernel and their views driven in Chromium.

* Unit tests: what `show` returns and how it draws (fresh ids, nothing loaded from the network),
  `plot`'s Figure, and the errors for bad arguments.
* Every notebook runs top to bottom in an IPython kernel started by nbclient (the ``notebook``
  extra) from a kernelspec written here, so the kernel is this Python, whatever kernels the
  machine has. Any error, or anything on stderr, fails the test. The training cell runs a few
  iterations only (``SELFATTN_NOTEBOOK_ITERS``).
* The executed notebooks' HTML outputs, put on one page as a notebook would, render in headless
  Chromium (`test_html_browser.Browser`) with no console error and no request, and each view
  answers its own controls only.

Skipped where nbclient or Chromium is missing, except under SELFATTN_REQUIRE_EXTRAS=1 (CI).
"""

from __future__ import annotations

import html.parser
import importlib
import json
import sys
from pathlib import Path

import pytest
import test_html_browser
import torch
from extras import need_module
from test_html_browser import Browser

import selfattn
from selfattn.explain import EXAMPLE_TOKENS, example_inputs, explain_example

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds for any one cell (the training cell on a slow machine)
TRAIN_ITERS = "3"  # the notebooks' training run, in these tests: it runs, it need not learn
browser = test_html_browser.browser  # the headless Chromium fixture, one per module


def mha_and_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(123)
    mha = selfattn.MultiHeadAttention(3, 4, context_length=6, dropout=0.0, num_heads=2)
    return mha, torch.stack((example_inputs(), example_inputs()))


class _Ids(html.parser.HTMLParser):
    """The ids of a fragment's elements outside <template> (in the page) and inside (each
    view's shadow root)."""

    def __init__(self) -> None:
        super().__init__()
        self.outside: list[str] = []
        self.inside: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag, attrs):
        ident = dict(attrs).get("id")
        if ident is not None:
            (self.inside if self.depth else self.outside).append(ident)
        self.depth += tag == "template"

    def handle_endtag(self, tag):
        self.depth -= tag == "template"


def ids_of(fragment: str) -> _Ids:
    parser = _Ids()
    parser.feed(fragment)
    return parser


# ---- show, plot and Trace._repr_html_ --------------------------------------------------------


def test_each_drawing_of_a_view_has_its_own_id_and_page_ids_only_inside_its_shadow_root():
    mha, batch = mha_and_batch()
    view = selfattn.show(mha, batch, EXAMPLE_TOKENS, head=1)
    first, second = view._repr_html_(), view._repr_html_()
    ids = [ids_of(first), ids_of(second)]
    hosts = [found.outside for found in ids]
    assert all(len(h) == 1 and h[0].startswith("selfattn-") for h in hosts)
    assert hosts[0] != hosts[1]  # the same view shown twice: two hosts, two ids
    # the page's ids (title, head, panels, ...) live in the <template>, moved into the shadow
    # root, where each view has its own: none of them reaches the notebook's document
    assert "head" in ids[0].inside and len(set(ids[0].inside)) == len(ids[0].inside)
    assert f'document.getElementById("{hosts[0][0]}")' in first
    assert first.count("document.getElementById(") == 1  # the script finds its own host only


def test_views_load_nothing_from_the_network():
    mha, batch = mha_and_batch()
    fragment = selfattn.show(mha, batch, EXAMPLE_TOKENS)._repr_html_()
    lowered = fragment.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<link" not in lowered and " src=" not in lowered and "@import" not in lowered
    assert "fetch(" not in fragment and "XMLHttpRequest" not in fragment


def test_a_trace_draws_itself_as_the_view_without_changing():
    mha, batch = mha_and_batch()
    tr = selfattn.trace(mha, batch, EXAMPLE_TOKENS)
    steps = sorted(tr.steps)
    fragment = tr._repr_html_()
    assert fragment is not None and 'class="selfattn-view"' in fragment
    assert '"tokens":["Your","journey","starts","with","one","step"]' in fragment
    assert '"merged":' in fragment  # the chapter's merged heads, added to a copy
    assert sorted(tr.steps) == steps
    assert ids_of(fragment).outside != ids_of(tr._repr_html_()).outside


def test_a_trace_has_no_html_form_without_the_view(monkeypatch):
    """trace.py imports nothing of explain: until explain.inline sets the hook, Jupyter gets
    None from ``_repr_html_`` and shows the text form."""
    trace_module = importlib.import_module("selfattn.trace")  # the module: selfattn.trace is
    monkeypatch.setattr(trace_module, "_html_view", None)  # the function trace()
    assert explain_example("v1")._repr_html_() is None


def test_show_of_a_module_traces_every_layer_and_shows_the_one_asked_first():
    torch.manual_seed(0)
    two = torch.nn.Sequential(
        selfattn.MultiHeadAttention(3, 4, 6, 0.0, 2), selfattn.MultiHeadAttention(4, 4, 6, 0.0, 4)
    )
    view = selfattn.show(two, example_inputs()[None], EXAMPLE_TOKENS, layer=1, head=3)
    assert [tr.num_heads for tr in view.traces] == [2, 4]
    assert (view.layer, view.head, view.step) == (1, 3, "weights")
    assert '"initial":{"layer":1,"head":3,"step":"weights"}' in view._repr_html_()
    assert repr(view) == "<selfattn view of Sequential: 6 tokens, 2 layers, 2-4 heads>"


def test_view_save_writes_the_explain_page(tmp_path):
    path = tmp_path / "view.html"
    selfattn.show(explain_example("v2")).save(path)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page


def test_plot_returns_the_png_renderers_figure_one_panel_per_head():
    need_module("matplotlib")
    from matplotlib.figure import Figure

    mha, batch = mha_and_batch()
    fig = selfattn.plot(mha, batch, EXAMPLE_TOKENS)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1"]
    one = selfattn.plot(mha, batch, EXAMPLE_TOKENS, head=1, step="scores")
    assert [ax.get_title() for ax in one.axes if ax.images] == ["head 1"]
    single = selfattn.plot(explain_example("v1"))
    assert len([ax for ax in single.axes if ax.images]) == 1


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m, x, tr: selfattn.show("text"), TypeError, "expects an nn.Module"),
        (lambda m, x, tr: selfattn.show([]), TypeError, "got list []"),
        (lambda m, x, tr: selfattn.show(m), TypeError, "x, the input"),
        (lambda m, x, tr: selfattn.show(m, x.tolist()), TypeError, "got list"),
        (lambda m, x, tr: selfattn.show(tr, x), TypeError, "takes no x or tokens"),
        (lambda m, x, tr: selfattn.show(m, x, "Your journey"), TypeError, "got str"),
        (lambda m, x, tr: selfattn.show(m, x, ["a"] * 5), ValueError, "5 token labels"),
        (lambda m, x, tr: selfattn.show(tr, head=2), ValueError, "valid heads are 0..1"),
        (lambda m, x, tr: selfattn.show(tr, head=True), TypeError, "got bool"),
        (lambda m, x, tr: selfattn.show(tr, layer=1), ValueError, "there is only layer 0"),
        (lambda m, x, tr: selfattn.show(tr, layer="0"), TypeError, "got str '0'"),
        (lambda m, x, tr: selfattn.show(tr, step="softmax"), ValueError, "one of inputs"),
        (lambda m, x, tr: selfattn.plot(tr, step="context"), ValueError, "weights, scores"),
        (lambda m, x, tr: selfattn.plot(m, x, head=-1), ValueError, "head -1"),
    ],
)
def test_bad_arguments_say_what_was_expected(call, error, words):
    mha, batch = mha_and_batch()
    with pytest.raises(error) as caught:
        call(mha, batch, selfattn.trace(mha, batch))
    assert words in str(caught.value)


# ---- the notebooks, in a kernel ---------------------------------------------------------------


def test_the_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), path


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, object]:
    """Every notebook, run in a fresh kernel of this Python: {name: executed notebook}."""
    nbformat = need_module("nbformat")
    nbclient = need_module("nbclient")
    need_module("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    home = tmp_path_factory.mktemp("jupyter")
    spec = home / "kernels" / "selfattn-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "selfattn tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")
    done = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SELFATTN_NOTEBOOK_ITERS", TRAIN_ITERS)
        env.setenv("TMPDIR", str(home))  # the training run's folder, removed with the rest
        env.setenv("JUPYTER_PLATFORM_DIRS", "1")
        for path in NOTEBOOKS:
            notebook = nbformat.read(path, as_version=4)
            specs = KernelSpecManager(kernel_dirs=[str(home / "kernels")])
            client = nbclient.NotebookClient(
                notebook,
                km=KernelManager(kernel_name="selfattn-tests", kernel_spec_manager=specs),
                kernel_name="selfattn-tests",
                timeout=CELL_TIMEOUT,
                startup_timeout=120,
                resources={"metadata": {"path": str(home)}},
            )
            client.execute()  # an error in any cell raises CellExecutionError
            done[path.name] = notebook
    return done


def outputs(notebook) -> list[tuple[str, dict]]:
    return [(c.source, o) for c in notebook.cells if c.cell_type == "code" for o in c.outputs]


def test_every_notebook_runs_in_a_kernel_without_error(executed):
    for name, notebook in executed.items():
        found = outputs(notebook)
        errors = [o for _, o in found if o.output_type == "error"]
        stderr = [o.text for _, o in found if o.output_type == "stream" and o.name == "stderr"]
        assert not errors and not stderr, (name, errors, stderr)
        shows = [source for source, _ in found if "selfattn.show(" in source]
        views = [o for _, o in found if "text/html" in o.get("data", {})]
        assert len(views) >= len(set(shows)) > 0, name  # a view for every show()


def test_plots_show_as_images_in_the_notebook(executed):
    plots = [
        o
        for notebook in executed.values()
        for source, o in outputs(notebook)
        if source.splitlines()[-1].startswith("selfattn.plot(")
    ]
    assert plots and all("image/png" in o.data for o in plots)


# ---- the executed notebooks' views, in Chromium -----------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>notebook outputs</title></head>
<body>__OUTPUTS__</body></html>
"""


@pytest.fixture(scope="module")
def views_page(executed, tmp_path_factory) -> Path:
    """Every HTML output of the executed notebooks, one after another, as a notebook shows them
    (each in its own output box, its scripts run once inserted)."""
    fragments = [
        o.data["text/html"]
        for notebook in executed.values()
        for _, o in outputs(notebook)
        if "text/html" in o.get("data", {})
    ]
    boxes = "\n".join(f'<div class="output">{f}</div>' for f in fragments)
    path = tmp_path_factory.mktemp("outputs") / "notebook.html"
    path.write_text(PAGE.replace("__OUTPUTS__", boxes), encoding="utf-8")
    return path


def in_view(index: int, expression: str) -> str:
    """``expression`` evaluated with ``root`` = the shadow root of the index-th view."""
    return (
        f"(() => {{ const root = document.querySelectorAll('.selfattn-view')[{index}]"
        f".shadowRoot; return {expression}; }})()"
    )


def view_state(browser: Browser, index: int) -> dict:
    return browser.js(
        in_view(
            index,
            "{head: root.getElementById('head').value, "
            "title: root.getElementById('step-title').textContent, "
            "cells: [...root.querySelectorAll('#panels rect.cell')].map(r => r.dataset.v)}",
        )
    )


@pytest.mark.browser
def test_the_notebooks_views_render_in_chromium_offline_without_errors(browser, views_page):
    browser.open(views_page)
    count = browser.js("document.querySelectorAll('.selfattn-view').length")
    assert count >= 5  # one per show() in the notebook, and the Trace it displays
    for index in range(count):
        drawn = browser.js(
            in_view(
                index,
                "root && [root.querySelectorAll('#panels rect.cell').length,"
                " root.querySelectorAll('#line-view line').length,"
                " root.host.querySelector('p').getClientRects().length]",
            )
        )
        assert drawn[0] > 0 and drawn[1] > 0, (index, drawn)
        assert drawn[2] == 0  # the "needs JavaScript" note is not drawn
    # the training timeline (selfattn.show(run_dir, timeline=True)): every head of the run drawn
    timeline = "document.querySelector('.selfattn-timeline').shadowRoot"
    assert browser.js("document.querySelectorAll('.selfattn-timeline').length") == 1
    assert browser.js(f"{timeline}.querySelectorAll('canvas').length") == 2 * 4  # layers x heads
    assert browser.js(f"{timeline}.getElementById('slider').type") == "range"
    ids = browser.js("[...document.querySelectorAll('[id]')].map(e => e.id)")
    assert len(ids) == count + 1 == len(set(ids))  # the views' hosts, and nothing else
    globals_ = browser.js("Object.keys(window).filter(k => /selfattn/i.test(k))")
    assert globals_ == []
    assert browser.errors() == []
    assert browser.requests() == [views_page.resolve().as_uri()]


@pytest.mark.browser
def test_selecting_a_head_changes_that_view_and_no_other(browser, views_page):
    from selenium.webdriver.common.by import By

    browser.open(views_page)
    count = browser.js("document.querySelectorAll('.selfattn-view').length")
    heads = [
        browser.js(in_view(k, "root.getElementById('head').options.length")) for k in range(count)
    ]
    first, second = [k for k in range(count) if heads[k] > 1][:2]
    before = [view_state(browser, k) for k in range(count)]

    other = (int(before[first]["head"]) + 1) % heads[first]
    browser.js(
        in_view(
            first,
            f"(() => {{ const s = root.getElementById('head'); s.value = '{other}';"
            "s.dispatchEvent(new Event('change')); })()",
        )
    )
    after = [view_state(browser, k) for k in range(count)]
    assert after[first]["head"] == str(other) and f"head {other}" in after[first]["title"]
    assert after[first]["cells"] != before[first]["cells"]
    assert [after[k] for k in range(count) if k != first] == [
        before[k] for k in range(count) if k != first
    ]

    # a real mouse click on a head's thumbnail in the second view, inside its shadow root
    target = (int(before[second]["head"]) + 1) % heads[second]
    host = browser.driver.find_elements(By.CSS_SELECTOR, ".selfattn-view")[second]
    thumb = host.shadow_root.find_element(By.CSS_SELECTOR, f'button.thumb[data-head="{target}"]')
    browser.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", thumb)
    thumb.click()
    clicked = [view_state(browser, k) for k in range(count)]
    assert clicked[second]["head"] == str(target)
    assert clicked[second]["cells"] != after[second]["cells"]
    assert [clicked[k] for k in range(count) if k != second] == [
        after[k] for k in range(count) if k != second
    ]
    assert browser.errors() == []
