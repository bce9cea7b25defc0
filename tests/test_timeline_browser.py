"""The timeline page (``explain --timeline --html``) and its inline view in headless Chromium:
moving the slider redraws the heads' heatmaps and the curves' marker, nothing is loaded from
anywhere, and the console stays free of errors. Driven as tests/test_html_browser.py drives the
explain page (its `browser` fixture: selenium with Debian's chromium and chromedriver; skipped
only where those are missing, and failing instead under SELFATTN_REQUIRE_EXTRAS=1).

The run folder is made by hand (a probes file and metrics.jsonl), so that each iteration's
weights are known: at the i-th evaluation every query attends to the key i places back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_html_browser
import torch

from selfattn.explain.inline import show
from selfattn.explain.timeline import write_timeline
from selfattn.probe_file import PROBES, Probes

pytestmark = pytest.mark.browser
browser = test_html_browser.browser  # the headless Chromium fixture, one per module
T, LAYERS, HEADS, ITERATIONS = 8, 2, 2, (10, 20, 30)


def shifted(offset: int) -> torch.Tensor:
    """(T, T): each query t attends to key max(t - offset, 0) alone."""
    w = torch.zeros(T, T)
    w[torch.arange(T), (torch.arange(T) - offset).clamp(min=0)] = 1.0
    return w


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("timeline") / "run"
    folder.mkdir()
    n = len(ITERATIONS)
    attention = torch.stack([shifted(i).expand(LAYERS, HEADS, T, T) for i in range(n)])
    induction = torch.tensor([0.1, 0.6, 0.9])[:, None, None].expand(n, LAYERS, HEADS).clone()
    probes = Probes(
        torch.arange(T), [f"t{i}" for i in range(T)], "induction", "8 tokens",
        torch.tensor(ITERATIONS), attention.half(), induction, torch.zeros(n, LAYERS, HEADS),
    )  # fmt: skip
    (folder / PROBES).write_bytes(probes.to_bytes())
    lines = [{"iter": i, "train_loss": 4.0 - i / 10} for i in range(1, 31)]
    for r in lines:
        if r["iter"] in ITERATIONS:
            r["val_loss"] = r["train_loss"] + 0.1
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def canvas(browser, root: str = "document", layer: int = 0, head: int = 0) -> str:
    """The pixels of one head's heatmap, as a data URL."""
    return browser.js(
        f'{root}.querySelector(\'canvas[data-layer="{layer}"][data-head="{head}"]\').toDataURL()'
    )


def darkest(browser, root: str = "document") -> list[int]:
    """For each query row of head L0H0, the key column of its darkest pixel."""
    return browser.js(
        f'(() => {{ const c = {root}.querySelector(\'canvas[data-layer="0"][data-head="0"]\');'
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const out = [];"
        "for (let i = 0; i < c.height; i++) { let best = 0, low = 1e9;"
        "  for (let j = 0; j < c.width; j++) { const k = 4 * (i * c.width + j);"
        "    const s = d[k] + d[k + 1] + d[k + 2]; if (s < low) { low = s; best = j; } }"
        "  out.push(best); } return out; })()"
    )


def test_moving_the_slider_redraws_the_heads_and_the_marker(browser, run_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys

    page = tmp_path / "timeline.html"
    write_timeline(run_dir, page)
    browser.open(page)
    assert browser.js("document.querySelectorAll('#grid canvas').length") == LAYERS * HEADS
    assert browser.js("document.getElementById('slider').type") == "range"
    assert browser.js("document.getElementById('where').textContent").startswith("iteration 30")
    assert darkest(browser) == [max(t - 2, 0) for t in range(T)]  # the last evaluation
    before = canvas(browser)
    marker = "document.querySelector('#loss .marker').getAttribute('x1')"
    x_before = float(browser.js(marker))
    browser.element("#slider").send_keys(Keys.HOME)  # the keyboard moves it to the first one
    assert browser.js("document.getElementById('slider').value") == "0"
    assert browser.js("document.getElementById('where').textContent").startswith("iteration 10")
    assert canvas(browser) != before
    assert darkest(browser) == list(range(T))  # the first evaluation: the diagonal
    assert float(browser.js(marker)) < x_before
    browser.element("#slider").send_keys(Keys.ARROW_RIGHT)
    assert darkest(browser) == [max(t - 1, 0) for t in range(T)]
    assert "L0H0 forms by iteration 20" in browser.js(
        "document.getElementById('formed').textContent"
    )
    assert browser.errors() == []
    assert browser.requests() == [page.resolve().as_uri()]  # the page itself, nothing else


def test_two_inline_timelines_on_one_page_move_on_their_own(browser, run_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys

    view = show(run_dir, timeline=True)
    page = tmp_path / "notebook.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        f"{view._repr_html_()}{view._repr_html_()}</body></html>",
        encoding="utf-8",
    )
    browser.open(page)
    hosts = browser.js("[...document.querySelectorAll('.selfattn-timeline')].map(e => e.id)")
    assert len(hosts) == 2 and hosts[0] != hosts[1]
    first, second = (f"document.getElementById('{h}').shadowRoot" for h in hosts)
    assert browser.js(f"{first}.querySelectorAll('canvas').length") == LAYERS * HEADS
    before = canvas(browser, second)
    slider = browser.js(f"{first}.getElementById('slider')")
    browser.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    slider.send_keys(Keys.HOME)
    assert darkest(browser, first) == list(range(T))
    assert canvas(browser, second) == before  # the other view did not move
    assert browser.errors() == []
