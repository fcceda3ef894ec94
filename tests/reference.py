"""Brute-force per-unit statistics with numpy, shared by the statistics tests."""

from __future__ import annotations

import numpy as np


def unit_stats(preact: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """float64 per-unit statistics of finite values, NaN/Inf counted apart."""
    moved = np.moveaxis(np.asarray(preact, dtype=np.float64), axis, 0).reshape(preact.shape[axis], -1)
    finite = np.isfinite(moved)
    values = [row[f] for row, f in zip(moved, finite)]
    return {
        "count": finite.sum(1),
        "positive": (moved > 0).sum(1),
        "nan": np.isnan(moved).sum(1),
        "inf": np.isinf(moved).sum(1),
        "min": np.array([v.min() if v.size else np.inf for v in values]),
        "max": np.array([v.max() if v.size else -np.inf for v in values]),
        "mean": np.array([v.mean() if v.size else 0.0 for v in values]),
        "std": np.array([v.std() if v.size else 0.0 for v in values]),
        "relu_mean": np.array([np.maximum(v, 0).mean() if v.size else 0.0 for v in values]),
    }


def assert_site_stats(site, ref: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """One scanned site against `unit_stats` of its pre-activations: counts and positives
    exactly, extremes and moments to `rtol`/`atol` (std to ten times `rtol`: it is a
    difference of sums in float32 models)."""
    s = site.stats
    np.testing.assert_array_equal(s.count, ref["count"], err_msg=site.name)
    np.testing.assert_array_equal(s.positive, ref["positive"], err_msg=site.name)
    np.testing.assert_allclose(s.minimum, ref["min"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.maximum, ref["max"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.std, ref["std"], rtol=10 * rtol, atol=atol, err_msg=site.name)


def assert_unit_stats_match(report, want) -> None:
    """A scan's per-unit statistics against a brute force (`fixtures/bruteforce.py`): dead
    sets, counts and positives exactly, extremes and moments to float32 rounding."""
    assert [site.name for site in report.sites] == [ref["name"] for ref in want]
    for site, ref in zip(report.sites, want):
        unit, s = ref["per_unit"], site.stats
        assert list(site.verdict.dead) == ref["dead_units"], site.name
        np.testing.assert_array_equal(s.positive, unit["positive"], err_msg=site.name)
        np.testing.assert_array_equal(s.count, unit["count"], err_msg=site.name)
        np.testing.assert_allclose(s.minimum, unit["min"], rtol=1e-6, atol=1e-6, err_msg=site.name)
        np.testing.assert_allclose(s.maximum, unit["max"], rtol=1e-6, atol=1e-6, err_msg=site.name)
        np.testing.assert_allclose(s.mean, unit["mean"], rtol=1e-5, atol=1e-5, err_msg=site.name)
        np.testing.assert_allclose(s.std, unit["std"], rtol=1e-5, atol=1e-5, err_msg=site.name)
        np.testing.assert_allclose(s.active_rate, unit["active_rate"], rtol=1e-12, err_msg=site.name)
        np.testing.assert_allclose(s.relu_mean, unit["relu_mean"], rtol=1e-5, atol=1e-6, err_msg=site.name)
