"""Output formats: golden table/markdown/github, JUnit parsed as XML, SARIF and JSON against
their schemas, escaping, and where each output goes (stdout, -o FILE, stderr).

Golden files live in tests/golden/; rewrite them with `python -m pytest tests/test_formats.py --update-golden`.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from synthetic import SAMPLE, Site, make_report, sample_report
from typer.testing import CliRunner

from deadrelu.cli import app
from deadrelu.diff import diff_reports
from deadrelu.formats import FORMAT_NAMES, get_format
from deadrelu.formats.github import escape_data, escape_property
from deadrelu.formats.interface import Outcome
from deadrelu.formats.markdown import code
from deadrelu.gates import FailOn, GatePolicy, evaluate
from deadrelu.report import json_schema

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
COLLAPSED = SAMPLE[3].name
POLICY = GatePolicy(max_dead=5, max_site_dead_fraction=0.15, ignore=("stem.*",))


def outcome(policy: GatePolicy = POLICY) -> Outcome:
    report = sample_report()
    return Outcome(report, evaluate(report, policy))


def sample_diff():
    old = make_report([Site("stem.relu", 8, dead=(3,)), Site("layer1.0.relu", 16, dead=(1, 5)),
                       Site("gone.relu", 4)])
    new = make_report([Site("stem.relu", 8), Site("layer1.0.relu", 16, dead=(1, 5, 9, 11)),
                       Site("new.relu", 4, dead=(2,))])
    return diff_reports(old, new, old_label="step-1000.json", new_label="step-2000.json", max_new_dead=2)


def check_golden(name: str, text: str, update: bool) -> None:
    path = GOLDEN / name
    if update or not path.exists():
        path.write_text(text, encoding="utf-8")
        if not update:
            pytest.fail(f"golden file {path} did not exist: written; check it and run again")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file (--update-golden rewrites it)"


@pytest.mark.parametrize(("fmt", "golden"), [("table", "table.txt"), ("markdown", "markdown.md"),
                                             ("github", "github.txt")])
def test_golden_outputs(fmt: str, golden: str, update_golden: bool) -> None:
    check_golden(golden, get_format(fmt).render(outcome()), update_golden)


@pytest.mark.parametrize(("fmt", "golden"), [("table", "diff_table.txt"), ("markdown", "diff_markdown.md"),
                                             ("github", "diff_github.txt")])
def test_golden_diff_outputs(fmt: str, golden: str, update_golden: bool) -> None:
    check_golden(golden, get_format(fmt).render_diff(sample_diff()), update_golden)


def test_every_format_renders_without_gates() -> None:
    plain = outcome(GatePolicy())
    for name in FORMAT_NAMES:
        assert get_format(name).render(plain).strip(), name


def test_every_format_renders_a_model_without_sites() -> None:
    report = make_report([])
    gates = evaluate(report, GatePolicy(max_dead=0))
    for name in FORMAT_NAMES:
        assert get_format(name).render(Outcome(report, gates)).strip(), name
    assert gates.passed and gates.counted_fraction == 0.0


def test_junit_has_one_case_per_site_failing_where_a_gate_fails() -> None:
    root = ET.fromstring(get_format("junit").render(outcome()))
    assert root.tag == "testsuites"
    sites = root.find("testsuite[@name='deadrelu.sites']")
    cases = sites.findall("testcase")
    assert [c.get("name") for c in cases] == [s.name for s in SAMPLE]
    status = {c.get("name"): ("failure" if c.find("failure") is not None
                              else "skipped" if c.find("skipped") is not None else "pass") for c in cases}
    assert status == {"stem.relu": "skipped", "layer1.0.relu": "failure", "layer1.0.relu_1": "pass",
                      COLLAPSED: "failure", SAMPLE[4].name: "pass"}
    failure = sites.find(f"testcase[@name='{SAMPLE[1].name}']/failure")
    assert failure.get("type") == "max-site-dead-fraction" and "3 of 16 units dead" in failure.get("message")
    collapsed = [c for c in cases if c.get("name") == COLLAPSED][0].find("failure")
    assert collapsed.get("type") == "collapsed"
    assert (sites.get("tests"), sites.get("failures"), sites.get("skipped")) == ("5", "2", "1")
    gates = root.find("testsuite[@name='deadrelu.gates']")
    assert [(c.get("name"), c.find("failure") is not None) for c in gates.findall("testcase")] == [("max-dead", True)]
    assert (root.get("tests"), root.get("failures")) == ("6", "3")


def test_sarif_is_valid_sarif_2_1_0() -> None:
    schema = json.loads((HERE / "schemas" / "sarif-schema-2.1.0.json").read_text())
    doc = json.loads(get_format("sarif").render(outcome()))
    jsonschema.Draft4Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(e.message for e in errors[:5])
    run = doc["runs"][0]
    assert doc["version"] == "2.1.0" and run["tool"]["driver"]["name"] == "deadrelu"
    assert [loc["name"] for loc in run["logicalLocations"]] == [s.name for s in SAMPLE]
    by_site = {}
    for result in run["results"]:
        for loc in result.get("locations", []):
            for logical in loc.get("logicalLocations", []):
                by_site.setdefault(logical["name"], []).append((result["ruleId"], result["level"]))
    assert by_site["layer1.0.relu"] == [("DR001", "error"), ("DR002", "note")]
    assert by_site[COLLAPSED] == [("DR003", "error")]
    assert by_site[SAMPLE[4].name] == [("DR002", "note")]
    stem = [r for r in run["results"] if r["locations"][0].get("logicalLocations", [{}])[0].get("name") == "stem.relu"]
    assert stem[0]["suppressions"][0]["kind"] == "external"  # ignored by configuration
    assert [r["ruleId"] for r in run["results"] if "logicalLocations" not in r["locations"][0]] == ["DR100"]
    assert run["artifacts"][0]["location"]["uri"] == "models/net.pt"


@pytest.mark.parametrize(("kind", "expected"), [
    (FailOn.DEAD, {"a": [("DR001", "error"), ("DR002", "note")], "b": [("DR002", "note")], "c": [("DR004", "note")]}),
    (FailOn.NEAR_DEAD, {"a": [("DR001", "error"), ("DR002", "error")], "b": [("DR002", "error")],
                        "c": [("DR004", "note")]}),
    (FailOn.DORMANT, {"a": [("DR001", "error"), ("DR002", "error")], "b": [("DR002", "error")],
                      "c": [("DR004", "error")]}),
])
def test_sarif_errors_are_the_findings_the_failed_gate_counted(kind: FailOn, expected: dict) -> None:
    """A gate that failed on near-dead or dormant units alone is no 'dead-units' (DR001) result."""
    schema = json.loads((HERE / "schemas" / "sarif-schema-2.1.0.json").read_text())
    report = make_report([Site("a", 8, dead=(1,), near=(2,)), Site("b", 8, near=(3,)), Site("c", 8, dormant=(4,))])
    gates = evaluate(report, GatePolicy(fail_on=kind, max_dead=100, max_site_dead_fraction=0.0))
    doc = json.loads(get_format("sarif").render(Outcome(report, gates)))
    jsonschema.validate(doc, schema, cls=jsonschema.Draft4Validator)
    by_site: dict[str, list] = {}
    gate_named: dict[str, list] = {}
    results = doc["runs"][0]["results"]
    assert all("logicalLocations" in r["locations"][0] for r in results)  # max-dead 100 passed
    for result in (r for r in results if "logicalLocations" in r["locations"][0]):
        site = result["locations"][0]["logicalLocations"][0]["name"]
        by_site.setdefault(site, []).append((result["ruleId"], result["level"]))
        if "Gate: " in result["message"]["text"]:
            gate_named.setdefault(site, []).append(result["ruleId"])
    assert by_site == expected
    first_errors = {site: [r for r, level in found if level == "error"][:1] for site, found in expected.items()}
    assert gate_named == {site: rules for site, rules in first_errors.items() if rules}


def _sarif_levels(report, gates) -> dict[str, list]:
    results = json.loads(get_format("sarif").render(Outcome(report, gates)))["runs"][0]["results"]
    levels: dict[str, list] = {}
    for result in results:
        logical = result["locations"][0].get("logicalLocations")
        gated = "Gate: " in result["message"]["text"]
        levels.setdefault(logical[0]["name"] if logical else "model", []).append((result["ruleId"], result["level"], gated))
    return levels


@pytest.mark.parametrize("policy", [GatePolicy(fail_on=FailOn.DEAD), GatePolicy(max_dead=1),
                                    GatePolicy(max_dead_fraction=0.05)])
def test_sarif_errors_are_the_findings_a_failed_whole_model_gate_counted(policy: GatePolicy) -> None:
    """--fail-on dead, --max-dead and --max-dead-fraction count the dead units of every site
    not ignored: those are errors, not only the DR100 result; near-dead ones stay notes."""
    report = make_report([Site("a", 8, dead=(1,), near=(2,)), Site("b", 8, dead=(0, 5)), Site("c", 8, near=(3,)),
                          Site("skip", 8, dead=(4,))])
    gates = evaluate(report, GatePolicy(**{**vars(policy), "ignore": ("skip",)}))
    assert not gates.passed
    assert _sarif_levels(report, gates) == {
        "a": [("DR001", "error", True), ("DR002", "note", False)], "b": [("DR001", "error", True)],
        "c": [("DR002", "note", False)], "skip": [("DR001", "warning", False)], "model": [("DR100", "error", False)]}
    passing = evaluate(report, GatePolicy(max_dead=10))
    assert {site: [level for _, level, _ in found] for site, found in _sarif_levels(report, passing).items()} == {
        "a": ["warning", "note"], "b": ["warning"], "c": ["note"], "skip": ["warning"]}


def test_sarif_with_a_baseline_errors_only_where_new_findings_were_counted() -> None:
    baseline = make_report([Site("a", 8, dead=(1,)), Site("b", 8)])
    report = make_report([Site("a", 8, dead=(1,)), Site("b", 8, dead=(6,))])
    gates = evaluate(report, GatePolicy(fail_on=FailOn.DEAD), baseline)
    assert _sarif_levels(report, gates) == {"a": [("DR001", "warning", False)], "b": [("DR001", "error", True)],
                                            "model": [("DR100", "error", False)]}


def test_sarif_without_a_model_file_is_still_valid() -> None:
    schema = json.loads((HERE / "schemas" / "sarif-schema-2.1.0.json").read_text())
    report = make_report([Site("a", 4, dead=(1,))], path="<MLP>")
    doc = json.loads(get_format("sarif").render(Outcome(report, evaluate(report, GatePolicy(max_dead=0)))))
    jsonschema.validate(doc, schema, cls=jsonschema.Draft4Validator)
    assert "artifacts" not in doc["runs"][0]


def test_json_is_the_report_schema_plus_gates() -> None:
    doc = json.loads(get_format("json").render(outcome()))
    jsonschema.validate(doc, json_schema(), cls=jsonschema.Draft202012Validator)
    assert {k: v for k, v in doc.items() if k != "gates"} == json.loads(sample_report().to_json())
    assert doc["gates"]["passed"] is False
    assert [(r["gate"], r["site"]) for r in doc["gates"]["results"] if not r["passed"]] == [
        ("max-dead", None), ("max-site-dead-fraction", "layer1.0.relu"), ("collapsed", COLLAPSED),
        ("max-site-dead-fraction", COLLAPSED)]


def test_github_escaping() -> None:
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("a:b,c%") == "a%3Ab%2Cc%25"
    text = get_format("github").render(outcome())
    lines = text.splitlines()
    assert all(line.startswith(("::error ", "::warning ", "deadrelu: ")) for line in lines)
    collapsed = [line for line in lines if "collapsed" in line and line.startswith("::error")][0]
    title, message = collapsed[len("::error "):].split("::", 1)
    assert title == "title=deadrelu gate collapsed at head.fc|act%3A1%2Cx%25y"
    assert message.startswith("head.fc|act:1,x%25y: collapsed")


def test_markdown_escapes_names_in_tables() -> None:
    assert code("a|b") == "`a\\|b`"
    assert code("x`y") == "``x`y``"
    text = get_format("markdown").render(outcome())
    assert "`head.fc\\|act:1,x%y`" in text
    for line in text.splitlines():
        if line.startswith("| `head.fc"):
            assert line.count(" | ") == 8  # nine cells: the name's pipe did not split the row


# --- where outputs go --------------------------------------------------------------------

def run(*args: object, columns: int = 120):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "sample.json"
    path.write_text(sample_report().to_json())
    return path


@pytest.mark.parametrize("fmt", ["json", "markdown", "junit", "sarif", "github"])
def test_stdout_carries_only_the_report(saved: Path, fmt: str) -> None:
    result = run("report", saved, "-f", fmt, "--max-dead", "1")
    assert result.exit_code == 1
    assert result.stdout == get_format(fmt).render(Outcome(sample_report(), evaluate(sample_report(),
                                                                                   GatePolicy(max_dead=1))))
    lines = result.stderr.splitlines()  # the report's warnings, then the summary line
    assert [line for line in lines if line.startswith("deadrelu: warning: ")] == [
        f"deadrelu: warning: {w}" for w in sample_report().warnings]
    assert lines[len(sample_report().warnings)].startswith("deadrelu: FAILED")


def test_output_file_is_written_and_stdout_is_empty(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    result = run("report", saved, "-f", "markdown", "-o", out)
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_text().startswith("## deadrelu: `models/net.pt`")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    missing = run("report", saved, "-o", tmp_path / "no" / "dir" / "r.txt")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_table_to_a_file_has_no_colour(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    assert run("report", saved, "-o", out, "--max-dead", "0").exit_code == 1
    text = out.read_text()
    assert "\x1b[" not in text and "Gates (counting dead units): FAILED" in text


def test_json_option_is_the_plain_report_document(tmp_path: Path) -> None:
    fixtures = HERE.parent / "fixtures"
    args = ("scan", fixtures / "mlp.ts.pt", "-d", fixtures / "mlp.calib.npy")
    result = run(*args, "--json", "-", "--max-dead", "1")
    assert result.exit_code == 1  # gates still decide the exit code
    doc = json.loads(result.stdout)
    assert "gates" not in doc and doc["summary"]["dead"] == 3  # the JSON of report.to_dict(), nothing else
    # (the first scan of a test session also says on stderr that the kernel is being built)
    assert any(line.startswith("deadrelu: FAILED") for line in result.stderr.splitlines())
    conflict = run(*args, "--json", "-", "-f", "markdown")
    assert conflict.exit_code == 2 and "--json -" in conflict.stderr
    both = tmp_path / "r.json"
    result = run(*args, "--json", both, "-f", "github", "--max-dead", "5")
    assert result.exit_code == 0 and result.stdout.startswith("::warning title=deadrelu%3A layers.1::")
    saved = json.loads(both.read_text())
    jsonschema.validate(saved, json_schema(), cls=jsonschema.Draft202012Validator)
    assert "gates" not in saved


def test_html_without_matplotlib_is_a_clear_usage_error(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = run("report", saved, "-f", "html")
    assert result.exit_code == 2
    assert "--format html needs matplotlib" in result.stderr and "deadrelu[html]" in result.stderr
