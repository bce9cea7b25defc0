"""Regenerate every image in docs/ (not docs/bench/) from the current code: `make docs-images`.

Each image is made by the command the docs show beside it (docs/explain.md, docs/training.md):

    docs/explain-heatmap.png   selfattn explain --module mha --heads 2 --png ...
    docs/explain-page.png      selfattn explain --module mha --heads 2 --html ..., then
                               chromium --headless --screenshot of that page
    docs/minilm-layer2.png     selfattn explain --model minilm --text "..." --layer 2 --png ...
    docs/induction-layer1.png  selfattn train --preset induction (1000 iterations, about 20 s
                               on two CPU cores), then explain --checkpoint ... --layer 1 --png ...
    docs/timeline.png          selfattn train --preset induction --iters 600 --eval-every 25
                               (about a minute), then explain --checkpoint ... --timeline --html,
                               then chromium --headless --screenshot of that page

Needs the plot and text extras and Chromium (Debian's ``chromium``). Every command is printed
before it runs; the first that fails stops the script with its exit status.

    python docs/make_images.py [--only NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SELFATTN = [sys.executable, "-m", "selfattn"]
MINILM_TEXT = "The cat sat on the mat because it was tired."
INDUCTION_TEXT = "abcdefghijklabcdefghijkl"
PAGE_WINDOW = (1280, 900)  # the screenshot's size in CSS pixels
TIMELINE_WINDOW = (1400, 900)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",  # let the page's script draw before the screenshot
]


def run(command: list[str], *, quiet: bool = False) -> None:
    """Run ``command`` after printing it; ``quiet``: show its output only if it fails (Chromium
    logs D-Bus errors on a machine without a desktop session even when all is well)."""
    print("$", shlex.join(command), flush=True)
    done = subprocess.run(command, timeout=600, capture_output=quiet, text=True)
    if done.returncode != 0:
        if quiet:
            print(done.stdout + done.stderr, file=sys.stderr)
        raise SystemExit(done.returncode)


def explain_heatmap(out: Path, work: Path) -> None:
    run([*SELFATTN, "explain", "--module", "mha", "--heads", "2", "--png", str(out)])


def explain_page(out: Path, work: Path) -> None:
    page = work / "explain.html"
    run([*SELFATTN, "explain", "--module", "mha", "--heads", "2", "--html", str(page)])
    screenshot(page, out, work, PAGE_WINDOW)


def screenshot(page: Path, out: Path, work: Path, window: tuple[int, int]) -> None:
    """Chromium's headless screenshot of ``page``, ``window`` CSS pixels."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("make_images: the page screenshot needs chromium on PATH")
    width, height = window
    run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={work / 'chromium'}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        quiet=True,
    )


def minilm_layer2(out: Path, work: Path) -> None:
    text = ["--text", MINILM_TEXT]
    run([*SELFATTN, "explain", "--model", "minilm", *text, "--layer", "2", "--png", str(out)])


def induction_layer1(out: Path, work: Path) -> None:
    trained = work / "induction"
    run([*SELFATTN, "train", "--preset", "induction", "--out", str(trained), "--quiet"])
    checkpoint = ["--checkpoint", str(trained), "--text", INDUCTION_TEXT]
    run([*SELFATTN, "explain", *checkpoint, "--layer", "1", "--png", str(out)])


def timeline(out: Path, work: Path) -> None:
    trained = work / "timeline-run"
    schedule = ["--iters", "600", "--eval-every", "25"]
    run([*SELFATTN, "train", "--preset", "induction", *schedule, "--out", str(trained), "--quiet"])
    page = work / "timeline.html"
    run([*SELFATTN, "explain", "--checkpoint", str(trained), "--timeline", "--html", str(page)])
    screenshot(page, out, work, TIMELINE_WINDOW)


IMAGES = {
    "explain-heatmap.png": explain_heatmap,
    "explain-page.png": explain_page,
    "minilm-layer2.png": minilm_layer2,
    "induction-layer1.png": induction_layer1,
    "timeline.png": timeline,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(IMAGES), help="just these images")
    parser.add_argument("--out", type=Path, default=DOCS, help="where to write (default: docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="selfattn-docs-") as tmp:
        for name in args.only or IMAGES:
            IMAGES[name](args.out / name, Path(tmp))
            print(f"wrote {args.out / name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
