"""GitHub Actions workflow commands: `::error` for failed gates, `::warning` for findings.

Messages and properties are escaped as the Actions toolkit does (`%`, CR, LF; and `:`
and `,` in properties), so a site name cannot end a command early or inject another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.formats.summary import diff_summary, scan_summary
from deadrelu.gates import FailOn, findings, plural

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff


def escape_data(text: str) -> str:
    return str(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(level: str, title: str, message: str) -> str:
    return f"::{level} title={escape_property(title)}::{escape_data(message)}"


class GithubFormat(ReportFormat):
    name = "github"
    supports_diff = True

    def render(self, outcome: Outcome) -> str:
        report, gates = outcome.report, outcome.gates
        lines = [command("error", f"deadrelu gate {r.gate}" + (f" at {r.site}" if r.site else ""), r.message)
                 for r in gates.failures]
        failed_sites = {r.site for r in gates.failures if r.site}
        kind = gates.policy.kind if gates.policy.kind is not FailOn.COLLAPSED else FailOn.DEAD
        for site, found in zip(report.sites, gates.sites, strict=True):
            units = findings(site, kind)
            if found.ignored or site.name in failed_sites or not units:
                continue
            what = "collapsed: every unit dead" if site.verdict.collapsed else (
                f"{len(units)} of {site.units} units {gates.kind_words.removeprefix('new ')}")
            lines.append(command("warning", f"deadrelu: {site.name}",
                                 f"{site.name}: {what} (units {_list(units)}) in {report.model.path}"))
        for warning in outcome.warnings:
            lines.append(command("warning", "deadrelu", warning))
        lines.append(scan_summary(report, gates)[0])
        return "\n".join(lines) + "\n"

    def render_diff(self, diff: ReportDiff) -> str:
        lines = [command("error", f"deadrelu gate {r.gate}", r.message) for r in diff.failures]
        for site in diff.sites:
            if site.died and not site.ignored:
                lines.append(command("warning", f"deadrelu: {site.name}",
                                     f"{site.name}: {len(site.died)} {plural(len(site.died), 'unit')} died (units {_list(site.died)})"))
        lines.append(diff_summary(diff)[0])
        return "\n".join(lines) + "\n"


def _list(units: tuple[int, ...], limit: int = 20) -> str:
    shown = ", ".join(str(u) for u in units[:limit])
    return shown + (f", ... {len(units)} in all" if len(units) > limit else "")
