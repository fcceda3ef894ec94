"""deadrelu: find dead ReLU units in trained neural networks.

Public API: `scan`, `ScanOptions`, `ScanReport`, `SiteReport`, `Thresholds`, `__version__`.

The API is imported on first use (PEP 562), not with the package: importing any module of
deadrelu would otherwise import torch (about 1.5 s), and the command line could not catch
a Ctrl-C made meanwhile (`deadrelu.__main__.main`).
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {"ScanOptions": "deadrelu.scan", "scan": "deadrelu.scan", "ScanReport": "deadrelu.report",
        "SiteReport": "deadrelu.report", "Thresholds": "deadrelu.judge", "AxisOverride": "deadrelu.sites"}

if TYPE_CHECKING:
    from deadrelu.judge import Thresholds
    from deadrelu.report import ScanReport, SiteReport
    from deadrelu.scan import ScanOptions, scan
    from deadrelu.sites import AxisOverride


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'deadrelu' has no attribute '{name}'")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


class _Package(ModuleType):
    """The package, whose `scan` stays the function: importing the submodule `deadrelu.scan`
    (which the import system then sets as the package's attribute) does not shadow it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["AxisOverride", "ScanOptions", "ScanReport", "SiteReport", "Thresholds", "__version__", "scan"]
