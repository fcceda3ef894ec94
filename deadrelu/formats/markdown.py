"""Markdown for `$GITHUB_STEP_SUMMARY` and pull-request comments (GitHub-flavoured tables)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateReport, GateResult, pct, pct_pair, plural
from deadrelu.report import ScanReport, SiteReport

if TYPE_CHECKING:
    from deadrelu.diff import ReportDiff

PASS, FAIL = "✅", "❌"
MAX_LISTED_UNITS = 12


def code(text: str, table: bool = True) -> str:
    """`text` as an inline code span; in a table cell, its pipes escaped (GFM splits cells first)."""
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if table else span


def cell(text: str) -> str:
    """Plain text for a table cell: Markdown and HTML specials escaped, one line."""
    text = " ".join(str(text).split())
    for char in "\\`*_{}[]<>#|!":
        text = text.replace(char, "\\" + char)
    return text


def units_list(units: tuple[int, ...]) -> str:
    shown = ", ".join(str(u) for u in units[:MAX_LISTED_UNITS])
    return shown + (f", … ({len(units)})" if len(units) > MAX_LISTED_UNITS else "")


class MarkdownFormat(ReportFormat):
    name = "markdown"
    supports_diff = True

    def render(self, outcome: Outcome) -> str:
        report, gates = outcome.report, outcome.gates
        out = [f"## deadrelu: {code(report.model.path, table=False)}", "", _verdict(gates), "", _summary(report), ""]
        if gates.active:
            out += ["### Gates", "", *_gate_table(gates), ""]
        flagged = [s for s in report.sites if s.dead or s.verdict.near_dead or s.verdict.collapsed]
        if flagged:
            out += ["### Sites with dead or near-dead units", "", *_site_table(flagged, gates), ""]
        if report.sites and len(flagged) < len(report.sites):
            out += [f"<details><summary>All {len(report.sites)} sites</summary>", "",
                    *_site_table(report.sites, gates), "", "</details>", ""]
        if outcome.warnings:
            out += ["### Warnings", "", *[f"- {cell(w)}" for w in outcome.warnings], ""]
        out.append(f"<sub>deadrelu {_version()} · model sha256 {code(report.model.sha256[:16] or '-', table=False)} · "
                   f"data {code(report.data.source, table=False)}</sub>")
        return "\n".join(out) + "\n"

    def render_diff(self, diff: ReportDiff) -> str:
        out = [f"## deadrelu diff: {code(diff.old_label, table=False)} → {code(diff.new_label, table=False)}", ""]
        if diff.results:
            out += [f"{PASS if diff.passed else FAIL} **{'PASSED' if diff.passed else 'FAILED'}**: "
                    + "; ".join(cell(r.message) for r in diff.results), ""]
        out += [f"**{diff.died}** {plural(diff.died, 'unit')} died, **{diff.revived}** revived; dead {diff.old.dead} → {diff.new.dead} "
                f"of {diff.new.units} units.", ""]
        changed = [s for s in diff.sites if s.changed]
        if changed:
            out += ["| site | units | dead | units died | units revived | active rate |", "|---|--:|--:|--:|--:|--:|"]
            for s in changed:
                units = s.new_units if s.new_units is not None else s.old_units
                rate = ("-" if s.active_rate_change is None
                        else f"{s.new_active_rate:.1%} ({s.active_rate_change * 100:+.1f} pp)")
                status = {"added": " (new)", "removed": " (gone)"}.get(s.status, "")
                ignored = " (ignored)" if s.ignored else ""
                out.append(f"| {code(s.name)}{status}{ignored} | {units} | {s.old_dead} → {s.new_dead} | "
                           f"{units_list(s.died) or 'none'} | {units_list(s.revived) or 'none'} | {rate} |")  # indices, not counts
            out.append("")
        else:
            out += ["No site changed its dead units.", ""]
        out += [f"- {cell(n)}" for n in diff.notes]
        return "\n".join(out).rstrip("\n") + "\n"


def _verdict(gates: GateReport) -> str:
    if not gates.active:
        return "No gates set: findings are reported, nothing fails."
    checks = len(gates.all_results)
    if gates.passed:
        counted = f"all {checks} gate checks" if checks != 1 else "the 1 gate check"
        return f"{PASS} **PASSED**: {counted} (counting {cell(gates.kind_words)} units)."
    return (f"{FAIL} **FAILED**: {len(gates.failures)} of {checks} gate checks "
            f"(counting {cell(gates.kind_words)} units).")


def _summary(report: ScanReport) -> str:
    s = report.summary()
    line = (f"{s['sites']} sites, {s['units']} units: **{s['dead']} dead** ({pct(s['dead_fraction'])}), "
            f"{s['near_dead']} near-dead, {s['dormant']} dormant; {report.data.samples} samples "
            f"(a unit that never fired fires on fewer than {s['never_fired_bound']:.2%} of samples, 95% confidence).")
    if s["collapsed_sites"]:
        line += "\n\n**Collapsed** (every unit dead): " + ", ".join(code(n, table=False) for n in s["collapsed_sites"])
    if report.partial:
        line = f"**PARTIAL**: interrupted after {report.data.samples} samples.\n\n" + line
    return line


def _gate_table(gates: GateReport) -> list[str]:
    rows = ["| | gate | site | actual | limit | |", "|---|---|---|--:|--:|---|"]
    shown: list[GateResult] = [*gates.global_results(), *(r for r in gates.failures if r.site is not None)]
    for r in shown:
        fraction = "fraction" in r.gate
        actual, limit = pct_pair(r.actual, r.limit) if fraction else (f"{r.actual:g}", f"{r.limit:g}")
        rows.append(f"| {PASS if r.passed else FAIL} | {r.gate} | {code(r.site) if r.site else 'all sites'} | "
                    f"{actual} | {limit} | {cell(r.message)} |")
    site_checks = [r for r in gates.all_results if r.site is not None]
    passed = sum(1 for r in site_checks if r.passed)
    rows += ["", f"{passed} of {len(site_checks)} site checks passed."]
    if gates.baseline:
        rows.append(f"Counting only units not in the baseline {code(gates.baseline, table=False)}.")
    ignored = [s.name for s in gates.sites if s.ignored]
    if ignored:
        rows.append("Ignored: " + ", ".join(code(n, table=False) for n in ignored))
    return rows


def _site_table(sites: list[SiteReport] | tuple[SiteReport, ...], gates: GateReport) -> list[str]:
    rows = ["| site | op | units | dead | near-dead | dormant | active | dead units | gate |",
            "|---|---|--:|--:|--:|--:|--:|---|---|"]
    for s in sites:
        results = gates.site_results(s.name)
        gate = "-" if not results else (PASS if all(r.passed for r in results) else FAIL)
        name = code(s.name) + (" **collapsed**" if s.verdict.collapsed else "")
        rows.append(f"| {name} | {s.op} | {s.units} | {s.dead} | {len(s.verdict.near_dead)} | "
                    f"{len(s.verdict.dormant)} | {s.active_rate:.1%} | {units_list(s.verdict.dead) or '-'} | {gate} |")
    return rows


def _version() -> str:
    from deadrelu import __version__

    return __version__
