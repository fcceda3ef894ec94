"""SARIF 2.1.0: one result per finding at a site (logical location = the site), one per
failed global gate. Upload to GitHub code scanning or open in any SARIF viewer.

Levels: `error` for the findings a failed gate counted at the site (dead units, then near-dead
and dormant ones as --fail-on widens; a failed whole-model gate counted those of every site
not ignored) and for failed global gates; otherwise `warning` for dead
units and collapsed sites, `note` for near-dead (DR002) and dormant (DR004) units. The model file is the physical location
(an artifact with its sha-256), so viewers that need a file have one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateResult, SiteFindings
from deadrelu.report import SiteReport

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"

RULES = (
    ("DR001", "dead-units", "ReLU units that never fire",
     "No pre-activation of these units was > 0 on any calibration sample: they output a constant and "
     "receive no gradient."),
    ("DR002", "near-dead-units", "ReLU units that almost never fire",
     "These units fire on fewer positions than the near-dead threshold."),
    ("DR003", "collapsed-site", "Every unit of a ReLU site is dead",
     "Everything after this site sees a constant: the layers after it cannot learn."),
    ("DR004", "dormant-units", "ReLU units whose output is tiny beside the site's other units",
     "The tau-dormant score of these units (mean output over the site's mean output, Sokar et al. 2023) is at "
     "or below tau: they fire, but contribute almost nothing."),
    ("DR100", "gate-failed", "A deadrelu gate failed",
     "A threshold over the whole model (max-dead, max-dead-fraction) was exceeded."),
)
_INDEX = {rule[0]: i for i, rule in enumerate(RULES)}
_DEFAULT_LEVEL = {"DR001": "warning", "DR002": "note", "DR003": "warning", "DR004": "note", "DR100": "error"}


def artifact_uri(path: str) -> str | None:
    """A URI reference for the model file; None for an in-memory model ('<MLP>')."""
    if not path or path.startswith("<"):
        return None
    p = Path(path)
    return p.as_uri() if p.is_absolute() else quote(p.as_posix())


class SarifFormat(ReportFormat):
    name = "sarif"

    def render(self, outcome: Outcome) -> str:
        return json.dumps(self.document(outcome), indent=2, allow_nan=False) + "\n"

    def document(self, outcome: Outcome) -> dict[str, Any]:
        from deadrelu import __version__

        report, gates = outcome.report, outcome.gates
        uri = artifact_uri(report.model.path)
        results: list[dict[str, Any]] = []
        found = {s.name: s for s in gates.sites}
        failed_globally = [r for r in gates.global_results() if not r.passed]
        for index, site in enumerate(report.sites):
            findings = found[site.name]
            failed = [r for r in gates.site_results(site.name) if not r.passed]
            if not findings.ignored:
                failed += failed_globally  # a whole-model gate counted this site's findings too
            results.extend(_site_results(site, index, failed, uri, findings))
        for gate in gates.global_results():
            if not gate.passed:
                result = _result("DR100", "error", gate.message,
                                 {"gate": gate.gate, "limit": gate.limit, "actual": gate.actual})
                if uri:
                    result["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": uri, "index": 0}}}]
                results.append(result)
        run: dict[str, Any] = {
            "tool": {"driver": {
                "name": "deadrelu", "version": __version__, "semanticVersion": __version__,
                "rules": [{"id": rid, "name": name, "shortDescription": {"text": short},
                           "fullDescription": {"text": full},
                           "defaultConfiguration": {"level": _DEFAULT_LEVEL[rid]}}
                          for rid, name, short, full in RULES],
            }},
            "invocations": [{"executionSuccessful": True,
                             "properties": {"gatesActive": gates.active, "gatesPassed": gates.passed,
                                            "failOn": gates.policy.kind.value}}],
            "logicalLocations": [{"name": s.name, "fullyQualifiedName": s.name, "kind": "module"}
                                 for s in report.sites],
            "results": results,
            "properties": {"data": report.data.source, "samples": report.data.samples,
                           "partial": report.partial},
        }
        if uri:
            artifact: dict[str, Any] = {"location": {"uri": uri}}
            if report.model.sha256:
                artifact["hashes"] = {"sha-256": report.model.sha256}
            run["artifacts"] = [artifact]
        return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}


def _site_results(site: SiteReport, index: int, failed: list[GateResult], uri: str | None,
                  findings: SiteFindings) -> list[dict[str, Any]]:
    """The site's findings, one result a kind. Where a failed gate (at the site, or over the
    whole model) counted some of them (`findings.counted`: dead, then near-dead, then
    dormant units by --fail-on; with a baseline only the new ones), the kinds holding them
    are errors, and the first carries the gates' messages; the rest stay warnings (dead)
    and notes."""
    gate = "; ".join(r.message for r in failed)
    v = site.verdict
    shown = set(v.dead) | set(v.near_dead)
    dormant = tuple(u for u in v.dormant if u not in shown)
    found: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = []
    if v.collapsed:
        found.append(("DR003", f"{site.name}: all {site.units} units are dead; everything after it sees a constant.",
                      {"units": site.units}, tuple(range(site.units))))
    elif site.dead:
        found.append(("DR001", f"{site.name}: {site.dead} of {site.units} units dead (units {_list(v.dead)}).",
                      {"units": site.units, "deadUnits": list(v.dead)}, v.dead))
    if v.near_dead:
        found.append(("DR002", f"{site.name}: {len(v.near_dead)} of {site.units} units near-dead "
                      f"(units {_list(v.near_dead)}).", {"units": site.units, "nearDeadUnits": list(v.near_dead)},
                      v.near_dead))
    if dormant and not v.collapsed:
        found.append(("DR004", f"{site.name}: {len(dormant)} of {site.units} units dormant "
                      f"(units {_list(dormant)}).", {"units": site.units, "dormantUnits": list(dormant)}, dormant))
    counted = set(findings.counted) if failed else set()
    at_fault = [rule for rule, _, _, units in found if counted & set(units)]
    levelled = []
    for rule, message, properties, _ in found:
        if rule in at_fault:
            suffix = f" Gate: {gate}" if rule == at_fault[0] else ""
            levelled.append((rule, "error", message + suffix, properties))
        else:
            levelled.append((rule, _DEFAULT_LEVEL[rule], message, properties))
    location: dict[str, Any] = {
        "logicalLocations": [{"name": site.name, "fullyQualifiedName": site.name, "kind": "module", "index": index}],
        "message": {"text": f"ReLU site {site.name} ({site.op}, unit axis {site.unit_axis})"},
    }
    if uri:
        location["physicalLocation"] = {"artifactLocation": {"uri": uri, "index": 0}}
    out = []
    for rule, rule_level, message, properties in levelled:
        result = _result(rule, rule_level, message, properties)
        result["locations"] = [location]
        if findings.ignored:
            result["suppressions"] = [{"kind": "external", "justification": "ignored by deadrelu configuration"}]
        out.append(result)
    return out


def _result(rule: str, level: str, message: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"ruleId": rule, "ruleIndex": _INDEX[rule], "level": level, "message": {"text": message},
            "properties": properties}


def _list(units: tuple[int, ...], limit: int = 20) -> str:
    shown = ", ".join(str(u) for u in units[:limit])
    return shown + (f", ... {len(units)} in all" if len(units) > limit else "")
