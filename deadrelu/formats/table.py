"""The terminal report: a rich table of sites in execution order, then a summary."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateReport, GateResult, plural
from deadrelu.report import ScanReport, SiteReport

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff, SiteDiff


def _num(value: float | None) -> str:
    """At most 6 characters: 2-3 significant digits, short exponents."""
    if value is None or value != value:
        return "-"
    text = f"{value:.3g}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"
    if "e" not in text and len(text) <= 6:
        return text
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


_OP_LABELS = {"leaky_relu": "leaky"}
_NUMERIC_COLUMNS = (("axis", 4), ("units", 5), ("dead", 4), ("near", 4), ("dorm", 4), ("active", 6),
                    ("mean", 6), ("std", 6), ("min", 6), ("max", 6))
# On a terminal too narrow for every column these go first, in this order: the site's name
# (folded, never dropped), its units and its dead/near-dead counts stay.
_DROPPED_FIRST = ("axis", "std", "min", "max", "dorm", "mean", "op", "active")


def _count(count: int, total: int, style: str) -> Text:
    return Text(str(count), style=style if count else "dim")


def site_table(report: ScanReport, console: Console | None = None) -> Table:
    """Every column, or on a console too narrow for them (under 80 columns) the ones that fit."""
    rows = [_row(site) for site in report.sites]
    dropped: list[str] = []
    while console is not None and len(dropped) < len(_DROPPED_FIRST) and _width(rows, dropped) > console.width:
        dropped.append(_DROPPED_FIRST[len(dropped)])
    return _table(report, rows, dropped)


_SITE_WIDTH = 12  # the folded name column's least width
# The width of output that goes to no terminal (a file, a pipe, a CI log): wider than any
# table, so site names stay whole on one line and grep finds them.
UNFOLDED_WIDTH = 10_000


def _width(rows: list[list[tuple[str, Text | str]]], dropped: list[str]) -> int:
    """Columns the table needs: the name folded to its least width, every other column as
    wide as its header or widest cell (they never wrap), and a separator a column."""
    widths = {"op": 5, **dict(_NUMERIC_COLUMNS)}
    for header, least in widths.items():
        widths[header] = max(least, len(header), *(len(str(cell)) for row in rows for h, cell in row if h == header))
    kept = [w for h, w in widths.items() if h not in dropped]
    return _SITE_WIDTH + sum(kept) + 1 + len(kept)


def _table(report: ScanReport, rows: list[list[tuple[str, Text | str]]], dropped: list[str]) -> Table:
    title = f"ReLU sites of {report.model.path}"
    if dropped:
        title += f" (hidden, too narrow: {', '.join(dropped)})"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 0), expand=False)
    table.add_column("site", overflow="fold", min_width=_SITE_WIDTH)
    if "op" not in dropped:
        table.add_column("op", no_wrap=True, min_width=5)
    for header, width in _NUMERIC_COLUMNS:
        if header not in dropped:
            table.add_column(header, justify="right", no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*(cell for header, cell in row if header not in dropped))
    return table


def _row(site: SiteReport) -> list[tuple[str, Text | str]]:
    m = site.preact
    name = Text(site.name, style="bold red" if site.verdict.collapsed else "")
    return [
        ("site", name),
        ("op", _OP_LABELS.get(site.op, site.op)),
        ("axis", str(site.unit_axis)),
        ("units", str(site.units)),
        ("dead", _count(site.dead, site.units, "bold red")),
        ("near", _count(len(site.verdict.near_dead), site.units, "yellow")),
        ("dorm", _count(len(site.verdict.dormant), site.units, "yellow")),
        ("active", f"{site.active_rate:.1%}"),
        ("mean", _num(m.mean)),
        ("std", _num(m.std)),
        ("min", _num(m.min)),
        ("max", _num(m.max)),
    ]


def summary_lines(report: ScanReport) -> list[str]:
    s = report.summary()
    lines = []
    if report.partial:
        lines.append(f"PARTIAL: interrupted after {report.data.samples} samples")
    if not report.sites:
        lines.append("No ReLU sites found: this model applies no ReLU, ReLU6, LeakyReLU or PReLU.")
        return lines
    lines.append(
        f"{s['sites']} sites, {s['units']} units, {s['dead']} dead ({s['dead_fraction']:.1%}), "
        f"{s['near_dead']} near-dead, {s['dormant']} dormant; {report.data.samples} samples"
    )
    if s["collapsed_sites"]:
        lines.append(f"COLLAPSED (every unit dead, all later layers see a constant): {', '.join(s['collapsed_sites'])}")
    nonfinite = [f"{site.name} ({int(site.stats.nan.sum())} NaN, {int(site.stats.inf.sum())} Inf)"
                 for site in report.sites if site.stats.nan.sum() or site.stats.inf.sum()]
    if nonfinite:
        lines.append(f"non-finite pre-activations, kept out of the moments: {', '.join(nonfinite)}")
    lines.append(
        f"A unit that never fired on {report.data.samples} samples fires on fewer than "
        f"{s['never_fired_bound']:.2%} of samples (95% confidence, rule of three)."
    )
    return lines


def render(report: ScanReport, console: Console) -> None:
    if report.sites:
        console.print(site_table(report, console))
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", highlight=False, markup=False)


# --- the table format (behind formats.interface) ---------------------------------------------

def gate_lines(gates: GateReport) -> list[Text]:
    """The gate verdict: every global gate, and the site gates that failed."""
    if not gates.active:
        return []
    status = Text("PASSED", style="bold green") if gates.passed else Text("FAILED", style="bold red")
    against = f", only units not in baseline {gates.baseline}" if gates.baseline else ""
    lines = [Text.assemble(f"Gates (counting {gates.kind_words} units{against}): ", status)]
    for result in gates.global_results():
        lines.append(_result_line(result))
    site_checks = [r for r in gates.all_results if r.site is not None]
    failed = [r for r in site_checks if not r.passed]
    lines.extend(_result_line(r) for r in failed)
    if site_checks:
        lines.append(Text(f"  {len(site_checks) - len(failed)} of {len(site_checks)} site checks passed", style="dim"))
    ignored = [s.name for s in gates.sites if s.ignored]
    if ignored:
        lines.append(Text(f"  ignored sites: {', '.join(ignored)}", style="dim"))
    lines.extend(Text(f"  warning: {note}", style="yellow") for note in gates.baseline_notes)
    return lines


def _result_line(result: GateResult) -> Text:
    mark = Text("  pass ", style="green") if result.passed else Text("  FAIL ", style="bold red")
    return Text.assemble(mark, result.message)


class TableFormat(ReportFormat):
    """The terminal report: site table, summary lines, warnings, gate verdict."""

    name = "table"
    supports_diff = True
    file_width = UNFOLDED_WIDTH  # a file has no width to fit: names are never folded

    def show(self, outcome: Outcome, console: Console) -> None:
        render(outcome.report, console)
        for line in gate_lines(outcome.gates):
            console.print(line, highlight=False)

    def render(self, outcome: Outcome) -> str:
        return _capture(lambda console: self.show(outcome, console), self.file_width)

    def show_diff(self, diff: ReportDiff, console: Console) -> None:
        table = Table(title=f"{diff.old_label} -> {diff.new_label}", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, padding=(0, 1), expand=False)
        table.add_column("site", overflow="fold", min_width=12)
        for header in ("units", "dead", "died", "revived", "active"):
            table.add_column(header, justify="right", no_wrap=True)
        for site in diff.sites:
            table.add_row(*_diff_row(site))
        console.print(table)
        for line in diff_lines(diff):
            console.print(line, highlight=False)

    def render_diff(self, diff: ReportDiff) -> str:
        return _capture(lambda console: self.show_diff(diff, console), self.file_width)


def _diff_row(site: SiteDiff) -> list[Text | str]:
    units = str(site.new_units if site.new_units is not None else site.old_units)
    if site.status == "both" and site.old_units != site.new_units:
        units = f"{site.old_units}->{site.new_units}"
    name = Text(site.name + {"added": " (new)", "removed": " (gone)"}.get(site.status, ""),
                style="dim" if site.ignored else "")
    change = site.active_rate_change
    active = "-" if change is None else f"{site.new_active_rate:.1%} ({change * 100:+.1f})"
    return [
        name, units, f"{site.old_dead}->{site.new_dead}",
        Text(str(len(site.died)), style="bold red" if site.died else "dim"),
        Text(str(len(site.revived)), style="green" if site.revived else "dim"),
        active,
    ]


def diff_lines(diff: ReportDiff) -> list[Text]:
    lines = [Text(f"{diff.died} {plural(diff.died, 'unit')} died, {diff.revived} revived; dead {diff.old.dead} -> {diff.new.dead} "
                  f"of {diff.new.units} units")]
    for site in diff.sites:
        if site.died and not site.ignored:
            lines.append(Text(f"  died    {site.name}: {_units(site.died)}"))
        if site.revived and not site.ignored:
            lines.append(Text(f"  revived {site.name}: {_units(site.revived)}"))
    lines.extend(Text(f"note: {note}", style="dim") for note in diff.notes)
    for result in diff.results:
        lines.append(_result_line(result))
    return lines


def _units(units: tuple[int, ...], limit: int = 20) -> str:
    shown = ", ".join(str(u) for u in units[:limit])
    return shown + (f", ... ({len(units)} in all)" if len(units) > limit else "")


def _capture(show, width: int) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False,
                      emoji=False)
    show(console)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())
