"""deadrelu: find dead ReLU units in trained neural networks.

Public API: `scan`, `ScanOptions`, `ScanReport`, `SiteReport`, `Thresholds`, `__version__`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from deadrelu.judge import Thresholds  # noqa: E402
from deadrelu.report import ScanReport, SiteReport  # noqa: E402
from deadrelu.scan import ScanOptions, scan  # noqa: E402

__all__ = ["ScanOptions", "ScanReport", "SiteReport", "Thresholds", "__version__", "scan"]
