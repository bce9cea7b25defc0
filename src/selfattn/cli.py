"""The `selfattn` command: argument parsing only; the work lives in `selfattn.explain`,
`selfattn.bench` and `selfattn.train` (train, generate).

Failures are one line on stderr, never a traceback:

- exit 2: a usage error, and every ValueError / TypeError / OSError / MissingExtra the work raises
  (bad input, an unwritable path, a missing extra);
- exit 1: the run itself failed, e.g. a RuntimeError from torch such as running out of memory,
  or a file the run must keep could not be written (an error whose ``exit_status`` is 1, such as
  `selfattn.train.files.CheckpointWriteError`: a full disk, a read-only folder);
- exit 130 (128 + SIGINT), silently: interrupted by Ctrl-C, at any moment, even while torch loads
  (`selfattn train` saves a checkpoint first and says so);
- exit 141 (128 + SIGPIPE), silently: the reader of the output went away (``selfattn bench --json
  q.json | head -1``), as a shell reports a tool killed by SIGPIPE. The command carries on with
  its output going nowhere, so every file it was asked for is still written (`_ReaderGone`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from selfattn._errors import first_line
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

    add_explain_parser(
        sub, checkpoint_traces=_training_run_traces, checkpoint_scores=_checkpoint_head_scores
    )

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


def _checkpoint_head_scores(folder: str, seed: int | None) -> dict:
    """`selfattn explain --checkpoint DIR --induction-scores`: every head's scores (here, as
    `_training_run_traces`, so that explain does not import train)."""
    from selfattn.train.head_scores import checkpoint_head_scores

    return checkpoint_head_scores(folder, seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `selfattn` console script; returns the exit status.

    This module imports only the standard library; torch and the commands load inside the
    ``try`` below, so Ctrl-C at any moment, even while torch loads, is exit 130 without a
    traceback. stdout and stderr are `_ReaderGone` guards for the whole command.
    """
    prog = "selfattn"  # "selfattn <command>" once the command is known: one error prefix
    out, err = _ReaderGone.install()
    try:
        try:
            args, unknown = build_parser().parse_known_args(argv)
        except SystemExit as done:  # --help and --version print, then exit 0
            sys.stdout.flush()
            return _status(int(done.code or 0), out, err)
        prog = f"selfattn {args.command}"
        if unknown:  # named after the command, as its other usage errors are
            raise UsageError(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}")
        status = args.run(args)
        sys.stdout.flush()
        return _status(status, out, err)
    except UsageError as error:
        print(str(error).splitlines()[0], file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # a write that went around the guards, e.g. to sys.stdout.buffer
        _silence(sys.stdout)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # quiet, as a shell shows ^C; `selfattn train` says what it saved
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, MissingExtra) as error:
        print(f"{prog}: error: {first_line(error)}", file=sys.stderr)
        return getattr(error, "exit_status", EXIT_USAGE)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        print(f"{prog}: error: {first_line(error, kind=True)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream


def _status(status: int, *guards: _ReaderGone) -> int:
    """The command's status, or 141 when a reader went away while it ran."""
    return EXIT_BROKEN_PIPE if any(guard.gone for guard in guards) else status


class _ReaderGone:
    """stdout (or stderr) for the span of a command: when its reader goes away (``selfattn ... |
    head -1``), the rest of the output goes to /dev/null and the command carries on, so every
    file it was asked for is still written; `main` then exits 141 without a word.

    Every writer goes through it: print, json.dump and rich's consoles (which write to
    ``sys.stdout``; left to themselves they end the process with status 1 on a closed pipe).
    """

    def __init__(self, stream) -> None:
        self.stream = stream
        self.gone = False

    @classmethod
    def install(cls) -> tuple[_ReaderGone, _ReaderGone]:
        sys.stdout, sys.stderr = out, err = cls(sys.stdout), cls(sys.stderr)
        return out, err

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._went_away()
            return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._went_away()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, buffer, ...
        return getattr(self.stream, name)

    def _went_away(self) -> None:
        self.gone = True
        _silence(self.stream)


def _silence(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null: the output still buffered, and Python's
    own flush at exit, then go nowhere instead of failing on the closed pipe again."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file, e.g. a test's capture
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
