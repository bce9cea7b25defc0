"""The `selfattn` command: argument parsing only; the work lives in `selfattn.explain` and
`selfattn.bench`.

Every usage error, and every ValueError / TypeError / OSError the work raises, becomes one line on
stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own: usage + message over two lines
        raise UsageError(f"{self.prog}: error: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from selfattn.explain import MODULE_KINDS

    parser = _Parser(prog="selfattn", description="Scaled dot-product self-attention, explained.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ex = sub.add_parser(
        "explain",
        help="walk through the attention computation step by step",
        description="Run a self-attention module on the chapter's example (or real text) and "
        "print every step: inputs, Q/K/V, scores, scaled scores, softmax weights, context.",
    )
    ex.add_argument("--module", choices=list(MODULE_KINDS), default="v1",
                    help="which module to explain (default: v1)")
    ex.add_argument("--seed", type=int, default=None,
                    help="torch.manual_seed before building it (default: 123; 789 for v2)")
    ex.add_argument("--d-out", type=_positive_int, default=2, help="output width (default: 2)")
    ex.add_argument("--heads", type=_positive_int, default=2,
                    help="heads for multi-head modules (default: 2)")
    ex.add_argument("--precision", type=_non_negative_int, default=4,
                    help="decimals shown (default: 4)")
    ex.add_argument("--json", action="store_true", help="print the run as JSON instead")
    ex.set_defaults(run=_run_explain)

    return parser


def _run_explain(args: argparse.Namespace) -> int:
    from selfattn.explain import explain_example
    from selfattn.explain.jsonout import to_json
    from selfattn.explain.terminal import make_console, render_walkthrough

    tr = explain_example(args.module, seed=args.seed, d_out=args.d_out, heads=args.heads)
    if args.json:
        json.dump(to_json(tr), sys.stdout)
        sys.stdout.write("\n")
    else:
        render_walkthrough(tr, make_console(), precision=args.precision)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `selfattn` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"selfattn: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
