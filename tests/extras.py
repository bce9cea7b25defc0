"""Optional test dependencies: skip where they are missing, fail where CI says they must be there.

`.ci/run` sets ``SELFATTN_REQUIRE_EXTRAS=1``: there, every test that needs an installed extra
(transformers, sentence-transformers, PIL, matplotlib, chromium, ...) must run, and a missing one
fails the test instead of skipping it quietly. On a developer's machine without them, they skip.
"""

from __future__ import annotations

import os
import shutil
from types import ModuleType

import pytest

REQUIRED = os.environ.get("SELFATTN_REQUIRE_EXTRAS", "") not in ("", "0")


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail with it where extras are required (CI)."""
    if REQUIRED:
        pytest.fail(f"SELFATTN_REQUIRE_EXTRAS is set but {reason}", pytrace=False)
    pytest.skip(reason)


def need_module(name: str) -> ModuleType:
    """``pytest.importorskip(name)``, except that it fails under SELFATTN_REQUIRE_EXTRAS."""
    try:
        return pytest.importorskip(name)
    except pytest.skip.Exception:
        missing(f"module {name!r} is not installed")
        raise  # unreachable: missing() raises


def need_program(*names: str) -> str:
    """The path of the first of ``names`` on PATH; skip (or fail in CI) when none is."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    missing(f"none of {', '.join(names)} is on PATH")
    raise AssertionError("unreachable")
