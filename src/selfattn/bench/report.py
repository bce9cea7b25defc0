"""Showing results: the rich table, the JSON file, the plot, and the comparison of two runs.

matplotlib is imported only by `plot`, and only when asked for (the ``bench`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from selfattn import _atomic
from selfattn.bench.results import Measurement, Results

PLOT_EXTRA = "--plot needs matplotlib: pip install 'selfattn[bench]'"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds >= 10:
        return f"{seconds:,.1f} s"
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.3g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{n} B"


def _error(e: float | None) -> str:
    return "" if e is None else f"{e:.1e}"


def _spread(m: Measurement) -> str:
    if m.q1_s is None or not m.median_s:
        return ""
    return f"±{(m.q3_s - m.q1_s) / 2 / m.median_s * 100:.0f}%"


def _status(m: Measurement) -> str:
    if m.status == "ok":
        return m.extra.get("memory", "")
    if m.status == "wrong":
        return f"[bold red]{escape(m.reason)}[/]"
    label = {"skipped": "skipped", "stopped": "", "oom": "OOM", "error": "error"}[m.status]
    text = m.reason if not label or m.reason.startswith(label) else f"{label}: {m.reason}"
    text = escape(text)  # a reason may hold brackets, e.g. pip install 'selfattn[bench]'
    return f"[yellow]{text}[/]" if m.status in ("oom", "error") else f"[dim]{text}[/]"


def _ratio(m: Measurement, baseline: str) -> str:
    if m.ratio is None:
        return ""
    return "[bold]1.00[/]" if m.contender == baseline else f"{m.ratio:.2f}"


def _columns(baseline: str, decode: bool) -> list[tuple[str, Callable[[Measurement], str]]]:
    """(header, cell of a measurement) per column of a case's table."""
    cols: list[tuple[str, Callable[[Measurement], str]]] = [("contender", lambda m: m.contender)]
    if not decode:
        cols.append(("pass", lambda m: m.pass_))
    cols += [
        ("median ms", lambda m: _ms(m.median_s)),
        ("IQR", _spread),
        (f"× {baseline}", lambda m: _ratio(m, baseline)),
        ("tokens/s", lambda m: f"{m.tokens_per_s:,.0f}" if m.tokens_per_s else ""),
    ]
    if decode:
        cols.append(("prefill ms", lambda m: _ms(m.extra.get("prefill_s"))))
    cols += [
        ("GFLOP/s", lambda m: f"{m.gflops_per_s:.1f}" if m.gflops_per_s else ""),
        ("% peak", lambda m: f"{m.peak_fraction * 100:.0f}%" if m.peak_fraction else ""),
    ]
    if not decode:
        cols.append(("peak mem", lambda m: _bytes(m.memory_bytes)))
    cols += [
        ("state", lambda m: _bytes(m.module_bytes)),
        ("row err", lambda m: _error(m.max_error)),
    ]
    if not decode:
        cols.append(("grad err", lambda m: _error(m.grad_error)))
    return [*cols, ("note", _status)]


def render(results: Results, console: Console) -> None:
    """One table per case; the ratio column is time / the baseline's time (lower is faster)."""
    settings = results.settings
    decode = settings.get("kind") == "decode"
    columns = _columns(settings["baseline"], decode)
    by_case: dict[str, list[Measurement]] = {}
    for m in results.measurements:
        by_case.setdefault(m.label, []).append(m)
    for label, ms in by_case.items():
        table = Table(title=f"{settings['preset']}: {label}", title_justify="left")
        for header, _ in columns:
            left = header in ("contender", "pass", "note")
            table.add_column(header, justify="left" if left else "right", overflow="fold")
        for m in ms:
            table.add_row(*(cell(m) for _, cell in columns))
        console.print(table)
    _legend(results, console, decode)


def _legend(results: Results, console: Console, decode: bool) -> None:
    """What the run ran on, and what each figure means."""
    env = results.environment
    console.print(f"[dim]{_device_name(results)}, torch {env.get('torch')}[/]")
    peaks = ", ".join(
        f"{dtype} {p['gflops']:.0f} GFLOP/s ({p['n']}³)" for dtype, p in results.peaks.items()
    )
    console.print(f"[dim]matmul peak measured in this run: {peaks}[/]")
    if not decode:
        console.print(f"[dim]FLOPs: {results.flop_formula}[/]")
    if any(m.memory_bytes is not None for m in results.measurements):
        console.print(
            "[dim]peak mem: high-water mark of one call beyond the module and inputs "
            f"({'a fresh process per case' if env.get('device') == 'cpu' else 'CUDA allocator'})"
            "[/]"
        )
    if any(m.module_bytes is not None for m in results.measurements):
        console.print(
            "[dim]state: the parameters and buffers of the module(s), held between calls[/]"
        )
    if results.error_rule:
        console.print(f"[dim]row err / grad err: {results.error_rule}[/]")
    for note in results.notes:
        console.print(f"[dim]note: {note}[/]")


# ----------------------------------------------------------------------------- JSON


def write_json(results: Results, path: str | Path) -> None:
    _atomic.write_text(path, json.dumps(results.to_dict(), indent=1) + "\n")


def read_json(path: str | Path) -> Results:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    try:
        return Results.from_dict(data)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a selfattn bench file (missing {err})") from None


# ----------------------------------------------------------------------------- plot


def check_plot_available() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(PLOT_EXTRA)


def plot(results: Results, path: str | Path) -> None:
    """Time and peak memory against L (log-log) per contender; bars for a single length."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [m for m in results.measurements if m.status == "ok" and m.median_s]
    if not ok:
        raise ValueError("nothing was timed: no plot to draw")
    lengths = {m.case["length"] for m in ok}
    series = {m.label.split(" ", 1)[-1] for m in ok}
    passes = list(dict.fromkeys(m.pass_ for m in ok))
    decode = results.settings.get("kind") == "decode"
    title = f"selfattn bench {results.settings['preset']} on {_device_name(results)}"
    if decode or len(lengths) == 1:
        _bars(results, ok, path, title, plt, decode)
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    lines = _lines(ok, multi=len(series) > 1)
    keys = list(dict.fromkeys((name, ser) for name, _, ser in lines))
    cmap = plt.get_cmap("tab20")  # the 10 strong colours first, then their light partners
    palette = [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]
    colors = {key: palette[i % 20] for i, key in enumerate(keys)}
    labelled: set = set()
    for (name, pass_, ser), points in lines.items():
        points.sort()
        style = "-" if pass_ == "fwd+bwd" else "--"
        color = colors[(name, ser)]
        label = None
        if (name, ser) not in labelled:
            labelled.add((name, ser))
            label = name + (f" [{ser}]" if ser else "")
        xs = [p[0] for p in points]
        ax_t.plot(xs, [p[1] * 1e3 for p in points], style, marker="o", ms=3, color=color,
                  label=label)  # fmt: skip
        mem = [(p[0], p[2]) for p in points if p[2]]
        if mem:
            ax_m.plot([p[0] for p in mem], [p[1] / 2**20 for p in mem], style, marker="o", ms=3,
                      color=color)  # fmt: skip
    for pass_ in passes:  # a legend entry per line style
        ax_t.plot([], [], "-" if pass_ == "fwd+bwd" else "--", color="grey", label=pass_)
    for ax, ylabel in ((ax_t, "median time per call (ms)"), (ax_m, "peak memory of a call (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7, ncol=2)
    fig.suptitle(title + f" ({next(iter(series))})" if len(series) == 1 else title, fontsize=10)
    fig.tight_layout()
    _atomic.save_figure(fig, path, dpi=90)
    plt.close(fig)


def _device_name(results: Results) -> str:
    env = results.environment
    name = env.get("gpu") or env.get("cpu", "?")
    threads = env.get("threads")
    plural = "thread" if threads == 1 else "threads"
    return f"{name}, {threads} {plural}" if env.get("device") == "cpu" else name


def _lines(ok: list[Measurement], multi: bool) -> dict:
    lines: dict = {}
    for m in ok:
        ser = m.label.split(" ", 1)[-1] if multi else ""
        lines.setdefault((m.contender, m.pass_, ser), []).append(
            (m.case["length"], m.median_s, m.memory_bytes)
        )
    return lines


def _bars(results: Results, ok: list[Measurement], path, title: str, plt, decode: bool) -> None:
    passes = list(dict.fromkeys(m.pass_ for m in ok))
    names = list(dict.fromkeys(m.contender for m in ok))
    panels = 1 if decode else 2
    fig, axes = plt.subplots(1, panels, figsize=(12 if panels == 2 else 7, 0.45 * len(names) + 1.8))
    axes = [axes] if panels == 1 else list(axes)
    height = 0.8 / len(passes)
    for i, pass_ in enumerate(passes):
        got = {m.contender: m for m in ok if m.pass_ == pass_}
        ys = [j + i * height for j in range(len(names))]
        if decode:
            vals = [got[n].tokens_per_s if n in got else 0 for n in names]
            axes[0].barh(ys, vals, height, label="tokens/s")
            for y, v in zip(ys, vals, strict=True):
                axes[0].text(v, y, f" {v:,.0f}", va="center", fontsize=7)
        else:
            vals = [got[n].median_s * 1e3 if n in got else 0 for n in names]
            axes[0].barh(ys, vals, height, label=pass_)
            for y, n in zip(ys, names, strict=True):
                if n in got and got[n].ratio is not None:
                    axes[0].text(got[n].median_s * 1e3, y, f" {got[n].ratio:.2f}×",
                                 va="center", fontsize=7)  # fmt: skip
            mem = [(got[n].memory_bytes or 0) / 2**20 if n in got else 0 for n in names]
            axes[1].barh(ys, mem, height, label=pass_)
    for ax in axes:
        ax.set_yticks([j + height * (len(passes) - 1) / 2 for j in range(len(names))], names)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8)
    baseline = results.settings["baseline"]
    if decode:
        axes[0].set_xscale("log")
        axes[0].set_xlabel("new tokens per second, log scale (higher is better)")
    else:
        axes[0].set_xlabel(f"median ms per call (labels: × {baseline})")
        axes[1].set_xlabel("peak memory of one call (MiB)")
    label = ok[0].label
    fig.suptitle(f"{title}\n{label}", fontsize=9)
    fig.tight_layout()
    _atomic.save_figure(fig, path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- compare


def compare(old: Results, new: Results, console: Console, threshold: float = 0.10) -> int:
    """Print what changed between two runs; returns how many regressions were flagged.

    A change is flagged only beyond noise: the new median is more than ``threshold`` slower
    (or faster) AND the two runs' interquartile ranges do not overlap.
    """
    kinds = [(r.settings.get("preset"), r.settings.get("device")) for r in (old, new)]
    if kinds[0] != kinds[1]:
        raise ValueError(
            "cannot compare runs of different presets or devices: "
            f"{kinds[0][0]} on {kinds[0][1]} vs {kinds[1][0]} on {kinds[1][1]}"
        )
    before = {(m.label, m.contender, m.pass_): m for m in old.measurements}
    table = Table(title="selfattn bench: changes (new vs old)", title_justify="left")
    for col, justify in (
        ("case", "left"),
        ("contender", "left"),
        ("pass", "left"),
        ("old ms", "right"),
        ("new ms", "right"),
        ("change", "right"),
        ("verdict", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    regressions = 0
    seen = set()
    for m in new.measurements:
        key = (m.label, m.contender, m.pass_)
        seen.add(key)
        cells, regressed = _change(before.get(key), m, threshold)
        if cells:
            table.add_row(*key, *cells)
        regressions += regressed
    for key in before:
        if key not in seen:
            table.add_row(*key, _ms(before[key].median_s), "", "", "[dim]gone[/]")
    console.print(table)
    _compare_footer(old, new, console, regressions, threshold)
    return regressions


def _change(o: Measurement | None, m: Measurement, threshold: float) -> tuple[list[str], bool]:
    """The cells old ms, new ms, change and verdict for one measurement (none when nothing is
    worth a row), and whether it regressed."""
    if o is None:
        return ["", _ms(m.median_s), "", "[dim]new[/]"], False
    if o.status != "ok" or m.status != "ok" or not o.median_s or not m.median_s:
        if o.status == m.status:
            return [], False
        regressed = o.status == "ok"  # it ran before; now it is wrong, skipped or failed
        verdict = f"{o.status} -> {m.status}"
        verdict = f"[bold red]{verdict}[/]" if regressed else verdict
        return [_ms(o.median_s), _ms(m.median_s), "", verdict], regressed
    change = m.median_s / o.median_s - 1.0
    slower = m.median_s > o.median_s * (1 + threshold) and m.q1_s > o.q3_s
    faster = m.median_s < o.median_s * (1 - threshold) and m.q3_s < o.q1_s
    if slower:
        verdict = "[bold red]REGRESSION[/]"
    elif faster:
        verdict = "[green]faster[/]"
    else:
        verdict = "[dim]within noise[/]"
    return [_ms(o.median_s), _ms(m.median_s), f"{change * 100:+.0f}%", verdict], slower


def _compare_footer(
    old: Results, new: Results, console: Console, regressions: int, threshold: float
) -> None:
    envs = [(r.environment.get("gpu") or r.environment.get("cpu"), r.environment.get("torch"))
            for r in (old, new)]  # fmt: skip
    if envs[0] != envs[1]:
        console.print(
            f"[yellow]note: the runs differ in machine or torch: {envs[0]} vs {envs[1]}[/]"
        )
    console.print(
        f"{regressions} regression(s) flagged (> {threshold:.0%} slower and outside both runs' "
        "interquartile ranges)"
    )
