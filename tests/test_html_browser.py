"""The `--html` page in real headless Chromium: it renders offline, without errors, and responds.

Chromium is driven with selenium through Debian's ``chromedriver`` (package ``chromium-driver``),
beside Debian's ``chromium``; .ci/run installs both. Every console error, uncaught exception and
Content-Security-Policy violation (the page allows no network at all) lands in the browser's log
at level SEVERE, and that must stay empty; an ``alert()`` would fail the next command. The
performance log's ``Network.requestWillBeSent`` events show every request the page made.

Skipped where Chromium, chromedriver or selenium is missing, except under
SELFATTN_REQUIRE_EXTRAS=1 (CI), where that fails instead.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from extras import need_module, need_program

from selfattn import trace
from selfattn.explain import build_module, example_inputs, explain_example
from selfattn.explain.html import write_html

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1280,900",
]
TIMEOUT = 30  # seconds for any one page load or script

pytestmark = pytest.mark.browser


class Browser:
    """One headless Chromium page, driven by selenium; what the tests below need of it."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.logged: list[dict] = []  # the browser log since the last `open`
        self.events: list[dict] = []  # DevTools events (performance log) since the last `open`

    def open(self, path: Path) -> None:
        self._drain()
        self.logged.clear()
        self.events.clear()
        self.driver.get(path.resolve().as_uri())  # returns once the load event has fired

    def js(self, expression: str):
        return self.driver.execute_script(f"return {expression};")

    def element(self, selector: str):
        """The first element matching ``selector``, scrolled to the middle of the view."""
        found = self.driver.find_element("css selector", selector)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found)
        return found

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        self.element(selector).click()

    def hover(self, selector: str) -> None:
        """Move the mouse to the middle of the first element matching ``selector``."""
        from selenium.webdriver import ActionChains

        ActionChains(self.driver).move_to_element(self.element(selector)).perform()

    def screenshot(self) -> bytes:
        return self.driver.get_screenshot_as_png()

    def requests(self) -> list[str]:
        """The URL of every request since the page's own (left-overs of the last page dropped)."""
        self._drain()
        page = self.driver.current_url
        urls = [
            event["params"]["request"]["url"]
            for event in self.events
            if event["method"] == "Network.requestWillBeSent"
        ]
        return urls[urls.index(page) :] if page in urls else urls

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and log errors (CSP violations included)."""
        self._drain()
        return [entry["message"][:500] for entry in self.logged if entry["level"] == "SEVERE"]

    def _drain(self) -> None:  # each get_log hands over what arrived since the last one
        self.logged += self.driver.get_log("browser")
        self.events += [
            json.loads(e["message"])["message"] for e in self.driver.get_log("performance")
        ]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = need_program("chromium", "chromium-browser")
    chromedriver = need_program("chromedriver")
    webdriver = need_module("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = webdriver.ChromeService(executable_path=chromedriver)  # never selenium-manager
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    driver.get("about:blank")  # not the new-tab page, whose requests would trickle into ours
    try:
        yield Browser(driver)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def mha_page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "mha.html"
    write_html(explain_example("mha", heads=2, d_out=4), path)
    return path


def cell(browser: Browser, i: int, j: int) -> dict:
    return browser.js(
        f'(() => {{ const r = document.querySelector(\'#panels rect.cell[data-i="{i}"]'
        f"[data-j=\"{j}\"]'); return {{v: r.dataset.v, fill: r.getAttribute('fill')}}; }})()"
    )


def test_page_renders_offline_without_errors(browser, mha_page):
    browser.open(mha_page)
    assert browser.js("document.querySelectorAll('#panels rect.cell').length") == 36  # 6 × 6
    assert browser.js("document.querySelectorAll('#line-view line').length") > 0
    assert browser.js("document.querySelectorAll('#thumbs canvas').length") == 2
    tokens = browser.js("[...document.querySelectorAll('#sentence .tok')].map(e => e.textContent)")
    assert tokens == ["Your", "journey", "starts", "with", "one", "step"]
    assert browser.errors() == []
    assert browser.requests() == [mha_page.resolve().as_uri()]  # the page itself, nothing else
    # the pixels: a rendered page, not a blank one
    image = need_module("PIL.Image").open(io.BytesIO(browser.screenshot())).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)  # [(count, rgb), ...]
    background = max(colours)[0] / (image.width * image.height)
    assert background < 0.8, f"{background:.0%} of the screenshot is one colour"
    assert len(colours) > 200  # heatmap shades, text, lines


def test_selecting_another_head_changes_the_heatmap_and_lines(browser, mha_page):
    browser.open(mha_page)
    before = cell(browser, 3, 1)
    lines_before = browser.js(
        "[...document.querySelectorAll('#line-view line')].map(l => l.getAttribute('stroke'))"
    )
    browser.js(
        "(() => { const s = document.getElementById('head'); s.value = '1';"
        "s.dispatchEvent(new Event('change')); })()"
    )
    after = cell(browser, 3, 1)
    assert after["v"] != before["v"] and after["fill"] != before["fill"]
    assert "head 1" in browser.js("document.getElementById('step-title').textContent")
    lines_after = browser.js(
        "[...document.querySelectorAll('#line-view line')].map(l => l.getAttribute('stroke'))"
    )
    assert set(lines_after) != set(lines_before)  # each head has its own colour
    # a real click on head 0's thumbnail goes back
    browser.click('#thumbs button[data-head="0"]')
    assert cell(browser, 3, 1) == before
    assert browser.js("document.getElementById('head').value") == "0"
    assert browser.errors() == []


def test_hovering_a_cell_shows_its_value(browser, mha_page):
    browser.open(mha_page)
    value = float(cell(browser, 4, 2)["v"])
    browser.hover('#panels rect.cell[data-i="4"][data-j="2"]')
    assert browser.js("document.getElementById('tip').hidden") is False
    tip = browser.js("document.getElementById('tip').textContent")
    assert "query “one”" in tip and "key “starts”" in tip and f"{value:.4f}" in tip
    # hovering a query token in the line view keeps only its lines
    browser.hover('#line-view text[data-i="0"]')
    visible = browser.js(
        "[...document.querySelectorAll('#line-view line')]"
        ".filter(l => +l.getAttribute('stroke-opacity') > 0).length"
    )
    assert visible == 1  # "Your" is the first token: under the causal mask it sees only itself
    assert browser.errors() == []


def test_every_step_renders(browser, mha_page):
    browser.open(mha_page)
    shapes = {}
    for step in ("inputs", "qkv", "scores", "scaled_scores", "weights", "context", "output"):
        browser.js(f"document.querySelector('#steps button[data-step=\"{step}\"]').click()")
        shapes[step] = browser.js(
            "[...document.querySelectorAll('#panels .panel .shape')].map(e => e.textContent)"
        )
    assert shapes == {
        "inputs": ["(6 × 3)"],
        "qkv": ["(6 × 2)"] * 3,  # d_out 4 over 2 heads
        "scores": ["(6 × 6)"],
        "scaled_scores": ["(6 × 6)"],
        "weights": ["(6 × 6)"],
        "context": ["(6 × 2)", "(6 × 2)"],
        "output": ["(6 × 4)", "(6 × 4)"],  # the heads merged, then out_proj's output
    }
    assert "— head" not in browser.js("document.getElementById('step-title').textContent")
    assert browser.errors() == []


def test_layer_selector_switches_layers(browser, tmp_path):
    layers = []
    for index, seed in enumerate((1, 2, 3)):
        tr = explain_example("v2", seed=seed)
        tr.extras["layer"] = index
        layers.append(tr)
    path = tmp_path / "layers.html"
    write_html(layers, path, layer=1)
    browser.open(path)
    assert browser.js("document.getElementById('layer-box').hidden") is False
    assert browser.js("document.getElementById('head-box').hidden") is True  # one head
    assert browser.js("document.getElementById('layer').value") == "1"
    expected = layers[2].steps["weights"][0, 0, 0].item()
    browser.js(
        "(() => { const s = document.getElementById('layer'); s.value = '2';"
        "s.dispatchEvent(new Event('change')); })()"
    )
    assert float(cell(browser, 0, 0)["v"]) == pytest.approx(expected, abs=1e-4)
    assert browser.errors() == []


def test_hostile_tokens_are_shown_as_text(browser, tmp_path):
    tokens = [
        "<script>alert(1)</script>",
        "##ing",
        "</script><img src=x onerror=alert(2)>",
        "&amp;",
    ]
    module = build_module("causal", 3, 2, 1, seed=0)
    path = tmp_path / "hostile.html"
    write_html(trace(module, example_inputs()[:4], tokens), path)
    browser.open(path)
    shown = browser.js("[...document.querySelectorAll('#sentence .tok')].map(e => e.textContent)")
    assert shown == tokens
    labels = browser.js(
        "[...document.querySelectorAll('#line-view text.label')].map(e => e.textContent)"
    )
    assert "##ing" in labels
    assert browser.js("document.querySelectorAll('img, script').length") == 2  # the page's own two
    assert browser.errors() == []


OVERLAPS = """(() => {
  const boxes = [...document.querySelectorAll(arguments[0])].map((t) => t.getBoundingClientRect());
  const x = arguments[1] === "x", key = x ? "left" : "top", end = x ? "right" : "bottom";
  boxes.sort((a, b) => a[key] - b[key]);
  let hits = 0;
  for (let k = 1; k < boxes.length; k++) if (boxes[k][key] < boxes[k - 1][end] - 0.5) hits++;
  return [boxes.length, hits];
})()"""


def test_a_long_page_keeps_labels_apart_and_disabled_steps_look_disabled(
    browser, tmp_path, monkeypatch
):
    import torch

    import selfattn.explain.html as page

    torch.manual_seed(0)
    x, tokens = torch.randn(94, 384), [f"t{i}" for i in range(94)]
    layers = []
    for index in range(2):
        tr = trace(build_module("v2", 384, 8, 1, seed=index), x, tokens)
        tr.extras["layer"] = index
        layers.append(tr)
    room = page._numbers(layers[0]) + layers[1].steps["weights"].numel()
    monkeypatch.setattr(page, "MAX_NUMBERS", room)  # layer 1 keeps its weights only
    path = tmp_path / "long.html"
    write_html(layers, path, step="inputs")
    browser.open(path)
    script = OVERLAPS.replace("arguments[0]", "'#panels svg text.label[text-anchor=\"middle\"]'")
    shown, hits = browser.js(script.replace("arguments[1]", "'x'"))  # x's 384 dimensions
    assert 1 < shown < 384 and hits == 0
    assert "every" in browser.js("document.querySelector('#panels .thin').textContent")
    browser.js("document.querySelector('#steps button[data-step=\"weights\"]').click()")
    rows = OVERLAPS.replace("arguments[0]", "'#panels svg text.label[text-anchor=\"end\"]'")
    assert browser.js(rows.replace("arguments[1]", "'y'")) == [94, 0]  # every row, none overlap
    assert "head" not in browser.js("document.querySelector('#lines .explain').textContent")

    enabled = browser.js(
        "getComputedStyle(document.querySelector('#steps button[data-step=\"scores\"]'))"
        ".backgroundColor"
    )
    browser.js(
        "(() => { const s = document.getElementById('layer'); s.value = '1';"
        "s.dispatchEvent(new Event('change')); })()"
    )
    style = browser.js(
        "(() => { const b = document.querySelector('#steps button[data-step=\"scores\"]');"
        "const c = getComputedStyle(b); b.click();"
        "return [b.disabled, c.cursor, c.pointerEvents, c.backgroundColor]; })()"
    )
    assert browser.js("window.selfattnPage.state.step") == "weights"  # the click did nothing
    assert style[:3] == [True, "not-allowed", "none"] and style[3] != enabled
    assert browser.errors() == []


def test_simple_module_page_says_what_it_computes(browser, tmp_path):
    """--module simple has no projections and no scaling: scores = x xᵀ, context = weights · x."""
    path = tmp_path / "simple.html"
    write_html(explain_example("simple"), path)
    browser.open(path)
    said = {}
    for step in ("qkv", "scores", "scaled_scores", "weights", "context"):
        browser.js(f"document.querySelector('#steps button[data-step=\"{step}\"]').click()")
        said[step] = browser.js(
            "document.getElementById('step-title').textContent + ' | ' + "
            "document.getElementById('step-text').textContent + ' | ' + "
            "[...document.querySelectorAll('#panels h3, #panels .name')]"
            ".map(e => e.textContent).join(' ')"
        )
    for step, text in said.items():
        for wrong in ("W", "√d_k", "Q Kᵀ", "learned", "· V"):
            assert wrong not in text.replace("Weights", "").replace("weights", ""), (step, text)
    assert "x xᵀ" in said["scores"] and "x xᵀ" in said["weights"]
    assert "weights · x" in said["context"]
    assert browser.errors() == []
