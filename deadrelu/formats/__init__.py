"""Output formats, one module each, behind `formats.interface.ReportFormat`.

`get_format(name)` returns one; `deliver` sends a rendered outcome to stdout or to a file
(atomically) and `summarize` prints the one-line summary for CI logs on stderr.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from deadrelu.errors import UsageError
from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.outputs import write_atomic

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff

# name -> (module, class); modules are imported on demand (html pulls in matplotlib).
_REGISTRY = {
    "table": ("deadrelu.formats.table", "TableFormat"),
    "json": ("deadrelu.formats.json_format", "JsonFormat"),
    "markdown": ("deadrelu.formats.markdown", "MarkdownFormat"),
    "junit": ("deadrelu.formats.junit", "JunitFormat"),
    "sarif": ("deadrelu.formats.sarif", "SarifFormat"),
    "github": ("deadrelu.formats.github", "GithubFormat"),
    "html": ("deadrelu.formats.html", "HtmlFormat"),
}
FORMAT_NAMES = tuple(_REGISTRY)

__all__ = ["FORMAT_NAMES", "Outcome", "ReportFormat", "deliver", "deliver_diff", "get_format"]


def get_format(name: str) -> ReportFormat:
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"--format '{name}': expected one of {', '.join(FORMAT_NAMES)}") from None
    return getattr(importlib.import_module(module), cls)()


def deliver(fmt: ReportFormat, outcome: Outcome, output: Path | None, *, quiet: bool, stdout: Console) -> None:
    """The report to `output` (atomically) or, unless quiet, to stdout."""
    if output is not None:
        write_atomic(output, fmt.render(outcome))
    elif not quiet:
        fmt.show(outcome, stdout)


def deliver_diff(fmt: ReportFormat, diff: ReportDiff, output: Path | None, *, quiet: bool, stdout: Console) -> None:
    if output is not None:
        write_atomic(output, fmt.render_diff(diff))
    elif not quiet:
        fmt.show_diff(diff, stdout)
