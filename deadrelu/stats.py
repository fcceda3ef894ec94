"""Per-unit statistics of pre-activations: update, merge, result. Plain tensors, no I/O.

Collecting is separate from judging: `UnitStats.update` folds one batch of one site into
running per-unit accumulators that live on the tensor's device; nothing is copied to the
host until `UnitStats.result`. Moments use Chan's parallel form (count, mean, M2), so two
accumulators merge exactly and large offsets (pre-activations of 1e4 and more) do not
cancel. Non-finite values (NaN, +-Inf) are counted apart and kept out of min/max/moments;
+Inf still counts as a positive pre-activation, so it keeps a unit alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deadrelu.reductions import BatchMoments, begin_batch, chan_merge


class UnitStats:
    """Running per-unit statistics of one site. State is plain tensors on one device."""

    def __init__(self, units: int, device: torch.device | str = "cpu") -> None:
        f64 = {"dtype": torch.float64, "device": device}
        i64 = {"dtype": torch.int64, "device": device}
        self.units = units
        self.count = torch.zeros(units, **f64)
        self.positive = torch.zeros(units, **i64)
        self.nan = torch.zeros(units, **i64)
        self.inf = torch.zeros(units, **i64)
        self.minimum = torch.full((units,), torch.inf, **f64)
        self.maximum = torch.full((units,), -torch.inf, **f64)
        self.mean = torch.zeros(units, **f64)
        self.m2 = torch.zeros(units, **f64)
        self.relu_sum = torch.zeros(units, **f64)

    @classmethod
    def from_summary(cls, summary: UnitSummary, device: torch.device | str = "cpu") -> UnitStats:
        """Accumulators holding a saved site's statistics (e.g. from a JSON report), to merge."""
        stats = cls(summary.units, device)
        for name in _FIELDS:
            current = getattr(stats, name)
            setattr(stats, name, torch.as_tensor(np.asarray(getattr(summary, name)), dtype=current.dtype).to(device))
        return stats

    def update(self, x: torch.Tensor, axis: int) -> None:
        """Fold one batch of pre-activations (any float dtype) into the accumulators."""
        if x.numel() == 0:
            return
        self.fold(begin_batch(x, axis, output_is_relu=False).complete())

    def merge(self, other: UnitStats) -> None:
        """Fold another accumulator of the same site (e.g. another shard) into this one."""
        if other.units != self.units:
            raise ValueError(f"cannot merge statistics of {other.units} units into {self.units}")
        self.fold(other.as_moments(self.count.device))

    def as_moments(self, device: torch.device | str) -> BatchMoments:
        return BatchMoments(
            count=self.count.to(device),
            positive=self.positive.to(device),
            nan=self.nan.to(device),
            inf=self.inf.to(device),
            minimum=self.minimum.to(device),
            maximum=self.maximum.to(device),
            mean=self.mean.to(device),
            m2=self.m2.to(device),
            relu_sum=self.relu_sum.to(device),
        )

    def fold(self, b: BatchMoments) -> None:
        """Chan's parallel merge of one batch's (or shard's) moments into the running ones."""
        merged = chan_merge(self.as_moments(self.count.device), b)
        for name in _FIELDS:
            value = getattr(merged, name)
            if name in _COUNTS:  # int64 accumulators; a batch's counts may come as exact floats
                value = value.round().to(torch.int64) if value.is_floating_point() else value
            setattr(self, name, value)

    def result(self) -> UnitSummary:
        """Copy the accumulators to the host (the only sync) as numpy float64/int64."""
        host = {name: getattr(self, name).cpu().numpy() for name in _FIELDS}
        return UnitSummary(**host)


_FIELDS = ("count", "positive", "nan", "inf", "minimum", "maximum", "mean", "m2", "relu_sum")
_COUNTS = ("positive", "nan", "inf")


@dataclass(frozen=True)
class UnitSummary:
    """Host copy of one site's per-unit accumulators, with derived per-unit figures."""

    count: np.ndarray
    positive: np.ndarray
    nan: np.ndarray
    inf: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    relu_sum: np.ndarray

    @property
    def units(self) -> int:
        return int(self.count.shape[0])

    @property
    def observed(self) -> np.ndarray:
        """Elements seen per unit, non-finite ones included."""
        return self.count + self.nan + self.inf

    @property
    def active_rate(self) -> np.ndarray:
        return self.positive / np.maximum(self.observed, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.m2, 0) / np.maximum(self.count, 1))

    @property
    def relu_mean(self) -> np.ndarray:
        return self.relu_sum / np.maximum(self.count, 1)

    def site_moments(self) -> tuple[float, float, float, float]:
        """Mean, std, min, max over all finite elements of the site (Chan over units)."""
        n = float(self.count.sum())
        if n == 0:
            return (float("nan"),) * 4
        mean = float((self.count * self.mean).sum() / n)
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        has = self.count > 0
        return mean, (max(m2, 0.0) / n) ** 0.5, float(self.minimum[has].min()), float(self.maximum[has].max())
