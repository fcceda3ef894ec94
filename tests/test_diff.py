"""Saved reports, baselines and diffs on fixtures whose dead sets differ in known ways.

The "old" checkpoint is the shipped MLP fixture (dead: layers.1 units 3 and 40, layers.3
unit 17; near-dead: layers.1 unit 10). The "new" one is the same weights with three biases
changed in memory: layers.1 unit 3 revived, layers.1 unit 20 and layers.3 unit 7 killed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import Site, make_report
from typer.testing import CliRunner

import deadrelu
from deadrelu.cli import app
from deadrelu.diff import diff_reports
from deadrelu.errors import SavedReportError
from deadrelu.judge import Thresholds
from deadrelu.saved import load_report, rejudge, report_from_dict

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def modified_mlp() -> torch.nn.Module:
    from fixture_models import MLP

    model = MLP()
    model.load_state_dict(torch.load(FIX / "mlp.state_dict.pt", weights_only=True))
    with torch.no_grad():
        model.layers[0].bias[3] = 0.0  # revive layers.1 unit 3 (planted at -1000)
        model.layers[0].bias[20] = -1e3  # kill layers.1 unit 20
        model.layers[2].bias[7] = -1e3  # kill layers.3 unit 7
    return model


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("diff")
    old = deadrelu.scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy")
    new = deadrelu.scan(modified_mlp(), FIX / "mlp.calib.npy")
    (folder / "old.json").write_text(old.to_json())
    (folder / "new.json").write_text(new.to_json())
    return {"old": old, "new": new, "old.json": folder / "old.json", "new.json": folder / "new.json", "dir": folder}


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "120"})


def test_the_fixtures_differ_as_planned(reports: dict) -> None:
    assert [s.verdict.dead for s in reports["old"].sites] == [(3, 40), (17,)]
    assert [s.verdict.dead for s in reports["new"].sites] == [(20, 40), (7, 17)]


def test_diff_finds_died_and_revived_units(reports: dict) -> None:
    diff = diff_reports(reports["old"], reports["new"])
    by_name = {s.name: s for s in diff.sites}
    assert (by_name["layers.1"].died, by_name["layers.1"].revived) == ((20,), (3,))
    assert (by_name["layers.3"].died, by_name["layers.3"].revived) == ((7,), ())
    assert diff.died == 2 and diff.revived == 1
    old3, new3 = reports["old"].sites[1], reports["new"].sites[1]
    assert by_name["layers.3"].active_rate_change == pytest.approx(new3.active_rate - old3.active_rate)
    assert by_name["layers.3"].active_rate_change < 0  # one more unit never fires
    assert diff.passed and diff.results == ()


def test_diff_of_sites_added_removed_and_resized() -> None:
    old = make_report([Site("a", 4, dead=(1,)), Site("b", 8, dead=(0, 7)), Site("gone", 2, dead=(1,))])
    new = make_report([Site("a", 4, dead=(1,)), Site("b", 6, dead=(0, 5)), Site("added", 3, dead=(2,))])
    diff = diff_reports(old, new, ignore=("a",), max_new_dead=1)
    by_name = {s.name: s for s in diff.sites}
    assert [s.name for s in diff.sites] == ["a", "b", "added", "gone"]
    assert (by_name["b"].died, by_name["b"].revived) == ((5,), ())  # unit 7 is gone, not revived
    assert (by_name["added"].status, by_name["added"].died) == ("added", (2,))
    assert (by_name["gone"].status, by_name["gone"].died, by_name["gone"].revived) == ("removed", (), ())
    assert by_name["a"].ignored and diff.died == 2 and not diff.passed
    assert "b: units changed from 8 to 6; units matched by index" in diff.notes
    assert not any("share no site name" in n for n in diff.notes)


def test_diff_of_reports_sharing_no_site_says_so() -> None:
    old = make_report([Site("x", 4, dead=(1,))])
    new = make_report([Site("a", 4, dead=(1,)), Site("b", 8, dead=(0, 7))])
    diff = diff_reports(old, new, old_label="old.json", new_label="new.json")
    assert diff.died == 3 and diff.notes[0] == ("old.json and new.json share no site name (scans of different "
                                                "architectures?): every dead unit counts as died, none as revived")


@pytest.mark.parametrize(("args", "code"), [
    ([], 0),
    (["--max-new-dead", "2"], 0),
    (["--max-new-dead", "1"], 1),
    (["--max-new-dead", "1", "--exit-zero"], 0),
    (["--max-new-dead", "1", "--ignore", "layers.3"], 0),
    (["--max-new-dead", "0", "--ignore", "layers.3"], 1),
    (["-f", "html"], 2),
    (["-f", "sarif"], 2),
])
def test_diff_command_exit_codes(reports: dict, args: list[str], code: int) -> None:
    result = run("diff", reports["old.json"], reports["new.json"], *args)
    assert result.exit_code == code, result.output


def test_diff_command_outputs(reports: dict, tmp_path: Path) -> None:
    old, new = reports["old.json"], reports["new.json"]
    table = run("diff", old, new)
    assert "died    layers.1: 20" in table.stdout and "revived layers.1: 3" in table.stdout
    assert table.stderr.startswith("deadrelu diff: 2 units died, 1 revived")
    doc = json.loads(run("diff", old, new, "-f", "json", "--max-new-dead", "0").stdout)
    assert [(s["name"], s["died_units"], s["revived_units"]) for s in doc["sites"]] == [
        ("layers.1", [20], [3]), ("layers.3", [7], [])]
    assert doc["gates"]["passed"] is False and doc["summary"]["died"] == 2
    markdown = run("diff", old, new, "-f", "markdown").stdout
    assert "| `layers.1` | 64 | 2 → 2 | 20 | 3 |" in markdown  # the units' indices
    assert "| `layers.3` | 32 | 1 → 2 | 7 | none |" in markdown  # not "0", which reads as unit 0
    github = run("diff", old, new, "-f", "github", "--max-new-dead", "0").stdout.splitlines()
    assert github[0] == "::error title=deadrelu gate max-new-dead::2 units died > max-new-dead 0"
    out = tmp_path / "diff.md"
    assert run("diff", old, new, "-f", "markdown", "-o", out, "-q").stdout == ""
    assert out.read_text() == markdown


def test_baseline_on_a_saved_report(reports: dict) -> None:
    result = run("report", reports["new.json"], "--baseline", reports["old.json"], "--fail-on", "dead", "-f", "json")
    assert result.exit_code == 1
    gates = json.loads(result.stdout)["gates"]
    assert [s["counted_units"] for s in gates["sites"]] == [[20], [7]]
    assert run("report", reports["new.json"], "--baseline", reports["old.json"], "--max-dead", "2").exit_code == 0


def test_baseline_on_a_scan(reports: dict) -> None:
    args = ("scan", FIX / "mlp.ts.pt", "-d", FIX / "mlp.calib.npy", "--baseline", reports["new.json"])
    result = run(*args, "--fail-on", "dead", "-f", "json")
    assert result.exit_code == 1  # layers.1 unit 3 is dead here, alive in the baseline
    assert [s["counted_units"] for s in json.loads(result.stdout)["gates"]["sites"]] == [[3], []]
    assert run(*args, "--max-dead", "1").exit_code == 0
    missing = run(*args[:4], "--baseline", reports["dir"] / "nope.json")
    assert missing.exit_code == 2 and "nope.json: no such report file" in missing.stderr


def test_saved_report_rejudges_to_the_same_verdicts(reports: dict) -> None:
    for key in ("old", "new"):
        original = reports[key]
        loaded = load_report(reports[f"{key}.json"])
        assert [s.verdict for s in loaded.sites] == [s.verdict for s in original.sites]
        assert loaded.summary() == original.summary()
        assert json.loads(loaded.to_json()) == json.loads(original.to_json())


def test_saved_report_with_new_thresholds(reports: dict) -> None:
    loaded = load_report(reports["old.json"], Thresholds(near_dead=0.49))
    assert loaded.thresholds.near_dead == 0.49
    direct = rejudge(reports["old"], Thresholds(near_dead=0.49))
    assert [s.verdict for s in loaded.sites] == [s.verdict for s in direct.sites]
    assert len(loaded.sites[0].verdict.near_dead) > 1
    result = run("report", reports["old.json"], "--near-dead", "0.49", "-f", "json", "--fail-on", "near-dead")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["sites"][0]["near_dead_units"] == list(loaded.sites[0].verdict.near_dead)


def test_saved_report_without_nonfinite_counts_still_loads(reports: dict) -> None:
    doc = json.loads(reports["old.json"].read_text())
    for site in doc["sites"]:
        del site["per_unit"]["nan"], site["per_unit"]["inf"]
    loaded = report_from_dict(doc)
    assert [s.verdict.dead for s in loaded.sites] == [(3, 40), (17,)]
    assert np.array_equal(loaded.sites[0].stats.nan, np.zeros(64))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema_version=7), "schema_version: expected 1, got 7"),
    (lambda d: d["sites"][0]["per_unit"].pop("count"), "sites[0].per_unit.count: missing"),
    (lambda d: d["sites"][1]["per_unit"].update(max=[1.0]), "sites[1].per_unit.max: expected a list of 32 values"),
    (lambda d: d["sites"][0].pop("name"), "sites[0].name: missing or not a string"),
    (lambda d: d.pop("model"), "model: missing or not an object"),
])
def test_bad_saved_reports_name_the_key(reports: dict, tmp_path: Path, mutate, message: str) -> None:
    doc = json.loads(reports["old.json"].read_text())
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SavedReportError, match=f"^{path}: " + message.replace("[", r"\[").replace("]", r"\]")):
        load_report(path)
    result = run("report", path)
    assert result.exit_code == 2 and message in result.stderr


def test_not_a_report(tmp_path: Path) -> None:
    garbage = tmp_path / "x.json"
    garbage.write_text("{not json")
    result = run("diff", garbage, garbage)
    assert result.exit_code == 2 and "x.json: not JSON" in result.stderr
    other = tmp_path / "y.json"
    other.write_text('{"hello": 1}')
    assert "(is this a deadrelu report?)" in run("report", other).stderr


@pytest.mark.parametrize(("fmt", "output", "on_stderr"), [
    ("json", False, True), ("github", False, True), ("markdown", True, True),
    ("table", False, False), ("markdown", False, False),
])
def test_diff_notes_reach_stderr_unless_stdout_shows_them(tmp_path: Path, fmt: str, output: bool,
                                                          on_stderr: bool) -> None:
    old = make_report([Site("x", 4, dead=(1,))])
    new = make_report([Site("a", 4, dead=(1,))])
    (tmp_path / "old.json").write_text(old.to_json())
    (tmp_path / "new.json").write_text(new.to_json())
    extra = ["-o", tmp_path / "out"] if output else []
    result = run("diff", tmp_path / "old.json", tmp_path / "new.json", "-f", fmt, *extra)
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "share no site name" in line]
    assert len(said) == (1 if on_stderr else 0), result.stderr
    if on_stderr:
        assert said[0].startswith("deadrelu: note: ")
    if not on_stderr:
        assert result.stdout.count("share no site name") == 1  # the rendered diff shows it
