"""The `selfattn` command: argument parsing only; the work lives in `selfattn.explain`,
`selfattn.bench` and `selfattn.train` (train, generate).

Failures are one line on stderr, never a traceback:

- exit 2: a usage error, and every ValueError / TypeError / OSError / MissingExtra the work raises
  (bad input, an unwritable path, a missing extra);
- exit 1: the run itself failed, e.g. a RuntimeError from torch such as running out of memory;
- exit 130 (128 + SIGINT): interrupted by Ctrl-C (`selfattn train` saves a checkpoint first);
- exit 141 (128 + SIGPIPE), silently: the reader of stdout went away (``selfattn explain | head``),
  as with any Unix tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from selfattn._extras import MissingExtra

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool killed by SIGPIPE


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


EXIT_STATUS_HELP = (
    "exit status: 0 success; 1 failure while running; 2 usage error (a bad option or input); "
    "130 interrupted (Ctrl-C); 141 the output pipe closed."
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)  # every sub-command's --help says it
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's own: usage + message over two lines
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    from selfattn import __version__

    parser = _Parser(prog="selfattn", description="Scaled dot-product self-attention, explained.")
    parser.add_argument("--version", action="version", version=f"selfattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    from selfattn.explain.cli import add_explain_parser

    add_explain_parser(sub, checkpoint_traces=_training_run_traces)

    from selfattn.bench.cli import add_bench_parser

    add_bench_parser(sub)

    from selfattn.train.cli import add_train_parsers

    add_train_parsers(sub)
    return parser


def _training_run_traces(run_dir: str, text: str) -> list:
    """`selfattn explain --checkpoint DIR --text ...`: the run's trained GPT on the text, one
    trace per block. Here, above both explain and train, so that neither imports the other."""
    from selfattn.train.traces import trace_run

    return trace_run(run_dir, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `selfattn` console script; returns the exit status."""
    prog = "selfattn"  # "selfattn <command>" once the command is known: one error prefix
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help and --version print, then exit 0
            sys.stdout.flush()
            return int(done.code or 0)
        prog = f"selfattn {args.command}"
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except UsageError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("selfattn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, MissingExtra) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        print(f"{prog}: error: {_one_line(err, kind=True)}", file=sys.stderr)
        return EXIT_FAILURE


def _one_line(err: BaseException, *, kind: bool = False) -> str:
    """The first line of ``err``'s message (its type's name when empty), after the name if asked."""
    name = type(err).__name__
    text = str(err).strip()
    if not text:
        return name
    first = text.splitlines()[0]
    return f"{name}: {first}" if kind else first


def _silence_stdout() -> None:
    """Point stdout at /dev/null: Python's own flush at exit would fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file, e.g. a test's capture
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
