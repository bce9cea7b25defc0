"""Hypothesis profiles for the property tests (tests/test_properties.py).

- "ci" (the default): derandomized, so every run draws the same examples and a failure in CI
  is a failure on every machine; sized so tests/test_properties.py takes about a minute on 2 cores.
- "fuzz": thousands of fresh random examples per test, for `make fuzz`. Failures are kept in the
  local example database (.hypothesis/, git-ignored) and replayed first on the next run.

Pick one with the environment variable HYPOTHESIS_PROFILE (``HYPOTHESIS_PROFILE=fuzz pytest ...``).
``print_blob=True`` makes a failure print the line that replays it exactly
(``@reproduce_failure(...)``).
"""

import os

from hypothesis import settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=3000,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
