"""Every statistic of every fixture, in every model format, against brute force.

The brute force (fixtures/bruteforce.py) runs the eager fixture model with its own
pre-activation recorder and reduces the materialised tensors with numpy in float64; it
shares no code with deadrelu.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import bruteforce
from deadrelu import ScanOptions, scan
from reference import assert_unit_stats_match

FORMATS = {
    "torchscript": lambda name: (f"{name}.ts.pt", {}),
    "exported_program": lambda name: (f"{name}.pt2", {}),
    "state_dict": lambda name: (f"{name}.state_dict.pt", {"arch": f"fixtures/fixture_models.py:{_cls(name)}"}),
    "pickle": lambda name: (f"{name}.pickle.pt", {"trust_pickle": True}),
}
MODELS = ("convnet", "seqnet", "mlp")


def _cls(name: str) -> str:
    return {"convnet": "ConvNet", "seqnet": "SeqNet", "mlp": "MLP"}[name]


@functools.cache
def truth(name: str) -> tuple[dict, ...]:
    return tuple(bruteforce.bruteforce(name))


@functools.cache
def scanned(name: str, fmt: str, batch_size: int = 16):
    filename, extra = FORMATS[fmt](name)
    root = Path(__file__).resolve().parent.parent
    options = ScanOptions(device="cpu", batch_size=batch_size, **extra)
    return scan(root / "fixtures" / filename, root / "fixtures" / f"{name}.calib.npy", options)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", MODELS)
def test_sites_and_dead_sets_match_brute_force(name: str, fmt: str, expected: dict) -> None:
    report = scanned(name, fmt)
    want = truth(name)
    assert report.model.format == fmt
    assert [s.name for s in report.sites] == [w["name"] for w in want]
    for site, ref in zip(report.sites, want):
        assert site.op == ref["op"], site.name
        assert site.units == ref["units"], site.name
        assert site.unit_axis == ref["axis"] % (3 if name == "seqnet" and ref["axis"] == -1 else 100), site.name
        assert list(site.verdict.dead) == ref["dead_units"], site.name
        assert list(site.verdict.near_dead) == ref["near_dead_units"], site.name
    planted = {s["name"]: s["dead_units"] for s in expected["models"][name]["sites"]}
    assert {s.name: list(s.verdict.dead) for s in report.sites} == planted


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", MODELS)
def test_per_unit_statistics_match_brute_force(name: str, fmt: str) -> None:
    report = scanned(name, fmt)
    assert_unit_stats_match(report, truth(name))
    for site, ref in zip(report.sites, truth(name)):
        pre = ref["preact"]
        m = site.preact
        np.testing.assert_allclose([m.mean, m.std, m.min, m.max], [pre["mean"], pre["std"], pre["min"], pre["max"]],
                                   rtol=1e-5, atol=1e-5, err_msg=site.name)


def test_json_document_carries_the_same_numbers() -> None:
    report = scanned("convnet", "torchscript")
    doc = report.to_dict()
    for site, ref in zip(doc["sites"], truth("convnet")):
        assert site["dead_units"] == ref["dead_units"]
        assert site["dead"] == len(ref["dead_units"])
        np.testing.assert_allclose(site["per_unit"]["max"], ref["per_unit"]["max"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(site["per_unit"]["active_rate"], ref["per_unit"]["active_rate"])
    assert doc["summary"]["dead"] == sum(len(r["dead_units"]) for r in truth("convnet"))
    assert doc["summary"]["units"] == sum(r["units"] for r in truth("convnet"))


def test_batch_size_does_not_change_results() -> None:
    a, b = scanned("convnet", "torchscript", 16), scanned("convnet", "torchscript", 7)
    for x, y in zip(a.sites, b.sites):
        assert x.verdict == y.verdict
        # per-batch moments are float32 reductions (the kernel's: of up to 128 values per
        # vector lane): agreement to float32 rounding of the data
        np.testing.assert_allclose(x.stats.mean, y.stats.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x.stats.m2, y.stats.m2, rtol=1e-3, atol=1e-6)


def test_dormant_follows_sokar_definition() -> None:
    report = scanned("mlp", "torchscript")
    for site, ref in zip(report.sites, truth("mlp")):
        relu_mean = np.asarray(ref["per_unit"]["relu_mean"])
        score = relu_mean / relu_mean.mean()
        assert list(site.verdict.dormant) == list(np.flatnonzero(score <= 0.1))
