"""argparse ``type=`` converters shared by every sub-command: one wording for bad numbers."""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    return _float_where(text, lambda x: x >= 0, "a number >= 0")


def probability(text: str) -> float:
    """A probability such as a dropout rate: 0 <= P < 1."""
    return _float_where(text, lambda x: 0 <= x < 1, "a number 0 <= P < 1")


def int_in_range(text: str, low: int, high: int) -> int:
    value = _int_at_least(text, low, f"an integer {low}..{high}")
    if value > high:
        raise argparse.ArgumentTypeError(f"expected an integer {low}..{high}, got {value}")
    return value


def _float_where(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def seed(text: str) -> int:
    """A ``torch.manual_seed`` value: an integer in [0, 2**64)."""
    value = _int_at_least(text, 0, "a seed in [0, 2**64)")
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**64), got {value}")
    return value


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
