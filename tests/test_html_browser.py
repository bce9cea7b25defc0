"""The `--html` page in real headless Chromium: it renders offline, without errors, and responds.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe``: it reads commands
from fd 3 and writes replies and events to fd 4, each one JSON message ending in a NUL byte. That
needs only the standard library (no websocket client, no selenium). Every console error,
uncaught exception and Content-Security-Policy violation (the page allows no network at all) is
collected and must stay empty.

Skipped when Chromium is not installed (CI installs Debian's package in .ci/run).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from selfattn import trace
from selfattn.explain import build_module, example_inputs, explain_example
from selfattn.explain.html import write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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
    "--remote-debugging-pipe",
]
TIMEOUT = 30.0

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


class Chromium:
    """A headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, user_data_dir: Path, width: int = 1280, height: int = 900) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child must see them as fds 3 and 4: park them above 10 first, so dup2 can't clash.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire_pipes() -> None:  # runs in the child, before exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self._log = open(user_data_dir / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={user_data_dir}",
                f"--window-size={width},{height}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            close_fds=False,  # keep fds 3 and 4; Python's own fds are close-on-exec anyway
            preexec_fn=wire_pipes,
        )
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    # -- the protocol --------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
        return message

    def wait_for(self, method: str) -> dict:
        for seen, event in enumerate(self.events):
            if event["method"] == method:
                return self.events.pop(seen)
        while True:
            message = self._receive()
            if message.get("method") == method:
                self.events.remove(message)
                return message

    # -- what the tests use --------------------------------------------------------------
    def open(self, path: Path) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        reply = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        params = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
        if kind == "mouseMoved":
            params["button"] = "none"
        self.send("Input.dispatchMouseEvent", params, session=True)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        x, y = self.centre(selector)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def centre(self, selector: str) -> tuple[float, float]:
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return box[0], box[1]

    def screenshot(self) -> bytes:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        return base64.b64decode(data)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and log errors (CSP violations included)."""
        self.js("0")  # flush: events sent before this reply have arrived
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
            elif method == "Page.javascriptDialogOpening":
                found.append(f"dialog: {params['message']}")
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def mha_page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "mha.html"
    write_html(explain_example("mha", heads=2, d_out=4), path)
    return path


def cell(browser: Chromium, i: int, j: int) -> dict:
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
    requested = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e["method"] == "Network.requestWillBeSent"
    ]
    assert requested == [mha_page.resolve().as_uri()]  # the page itself, nothing else
    # the pixels: a rendered page, not a blank one
    image = pytest.importorskip("PIL.Image").open(io.BytesIO(browser.screenshot())).convert("RGB")
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
    x, y = browser.centre('#panels rect.cell[data-i="4"][data-j="2"]')
    browser.mouse("mouseMoved", x, y)
    assert browser.js("document.getElementById('tip').hidden") is False
    tip = browser.js("document.getElementById('tip').textContent")
    assert "query “one”" in tip and "key “starts”" in tip and f"{value:.4f}" in tip
    # hovering a query token in the line view keeps only its lines
    x, y = browser.centre('#line-view text[data-i="0"]')
    browser.mouse("mouseMoved", x, y)
    visible = browser.js(
        "[...document.querySelectorAll('#line-view line')]"
        ".filter(l => +l.getAttribute('stroke-opacity') > 0).length"
    )
    assert visible == 1  # "Your" is the first token: under the causal mask it sees only itself
    assert browser.errors() == []


def test_every_step_renders(browser, mha_page):
    browser.open(mha_page)
    shapes = {}
    for step in ("inputs", "qkv", "scores", "scaled_scores", "weights", "context"):
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
    }
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
