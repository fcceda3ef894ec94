"""[tool.deadrelu]: discovery, every key, errors that name the key, and flags over the file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from synthetic import Site, make_report, sample_report
from typer.testing import CliRunner

from deadrelu.cli import app
from deadrelu.config import Settings, find_pyproject, load_settings
from deadrelu.errors import ConfigError
from deadrelu.gates import FailOn, SiteRule
from deadrelu.judge import Thresholds


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


FULL = """
    [project]
    name = "somebody-elses"

    [tool.deadrelu]
    fail-on = "near-dead"
    max-dead = 20
    max_dead_fraction = 0.05
    max-site-dead-fraction = 0.25
    max-new-dead = 0
    near-dead = 0.02
    tau = 0.2
    ignore = ["head.*", "classifier"]
    baseline = "reports/main.json"

    [tool.deadrelu.sites."layer4.*"]
    max-dead-fraction = 0.5
    max-dead = 3
"""


def test_every_key_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "pyproject.toml", FULL)
    s = load_settings(start=tmp_path)
    assert s.source == path
    assert (s.fail_on, s.max_dead, s.max_dead_fraction, s.max_site_dead_fraction, s.max_new_dead) == (
        FailOn.NEAR_DEAD, 20, 0.05, 0.25, 0)
    assert s.thresholds() == Thresholds(near_dead=0.02, tau=0.2)
    assert s.ignore == ("head.*", "classifier")
    assert s.baseline == tmp_path / "reports" / "main.json"  # relative to the file
    assert s.site_rules == (SiteRule("layer4.*", max_dead=3, max_dead_fraction=0.5),)
    policy = s.policy()
    assert policy.site_limits("layer4.2") == (3, 0.5, "layer4.*")
    assert policy.site_limits("layer3.0") == (None, 0.25, None)


def test_nearest_pyproject_with_the_table_wins(tmp_path: Path) -> None:
    outer = write(tmp_path / "pyproject.toml", "[tool.deadrelu]\nmax-dead = 1\n")
    write(tmp_path / "pkg" / "pyproject.toml", "[project]\nname = 'no-table-here'\n")
    inner_dir = tmp_path / "pkg" / "sub"
    inner_dir.mkdir()
    assert find_pyproject(inner_dir) == outer
    nested = write(tmp_path / "pkg" / "sub" / "pyproject.toml", "[tool.deadrelu]\nmax-dead = 2\n")
    assert find_pyproject(inner_dir) == nested
    assert load_settings(start=inner_dir).max_dead == 2


def test_no_configuration_is_empty_settings(tmp_path: Path) -> None:
    assert load_settings(start=tmp_path) == Settings()


def test_explicit_config_file(tmp_path: Path) -> None:
    plain = write(tmp_path / "deadrelu.toml", 'max-dead = 4\nfail-on = "dormant"\n')
    assert load_settings(plain).max_dead == 4 and load_settings(plain).fail_on is FailOn.DORMANT
    pyproject = write(tmp_path / "other" / "pyproject.toml", "[tool.deadrelu]\nmax-dead = 5\n")
    assert load_settings(pyproject).max_dead == 5


@pytest.mark.parametrize(("text", "pattern"), [
    ("[tool.deadrelu]\nmax-dead = -1\n", "[tool.deadrelu] max-dead: expected an integer >= 0, got -1"),
    ("[tool.deadrelu]\nmax-dead = true\n", "max-dead: expected an integer >= 0, got True"),
    ("[tool.deadrelu]\nmax-dead-fraction = 5\n", "max-dead-fraction: expected a number from 0 to 1, got 5"),
    ("[tool.deadrelu]\nmax_site_dead_fraction = 'x'\n", "max_site_dead_fraction: expected a number from 0 to 1"),
    ("[tool.deadrelu]\nfail-on = 'zombie'\n", "fail-on: expected one of dormant | near-dead | dead | collapsed"),
    ("[tool.deadrelu]\nignore = [1]\n", "ignore: expected a list of site-name globs"),
    ("[tool.deadrelu]\ntau = -1\n", "tau: expected a finite number >= 0"),
    ("[tool.deadrelu]\ntau = inf\n", "tau: expected a finite number >= 0, got inf"),
    ("[tool.deadrelu]\nmax-dead-frac = 0.1\n", "max-dead-frac: unknown key (known keys: "),
    ("[tool.deadrelu]\nsites = 3\n", "[tool.deadrelu.sites]: expected a table of site-name globs"),
    ("[tool.deadrelu.sites.'layer4.*']\nmax-dead = 'many'\n",
     '[tool.deadrelu.sites."layer4.*"] max-dead: expected an integer >= 0'),
    ("[tool.deadrelu.sites.'layer4.*']\nignore = true\n", '[tool.deadrelu.sites."layer4.*"] ignore: unknown key'),
    ("[tool.deadrelu]\nmax-dead = 1\nmax_dead = 5\n", "[tool.deadrelu] max-dead and max_dead: one key spelt 2 ways"),
    ("[tool.deadrelu.sites.'layer4.*']\nmax-dead-fraction = 0.1\nmax_dead_fraction = 0.2\n",
     '[tool.deadrelu.sites."layer4.*"] max-dead-fraction and max_dead_fraction: one key spelt 2 ways'),
    ("[tool.deadrelu\nmax-dead = 1\n", "invalid TOML"),
    ("[tool]\ndeadrelu = 3\n", "tool.deadrelu: expected a table"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path / "pyproject.toml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")
    assert pattern in str(info.value)


def test_config_errors_exit_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "r.json"
    saved.write_text(sample_report().to_json())
    write(tmp_path / "pyproject.toml", "[tool.deadrelu]\nmax-dead = 'ten'\n")
    monkeypatch.chdir(tmp_path)
    result = run("report", saved)
    assert result.exit_code == 2
    assert "max-dead: expected an integer" in result.stderr and "Traceback" not in result.output
    missing = run("report", saved, "--config", tmp_path / "nope.toml")
    assert missing.exit_code == 2 and "nope.toml: no such configuration file" in missing.stderr


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "r.json"
    saved.write_text(make_report([Site("a", 10, dead=(1, 2)), Site("head", 10, dead=(1, 2, 3, 4))]).to_json())
    write(tmp_path / "pyproject.toml", '[tool.deadrelu]\nmax-dead = 2\nignore = ["head"]\n')
    monkeypatch.chdir(tmp_path)
    assert run("report", saved).exit_code == 0  # the file: 2 dead outside the ignored head
    assert run("report", saved, "--max-dead", "1").exit_code == 1  # flag beats file
    assert run("report", saved, "--ignore", "a").exit_code == 1  # --ignore replaces the list: head counts
    assert run("report", saved, "--ignore", "a", "--max-dead", "4").exit_code == 0
    other = write(tmp_path / "strict.toml", "max-dead = 0\n")
    assert run("report", saved, "--config", other).exit_code == 1  # --config instead of pyproject.toml


def test_thresholds_from_the_file_rejudge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "r.json"
    saved.write_text(make_report([Site("a", 10, near=(3,))]).to_json())  # near-dead at active rate 0.003
    write(tmp_path / "pyproject.toml", "[tool.deadrelu]\nnear-dead = 0.001\n")
    monkeypatch.chdir(tmp_path)
    doc = json.loads(run("report", saved, "-f", "json").stdout)
    assert doc["thresholds"]["near_dead"] == 0.001 and doc["sites"][0]["near_dead_units"] == []
    doc = json.loads(run("report", saved, "-f", "json", "--near-dead", "0.01").stdout)
    assert doc["sites"][0]["near_dead_units"] == [3]


def test_baseline_from_the_file_is_relative_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "main.json").write_text(make_report([Site("a", 10, dead=(1,))]).to_json())
    new = tmp_path / "new.json"
    new.write_text(make_report([Site("a", 10, dead=(1, 2))]).to_json())
    write(tmp_path / "pyproject.toml", '[tool.deadrelu]\nfail-on = "dead"\nbaseline = "reports/main.json"\n')
    work = tmp_path / "sub"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run("report", new, "-f", "json")
    assert result.exit_code == 1
    gates = json.loads(result.stdout)["gates"]
    assert gates["sites"][0]["counted_units"] == [2]
    assert gates["baseline"].endswith("main.json")


def test_per_site_rules_gate_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "r.json"
    saved.write_text(make_report([Site("layer4.0", 10, dead=(1,)), Site("layer3.0", 10, dead=(1, 2))]).to_json())
    write(tmp_path / "pyproject.toml", """
        [tool.deadrelu]
        max-site-dead-fraction = 0.5
        [tool.deadrelu.sites."layer4.*"]
        max-dead = 0
    """)
    monkeypatch.chdir(tmp_path)
    result = run("report", saved, "-f", "json")
    assert result.exit_code == 1
    failures = [(r["gate"], r["site"]) for r in json.loads(result.stdout)["gates"]["results"] if not r["passed"]]
    assert failures == [("site-max-dead", "layer4.0")]
