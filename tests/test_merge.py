"""Shards scanned apart and merged, or scanned by torchrun ranks, equal one scan of all the data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deadrelu.cli import app

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def scan_json(tmp_path: Path, model: str, data: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    result = CliRunner().invoke(app, ["scan", str(FIX / model), "--data", str(data), "--json", str(out), "-b", "16", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def assert_same_scan(got: dict, want: dict) -> None:
    assert got["data"]["samples"] == want["data"]["samples"]
    assert [s["name"] for s in got["sites"]] == [s["name"] for s in want["sites"]]
    for a, b in zip(got["sites"], want["sites"]):
        for key in ("dead_units", "near_dead_units", "dormant_units"):
            assert a[key] == b[key], (a["name"], key)
        for key in ("count", "positive", "max", "min"):
            assert a["per_unit"][key] == b["per_unit"][key], (a["name"], key)
        for key in ("mean", "std", "m2", "relu_mean", "active_rate"):
            np.testing.assert_allclose(a["per_unit"][key], b["per_unit"][key], rtol=1e-9, atol=1e-9, err_msg=a["name"])


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, Path]:
    data = np.load(FIX / "convnet.calib.npy")
    np.save(tmp_path / "a.npy", data[:32])
    np.save(tmp_path / "b.npy", data[32:])
    return tmp_path / "a.npy", tmp_path / "b.npy"


def test_merge_equals_one_scan(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    whole = scan_json(tmp_path, "convnet.pt2", FIX / "convnet.calib.npy", "all.json")
    scan_json(tmp_path, "convnet.pt2", shards[0], "a.json")
    scan_json(tmp_path, "convnet.pt2", shards[1], "b.json")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "m.json").read_text())
    assert_same_scan(merged, whole)
    assert merged["summary"]["dead"] == 14


def test_a_merge_with_a_random_data_part_is_random_and_dash_o_is_stdout(tmp_path: Path,
                                                                         shards: tuple[Path, Path]) -> None:
    """Any random part makes the merge random (it read "random": false when one part was
    real); `-o -` is stdout for merge and report, as `--json -` is (a file named '-' before)."""
    scan_json(tmp_path, "convnet.pt2", shards[0], "a.json")
    scan_json(tmp_path, "convnet.pt2", Path("random"), "r.json", "--input-shape", "3,16,16", "--samples", "8")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json"), str(tmp_path / "r.json"), "-o", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["random"] is True
    shown = CliRunner().invoke(app, ["report", str(tmp_path / "a.json"), "-f", "json", "-o", "-"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["data"]["samples"] == 32
    assert not (Path.cwd() / "-").exists()


def test_merge_refuses_other_models_and_sites(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    scan_json(tmp_path, "convnet.pt2", shards[0], "a.json")
    scan_json(tmp_path, "convnet.ts.pt", shards[1], "ts.json")
    other = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json"), str(tmp_path / "ts.json")])
    assert other.exit_code == 2 and "another model" in other.stderr
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["sites"] = doc["sites"][1:]
    del doc["summary"]  # a scan that saw one site fewer (its summary would say so)
    (tmp_path / "fewer.json").write_text(json.dumps(doc))
    fewer = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json"), str(tmp_path / "fewer.json")])
    assert fewer.exit_code == 2 and "sites differ" in fewer.stderr


def test_torchrun_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    whole = scan_json(tmp_path, "convnet.pt2", FIX / "convnet.calib.npy", "all.json", "--device", "cpu")
    out = tmp_path / "dist.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deadrelu",
         "scan", str(FIX / "convnet.pt2"), "--data", str(FIX / "convnet.calib.npy"), "-b", "16", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ReLU sites of") == 1  # rank 0 alone reports
    assert_same_scan(json.loads(out.read_text()), whole)


def test_merge_refuses_the_same_scan_twice_and_says_when_thresholds_differ(tmp_path: Path,
                                                                           shards: tuple[Path, Path]) -> None:
    a = scan_json(tmp_path, "convnet.pt2", shards[0], "a.json")
    scan_json(tmp_path, "convnet.pt2", shards[1], "b.json", "--near-dead", "0.5")
    (tmp_path / "copy.json").write_text(json.dumps(a))
    renamed = tmp_path / "renamed.npy"
    renamed.write_bytes(Path(shards[0]).read_bytes())
    scan_json(tmp_path, "convnet.pt2", renamed, "renamed.json")  # the same data under another name
    rebatched = scan_json(tmp_path, "convnet.pt2", shards[0], "b7.json", "-b", "7")  # the kernels round otherwise
    assert any(x["per_unit"]["max"] != y["per_unit"]["max"] for x, y in zip(rebatched["sites"], a["sites"]))
    for twice, why in ((["a.json", "a.json"], "a.json: given twice;"),
                       (["a.json", "b7.json"], "b7.json: the same data as " + str(tmp_path / "a.json") +
                        ", scanned again"),
                       (["a.json", "b.json", "copy.json"], "copy.json: the same scan as " + str(tmp_path / "a.json")),
                       (["a.json", "renamed.json"], "renamed.json: the same scan as " + str(tmp_path / "a.json"))):
        result = CliRunner().invoke(app, ["merge", *[str(tmp_path / n) for n in twice]])
        assert result.exit_code == 2 and "would count its samples twice" in result.stderr, result.output
        assert why in result.stderr, result.stderr
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    merged = json.loads(result.stdout)
    assert merged["thresholds"]["near_dead"] == 0.01  # the first report's
    assert any("judged with different thresholds (near-dead 0.5" in w for w in merged["warnings"])
    (tmp_path / "ab.json").write_text(result.stdout)
    for again in (["ab.json", "a.json"], ["b.json", "ab.json"], ["ab.json", "renamed.json"]):
        result = CliRunner().invoke(app, ["merge", *[str(tmp_path / n) for n in again]])
        assert result.exit_code == 2 and "(one is a merge that includes it); merging it again" in result.stderr, \
            (again, result.output)
    # a part rescanned at another batch size, beside the merge that holds it (either side, or inside another merge)
    only_b7 = CliRunner().invoke(app, ["merge", str(tmp_path / "b7.json"), "-o", str(tmp_path / "only_b7.json")])
    assert only_b7.exit_code == 0, only_b7.output
    for again in (["ab.json", "b7.json"], ["b7.json", "ab.json"], ["ab.json", "only_b7.json"]):
        result = CliRunner().invoke(app, ["merge", *[str(tmp_path / n) for n in again]])
        assert result.exit_code == 2 and "hold the same data, scanned again (one is a merge" in result.stderr, \
            (again, result.output)
    summaries = merged["data"]["part_summaries"]
    assert [p["samples"] for p in summaries] == [a["data"]["samples"], merged["data"]["samples"] - a["data"]["samples"]]
    assert len(summaries[0]["sites"]) == len(a["sites"])
    only_a = CliRunner().invoke(app, ["merge", str(tmp_path / "a.json")])
    (tmp_path / "only_a.json").write_text(only_a.stdout)
    nested = CliRunner().invoke(app, ["merge", str(tmp_path / "only_a.json"), str(tmp_path / "b.json")])
    assert nested.exit_code == 0, nested.output  # a merge beside a scan it does not hold
    assert json.loads(nested.stdout)["data"]["parts"] == merged["data"]["parts"]
    assert json.loads(nested.stdout)["sites"] == merged["sites"]


def test_merge_report_and_diff_refuse_a_closed_stdout(tmp_path: Path, shards: tuple[Path, Path]) -> None:
    """`>&-`: the merged report (or the re-rendered one, or the diff) would vanish with exit 0."""
    import os
    import subprocess
    import sys

    a, b = (tmp_path / "a.json", tmp_path / "b.json")
    scan_json(tmp_path, "convnet.pt2", shards[0], a.name)
    scan_json(tmp_path, "convnet.pt2", shards[1], b.name)

    def closed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deadrelu", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=120, preexec_fn=lambda: os.close(1))

    for args in (["merge", str(a), str(b)], ["report", str(a)], ["diff", str(a), str(b)]):
        proc = closed(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("deadrelu: error: stdout is closed"), (args, proc.stderr)
    written = closed("merge", str(a), str(b), "-o", str(tmp_path / "m.json"))
    assert written.returncode == 0, written.stderr
    assert json.loads((tmp_path / "m.json").read_text())["data"]["samples"] == 64
