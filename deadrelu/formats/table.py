"""The terminal report: a rich table of sites in execution order, then a summary."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deadrelu.report import ScanReport, SiteReport


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


def _count(count: int, total: int, style: str) -> Text:
    return Text(str(count), style=style if count else "dim")


def site_table(report: ScanReport) -> Table:
    table = Table(title=f"ReLU sites of {report.model.path}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 0), expand=False)
    table.add_column("site", overflow="fold", min_width=12)
    table.add_column("op", no_wrap=True, min_width=5)
    for header, width in _NUMERIC_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    for site in report.sites:
        table.add_row(*_row(site))
    return table


def _row(site: SiteReport) -> list[Text | str]:
    m = site.preact
    name = Text(site.name, style="bold red" if site.verdict.collapsed else "")
    return [
        name,
        _OP_LABELS.get(site.op, site.op),
        str(site.unit_axis),
        str(site.units),
        _count(site.dead, site.units, "bold red"),
        _count(len(site.verdict.near_dead), site.units, "yellow"),
        _count(len(site.verdict.dormant), site.units, "yellow"),
        f"{site.active_rate:.1%}",
        _num(m.mean),
        _num(m.std),
        _num(m.min),
        _num(m.max),
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
    lines.append(
        f"A unit that never fired on {report.data.samples} samples fires on fewer than "
        f"{s['never_fired_bound']:.2%} of samples (95% confidence, rule of three)."
    )
    return lines


def render(report: ScanReport, console: Console) -> None:
    if report.sites:
        console.print(site_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", highlight=False, markup=False)
