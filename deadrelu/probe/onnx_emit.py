"""The nodes that reduce an ONNX site's pre-activation to per-unit statistics, and how
their output rows are read back on the host (see `deadrelu.probe.onnx_probe`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deadrelu.onnx_sites import OnnxSite
from deadrelu.probe.kernel import DOMAIN as KERNEL_DOMAIN
from deadrelu.probe.kernel import OP_TYPE as KERNEL_OP
from deadrelu.reductions import CONSTANT_SPREAD, spread_within

FAST_ROWS = ("maximum", "minimum", "mean", "var", "positive", "relu_mean")  # var, relu_mean: per element
MASKED_ROWS = ("count", "positive", "nan", "inf", "minimum", "maximum", "mean", "m2", "relu_sum")
PREFIX = "deadrelu::"
EXACT_FLOAT_COUNT = 1 << 24  # a float32 sum of 0/1 values is exact up to here


# --- site layout and host-side decoding ------------------------------------------------------


@dataclass(frozen=True)
class SitePlan:
    """A site to scan: where its unit axis is and how its statistics come out."""

    id: int
    site: OnnxSite
    rank: int
    axis: int  # unit axis of the pre-activation

    @property
    def flat(self) -> bool:
        """A vector or scalar pre-activation is one unit, reduced as a (values, 1) matrix."""
        return self.rank < 2

    @property
    def work_rank(self) -> int:
        return 2 if self.flat else self.rank

    @property
    def work_axis(self) -> int:
        return 1 if self.flat else self.axis

    @property
    def reduce_axes(self) -> list[int]:
        return [d for d in range(self.work_rank) if d != self.work_axis]

    @property
    def pack_axis(self) -> int:
        """The (reduced, size-1) axis the statistic rows are concatenated along."""
        return self.reduce_axes[0]

    @property
    def compute_type(self) -> int:
        return TensorProto.DOUBLE if self.site.elem_type == TensorProto.DOUBLE else TensorProto.FLOAT

    def unpack(self, packed: np.ndarray, rows: int) -> np.ndarray:
        """``(n, rows, units)`` float64 from a packed output, n = stacked iterations (1 outside loops)."""
        if packed.size == 0 or packed.ndim < self.work_rank:
            return np.zeros((0, rows, 0))
        if packed.ndim == self.work_rank:  # one row: every axis but the pack and unit axes has size 1
            if self.pack_axis < self.work_axis:
                return packed.reshape(1, rows, -1).astype(np.float64)
            return packed.reshape(1, -1, rows).transpose(0, 2, 1).astype(np.float64)
        lead = packed.shape[: packed.ndim - self.work_rank]
        batch = packed.reshape(-1, *packed.shape[len(lead):]).astype(np.float64)
        moved = np.moveaxis(batch, (1 + self.pack_axis, 1 + self.work_axis), (1, 2))
        return moved.reshape(batch.shape[0], rows, -1)

    def per_unit_counts(self, shapes: np.ndarray, units: int, n: int) -> np.ndarray:
        """Elements per unit of each of the n stacked rows, from the pre-activation shapes."""
        shapes = shapes.reshape(n, -1) if shapes.size else np.ones((n, 0), dtype=np.int64)
        return np.prod(shapes, axis=1, dtype=np.float64) / max(units, 1)


# One site's statistics of a batch, whatever path computed them: ``(n, 9, units)`` float64,
# the `MASKED_ROWS` of n stacked rows (n > 1: the iterations of a Loop/Scan body). Counts
# are float64, exact up to 2**53.
Rows = np.ndarray
COUNT, POSITIVE, NAN, INF, MINIMUM, MAXIMUM, MEAN, M2, RELU_SUM = range(len(MASKED_ROWS))


def fast_rows(rows: np.ndarray, counts: np.ndarray) -> Rows | None:
    """`MASKED_ROWS` from fast-path rows (`FAST_ROWS`); None when a value is not finite.

    Per-element variance and ReLU mean become sums in float64 here, so the graph needs
    no float64 cast and no division by the count."""
    if not np.isfinite(rows[:, :4]).all():
        return None
    out = np.zeros((rows.shape[0], len(MASKED_ROWS), rows.shape[2]))
    count = counts[:, None]
    out[:, COUNT] = count
    out[:, POSITIVE] = np.rint(rows[:, 4])
    out[:, MINIMUM], out[:, MAXIMUM], out[:, MEAN] = rows[:, 1], rows[:, 0], rows[:, 2]
    out[:, M2] = rows[:, 3] * count
    out[:, RELU_SUM] = rows[:, 5] * count
    return out


# A float32 batch mean is off by up to half an ulp (6e-8 of it), and the batch variance
# about it by that squared: (3e-8 * |mean| / std)^2 of the variance, 1e-6 at |mean|/std =
# 3e4. Batches with a unit between that and 2 ulps of spread (below, the unit is constant
# but for rounding) take the masked graph's corrected two-pass moments instead.
_FAR_FROM_ZERO = (3e4, 1 / CONSTANT_SPREAD)  # |mean| / std


def far_from_zero(rows: np.ndarray) -> bool:
    """Whether a unit's fast-path (float32) variance would be too coarse (see `_FAR_FROM_ZERO`)."""
    return spread_within(rows[:, 2] ** 2, rows[:, 3], _FAR_FROM_ZERO)


def masked_rows(rows: np.ndarray) -> Rows:
    """`MASKED_ROWS` from the masked graph's rows, counts rounded to integers."""
    out = np.array(rows, dtype=np.float64)
    out[:, :MINIMUM] = np.rint(out[:, :MINIMUM])  # count, positive, nan, inf
    return out


def kernel_rows(packed: np.ndarray) -> Rows:
    """`Rows` from the kernel's ``(9, units)`` output (``(n, 9, units)`` out of a loop)."""
    if packed.size == 0 or packed.ndim < 2:
        return np.zeros((0, len(MASKED_ROWS), 0))
    return packed.reshape(-1, len(MASKED_ROWS), packed.shape[-1]).astype(np.float64, copy=False)


# --- emitting nodes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Emitted:
    """The two tensors a site's reductions produce, in the graph that holds the site."""

    stats: str  # packed statistics, one row per statistic along the pack axis
    shape: str | None  # the pre-activation's shape (int64); None where the rows need none (kernel)
    stats_type: int  # onnx data type of ``stats``
    rows: str = "fast"  # the layout of ``stats``: "fast", "masked" or "kernel" (see `OnnxScanner._decode`)


class Emitter:
    """Builds nodes that are valid for the model's opset, with names no graph uses."""

    def __init__(self, opset: int, prefix: str) -> None:
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}#{self._count}"

    def node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str) -> str:
        return self.node("Constant", [], hint, value=numpy_helper.from_array(np.asarray(value)))

    def reduce(self, op: str, x: str, axes: list[int], hint: str) -> str:
        """A keepdims reduction over ``axes`` (axes as an input from opset 13/18 on)."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            axes_name = self.const(np.array(axes, dtype=np.int64), "axes")
            return self.node(op, [x, axes_name], hint, keepdims=1)
        return self.node(op, [x], hint, axes=axes, keepdims=1)


def _work_input(em: Emitter, plan: SitePlan) -> str:
    """The pre-activation as the reductions read it: float32/64, at least 2-D."""
    x = plan.site.preact
    if plan.site.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        x = em.node("Cast", [x], "cast", to=TensorProto.FLOAT)
    if plan.flat:
        x = em.node("Reshape", [x, em.const(np.array([-1, 1], dtype=np.int64), "flat")], "flat")
    return x


def _np_type(plan: SitePlan) -> type:
    return np.float64 if plan.compute_type == TensorProto.DOUBLE else np.float32


def emit_fast(em: Emitter, plan: SitePlan) -> Emitted:
    """Fast per-unit reductions of one site, packed as `FAST_ROWS`, and its shape.

    Few full passes over the pre-activation, none of them a float64 cast: max and min
    reduce the contiguous trailing axes first (units last: see `_units_first`); mean and
    variance come from one training-mode BatchNormalization (opset 14+), which computes both
    in two reading passes (centred, as `numpy.var` does) where Mean + Sub + Mul + Sum
    would write two temporaries; the ReLU mean is a GlobalAveragePool of the op's own
    output, which ONNX Runtime pools in its blocked NCHWc layout (a ReduceSum there
    made it convert the whole output back to NCHW). Per-element variances and ReLU
    means become sums on the host, in float64.

    Measured on CPU and rejected: ReduceSumSquare (not vectorised per axis in ONNX
    Runtime, slower than Mul + ReduceSum), Sign of the ReLU output for the positive
    count (a scalar loop, 3x slower than Greater + Cast), LayerNormalization's mean and
    inverse std (a one-pass float32 variance that cancels), one-pass sums of squares
    (cancel for units far from zero, e.g. dead ones behind a large negative bias),
    statistics pooled in the NCHWc layout with depthwise convolutions for -x and the
    x > 0 indicator (no faster, and the indicator misses positive subnormals).
    """
    x = _work_input(em, plan)
    axes, dtype = plan.reduce_axes, _np_type(plan)
    shape = em.node("Shape", [plan.site.preact], "shape")
    rows = _units_first(em, x, plan)
    if rows is not None:
        maximum = _keep_shape(em, em.reduce("ReduceMax", rows, [1], "max_rows"), plan, "max")
        minimum = _keep_shape(em, em.reduce("ReduceMin", rows, [1], "min_rows"), plan, "min")
    else:
        maximum = _reduce_layout(em, "ReduceMax", x, plan, "max")
        minimum = _reduce_layout(em, "ReduceMin", x, plan, "min")
    above = em.node("Greater", [x, em.const(np.array(0, dtype=dtype), "zero")], "gt0")
    positive = em.reduce("ReduceSum", em.node("Cast", [above], "gt0f", to=plan.compute_type), axes, "pos")
    if em.opset >= 14 and plan.work_axis == 1:
        mean, var = _emit_batch_norm(em, x, positive, plan)
    elif em.opset >= 14 and rows is not None:
        mean, var = _emit_batch_norm(em, em.node("Unsqueeze", [rows, em.const(np.array([0], np.int64), "ax0")],
                                                 "rows3"), positive, plan)
    else:
        mean = em.reduce("ReduceMean", x, axes, "mean")
        centred = em.node("Sub", [x, mean], "centred")
        var = em.reduce("ReduceMean", em.node("Mul", [centred, centred], "sq"), axes, "var")
    relu_out = plan.site.output if (plan.site.op_type == "Relu" and x == plan.site.preact) else None
    relu = relu_out or em.node("Relu", [x], "relu")
    if plan.work_axis == 1 and plan.work_rank >= 3 and plan.compute_type == TensorProto.FLOAT:
        relu_mean = em.reduce("ReduceMean", em.node("GlobalAveragePool", [relu], "relu_gap"), [0], "relu_mean")
    else:
        relu_mean = em.reduce("ReduceMean", relu, axes, "relu_mean")
    packed = em.node("Concat", [maximum, minimum, mean, var, positive, relu_mean], "stats", axis=plan.pack_axis)
    return Emitted(packed, shape, plan.compute_type)


def _reduce_layout(em: Emitter, op: str, x: str, plan: SitePlan, hint: str) -> str:
    """A max/min over the reduce axes, the contiguous ones after the unit axis first (a
    row-wise pass, then a small one over the leading axes), which ONNX Runtime runs
    faster than one reduction over scattered axes."""
    inner = [d for d in plan.reduce_axes if d > plan.work_axis]
    outer = [d for d in plan.reduce_axes if d < plan.work_axis]
    if not inner or not outer:
        return em.reduce(op, x, plan.reduce_axes, hint)
    return em.reduce(op, em.reduce(op, x, inner, hint + "_inner"), outer, hint)


def _units_first(em: Emitter, x: str, plan: SitePlan) -> str | None:
    """``(units, everything else)`` when the units are the last axis, else None.

    ONNX Runtime reduces leading axes into a trailing one (a dense layer's (N, F), a
    sequence's (N, T, F)) with a scalar, branchy loop for max and min; one transposed
    copy makes them row-wise, vectorised reductions, twice as fast, and lets one
    BatchNormalization take mean and variance."""
    if plan.work_rank < 2 or plan.work_axis != plan.work_rank - 1:
        return None
    perm = [plan.work_axis, *range(plan.work_axis)]
    moved = em.node("Transpose", [x], "units_first", perm=perm)
    return em.node("Reshape", [moved, em.const(np.array([0, -1], np.int64), "rows_shape")], "rows")


def _keep_shape(em: Emitter, vector: str, plan: SitePlan, hint: str) -> str:
    """A per-unit vector in the keepdims shape of the other reductions (units on the unit axis)."""
    keep = np.ones(plan.work_rank, dtype=np.int64)
    keep[plan.work_axis] = -1
    return em.node("Reshape", [vector, em.const(keep, "keep_shape")], hint)


def _emit_batch_norm(em: Emitter, x: str, positive: str, plan: SitePlan) -> tuple[str, str]:
    """(mean, population variance) per unit of ``x``, whose axis 1 holds the units, in
    the keepdims shape of the other reductions; ``positive`` is the site's per-unit
    positive count (any finite per-unit vector of this batch would do).

    momentum 0 makes the "running" outputs the batch's own statistics. ONNX Runtime's
    CPU kernel writes them into its input_mean and input_var buffers (it aliases them),
    so those must be values computed in this run: a constant there is folded into an
    initializer that ORT may share with an equal weight of the model (a LayerNorm's
    ones or zeros), which the scan would then overwrite. They are 0 * positive and
    0 * positive + 1: finite (a mean would carry a NaN over to the next batch), a few
    vector operations per batch, and as long as the unit axis whatever shape inference
    says.
    """
    dtype = _np_type(plan)
    flat = em.node("Reshape", [positive, em.const(np.array([-1], np.int64), "flat")], "pos_flat")
    zeros = em.node("Mul", [flat, em.const(np.array(0, dtype=dtype), "nought")], "bn_zeros")
    ones = em.node("Add", [zeros, em.const(np.array(1, dtype=dtype), "unity")], "bn_ones")
    normalised, mean, var = em.fresh("bn_y"), em.fresh("bn_mean"), em.fresh("bn_var")
    em.nodes.append(helper.make_node("BatchNormalization", [x, ones, zeros, zeros, ones], [normalised, mean, var],
                                     name=normalised, training_mode=1, momentum=0.0))
    return _keep_shape(em, mean, plan, "mean"), _keep_shape(em, var, plan, "var")


def emit_masked(em: Emitter, plan: SitePlan) -> Emitted:
    """Reductions that count NaN/Inf apart and keep them out of min/max/moments (`MASKED_ROWS`),
    as float64 rows.

    The moments are taken about the float32 mean c by the corrected two-pass formula,
    mean = c + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n with d = x - c, finished in float64
    on the per-unit vectors: the rounding of c cancels, so a unit whose std is 1e-6 of its
    mean keeps its variance (the fast path's float32 batch moments lose 0.1-0.4% there,
    and `OnnxScanner._decode` sends such batches here)."""
    x = _work_input(em, plan)
    axes, dtype, to = plan.reduce_axes, _np_type(plan), plan.compute_type
    big = em.const(np.array(np.finfo(dtype).max, dtype=dtype), "fmax")
    zero = em.const(np.array(0, dtype=dtype), "zero")
    one = em.const(np.array(1, dtype=dtype), "one")
    is_nan = em.node("IsNaN", [x], "isnan")
    is_inf = em.node("Greater", [em.node("Abs", [x], "abs"), big], "isinf")
    finite = em.node("Not", [em.node("Or", [is_nan, is_inf], "bad")], "finite")
    count = em.reduce("ReduceSum", em.node("Cast", [finite], "finitef", to=to), axes, "count")
    nan = em.reduce("ReduceSum", em.node("Cast", [is_nan], "nanf", to=to), axes, "nan")
    inf = em.reduce("ReduceSum", em.node("Cast", [is_inf], "inff", to=to), axes, "inf")
    zeroed = em.node("Where", [finite, x, zero], "zeroed")
    n = em.node("Max", [count, one], "n")
    rough = em.node("Div", [em.reduce("ReduceSum", zeroed, axes, "sum"), n], "rough_mean")
    centred = em.node("Where", [finite, em.node("Sub", [zeroed, rough], "d"), zero], "centred")
    squares = em.reduce("ReduceSum", em.node("Mul", [centred, centred], "sq"), axes, "squares")
    offset, n64 = _double(em, em.reduce("ReduceSum", centred, axes, "offset")), _double(em, n)
    shift = em.node("Div", [offset, n64], "shift")
    mean = em.node("Add", [_double(em, rough), shift], "mean")
    m2 = em.node("Sub", [_double(em, squares), em.node("Mul", [offset, shift], "offset_sq")], "m2")
    inf_const = em.const(np.array(np.inf, dtype=dtype), "pinf")
    ninf_const = em.const(np.array(-np.inf, dtype=dtype), "ninf")
    minimum = em.reduce("ReduceMin", em.node("Where", [finite, x, inf_const], "minin"), axes, "min")
    maximum = em.reduce("ReduceMax", em.node("Where", [finite, x, ninf_const], "maxin"), axes, "max")
    above = em.node("Cast", [em.node("Greater", [x, zero], "gt0")], "gt0f", to=to)
    positive = em.reduce("ReduceSum", above, axes, "pos")
    relu_sum = em.reduce("ReduceSum", em.node("Relu", [zeroed], "relu"), axes, "relu_sum")
    rows = [_double(em, v) for v in (count, positive, nan, inf, minimum, maximum)] + [mean, m2, _double(em, relu_sum)]
    packed = em.node("Concat", rows, "stats", axis=plan.pack_axis)
    return Emitted(packed, em.node("Shape", [plan.site.preact], "shape"), TensorProto.DOUBLE, "masked")


def _double(em: Emitter, vector: str) -> str:
    """A (small, per-unit) vector cast to float64."""
    return em.node("Cast", [vector], "f64", to=TensorProto.DOUBLE)


def emit_kernel(em: Emitter, plan: SitePlan) -> Emitted:
    """One ``ai.deadrelu::ReluStats`` node (`deadrelu.probe.kernel`): the `MASKED_ROWS`
    of the site as a ``(9, units)`` float64 tensor, from one read of the pre-activation.
    Double-precision sites keep the masked standard-operator reductions (the kernel reads
    float32; float16/bfloat16 pre-activations are cast to it, as for the other paths)."""
    if plan.compute_type == TensorProto.DOUBLE:
        return emit_masked(em, plan)
    x = _work_input(em, plan)
    stats = em.node(KERNEL_OP, [x], "kernel_stats", domain=KERNEL_DOMAIN, axis=plan.work_axis)
    if plan.site.scope:  # a Loop/Scan body's outputs need a known rank; ORT infers none for custom ops
        stats = em.node("Reshape", [stats, em.const(np.array([len(MASKED_ROWS), -1], np.int64), "rows")], "ranked")
    # no Shape: the rows carry their counts (a Shape of the pre-activation would also make
    # ORT convert a blocked NCHWc tensor just to read its dimensions)
    return Emitted(stats, None, TensorProto.DOUBLE, "kernel")


def emit_shape(em: Emitter, plan: SitePlan) -> Emitted:
    """Only the pre-activation's shape (finding ranks that shape inference could not)."""
    shape = em.node("Shape", [plan.site.preact], "shape")
    return Emitted(em.node("Identity", [shape], "shape_copy"), shape, TensorProto.INT64)


EmitFn = Callable[[Emitter, SitePlan], "Emitted"]
