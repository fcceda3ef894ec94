"""Gates: every threshold, fail-on kind, ignore, per-site rules, baselines, and their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import SAMPLE, Site, make_report, sample_report
from typer.testing import CliRunner

from deadrelu.cli import app
from deadrelu.errors import ExitCode
from deadrelu.gates import FailOn, GatePolicy, SiteRule, evaluate, findings

FIX = Path(__file__).resolve().parent.parent / "fixtures"
COLLAPSED = "head.fc|act:1,x%y"


def failed(policy: GatePolicy, report=None, baseline=None) -> list[tuple[str, str | None]]:
    gates = evaluate(report or sample_report(), policy, baseline)
    return [(r.gate, r.site) for r in gates.failures]


def test_no_threshold_means_no_gate() -> None:
    gates = evaluate(sample_report(), GatePolicy())
    assert not gates.active and gates.passed and gates.results == ()
    assert gates.exit_code() is ExitCode.CLEAN


def test_findings_by_kind() -> None:
    site = sample_report().sites[1]  # dead 1, 5, 9; near-dead 2
    assert findings(site, FailOn.DEAD) == (1, 5, 9)
    assert findings(site, FailOn.NEAR_DEAD) == (1, 2, 5, 9)
    assert findings(sample_report().sites[2], FailOn.DORMANT) == (6,)
    assert findings(sample_report().sites[3], FailOn.COLLAPSED) == (0, 1, 2, 3)
    assert findings(site, FailOn.COLLAPSED) == ()


@pytest.mark.parametrize(("kind", "counted"), [(FailOn.DEAD, 8), (FailOn.NEAR_DEAD, 11), (FailOn.DORMANT, 12),
                                               (FailOn.COLLAPSED, 4)])
def test_fail_on_chooses_what_max_dead_counts(kind: FailOn, counted: int) -> None:
    report = sample_report()
    assert evaluate(report, GatePolicy(fail_on=kind, max_dead=counted)).counted == counted
    assert ("max-dead", None) not in failed(GatePolicy(fail_on=kind, max_dead=counted))
    assert ("max-dead", None) in failed(GatePolicy(fail_on=kind, max_dead=counted - 1))


def test_max_dead_at_the_limit_passes() -> None:
    report = make_report([Site("a", 10, dead=(1, 2))])
    assert evaluate(report, GatePolicy(max_dead=2)).passed
    gates = evaluate(report, GatePolicy(max_dead=1))
    assert [r.message for r in gates.failures] == ["2 dead units > max-dead 1"]
    assert gates.exit_code() is ExitCode.FINDINGS and gates.exit_code(exit_zero=True) is ExitCode.CLEAN


def test_max_dead_fraction_is_over_all_units() -> None:
    report = make_report([Site("a", 10, dead=(1, 2)), Site("b", 10)])  # 2 / 20 = 10%
    assert evaluate(report, GatePolicy(max_dead_fraction=0.1)).passed
    gates = evaluate(report, GatePolicy(max_dead_fraction=0.09))
    assert [(r.gate, r.actual) for r in gates.failures] == [("max-dead-fraction", 0.1)]


def test_max_site_dead_fraction_names_the_site() -> None:
    report = make_report([Site("a", 10, dead=(1, 2, 3)), Site("b", 10, dead=(4,))])
    assert failed(GatePolicy(max_site_dead_fraction=0.2), report) == [("max-site-dead-fraction", "a")]
    assert failed(GatePolicy(max_site_dead_fraction=0.3), report) == []


def test_fail_on_alone_is_zero_tolerance() -> None:
    clean = make_report([Site("a", 4)])
    assert evaluate(clean, GatePolicy(fail_on=FailOn.DEAD)).passed
    one = make_report([Site("a", 4, dead=(2,))])
    assert failed(GatePolicy(fail_on=FailOn.DEAD), one) == [("max-dead", None)]
    near = make_report([Site("a", 4, near=(2,))])
    assert failed(GatePolicy(fail_on=FailOn.DEAD), near) == []
    assert failed(GatePolicy(fail_on=FailOn.NEAR_DEAD), near) == [("max-dead", None)]


def test_collapsed_site_fails_every_active_policy() -> None:
    assert ("collapsed", COLLAPSED) in failed(GatePolicy(max_dead=1000))
    assert failed(GatePolicy(fail_on=FailOn.COLLAPSED)) == [("collapsed", COLLAPSED)]
    no_collapse = make_report([Site("a", 4, dead=(0, 1, 2))])
    assert failed(GatePolicy(fail_on=FailOn.COLLAPSED), no_collapse) == []
    assert failed(GatePolicy(), sample_report()) == []  # inactive: nothing fails


def test_ignore_globs_leave_sites_out_of_counts_and_denominators() -> None:
    gates = evaluate(sample_report(), GatePolicy(max_dead=4, ignore=("head.*",)))
    assert gates.passed and gates.counted == 4 and gates.units == 72
    ignored = [s.name for s in gates.sites if s.ignored]
    assert ignored == [COLLAPSED]
    assert not any(r.site == COLLAPSED for r in gates.results)


def test_site_rules_override_the_site_fraction_and_cap_counts() -> None:
    report = make_report([Site("layer4.0", 10, dead=(1, 2, 3)), Site("layer4.1", 10, dead=(1,)), Site("x", 10)])
    policy = GatePolicy(max_site_dead_fraction=0.05, site_rules=(SiteRule("layer4.*", max_dead_fraction=0.5),))
    assert failed(policy, report) == []
    policy = GatePolicy(site_rules=(SiteRule("layer4.*", max_dead=2), SiteRule("layer4.1", max_dead=0)))
    assert failed(policy, report) == [("site-max-dead", "layer4.0"), ("site-max-dead", "layer4.1")]
    message = evaluate(report, policy).failures[1].message
    assert message == 'layer4.1: 1 dead unit > max-dead 0 (sites."layer4.1")'


def test_fail_on_with_site_rules_alone_keeps_zero_tolerance_elsewhere() -> None:
    """A rule that relaxes layer4.* un-gated every other site before: fail_on's implied
    zero tolerance was dropped as soon as any rule set a limit."""
    report = make_report([Site("layer4.0", 10, dead=(1, 2, 3)), Site("stem", 10, dead=(4, 5)), Site("x", 10)])
    relaxed = GatePolicy(fail_on=FailOn.DEAD, site_rules=(SiteRule("layer4.*", max_dead=5),))
    assert failed(relaxed, report) == [("site-max-dead", "stem")]
    assert evaluate(report, relaxed).failures[0].message == "stem: 2 dead units > max-dead 0"
    fraction = GatePolicy(fail_on=FailOn.DEAD, site_rules=(SiteRule("layer4.*", max_dead_fraction=0.5),))
    assert failed(fraction, report) == [("site-max-dead", "stem")]  # the matched site: its fraction rule alone
    whole = GatePolicy(fail_on=FailOn.DEAD, max_dead=10, site_rules=(SiteRule("layer4.*", max_dead=5),))
    assert failed(whole, report) == []  # a model-wide limit given: rules only add to it
    assert failed(GatePolicy(site_rules=(SiteRule("layer4.*", max_dead=5),)), report) == []  # no fail_on


def test_baseline_counts_only_new_findings() -> None:
    old = make_report([Site("a", 10, dead=(1, 2)), Site("c", 2, dead=(0, 1))])
    new = make_report([Site("a", 10, dead=(1, 2, 7)), Site("b", 4, dead=(0,)), Site("c", 2, dead=(0, 1))])
    gates = evaluate(new, GatePolicy(max_dead=0), old, "old.json")
    assert {s.name: s.counted for s in gates.sites} == {"a": (7,), "b": (0,), "c": ()}
    assert gates.counted == 2 and gates.baseline == "old.json"
    assert ("collapsed", "c") not in [(r.gate, r.site) for r in gates.failures]  # collapsed before too
    assert gates.failures[0].message == "2 new dead units > max-dead 0"
    assert evaluate(new, GatePolicy(max_dead=2), old).passed
    assert gates.baseline_notes == ("baseline old.json lacks 1 of this report's 3 sites, whose findings all count as "
                                    "new: b",)


def test_a_baseline_that_does_not_match_says_so() -> None:
    new = make_report([Site("a", 10, dead=(1, 2)), Site("b", 4, dead=(0,))])
    other_model = make_report([Site("x", 10, dead=(1, 2)), Site("y", 4, dead=(0,))])
    gates = evaluate(new, GatePolicy(max_dead=0), other_model, "old.json")
    assert gates.counted == 3 and gates.baseline_notes == (
        "baseline old.json shares no site name with this report (another model?): every finding counts as new",)
    resized = make_report([Site("a", 20, dead=(1, 2)), Site("b", 4, dead=(0,))])  # 'a' is another layer now
    gates = evaluate(new, GatePolicy(max_dead=0), resized, "old.json")
    assert {s.name: s.counted for s in gates.sites} == {"a": (1, 2), "b": ()}
    assert gates.baseline_notes == ("baseline old.json has other unit counts at 1 sites, whose findings all count "
                                    "as new: a (10 units, 20 there)",)
    assert evaluate(new, GatePolicy(max_dead=0), new).baseline_notes == ()
    assert evaluate(new, GatePolicy(max_dead=0)).to_dict()["baseline_notes"] == []


def test_baseline_mismatches_reach_the_table_or_stderr(tmp_path: Path) -> None:
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(make_report([Site("a", 10, dead=(1,))]).to_json())
    old.write_text(make_report([Site("x", 10, dead=(1,))]).to_json())
    table = run("report", new, "--baseline", old, "--max-dead", "0")
    assert table.exit_code == 1 and "shares no site name" in " ".join(table.stdout.split())
    assert "shares no" not in table.stderr  # the table on stdout said it
    as_json = run("report", new, "--baseline", old, "--max-dead", "0", "-f", "json")
    assert "deadrelu: warning: baseline" in as_json.stderr and "shares no site name" in " ".join(as_json.stderr.split())
    assert json.loads(as_json.stdout)["gates"]["baseline_notes"][0].startswith(f"baseline {old} shares no site")
    for fmt, mark in (("github", "::warning title=deadrelu::baseline"), ("markdown", "- baseline"),
                      ("html", "<li>baseline")):
        shown = run("report", new, "--baseline", old, "--max-dead", "0", "-f", fmt)
        assert any(mark in line and "shares no site name" in line for line in shown.stdout.splitlines()), fmt


def test_a_failed_fraction_gate_never_reads_as_equal() -> None:
    """14 of 216 units is 6.4815%: against 6.48% the message shows the digits that differ."""
    report = make_report([Site("a", 216, dead=tuple(range(14)))])
    for policy in (GatePolicy(max_dead_fraction=0.0648), GatePolicy(max_site_dead_fraction=0.0648)):
        failure = evaluate(report, policy).failures[0]
        assert "(6.481%) > max" in failure.message and failure.message.endswith(" 6.48%"), failure.message
    passing = evaluate(report, GatePolicy(max_dead_fraction=14 / 216)).results[0]
    assert passing.passed and "(6.48%) <= max-dead-fraction 6.48%" in passing.message


def test_gate_report_json_shape() -> None:
    doc = evaluate(sample_report(), GatePolicy(fail_on=FailOn.DEAD)).to_dict()
    assert doc["active"] is True and doc["passed"] is False
    assert doc["policy"]["max_dead"] == 0  # fail_on alone: zero tolerance, written out
    assert doc["counted"] == {"kind": "dead", "units": 76, "findings": 8, "fraction": 8 / 76}
    json.dumps(doc, allow_nan=False)


# --- the command line: exit codes ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gates") / "sample.json"
    path.write_text(sample_report().to_json())
    return path


def run(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80", **(env or {})})


@pytest.mark.parametrize(("args", "code"), [
    ([], 0),
    (["--max-dead", "8", "--ignore", "head.*"], 0),
    (["--max-dead", "3", "--ignore", "head.*"], 1),
    (["--max-dead", "100"], 1),  # the collapsed site
    (["--max-dead-fraction", "0.2", "--ignore", "head.*"], 0),
    (["--max-dead-fraction", "0.05", "--ignore", "head.*"], 1),
    (["--max-site-dead-fraction", "0.2", "--ignore", "head.*"], 0),
    (["--max-site-dead-fraction", "0.15", "--ignore", "head.*"], 1),
    (["--fail-on", "near-dead", "--max-dead", "7", "--ignore", "head.*"], 0),
    (["--fail-on", "near-dead", "--max-dead", "6", "--ignore", "head.*"], 1),
    (["--fail-on", "dormant", "--max-dead", "8", "--ignore", "head.*"], 0),
    (["--fail-on", "dormant", "--max-dead", "7", "--ignore", "head.*"], 1),
    (["--fail-on", "collapsed"], 1),
    (["--fail-on", "collapsed", "--ignore", "head.*"], 0),
    (["--fail-on", "dead"], 1),
    (["--fail-on", "dead", "--exit-zero"], 0),
    (["--max-dead-fraction", "1.5"], 2),
    (["--max-dead", "-1"], 2),
    (["--fail-on", "zombie"], 2),
])
def test_report_command_exit_codes(saved: Path, args: list[str], code: int) -> None:
    result = run("report", saved, *args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


def test_scan_gates_on_a_fixture() -> None:
    model, data = FIX / "mlp.ts.pt", FIX / "mlp.calib.npy"  # dead: layers.1 3, 40; layers.3 17; near-dead layers.1 10
    assert run("scan", model, "-d", data, "--max-dead", "3").exit_code == 0
    result = run("scan", model, "-d", data, "--max-dead", "2")
    assert result.exit_code == 1
    assert "FAIL 3 dead units > max-dead 2" in result.stdout
    assert "FAILED" in result.stderr
    assert run("scan", model, "-d", data, "--fail-on", "near-dead", "--max-dead", "3").exit_code == 1
    assert run("scan", model, "-d", data, "--max-dead", "2", "--exit-zero").exit_code == 0


def test_quiet_prints_only_the_summary_line(saved: Path) -> None:
    result = run("report", saved, "-q", "--max-dead", "1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("deadrelu: FAILED")


def test_summary_line_fits_80_columns_and_folds_names(saved: Path) -> None:
    result = run("report", saved, "-q", "--max-site-dead-fraction", "0.01", "--fail-on", "near-dead",
                 "--ignore", "stem.*", "--ignore", "layer*", "--ignore", "head*")
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) > 1
    assert all(len(line) <= 80 for line in lines)
    long_name = SAMPLE[-1].name
    assert long_name in "".join(lines)  # folded over lines, not cut


def test_summary_line_in_a_log_is_one_line(saved: Path) -> None:
    """stderr that is no terminal (a CI log) and no COLUMNS: the line is not folded, so a
    grep for the verdict and the long site name finds both on it."""
    result = run("report", saved, "-q", "--max-site-dead-fraction", "0.01", "--fail-on", "near-dead",
                 "--ignore", "stem.*", "--ignore", "layer*", "--ignore", "head*", env={"COLUMNS": None})
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("deadrelu: FAILED") and SAMPLE[-1].name in line and len(line) > 80


def test_no_color_is_respected(saved: Path) -> None:
    coloured = run("report", saved, "-q", "--max-dead", "1", env={"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"})
    assert "\x1b[" in coloured.stderr
    plain = run("report", saved, "-q", "--max-dead", "1",
                env={"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"})
    assert "\x1b[" not in plain.stderr and plain.stderr.startswith("deadrelu: FAILED")
