"""Per-unit statistics of pre-activations: update, merge, result. Plain tensors, no I/O.

Collecting is separate from judging: `UnitStats.update` folds one batch of one site into
running per-unit accumulators that live on the tensor's device; nothing is copied to the
host until `UnitStats.result`. Moments use Chan's parallel form (count, mean, M2), so two
accumulators merge exactly and large offsets (pre-activations of 1e4 and more) do not
cancel. Non-finite values (NaN, +-Inf) are counted apart and kept out of min/max/moments;
+Inf still counts as a positive pre-activation, so it keeps a unit alive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def _masked_moments(x: torch.Tensor, dims: tuple[int, ...]) -> BatchMoments:
    """One batch that may hold NaN/Inf: moments over the finite values only (two-pass)."""
    finite = torch.isfinite(x)
    count = finite.sum(dim=dims, dtype=torch.float64)
    zeroed = torch.where(finite, x, 0).double()
    mean = zeroed.sum(dim=dims) / count.clamp_min(1)
    centred = torch.where(finite, zeroed - mean.view(_unit_shape(x.ndim, dims)), 0)
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


# The one-pass variance M2 = sum(x^2) - sum(x)^2 / n (float32 sums, float64 difference) is
# kept only where it is at least this fraction of sum(x^2), i.e. |mean| <= ~8 std, which
# bounds its relative error near 64 float32 roundings. Elsewhere (a unit far from zero,
# like a dead unit behind a bias of -50) the centred two-pass sum runs instead.
_ONE_PASS_MIN_RATIO = 1.0 / 64.0


class Scratch:
    """One reusable float buffer for elementwise temporaries (x*x, x>0, max(x, 0)).

    Fresh temporaries of tens of MB cost more in page faults than the reductions that
    use them; one buffer, grown to the largest pre-activation seen, avoids that. Memory
    stays flat: one pre-activation's worth, whatever the dataset size.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat
        if flat is None or flat.numel() < x.numel() or flat.dtype != x.dtype or flat.device != x.device:
            flat = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
            self._flat = flat
        return flat[: x.numel()].view(x.shape)


# Counting positives as a float32 sum of 0/1 is exact below 2**24 elements per unit.
_EXACT_FLOAT_COUNT = 1 << 24


@dataclass(frozen=True)
class PendingBatch:
    """A batch whose input-side reductions are done; `finish` adds the output side.

    Reading the input first lets a probe tap an inplace ReLU before it overwrites its
    input; the ReLU-output sum is then read from the op's own output (for a plain relu
    it is max(x, 0)) instead of computing max(x, 0) again.
    """

    dims: tuple[int, ...]
    moments: BatchMoments
    needs_output: bool  # relu_sum still to be read from the output

    def complete(self, output: torch.Tensor | None = None) -> BatchMoments:
        """The batch's moments, reading the op's output where needed."""
        if not self.needs_output:
            return self.moments
        assert output is not None, "this batch needs the op's output"
        relu_sum = output.detach().sum(dim=self.dims, dtype=torch.float32).double()
        return replace(self.moments, relu_sum=relu_sum)


def _finite_moments(x: torch.Tensor, dims: tuple[int, ...], per_unit: int, scratch: Scratch,
                    relu_from_output: bool) -> BatchMoments | None:
    """All moments of an all-finite batch from a few fast reductions; None if a value is
    not finite. With `relu_from_output`, relu_sum is left for the op's output."""
    total = x.sum(dim=dims).double()
    minimum, maximum = x.amin(dim=dims).double(), x.amax(dim=dims).double()
    if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(minimum).all())
            and bool(torch.isfinite(maximum).all())):
        return None
    buf = scratch.like(x)
    mean = total / per_unit
    squares = torch.mul(x, x, out=buf).sum(dim=dims).double()
    m2 = squares - total * mean
    if bool((m2 < _ONE_PASS_MIN_RATIO * squares).any()):
        centred = torch.sub(x, mean.to(x.dtype).view(_unit_shape(x.ndim, dims)), out=buf)
        m2 = torch.mul(centred, centred, out=buf).sum(dim=dims).double()
    if per_unit < _EXACT_FLOAT_COUNT:
        positive = torch.gt(x, 0, out=buf).sum(dim=dims).round().to(torch.int64)
    else:
        positive = (x > 0).sum(dim=dims, dtype=torch.int64)
    units = total.shape[0]
    relu_sum = (torch.zeros(units, dtype=torch.float64, device=x.device) if relu_from_output
                else torch.clamp_min(x, 0, out=buf).sum(dim=dims).double())
    zeros = torch.zeros(units, dtype=torch.int64, device=x.device)
    return BatchMoments(
        count=torch.full((units,), float(per_unit), dtype=torch.float64, device=x.device),
        positive=positive, nan=zeros, inf=zeros, minimum=minimum, maximum=maximum,
        mean=mean, m2=m2, relu_sum=relu_sum,
    )


def _unit_shape(ndim: int, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else -1 for d in range(ndim)]


def begin_batch(x: torch.Tensor, axis: int, output_is_relu: bool, scratch: Scratch | None = None) -> PendingBatch:
    """Reduce the input side of one batch now (before an inplace op can overwrite it).

    Args:
        output_is_relu: the op's output will be max(x, 0) (a plain relu); the ReLU-output
            sum is then read from it in `finish`.
        scratch: a reusable temporary buffer (a fresh one if None).

    On CPU the finite check costs nothing, so the fast path runs and the masked one only
    when a value is not finite. On an accelerator that check would be a host sync per
    batch, so the masked (always correct) path runs unconditionally.
    """
    x = x.detach()
    if x.ndim == 0:
        x = x.reshape(1)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # half-precision reductions overflow; per-batch float32 is enough
    axis = axis % x.ndim
    dims = reduce_dims(x.ndim, axis)
    units = x.shape[axis]
    per_unit = x.numel() // units if units else 0
    if x.device.type != "cpu":
        return PendingBatch(dims, _masked_moments(x, dims), needs_output=False)
    moments = _finite_moments(x, dims, per_unit, scratch or Scratch(), output_is_relu)
    if moments is None:
        return PendingBatch(dims, _masked_moments(x, dims), needs_output=False)
    return PendingBatch(dims, moments, needs_output=output_is_relu)


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
