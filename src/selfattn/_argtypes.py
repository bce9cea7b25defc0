"""argparse ``type=`` converters shared by every sub-command: text parsed, then held to the same
checks as the API (`selfattn._checks`), so a flag and its setting accept the same values and say
the same words."""

from __future__ import annotations

import argparse
import os
import sys

from selfattn import _checks as checks


def positive_int(text: str) -> int:
    return _converted(text, int, checks.positive_int)


def non_negative_int(text: str) -> int:
    return _converted(text, int, checks.non_negative_int)


def int_in_range(text: str, low: int, high: int) -> int:
    return _converted(text, int, lambda name, value: checks.int_in_range(name, value, low, high))


def seed(text: str) -> int:
    """A ``torch.manual_seed`` value: an integer in [0, 2**64)."""
    return _converted(text, int, checks.seed)


def positive_float(text: str) -> float:
    return _converted(text, float, checks.positive_float)


def non_negative_float(text: str) -> float:
    return _converted(text, float, checks.non_negative_float)


def probability(text: str) -> float:
    """A probability such as a dropout rate: 0 <= P < 1."""
    return _converted(text, float, checks.probability)


def _converted(text: str, parse, check):
    """``text`` parsed, then held to the check the API uses (`selfattn._checks`), whose message
    becomes argparse's: "argument --lr: expected a finite number > 0, got inf"."""
    try:
        value = parse(text)
    except ValueError:
        value = text  # not a number at all: the check says what was expected
    try:
        return check(None, value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def warn_if_more_threads_than_cores(command: str, threads: int | None) -> None:
    """One line on stderr when ``--threads`` asks for more threads than the machine has cores
    (the run goes on: oversubscribed threads are slower, not wrong)."""
    cores = os.cpu_count()
    if threads is not None and cores is not None and threads > cores:
        noun = "core" if cores == 1 else "cores"
        print(
            f"selfattn {command}: warning: --threads {threads} is more than this machine's "
            f"{cores} {noun}",
            file=sys.stderr,
        )


def check_writable(flag: str, path: str) -> None:
    """Fail before any work when ``path`` cannot be written, naming the flag and the path.

    The file is opened for appending (nothing is truncated); a file created by the check is
    removed again.
    """
    if os.path.isdir(path):
        raise ValueError(f"cannot write {flag} {path}: it is a directory")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {flag} {path}: no such directory {folder}")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {flag} {path}: {err.strerror}") from None
    if not existed:
        os.remove(path)
