"""SARIF 2.1.0: one result per finding at a site (logical location = the site), one per
failed global gate. Upload to GitHub code scanning or open in any SARIF viewer.

Levels: `error` where a gate failed for the site (or globally), `warning` for dead units
and collapsed sites, `note` for near-dead units. The model file is the physical location
(an artifact with its sha-256), so viewers that need a file have one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateResult
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
    ("DR100", "gate-failed", "A deadrelu gate failed",
     "A threshold over the whole model (max-dead, max-dead-fraction) was exceeded."),
)
_INDEX = {rule[0]: i for i, rule in enumerate(RULES)}


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
        ignored = {s.name for s in gates.sites if s.ignored}
        for index, site in enumerate(report.sites):
            failed = [r for r in gates.site_results(site.name) if not r.passed]
            results.extend(_site_results(site, index, failed, uri, site.name in ignored))
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
                           "defaultConfiguration": {"level": "note" if rid == "DR002" else "warning"}}
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
                  ignored: bool) -> list[dict[str, Any]]:
    gate = "; ".join(r.message for r in failed)
    suffix = f" Gate: {gate}" if gate else ""
    level = "error" if failed else "warning"
    v = site.verdict
    found: list[tuple[str, str, str, dict[str, Any]]] = []
    if v.collapsed:
        found.append(("DR003", level, f"{site.name}: all {site.units} units are dead; everything after it sees "
                      f"a constant.{suffix}", {"units": site.units}))
    elif site.dead:
        found.append(("DR001", level, f"{site.name}: {site.dead} of {site.units} units dead "
                      f"(units {_list(v.dead)}).{suffix}", {"units": site.units, "deadUnits": list(v.dead)}))
    elif failed:  # a gate that counts near-dead or dormant units failed here
        found.append(("DR001", "error", f"{site.name}: {gate}", {"units": site.units}))
    if v.near_dead:
        found.append(("DR002", "note", f"{site.name}: {len(v.near_dead)} of {site.units} units near-dead "
                      f"(units {_list(v.near_dead)}).", {"units": site.units, "nearDeadUnits": list(v.near_dead)}))
    location: dict[str, Any] = {
        "logicalLocations": [{"name": site.name, "fullyQualifiedName": site.name, "kind": "module", "index": index}],
        "message": {"text": f"ReLU site {site.name} ({site.op}, unit axis {site.unit_axis})"},
    }
    if uri:
        location["physicalLocation"] = {"artifactLocation": {"uri": uri, "index": 0}}
    out = []
    for rule, rule_level, message, properties in found:
        result = _result(rule, rule_level, message, properties)
        result["locations"] = [location]
        if ignored:
            result["suppressions"] = [{"kind": "external", "justification": "ignored by deadrelu configuration"}]
        out.append(result)
    return out


def _result(rule: str, level: str, message: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"ruleId": rule, "ruleIndex": _INDEX[rule], "level": level, "message": {"text": message},
            "properties": properties}


def _list(units: tuple[int, ...], limit: int = 20) -> str:
    shown = ", ".join(str(u) for u in units[:limit])
    return shown + (f", ... {len(units)} in all" if len(units) > limit else "")
