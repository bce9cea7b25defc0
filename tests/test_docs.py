"""The documentation holds: README.md and every page of docs/ (the mkdocs site).

- Every ```python block runs as pasted: each in a fresh interpreter, in an empty folder, with a
  timeout. A block must be complete (define what it uses); none is skipped. A block that appears
  word for word in several places runs once.
- Every relative link (and image) points at a file that exists, and an ``#anchor`` at a heading
  of its target: as GitHub names headings for README.md (read on GitHub), and for docs/ pages as
  both mkdocs (the site) and GitHub (the same files browsed there) name them.
- The site builds with ``mkdocs build --strict`` and loads nothing from the network.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from extras import need_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TIMEOUT_S = 120

FENCE = re.compile(r"^( *)(`{3,}|~{3,})(.*)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(?:.(?!\1))*?.?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass
class Block:
    """A fenced block: its language (the info string's first word), code and first line."""

    language: str
    code: str
    line: int  # the line of the opening fence, 1-based


def split_markdown(text: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of ``text`` and its other lines, (line number, text), fences left out."""
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        indent, fence, info = opening.groups()
        body, j = [], i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing.group(2).startswith(fence) and not closing.group(3).strip():
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        language = info.strip().split()[0].lstrip(".{") if info.strip() else ""
        blocks.append(Block(language, "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks, prose


def python_blocks() -> dict[str, list[str]]:
    """Each distinct ```python block's code -> where it appears ("README.md:40", ...)."""
    found: dict[str, list[str]] = {}
    for path in markdown_files():
        blocks, _ = split_markdown(path.read_text(encoding="utf-8"))
        for block in blocks:
            if block.language in ("python", "py"):
                found.setdefault(block.code, []).append(f"{name(path)}:{block.line}")
    return found


def test_the_docs_have_python_blocks():
    places = [place for where in python_blocks().values() for place in where]
    assert sum(place.startswith("README.md:") for place in places) >= 3
    assert sum(place.startswith("docs/") for place in places) >= 6


@pytest.mark.parametrize(
    ("where", "code"), [pytest.param(w, c, id=w[0]) for c, w in python_blocks().items()]
)
def test_python_block_runs(where, code, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # a fresh process in an empty folder: nothing but the installed package
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{', '.join(where)}:\n{done.stderr[-2000:]}"


# Heading ids ----------------------------------------------------------------------------------


def selfattn_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every ``selfattn ...`` or ``... -m selfattn ...`` command line in
    the shell blocks (```bash, ```sh, ```console or unlabelled), continuation lines joined."""
    found = []
    for path in markdown_files():
        blocks, _ = split_markdown(path.read_text(encoding="utf-8"))
        for block in blocks:
            if block.language not in ("bash", "sh", "console", ""):
                continue
            for k, line in enumerate(block.code.replace("\\\n", " ").splitlines()):
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # not a command line
                    continue
                words = words[: words.index("|")] if "|" in words else words
                where = f"{name(path)}:{block.line + 1 + k}"
                if words[:1] == ["selfattn"]:
                    found.append((where, words[1:]))
                elif "selfattn" in words[1:] and words[words.index("selfattn") - 1] == "-m":
                    found.append((where, words[words.index("selfattn") + 1 :]))
    return found


def test_every_command_line_in_the_docs_parses():
    """The commands the pages show are ones selfattn accepts (flags renamed or removed since
    would fail here); running them is the python blocks' and the CLI tests' job."""
    from selfattn.cli import build_parser

    commands = selfattn_commands()
    assert len(commands) >= 15
    for where, args in commands:
        try:
            build_parser().parse_args(args)
        except SystemExit as done:
            assert not done.code, f"{where}: selfattn {' '.join(args)}"


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (mkdocs' and material's default): ASCII, word characters."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(text: str) -> str:
    """GitHub's heading ids: lower case, only letters, digits, '_', '-' and spaces kept, each
    space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def heading_text(markdown: str) -> str:
    """A heading as it renders: links reduced to their text, code spans and emphasis unmarked."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"\{[^}]*\}\s*$", "", text)  # attr_list: {#id .class}
    return text.replace("`", "").replace("*", "").strip()


def heading_ids(path: Path, rule: str) -> set[str]:
    """Every heading id of a Markdown file under ``rule`` ("mkdocs" or "github"), with the
    suffixes each gives repeated headings, and any explicit ``{#id}``."""
    slug, separator = (mkdocs_slug, "_") if rule == "mkdocs" else (github_slug, "-")
    _, prose = split_markdown(path.read_text(encoding="utf-8"))
    ids: set[str] = set()
    for _, line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        explicit = re.search(r"\{[^}]*#([\w-]+)[^}]*\}\s*$", match.group(2))
        if explicit:
            ids.add(explicit.group(1))
            continue
        base = slug(heading_text(match.group(2)))
        candidate, n = base, 0
        while candidate in ids:
            n += 1
            candidate = f"{base}{separator}{n}"
        ids.add(candidate)
    return ids


# Links ----------------------------------------------------------------------------------------


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of each inline link, image and reference definition, outside code."""
    _, prose = split_markdown(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = CODE_SPAN.sub("", line)
        found += [(number, m.group(1)) for m in LINK.finditer(line)]
        reference = REFERENCE.match(line)
        if reference:
            found.append((number, reference.group(1)))
    return found


def link_problem(source: Path, target: str) -> str | None:
    """Why a relative link from ``source`` is broken, or None."""
    if SCHEME.match(target):
        return None  # https:, mailto:, ...: not checked (no network here)
    if target.startswith("/"):
        return "an absolute path: works neither on GitHub nor in the site"
    path_part, _, anchor = target.partition("#")
    destination = (source.parent / path_part).resolve() if path_part else source
    home = DOCS if source.is_relative_to(DOCS) else ROOT
    if not destination.is_relative_to(home):
        return f"outside {name(home) if home != ROOT else 'the repository'}"
    if not destination.exists():
        return f"no such file: {destination.relative_to(ROOT).as_posix()}"
    if not anchor:
        return None
    if destination.suffix != ".md":
        return "an anchor into a file that is not Markdown"
    rules = ("mkdocs", "github") if source.is_relative_to(DOCS) else ("github",)
    missing = [rule for rule in rules if anchor not in heading_ids(destination, rule)]
    if missing:
        return f"no heading with the id #{anchor} ({' and '.join(missing)} ids)"
    return None


def all_links() -> list[tuple[Path, int, str]]:
    return [(path, line, target) for path in markdown_files() for line, target in links(path)]


def test_every_relative_link_and_anchor_resolves():
    checked = [(p, line, t) for p, line, t in all_links() if not SCHEME.match(t)]
    assert len(checked) >= 40  # the parser finds the links (README alone links every guide)
    assert sum("#" in t for _, _, t in checked) >= 3
    broken = [
        f"{name(p)}:{line}: ({t}) {problem}"
        for p, line, t in checked
        if (problem := link_problem(p, t)) is not None
    ]
    assert not broken, "\n".join(broken)


def test_the_readme_links_every_guide():
    linked = {t.partition("#")[0] for p, _, t in all_links() if p == ROOT / "README.md"}
    guides = {name(p) for p in DOCS.glob("*.md")}
    assert guides <= linked, f"README.md does not link {sorted(guides - linked)}"


def test_the_readme_is_a_front_door():
    """At most 250 lines: what selfattn is, the commands, an example per area, figures, links;
    everything else lives in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_link_checker_catches_broken_links(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Title\n\n## The `x` part: one\n\n## Repeat\n\n## Repeat\n")
    (tmp_path / "README.md").write_text("x")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", docs)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = docs / "a.md"
    assert link_problem(page, "a.md#the-x-part-one") is None
    assert link_problem(page, "#repeat_1") == "no heading with the id #repeat_1 (github ids)"
    assert link_problem(tmp_path / "README.md", "docs/a.md#repeat-1") is None
    assert "no such file" in link_problem(page, "b.md")
    assert "no heading" in link_problem(page, "a.md#nope")
    assert "outside docs" in link_problem(page, "../README.md")
    assert "absolute" in link_problem(page, "/docs/a.md")
    assert link_problem(page, "https://example.com/x") is None


def test_heading_ids_follow_mkdocs_slugify():
    toc = need_module("markdown.extensions.toc")
    headings = [
        heading_text(HEADING.match(line).group(2))
        for path in markdown_files()
        for _, line in split_markdown(path.read_text(encoding="utf-8"))[1]
        if HEADING.match(line)
    ]
    assert len(headings) >= 40
    for text in headings:
        assert mkdocs_slug(text) == toc.slugify(text, "-"), text


# The site -------------------------------------------------------------------------------------

NETWORK_LOAD = re.compile(
    r"<(?:script|img|iframe)[^>]*\ssrc=[\"']?(?:https?:)?//"
    r"|<link[^>]*\shref=[\"']?(?:https?:)?//[^>]*>"
    r"|@import\s+(?:url\()?[\"']?(?:https?:)?//"
    r"|fonts\.googleapis|fonts\.gstatic",
    re.IGNORECASE,
)


def test_site_builds_strict_and_loads_nothing_from_the_network(tmp_path):
    need_module("mkdocs")
    need_module("material")
    need_module("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no end-of-life banner
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 15
    loads = [
        f"{page.relative_to(site)}: {m.group(0)[:120]}"
        for page in [*pages, *site.rglob("*.css")]
        for m in NETWORK_LOAD.finditer(page.read_text(encoding="utf-8", errors="replace"))
        if not m.group(0).lower().startswith("<link") or "stylesheet" in m.group(0).lower()
    ]
    assert not loads, "\n".join(loads[:20])
    assert (site / "api" / "functional" / "index.html").read_text().count("merge_partials") >= 2
