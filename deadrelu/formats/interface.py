"""The one small interface every output format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from rich.console import Console

from deadrelu.errors import UsageError
from deadrelu.gates import GateReport
from deadrelu.report import ScanReport

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff


@dataclass(frozen=True)
class Outcome:
    """What a format renders: the report and how it fared against the gates."""

    report: ScanReport
    gates: GateReport

    @property
    def warnings(self) -> tuple[str, ...]:
        """The report's warnings, then where its baseline does not match it."""
        return (*self.report.warnings, *self.gates.baseline_notes)


class ReportFormat(ABC):
    """An output format: a name, and the text of a scan outcome (and, optionally, of a diff)."""

    name: ClassVar[str]
    supports_diff: ClassVar[bool] = False  # renders `deadrelu diff` too
    diff_formats: ClassVar[str] = "table, json, markdown or github"

    def check_available(self) -> None:
        """Raise `UsageError` if the format cannot work here (a missing optional dependency).
        Called before a scan starts, so that a long scan does not end in that error."""

    @abstractmethod
    def render(self, outcome: Outcome) -> str:
        """The whole document, as text (what `-o FILE` receives)."""

    def render_diff(self, diff: ReportDiff) -> str:
        raise UsageError(f"deadrelu diff: --format {self.name} is not supported (use {self.diff_formats})")  # see supports_diff

    def show(self, outcome: Outcome, console: Console) -> None:
        """Write the document to a terminal or pipe (stdout). The table format prints in colour."""
        _write(console, self.render(outcome))

    def show_diff(self, diff: ReportDiff, console: Console) -> None:
        _write(console, self.render_diff(diff))


def _write(console: Console, text: str) -> None:
    console.file.write(text)
    console.file.flush()
