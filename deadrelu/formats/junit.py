"""JUnit XML: one test case per site, failing where a gate fails for it; one per global gate.

CI systems (GitLab, Jenkins, Azure, the GitHub test-report actions) show these as tests.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from deadrelu.formats.interface import Outcome, ReportFormat
from deadrelu.gates import GateResult

# Characters XML 1.0 cannot carry at all, even escaped.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: object) -> str:
    return _NOT_XML.sub("?", str(value))


class JunitFormat(ReportFormat):
    name = "junit"

    def render(self, outcome: Outcome) -> str:
        report, gates = outcome.report, outcome.gates
        root = ET.Element("testsuites", name="deadrelu")
        sites = ET.SubElement(root, "testsuite", name="deadrelu.sites")
        props = ET.SubElement(sites, "properties")
        for key, value in (("model", report.model.path), ("model.sha256", report.model.sha256),
                           ("data", report.data.source), ("samples", report.data.samples),
                           ("fail-on", gates.policy.kind.value), ("baseline", gates.baseline or "")):
            ET.SubElement(props, "property", name=key, value=_text(value))
        counts = {"tests": 0, "failures": 0, "skipped": 0}
        for site in report.sites:
            case = ET.SubElement(sites, "testcase", classname="deadrelu.sites", name=_text(site.name), time="0")
            counts["tests"] += 1
            finding = next((f for f in gates.sites if f.name == site.name), None)
            if finding is not None and finding.ignored:
                ET.SubElement(case, "skipped", message="ignored by configuration")
                counts["skipped"] += 1
            else:
                failed = [r for r in gates.site_results(site.name) if not r.passed]
                if failed:
                    counts["failures"] += 1
                    _failure(case, failed)
            ET.SubElement(case, "system-out").text = _text(
                f"units={site.units} dead={site.dead} dead_units={list(site.verdict.dead)} "
                f"near_dead={len(site.verdict.near_dead)} dormant={len(site.verdict.dormant)} "
                f"collapsed={site.verdict.collapsed} active_rate={site.active_rate:.4f}")
        _counts(sites, counts)
        totals = dict(counts)
        global_results = gates.global_results()
        if global_results:
            suite = ET.SubElement(root, "testsuite", name="deadrelu.gates")
            gate_counts = {"tests": 0, "failures": 0, "skipped": 0}
            for result in global_results:
                case = ET.SubElement(suite, "testcase", classname="deadrelu.gates", name=result.gate, time="0")
                gate_counts["tests"] += 1
                if not result.passed:
                    gate_counts["failures"] += 1
                    _failure(case, [result])
                ET.SubElement(case, "system-out").text = _text(result.message)
            _counts(suite, gate_counts)
            totals = {k: totals[k] + gate_counts[k] for k in totals}
        _counts(root, totals, errors=False)
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _failure(case: ET.Element, failed: list[GateResult]) -> None:
    element = ET.SubElement(case, "failure", message=_text(failed[0].message), type=failed[0].gate)
    element.text = _text("\n".join(r.message for r in failed))


def _counts(element: ET.Element, counts: dict[str, int], errors: bool = True) -> None:
    element.set("tests", str(counts["tests"]))
    element.set("failures", str(counts["failures"]))
    element.set("errors", "0")
    if errors:
        element.set("skipped", str(counts["skipped"]))
