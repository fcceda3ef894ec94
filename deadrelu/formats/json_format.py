"""JSON: the report document of `--json` (report.schema.json) plus the gate results."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from deadrelu.formats.interface import Outcome, ReportFormat

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff


def document(outcome: Outcome) -> dict[str, Any]:
    return {**outcome.report.to_dict(), "gates": outcome.gates.to_dict()}


class JsonFormat(ReportFormat):
    name = "json"
    supports_diff = True

    def render(self, outcome: Outcome) -> str:
        return _dump(document(outcome))

    def render_diff(self, diff: ReportDiff) -> str:
        return _dump(diff.to_dict())


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"
