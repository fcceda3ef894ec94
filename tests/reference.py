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
