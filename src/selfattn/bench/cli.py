"""`selfattn bench`: the arguments, and the run that turns them into a table, JSON and a plot.

`add_bench_parser(subparsers)` registers the sub-command on `selfattn.cli`'s parser; a bad value
is a one-line error and exit status 2 there (argparse errors and ValueErrors alike).
Exit status: 0 after a run; with --compare, 1 when a regression is flagged.
"""

from __future__ import annotations

import argparse
import sys

from selfattn._argtypes import (
    check_writable,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
    warn_if_more_threads_than_cores,
)
from selfattn.bench.presets import PRESETS


def _int_list(text: str) -> tuple[int, ...]:
    """ "128,256" or a doubling range "128..4096"."""
    try:
        if ".." in text:
            lo, hi = (int(t) for t in text.split("..", 1))
            if lo < 1 or hi < lo:
                raise ValueError
            values, v = [], lo
            while v <= hi:
                values.append(v)
                v *= 2
        else:
            values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 128,256 or 128..4096, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return tuple(values)


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


_CAUSAL = {"yes": (True,), "no": (False,), "both": (True, False)}


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """The ``bench`` sub-command: what to time (`_what_to_time`), how (`_how_to_time`), and where
    the figures go (`_outputs`)."""
    presets = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
    bench = subparsers.add_parser(
        "bench",
        help="time attention implementations against each other",
        description="Time attention implementations on the same inputs in one run, after "
        "checking each against a float64 reference, and report each as a ratio to a baseline. "
        f"Presets: {presets}.",
    )
    _what_to_time(bench)
    _how_to_time(bench)
    _outputs(bench)
    bench.set_defaults(run=run_bench)
    return bench


def _what_to_time(bench: argparse.ArgumentParser) -> None:
    """The preset, the contenders and the shapes of their inputs."""
    add = bench.add_argument
    add("--preset", choices=list(PRESETS), default="quick", help="what to run (default: quick)")
    add(
        "--contenders",
        type=_name_list,
        metavar="A,B",
        help="contenders to run (default: the preset's; --list shows them all)",
    )
    add("--baseline", metavar="NAME", help="the contender the ratio column divides by")
    add("--list", action="store_true", help="list the presets and contenders, then exit")
    add("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    add("--batch", type=_int_list, metavar="B[,B]", help="batch sizes")
    add("--heads", type=_int_list, metavar="H[,H]", help="numbers of heads")
    add("--head-dim", type=_int_list, metavar="E[,E]", help="head dims")
    add(
        "--lengths",
        type=_int_list,
        metavar="L[,L]|LO..HI",
        help="sequence lengths: a list, or a doubling range like 128..32768",
    )
    add("--causal", choices=tuple(_CAUSAL), help="causal masks, full ones, or both")
    add(
        "--dtype",
        type=_name_list,
        metavar="fp32[,bf16]",
        help="dtypes (default: fp32 on CPU, bf16 on CUDA)",
    )
    add("--passes", type=_name_list, metavar="fwd[,fwd+bwd]", help="which passes to time")
    add("--prompt", type=positive_int, help="decode preset: prompt length (default: 512)")
    add("--new-tokens", type=positive_int, help="decode preset: new tokens (default: 256)")
    add("--layers", type=positive_int, help="decode preset: attention layers (default: 2)")


def _how_to_time(bench: argparse.ArgumentParser) -> None:
    """Repeats, budgets, threads and the seed."""
    add = bench.add_argument
    add("--repeats", type=positive_int, help="timed repeats per contender and pass")
    add("--warmup", type=non_negative_int, help="untimed calls before the repeats")
    add(
        "--time-budget",
        type=positive_float,
        metavar="SECONDS",
        help="a contender stops at the length where one call would take longer",
    )
    add(
        "--memory-budget",
        type=positive_float,
        metavar="GIB",
        help="a contender stops at the length where it would need more (default: a quarter of "
        "RAM on a CPU, 60%% of GPU memory)",
    )
    add("--no-memory", action="store_true", help="skip the peak-memory measurements")
    add("--threads", type=positive_int, help="torch.set_num_threads before running")
    add("--seed", type=seed, default=0, help="seed of the weights and inputs (default: 0)")


def _outputs(bench: argparse.ArgumentParser) -> None:
    """The table on stdout, and the files and comparisons asked for."""
    add = bench.add_argument
    add("--json", metavar="FILE", help="write every figure and the environment to FILE")
    add("--plot", metavar="FILE.png", help="draw time and memory per contender (needs matplotlib)")
    add(
        "--compare",
        nargs=2,
        metavar=("OLD.json", "NEW.json"),
        help="compare two saved runs and flag regressions beyond noise (runs nothing)",
    )
    add("--quiet", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from selfattn.bench import report
    from selfattn.bench.runner import run_benchmark

    out = Console(width=None if sys.stdout.isatty() else 160)
    if args.compare:
        old, new = (report.read_json(p) for p in args.compare)
        return 1 if report.compare(old, new, out) else 0
    if args.list:
        _print_list(out)
        return 0
    if args.plot:
        report.check_plot_available()
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(flag, path)
    config = _config(args)
    warn_if_more_threads_than_cores("bench", args.threads)
    err = Console(stderr=True)
    with _RichProgress(err, disable=args.quiet or not err.is_terminal) as progress:
        results = run_benchmark(config, progress)
    report.render(results, out)
    if args.json:
        report.write_json(results, args.json)
        out.print(f"wrote {args.json}")
    if args.plot:
        report.plot(results, args.plot)
        out.print(f"wrote {args.plot}")
    return 0


def _config(args: argparse.Namespace):
    """The run the flags ask for; a flag left out takes the preset's value."""
    from selfattn.bench.presets import BenchConfig

    return BenchConfig(
        preset=args.preset,
        contenders=args.contenders,
        baseline=args.baseline,
        device=args.device,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        lengths=args.lengths,
        causal=_CAUSAL[args.causal] if args.causal else None,
        dtype=args.dtype,
        passes=args.passes,
        repeats=args.repeats,
        warmup=args.warmup,
        time_budget_s=args.time_budget,
        memory_budget_gib=args.memory_budget,
        measure_memory=not args.no_memory,
        threads=args.threads,
        seed=args.seed,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        layers=args.layers,
    )


def _print_list(console) -> None:
    from selfattn.bench.contenders import CONTENDERS, DECODERS

    console.print("[bold]presets[/]")
    for p in PRESETS.values():
        console.print(f"  {p.name:10} {p.summary}")
    console.print("[bold]contenders[/] (quick, book, scaling)")
    for c in CONTENDERS.values():
        console.print(f"  {c.name:18} {c.summary}")
    console.print("[bold]decode contenders[/]")
    for d in DECODERS.values():
        console.print(f"  {d.name:18} {d.summary}")


class _RichProgress:
    """A live progress bar on stderr, fed by the run's `Progress` calls."""

    def __init__(self, console, disable: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}", style="cyan"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=disable,
        )
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, total: int) -> None:
        self.task = self.bar.add_task("bench", total=total)

    def advance(self, description: str, steps: int = 1) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=steps, description=description[:70])
