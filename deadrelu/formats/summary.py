"""One summary line for CI logs (stderr): what was found and whether the gates passed."""

from __future__ import annotations

from deadrelu.diff import ReportDiff
from deadrelu.gates import GateReport, GateResult, pct, pct_pair, plural
from deadrelu.report import ScanReport


def scan_summary(report: ScanReport, gates: GateReport) -> tuple[str, str]:
    """(line, style): e.g. 'deadrelu: FAILED 1 of 14 gate checks: max-dead (14 > 10); 13 sites,
    216 units, 14 dead (6.48%), 1 near-dead, 20 dormant'."""
    s = report.summary()
    found = (f"{s['sites']} sites, {s['units']} units, {s['dead']} dead ({pct(s['dead_fraction'])}), "
             f"{s['near_dead']} near-dead, {s['dormant']} dormant")
    if s["collapsed_sites"]:
        found += f", {len(s['collapsed_sites'])} collapsed"
    if report.partial:
        found += f"; PARTIAL ({report.data.samples} samples)"
    return _with_gates(found, gates.all_results if gates.active else None)


def diff_summary(diff: ReportDiff) -> tuple[str, str]:
    found = (f"{diff.died} {plural(diff.died, 'unit')} died, {diff.revived} revived; dead {diff.old.dead} -> {diff.new.dead} "
             f"of {diff.new.units} units in {len(diff.new.sites)} sites")
    return _with_gates(found, diff.results if diff.max_new_dead is not None else None, prefix="deadrelu diff")


def _with_gates(found: str, results: tuple[GateResult, ...] | None, prefix: str = "deadrelu") -> tuple[str, str]:
    if results is None:
        return f"{prefix}: {found}; no gates set", ""
    failed = [r for r in results if not r.passed]
    if not failed:
        return f"{prefix}: PASSED {len(results)} gate check{'s' if len(results) != 1 else ''}; {found}", "green"
    named = ", ".join(_short(r) for r in failed[:3]) + (f", +{len(failed) - 3} more" if len(failed) > 3 else "")
    return f"{prefix}: FAILED {len(failed)} of {len(results)} gate checks: {named}; {found}", "red"


def _short(result: GateResult) -> str:
    where = f" {result.site}" if result.site else ""
    if result.gate == "collapsed":
        return f"collapsed{where}"
    if isinstance(result.limit, float) and "fraction" in result.gate:
        actual, limit = pct_pair(result.actual, result.limit)
        return f"{result.gate}{where} ({actual} > {limit})"
    return f"{result.gate}{where} ({result.actual:g} > {result.limit:g})"
