"""Optional dependencies ("extras"): import one, or fail with a message that says what to install.

    matplotlib = require("matplotlib", "plot", "--png")
    # without matplotlib: MissingExtra: --png requires the 'plot' extra:
    #     pip install 'selfattn[plot]' (no module named 'matplotlib')

The CLI prints a `MissingExtra` as one line and exits with status 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A feature needs an optional dependency group ("extra") that is not installed."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} requires the {extra!r} extra: pip install 'selfattn[{extra}]' "
            f"(no module named {module!r})",
            name=module,
        )
        self.feature = feature
        self.extra = extra


def require(module_name: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module_name)``, or `MissingExtra` naming the extra to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise MissingExtra(feature, extra, module_name) from err
