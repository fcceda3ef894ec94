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


def reduce_dims(ndim: int, axis: int) -> tuple[int, ...]:
    """Every dimension of an ndim tensor except the unit axis."""
    return tuple(d for d in range(ndim) if d != axis)


@dataclass(frozen=True)
class BatchMoments:
    """Per-unit reductions of one batch (small vectors on the batch's device)."""

    count: torch.Tensor  # finite elements per unit (float64)
    positive: torch.Tensor  # elements > 0, +Inf included (int64)
    nan: torch.Tensor  # int64
    inf: torch.Tensor  # int64, both signs
    minimum: torch.Tensor  # finite minimum (float64; +inf when no finite value)
    maximum: torch.Tensor  # finite maximum (float64; -inf when no finite value)
    mean: torch.Tensor  # float64
    m2: torch.Tensor  # sum of squared deviations from mean, float64
    relu_sum: torch.Tensor  # sum of max(x, 0) over finite values, float64


def _fast_moments(x: torch.Tensor, dims: tuple[int, ...], per_unit: int) -> BatchMoments:
    """One batch, assuming every value is finite: few passes, no temporaries of float64."""
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    units = mean.shape[0]
    zeros = torch.zeros(units, dtype=torch.int64, device=x.device)
    return BatchMoments(
        count=torch.full((units,), float(per_unit), dtype=torch.float64, device=x.device),
        positive=(x > 0).sum(dim=dims, dtype=torch.int32).to(torch.int64),
        nan=zeros,
        inf=zeros,
        minimum=x.amin(dim=dims).double(),
        maximum=x.amax(dim=dims).double(),
        mean=mean.double(),
        m2=var.double() * per_unit,
        relu_sum=x.clamp_min(0).sum(dim=dims, dtype=torch.float64),
    )


def _masked_moments(x: torch.Tensor, dims: tuple[int, ...]) -> BatchMoments:
    """One batch that may hold NaN/Inf: moments over the finite values only (two-pass)."""
    finite = torch.isfinite(x)
    count = finite.sum(dim=dims, dtype=torch.float64)
    shape = [1] * x.ndim
    axis = next(d for d in range(x.ndim) if d not in dims)
    shape[axis] = -1
    zeroed = torch.where(finite, x, 0).double()
    mean = zeroed.sum(dim=dims) / count.clamp_min(1)
    centred = torch.where(finite, zeroed - mean.view(shape), 0)
    return BatchMoments(
        count=count,
        positive=(x > 0).sum(dim=dims, dtype=torch.int64),
        nan=torch.isnan(x).sum(dim=dims, dtype=torch.int64),
        inf=torch.isinf(x).sum(dim=dims, dtype=torch.int64),
        minimum=torch.where(finite, x, torch.inf).amin(dim=dims).double(),
        maximum=torch.where(finite, x, -torch.inf).amax(dim=dims).double(),
        mean=mean,
        m2=(centred * centred).sum(dim=dims),
        relu_sum=zeroed.clamp_min(0).sum(dim=dims),
    )


def batch_moments(x: torch.Tensor, axis: int) -> BatchMoments:
    """Per-unit reductions of one pre-activation tensor along its unit axis.

    On CPU the finite check is free, so the fast path runs and the masked one only when a
    value is not finite. On an accelerator, branching would need a host sync per batch, so
    the masked (always correct) path runs unconditionally.
    """
    if x.ndim == 0:
        x = x.reshape(1)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # half-precision reductions overflow; per-batch float32 is enough
    axis = axis % x.ndim
    dims = reduce_dims(x.ndim, axis)
    units = x.shape[axis]
    per_unit = x.numel() // units if units else 0
    if x.device.type != "cpu":
        return _masked_moments(x, dims)
    fast = _fast_moments(x, dims, per_unit)
    if bool(torch.isfinite(fast.mean).all()) and bool(torch.isfinite(fast.m2).all()):
        return fast
    return _masked_moments(x, dims)


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

    def update(self, x: torch.Tensor, axis: int) -> None:
        """Fold one batch of pre-activations (any float dtype) into the accumulators."""
        if x.numel() == 0:
            return
        self._fold(batch_moments(x.detach(), axis))

    def merge(self, other: UnitStats) -> None:
        """Fold another accumulator of the same site (e.g. another shard) into this one."""
        if other.units != self.units:
            raise ValueError(f"cannot merge statistics of {other.units} units into {self.units}")
        self._fold(other.as_moments(self.count.device))

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

    def _fold(self, b: BatchMoments) -> None:
        total = self.count + b.count
        safe_total = total.clamp_min(1)
        delta = b.mean - self.mean
        self.mean = self.mean + delta * (b.count / safe_total)
        self.m2 = self.m2 + b.m2 + delta * delta * (self.count * b.count / safe_total)
        self.count = total
        self.positive += b.positive
        self.nan += b.nan
        self.inf += b.inf
        self.minimum = torch.minimum(self.minimum, b.minimum)
        self.maximum = torch.maximum(self.maximum, b.maximum)
        self.relu_sum = self.relu_sum + b.relu_sum

    def result(self) -> UnitSummary:
        """Copy the accumulators to the host (the only sync) as numpy float64/int64."""
        host = {name: getattr(self, name).cpu().numpy() for name in _FIELDS}
        return UnitSummary(**host)


_FIELDS = ("count", "positive", "nan", "inf", "minimum", "maximum", "mean", "m2", "relu_sum")


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
