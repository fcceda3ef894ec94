"""Per-batch reductions of one pre-activation tensor along its unit axis.

Four ways to reduce a batch, all giving the same `BatchMoments`:

* on CPU, deadrelu's C kernel (`probe.torch_kernel`): every statistic in one read, NaN/Inf
  counted apart, for float32 (and half-precision) pre-activations;
* the CPU fast path, where the kernel is not available or the model is float64: a few
  well-vectorised reductions, temporaries in one reusable buffer, the finite check free
  (no device to sync with); a careful masked path only when a value is not finite;
* the fused path for accelerators: every statistic from one expression over the tensor,
  NaN/Inf masked inside it, moments shifted by a per-unit constant for precision, and no
  host sync -- which `torch.compile` turns into one kernel that reads the tensor once;
* the masked path: two passes, exact, for batches that hold NaN/Inf on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

def reduce_dims(ndim: int, axis: int) -> tuple[int, ...]:
    """Every dimension of an ndim tensor except the unit axis."""
    return tuple(d for d in range(ndim) if d != axis)


@dataclass(frozen=True)
class BatchMoments:
    """Per-unit reductions of one batch: small vectors on the batch's device, or a plain
    number where every unit has the same value (e.g. the count of an all-finite batch)."""

    count: torch.Tensor | float  # finite elements per unit
    positive: torch.Tensor  # elements > 0, +Inf included (int64, or float64 holding integers)
    nan: torch.Tensor | int
    inf: torch.Tensor | int  # both signs
    minimum: torch.Tensor  # finite minimum (float64; +inf when no finite value)
    maximum: torch.Tensor  # finite maximum (float64; -inf when no finite value)
    mean: torch.Tensor  # float64
    m2: torch.Tensor  # sum of squared deviations from mean, float64
    relu_sum: torch.Tensor | float  # sum of max(x, 0) over finite values, float64


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
    """A batch whose input-side reductions are done; `complete` adds the output side.

    Reading the input first lets a probe tap an inplace ReLU before it overwrites its
    input; the ReLU-output sum is then read from the op's own output (for a plain relu
    it is max(x, 0)) instead of computing max(x, 0) again.
    """

    dims: tuple[int, ...]
    moments: BatchMoments | None  # None: they are `rows`
    needs_output: bool  # relu_sum still to be read from the output
    rows: torch.Tensor | None = None  # the C kernel's (9, units) rows, when it reduced the batch

    def complete(self, output: torch.Tensor | None = None) -> BatchMoments:
        """The batch's moments, reading the op's output where needed."""
        if self.moments is None:
            assert self.rows is not None
            return kernel_moments(self.rows)
        if not self.needs_output:
            return self.moments
        assert output is not None, "this batch needs the op's output"
        relu_sum = output.detach().sum(dim=self.dims, dtype=_sum_dtype(output)).double()
        return replace(self.moments, relu_sum=relu_sum)


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 sums for a float64 model (its values may not fit float32), float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite_moments(x: torch.Tensor, dims: tuple[int, ...], per_unit: int, scratch: Scratch,
                    relu_from_output: bool) -> BatchMoments | None:
    """All moments of an all-finite batch from a few fast reductions; None if a value is
    not finite. With `relu_from_output`, relu_sum is left for the op's output."""
    total = x.sum(dim=dims).double()
    minimum, maximum = x.amin(dim=dims).double(), x.amax(dim=dims).double()
    if not bool(torch.isfinite(total + minimum + maximum).all()):  # NaN/Inf anywhere shows here
        return None
    buf = scratch.like(x)
    mean = total / per_unit
    squares = torch.mul(x, x, out=buf).sum(dim=dims).double()
    m2 = squares - total * mean
    if bool((m2 < _ONE_PASS_MIN_RATIO * squares).any()):
        mean, m2 = _centred_moments(x, mean, dims, per_unit, buf)
    if per_unit < _EXACT_FLOAT_COUNT:
        positive = torch.gt(x, 0, out=buf).sum(dim=dims).round().to(torch.int64)
    else:
        positive = (x > 0).sum(dim=dims, dtype=torch.int64)
    relu_sum = 0.0 if relu_from_output else torch.clamp_min(x, 0, out=buf).sum(dim=dims).double()
    return BatchMoments(count=float(per_unit), positive=positive, nan=0, inf=0, minimum=minimum, maximum=maximum,
                        mean=mean, m2=m2, relu_sum=relu_sum)


def _centred_moments(x: torch.Tensor, rough_mean: torch.Tensor, dims: tuple[int, ...], per_unit: int,
                     buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2) per unit, about the rough mean c rounded to x's dtype (d = x - c is exact
    for x near c).

    M2 = sum(d^2) would add n*(mean - c)^2, the rounding of c and of the float32 sum
    behind it (about 1e-6 of the mean): negligible unless |mean| > ~300 std (1e-7 of the
    variance there), but 0.3-0.6% of the variance of a unit whose std is 1e-6 of its mean
    (measured, batches of 8 to 32). Such
    batches (`_FAR_FROM_CENTRE`) take two more passes for the corrected two-pass formula,
    mean = c + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n, in float64.
    """
    centre = rough_mean.to(x.dtype)
    shape = _unit_shape(x.ndim, dims)
    centred = torch.sub(x, centre.view(shape), out=buf)
    squares = torch.mul(centred, centred, out=buf).sum(dim=dims).double()
    if not spread_within(rough_mean * rough_mean * per_unit, squares, _FAR_FROM_CENTRE):
        return rough_mean, squares
    centred = torch.sub(x, centre.view(shape), out=buf)
    offset = centred.sum(dim=dims).double()
    squares = torch.mul(centred, centred, out=buf).sum(dim=dims).double()
    return centre.double() + offset / per_unit, (squares - offset * offset / per_unit).clamp_min(0.0)


# std / |mean| under which a float32 unit is constant but for rounding (its spread is under
# two float32 steps of its mean): no moment formula can say more about it than that
CONSTANT_SPREAD = 2.5e-7

# |mean| / std between which the centre's rounding is corrected (below: under 1e-7 of the
# variance; above: a constant unit, see `CONSTANT_SPREAD`)
_FAR_FROM_CENTRE = (300.0, 1 / CONSTANT_SPREAD)


def spread_within(squared_mean: Any, spread: Any, window: tuple[float, float]) -> bool:
    """Whether any unit's |mean| / std lies inside ``window`` (low, high), from its squared
    mean and its variance (or both times n); torch tensors or numpy arrays."""
    low, high = window
    return bool(((squared_mean > low * low * spread) & (squared_mean < high * high * spread)).any())


def _unit_shape(ndim: int, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else -1 for d in range(ndim)]


def begin_batch(x: torch.Tensor, axis: int, output_is_relu: bool, scratch: Scratch | None = None) -> PendingBatch:
    """Reduce the input side of one batch now (before an inplace op can overwrite it).

    Args:
        output_is_relu: the op's output will be max(x, 0) (a plain relu); the ReLU-output
            sum is then read from it in `finish`.
        scratch: a reusable temporary buffer (a fresh one if None).

    This is the CPU path: the finite check costs nothing there, so the fast reductions
    run and the masked ones only when a value is not finite. (On an accelerator that check
    would be a host sync per batch: `BatchReducer` takes the fused path there.)
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
    moments = _finite_moments(x, dims, per_unit, scratch or Scratch(), output_is_relu)
    if moments is None:
        return PendingBatch(dims, _masked_moments(x, dims), needs_output=False)
    return PendingBatch(dims, moments, needs_output=output_is_relu)




def _kernel_reads(x: torch.Tensor) -> bool:
    """Whether the C kernel can read x's memory: a plain strided float32/half tensor (a
    float64 model keeps PyTorch's float64 sums)."""
    return (x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.layout == torch.strided
            and type(x) in (torch.Tensor, torch.nn.Parameter) and not x.is_neg())


class RowsKernel(Protocol):
    """deadrelu's C kernel on CPU tensors (`probe.torch_kernel.TorchKernel`)."""

    def rows(self, x: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The (9, units) float64 statistics of a float32 tensor, in `BatchMoments` field
        order (into `out` where given)."""
        ...

    def fold(self, acc: torch.Tensor, rows: torch.Tensor) -> None:
        """acc += rows (Chan's merge of two such row sets), in place."""
        ...


def kernel_batch(kernel: RowsKernel, x: torch.Tensor, axis: int, rows: torch.Tensor | None = None) -> PendingBatch:
    """One batch reduced by deadrelu's C kernel (`probe.torch_kernel`), all nine statistics
    in one read of x, NaN/Inf counted apart; written into `rows` where given (a (9, units)
    float64 buffer the caller reuses once the batch is folded)."""
    x = x.detach()
    if x.ndim == 0:
        x = x.reshape(1)
    if x.dtype != torch.float32:
        x = x.float()  # the kernel reads float32; half precision is exact in it
    axis = axis % x.ndim
    return PendingBatch(reduce_dims(x.ndim, axis), None, needs_output=False, rows=kernel.rows(x, axis, rows))


def kernel_moments(rows: torch.Tensor) -> BatchMoments:
    """The kernel's (9, units) rows (`BatchMoments` field order) as moments."""
    count, positive, nan, inf, minimum, maximum, mean, m2, relu_sum = rows.unbind(0)
    return BatchMoments(count=count, positive=positive, nan=nan, inf=inf, minimum=minimum, maximum=maximum,
                        mean=mean, m2=m2, relu_sum=relu_sum)


# --- the fused, sync-free path ----------------------------------------------------------------

def count_dtype(x: torch.Tensor, dims: list[int] | tuple[int, ...]) -> torch.dtype:
    """float32 for counts of up to 2**24 elements per unit (exact there), float64 beyond."""
    per_unit = 1
    for d in dims:
        per_unit *= int(x.shape[d])
    return torch.float32 if per_unit < _EXACT_FLOAT_COUNT else torch.float64


def fused_reductions(x: torch.Tensor, dims: list[int], shift: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every per-unit statistic of a batch in one expression (one kernel once compiled).

    Non-finite values are masked inside; moments are taken about `shift` (a per-unit value
    near the data, broadcastable to x), so float32 sums of squares do not cancel.
    Returns the rows of `moments_from_rows`: (shifted sum, shifted sum of squares, finite
    min, finite max, positives, sum of max(x, 0), NaNs, Infs); counts in `count_dtype`.
    """
    counts = count_dtype(x, dims)
    finite = torch.isfinite(x)
    centred = torch.where(finite, x - shift, 0.0)
    zeroed = torch.where(finite, x, 0.0)
    return (centred.sum(dims), (centred * centred).sum(dims),
            torch.where(finite, x, float("inf")).amin(dims), torch.where(finite, x, float("-inf")).amax(dims),
            (x > 0).sum(dims, dtype=counts), zeroed.clamp_min(0.0).sum(dims),
            torch.isnan(x).sum(dims, dtype=counts), torch.isinf(x).sum(dims, dtype=counts))


def moments_from_rows(parts: Sequence[torch.Tensor], shift: torch.Tensor,
                      per_unit: torch.Tensor | float) -> BatchMoments:
    """`BatchMoments` from the rows of `fused_reductions` (8) or `fast_reductions` (6, an
    all-finite batch): float64 arithmetic on small vectors only, no host sync. Counts stay
    float64 (exact to 2**53), so this also runs inside a compiled program."""
    total, squares, minimum, maximum, positive, relu_sum = (p.double() for p in parts[:6])
    if len(parts) == 8:
        nan, inf = parts[6].double().round(), parts[7].double().round()
        count = per_unit - nan - inf
    else:
        nan = inf = torch.zeros_like(total)
        count = per_unit + torch.zeros_like(total)
    offset = total / count.clamp_min(1.0)
    return BatchMoments(count=count, positive=positive.round(), nan=nan, inf=inf, minimum=minimum,
                        maximum=maximum, mean=torch.where(count > 0, shift.reshape(-1).double() + offset, 0.0),
                        m2=(squares - total * offset).clamp_min(0.0), relu_sum=relu_sum)


def chan_merge(a: BatchMoments, b: BatchMoments) -> BatchMoments:
    """Chan's parallel merge of two sets of per-unit moments (running and batch, or two shards)."""
    total = a.count + b.count
    safe_total = total.clamp_min(1) if isinstance(total, torch.Tensor) else max(total, 1)
    delta = b.mean - a.mean
    return BatchMoments(count=total, positive=a.positive + b.positive, nan=a.nan + b.nan, inf=a.inf + b.inf,
                        minimum=torch.minimum(a.minimum, b.minimum), maximum=torch.maximum(a.maximum, b.maximum),
                        mean=a.mean + delta * (b.count / safe_total),
                        m2=a.m2 + b.m2 + delta * delta * (a.count * b.count / safe_total),
                        relu_sum=a.relu_sum + b.relu_sum)


def site_shift(x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-unit value near the data, broadcastable to x: the shift of the fused and
    compiled paths' moments.

    The finite mean of each unit over this (first) batch; 0 for a unit with no finite
    value. Computed once per site, so its few passes do not matter.
    """
    x = x.detach()
    axis = axis % x.ndim
    dims = reduce_dims(x.ndim, axis)
    finite = torch.isfinite(x)
    count = finite.sum(dims, dtype=torch.float32).clamp_min(1)
    mean = torch.where(finite, x, 0).sum(dims, dtype=torch.float32) / count
    return mean.reshape(_unit_shape(x.ndim, dims))


def fast_reductions(x: torch.Tensor, shift: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, ...]:
    """The statistics of an all-finite batch in one expression, for torch.compile: the
    first six rows of `fused_reductions`, with fewer operations per element."""
    centred = x - shift
    return (centred.sum(dims), (centred * centred).sum(dims), x.amin(dims), x.amax(dims),
            (x > 0).sum(dims, dtype=count_dtype(x, dims)), x.clamp_min(0.0).sum(dims))


def rows_finite(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool: the (unmasked) sums and bounds are finite, so the batch was."""
    total, squares, minimum, maximum = (p.double() for p in parts[:4])
    return torch.isfinite(total + squares + minimum + maximum).all()


# Each distinct (site shape) compiles once; models have a few dozen. Dynamo's default
# limit (8 graphs per function) would silently send the rest back to eager.
_COMPILED_SHAPES_LIMIT = 256


class BatchReducer:
    """Reduces batches for a probe.

    * CPU: with `kernel` (called on the first CPU batch: it may build the kernel), deadrelu's
      C kernel for float32 and half-precision sites; else, and for float64
      sites, the eager fast path (`begin_batch`); with compilation ("on", or "auto" with
      `large` where there is no kernel) the `fast_reductions` kernel compiled for each
      site's shape instead (one pass over the tensor);
    * accelerators: the sync-free `fused_reductions`, compiled or eager.

    `compile` is "on", "off" or "auto" (compile when `large` says the data repays the
    compilation). Shapes are compiled statically -- dynamic shapes gave kernels several
    times slower -- and only those seen in the first forward pass (`freeze`): a later new
    shape (the last, shorter batch) takes the eager path instead of compiling again. A
    compilation that fails falls back to eager and says so once through `notify`.
    """

    def __init__(self, compile: str = "off", large: bool = False, notify: Callable[[str], None] | None = None,
                 kernel: Callable[[], RowsKernel | None] | None = None) -> None:
        self.scratch = Scratch()
        self.mode = compile
        self.large = large
        self.notify = notify
        self._find_kernel = kernel  # called once, on the first CPU batch
        self._kernel: RowsKernel | None = None
        self.kernel_used = False  # a batch was reduced by the C kernel
        self._compiled: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self._shapes: set[tuple[int, ...]] = set()
        self._frozen = False
        self._failed = False

    @property
    def compiled_any(self) -> bool:
        """Whether a compiled reduction ran."""
        return bool(self._compiled) and not self._failed

    def freeze(self) -> None:
        """The first forward pass is done: compile no new shapes from now on."""
        self._frozen = True

    def _compile_for(self, x: torch.Tensor) -> bool:
        if self._failed or self.mode == "off" or (self.mode == "auto" and not self.large):
            return False
        if self.mode == "auto" and x.device.type == "cpu" and _kernel_reads(x) and self._cpu_kernel() is not None:
            return False  # the kernel is as fast, and has nothing to compile
        shape = (*x.shape, x.device.type == "cpu")
        if shape in self._shapes:
            return True
        if self._frozen or len(self._shapes) >= _COMPILED_SHAPES_LIMIT:
            return False
        self._shapes.add(shape)
        return True

    @property
    def kernel(self) -> RowsKernel | None:
        """The C kernel, once a CPU batch has looked for it (None before, or where there is none)."""
        return self._kernel

    def _cpu_kernel(self) -> RowsKernel | None:
        if self._find_kernel is not None:
            self._kernel, self._find_kernel = self._find_kernel(), None
        return self._kernel

    def begin(self, x: torch.Tensor, axis: int, output_is_relu: bool, shift: torch.Tensor,
              rows: torch.Tensor | None = None) -> PendingBatch:
        """A batch of a site, its input reduced. `rows`: where the C kernel may write its
        statistics (a (9, units) float64 buffer, reused by the caller once the batch is folded)."""
        compiled = self._compile_for(x)
        if x.device.type == "cpu" and not compiled:
            kernel = self._cpu_kernel() if _kernel_reads(x) else None
            if kernel is None:
                return begin_batch(x, axis, output_is_relu, self.scratch)
            self.kernel_used = True
            return kernel_batch(kernel, x, axis, rows)
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        axis = axis % x.ndim
        dims = reduce_dims(x.ndim, axis)
        shift = shift.to(x.dtype)
        per_unit = float(x.numel() // max(x.shape[axis], 1))
        if x.device.type == "cpu":
            parts = self._run("fast", fast_reductions, x, shift, list(dims))
            if bool(rows_finite(parts)):  # a free check on CPU
                return PendingBatch(dims, moments_from_rows(parts, shift, per_unit), needs_output=False)
            return PendingBatch(dims, _masked_moments(x, dims), needs_output=False)
        if compiled:
            parts = self._run("fused", fused_reductions, x, list(dims), shift)
        else:
            parts = fused_reductions(x, list(dims), shift)
        return PendingBatch(dims, moments_from_rows(parts, shift, per_unit), needs_output=False)

    def _run(self, key: str, fn: Callable[..., tuple[torch.Tensor, ...]], *args: object) -> tuple[torch.Tensor, ...]:
        if not self._failed:
            try:
                if key not in self._compiled:
                    import torch._dynamo

                    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                                _COMPILED_SHAPES_LIMIT)
                    self._compiled[key] = torch.compile(fn, dynamic=False)
                return self._compiled[key](*args)
            except Exception as exc:  # a compiler failure must not cost the scan
                self._failed = True
                if self.notify:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                    self.notify(f"torch.compile failed ({first}); using the eager path")
        return fn(*args)
