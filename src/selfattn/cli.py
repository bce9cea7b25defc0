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

from selfattn._argtypes import non_negative_int, positive_int, seed
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
    from selfattn.explain import MODULE_KINDS
    from selfattn.explain.run import dropout_rate, precision

    parser = _Parser(prog="selfattn", description="Scaled dot-product self-attention, explained.")
    parser.add_argument("--version", action="version", version=f"selfattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ex = sub.add_parser(
        "explain",
        help="walk through the attention computation step by step",
        description="Run a self-attention module on the chapter's example (or real text) and "
        "print every step: inputs, Q/K/V, scores, scaled scores, mask, softmax weights, dropout, "
        "context, heads merged and out_proj. An option that does not apply to the run asked for "
        "is a usage error.",
    )
    which = ex.add_mutually_exclusive_group()
    which.add_argument(
        "--module",
        choices=list(MODULE_KINDS),
        default=None,
        help="which module to explain (default: v1); simple: no trainable weights, the "
        "chapter's starting point",
    )
    which.add_argument(
        "--model",
        choices=["minilm"],
        default=None,
        help="a real pretrained model instead: all-MiniLM-L6-v2's own attention, 6 layers of "
        "12 heads (needs the 'text' extra)",
    )
    which.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="a model trained by `selfattn train` (its folder): its attention on --text, one "
        "layer per block, the run's tokens as labels",
    )
    ex.add_argument(
        "--text",
        default=None,
        help="real text: tokenized by MiniLM's tokenizer and fed its pretrained word embeddings "
        "(default: the chapter's six-token example; needs the 'text' extra)",
    )
    ex.add_argument(
        "--truncate", action="store_true", help="cut --text past the model's 512 tokens"
    )
    ex.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="torch.manual_seed before building it, and for --dropout (default: 123; 789 for v2)",
    )
    ex.add_argument(
        "--d-out",
        type=positive_int,
        default=None,
        help="output width (default: 2; 64 with --text)",
    )
    ex.add_argument(
        "--heads",
        type=positive_int,
        default=None,
        help="heads for --module wrapper or mha (default: 2)",
    )
    ex.add_argument(
        "--dropout",
        type=dropout_rate,
        default=None,
        metavar="P",
        help="also show the weights after dropout in training mode (0 <= P < 1), seeded",
    )
    ex.add_argument(
        "--layer",
        type=non_negative_int,
        default=None,
        help="which layer, for --model or --checkpoint (default: 0)",
    )
    ex.add_argument(
        "--head",
        type=non_negative_int,
        default=None,
        help="show one head only (default: every head; head 0 for --model's walkthrough and JSON)",
    )
    ex.add_argument(
        "--precision", type=precision, default=None, help="decimals shown, 0..8 (default: 4)"
    )
    ex.add_argument("--json", action="store_true", help="print the run as JSON instead")
    ex.add_argument(
        "--png",
        metavar="FILE",
        default=None,
        help="save heatmaps, one per head, as an image: .png, or .svg / .pdf by the name",
    )
    ex.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="save one self-contained, offline web page to explore every step, head and layer",
    )
    ex.add_argument(
        "--step",
        choices=["weights", "scores", "scaled_scores"],
        default=None,
        help="what --png draws, and the step --html opens on (default: weights)",
    )
    ex.set_defaults(run=_run_explain)

    from selfattn.bench.cli import add_bench_parser

    add_bench_parser(sub)

    from selfattn.train.cli import add_train_parsers

    add_train_parsers(sub)
    return parser


def _run_explain(args: argparse.Namespace) -> int:
    from selfattn.explain.run import ExplainRequest, run_explain

    fields = ExplainRequest.__dataclass_fields__
    run_explain(ExplainRequest(**{name: getattr(args, name) for name in fields}))
    return 0


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
