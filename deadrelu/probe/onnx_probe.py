"""Per-unit statistics of ONNX ReLU sites, reduced inside the graph while data streams.

Three phases, like ONNX Runtime's calibrators, without their costs:

1. *Augment.* Right after each site, nodes reduce its pre-activation over every axis but
   the unit axis and bring out one small tensor per site, threaded out of ``If`` branches
   and ``Loop``/``Scan`` bodies. Whole pre-activations never leave ONNX Runtime. On CPU,
   by default, that is one node of deadrelu's own kernel (`emit_kernel`,
   `deadrelu.probe.kernel`): nine statistics from one read, ``(9, units)`` float64.
   Otherwise ONNX Runtime's own operators compute max, min, mean, variance, positive count
   and ReLU mean (`emit_fast`; see it for how few passes they take) into ``(6, units)``
   float32, plus the pre-activation's ``Shape``. The model is built in memory; its weights
   are appended as serialized protobuf fragments, not copied into a second model, and
   external data stays where it is. The model's own outputs are dropped, and with them
   every node (and weight) that no site's statistics depend on (`prune_to`).
2. *Collect.* One session run per batch; each site's rows become the nine `MASKED_ROWS`
   and are folded on the host into one float64 array per site with Chan's merge (the
   arithmetic of `deadrelu.stats.UnitStats.fold`).
3. *Result.* A `UnitSummary` per site.

Graph optimisations stay on (ORT_ENABLE_ALL: its blocked NCHWc convolutions make plain
inference of a ResNet ~1.4x faster than EXTENDED). A tapped tensor has consumers besides
its ReLU, so ONNX Runtime cannot fuse the ReLU into its producer or drop the tensor; the
tests check the results against a session with every optimisation off. The reduction
nodes are listed so that ONNX Runtime runs each site's right after the site (see
`Rewriter._graph`): each pre-activation is reduced while in cache and freed at once, not
kept to the end.

The kernel counts NaN and +-Inf apart by itself. The operator reductions assume finite
values: when a batch's statistics come back not finite, that batch runs again through a
second, lazily built session whose reductions count NaN and +-Inf apart and keep them out
of min/max/moments (the split of `deadrelu.stats`). Their per-batch partial sums are
float32 (float64 for double models): positive counts are exact below 2**24 elements per
unit per batch, and "dead" (no value > 0) is exact at any size; the kernel's counts are
exact at any size.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from deadrelu.data import ModelInput
from deadrelu.errors import DataError, ModelLoadError, ModelRunError, UsageError
from deadrelu.load import LoadedModel
from deadrelu.load.onnx_format import OnnxModel
from deadrelu.onnx_sites import OnnxSite, ScopeStep, Survey, copy_field, node_label, survey
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.probe.kernel import DOMAIN as KERNEL_DOMAIN
from deadrelu.probe.kernel import OP_TYPE as KERNEL_OP
from deadrelu.probe.kernel import kernel_library
from deadrelu.reductions import CONSTANT_SPREAD, spread_within
from deadrelu.stats import UnitSummary

ProgressFn = Callable[[int], None]

FAST_ROWS = ("maximum", "minimum", "mean", "var", "positive", "relu_mean")  # var, relu_mean: per element
MASKED_ROWS = ("count", "positive", "nan", "inf", "minimum", "maximum", "mean", "m2", "relu_sum")
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
PREFIX = "deadrelu::"
EXACT_FLOAT_COUNT = 1 << 24  # a float32 sum of 0/1 values is exact up to here


# --- public entry ----------------------------------------------------------------------------


def stream_onnx(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device,
                progress: ProgressFn | None, compile_mode: str = "auto",
                notify: Callable[[str], None] | None = None) -> StreamResult:
    """Run every batch through the ONNX model with in-graph reductions at each ReLU site.

    ``compile_mode`` (``--compile``) decides about deadrelu's one-pass kernel on CPU:
    "auto" uses it when it can be built here (else says so through ``notify`` and uses
    ONNX Runtime's operators), "on" requires it, "off" never builds it."""
    kernel = choose_kernel(device, compile_mode, notify)
    return scan_batches(loaded.module, batches, execution_providers(device), progress, kernel=kernel)


def choose_kernel(device: torch.device, compile_mode: str, notify: Callable[[str], None] | None) -> Path | None:
    """The kernel library to scan with, or None for ONNX Runtime's own operators."""
    if compile_mode == "off":
        return None
    if device.type != "cpu":
        if compile_mode == "on" and notify:
            notify("--compile on: the one-pass ONNX kernel runs on CPU only; on CUDA the reductions stay in "
                   "ONNX Runtime's graph")
        return None
    library = kernel_library(notify)
    if library.path is not None:
        return library.path
    if compile_mode == "on":
        raise UsageError(f"--compile on: the one-pass ONNX kernel is not available here: {library.reason}")
    if notify:
        notify(f"the one-pass ONNX kernel is not available ({library.reason}); "
               "scanning with ONNX Runtime's own operators, which is slower")
    return None


def scan_batches(model: OnnxModel, batches: Iterator[ModelInput], providers: list[Any],
                 progress: ProgressFn | None = None, *, optimise: bool = True,
                 kernel: Path | None = None) -> StreamResult:
    """`stream_onnx` with explicit providers; ``optimise=False`` turns every ORT graph
    optimisation off (the reference the tests compare against); ``kernel``: the library
    of deadrelu's one-pass kernel (None: ONNX Runtime's operators)."""
    with OnnxScanner(model, survey(model.proto), providers, optimise, kernel) as scanner:
        samples, partial = 0, False
        try:
            for batch in batches:
                samples += scanner.run(batch)
                if progress:
                    progress(batch.size)
        except KeyboardInterrupt:
            partial = True
        engine = "onnxruntime-kernel" if kernel is not None else "onnxruntime"
        return StreamResult(scanner.observations(), samples, partial, scanner.notes(), engine)


def execution_providers(device: torch.device) -> list[Any]:
    """ONNX Runtime execution providers for a torch device."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UsageError(
            f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDA execution provider; "
            "install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


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


def _fast_rows(rows: np.ndarray, counts: np.ndarray) -> Rows | None:
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


def _far_from_zero(rows: np.ndarray) -> bool:
    """Whether a unit's fast-path (float32) variance would be too coarse (see `_FAR_FROM_ZERO`)."""
    return spread_within(rows[:, 2] ** 2, rows[:, 3], _FAR_FROM_ZERO)


def _masked_rows(rows: np.ndarray) -> Rows:
    """`MASKED_ROWS` from the masked graph's rows, counts rounded to integers."""
    out = np.array(rows, dtype=np.float64)
    out[:, :MINIMUM] = np.rint(out[:, :MINIMUM])  # count, positive, nan, inf
    return out


def _kernel_rows(packed: np.ndarray) -> Rows:
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


# --- rewriting the graph -----------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """A site's two statistic tensors as visible in one graph (its own, or an enclosing one)."""

    plan: SitePlan
    stats: str
    shape: str | None
    stats_type: int
    rows: str = "fast"


class Rewriter:
    """Adds the reductions of every plan to a copy of the graph and brings them out.

    With ``statistics_only`` the model's own outputs are dropped and, with them, every
    main-graph node that no site's statistics depend on (`prune_to`): a classifier's or
    a language model's head after its last ReLU is not computed, since ONNX Runtime runs
    every node of a graph whatever outputs a run asks for."""

    def __init__(self, model: OnnxModel, plans: list[SitePlan], emit: EmitFn,
                 statistics_only: bool = False) -> None:
        self.model = model
        self.plans = plans
        self.emit = emit
        self.statistics_only = statistics_only
        self._emitters = 0

    def head(self) -> tuple[onnx.ModelProto, dict[int, Exposure]]:
        """The augmented model without its main-graph initializers, and where each site's
        statistics come out (graph output names by plan id)."""
        source = self.model.proto
        head = onnx.ModelProto()
        for descriptor, value in source.ListFields():
            if descriptor.name not in ("graph",):
                copy_field(head, descriptor, value)
        graph, exposures = self._graph(source.graph, (), skip=("node", "initializer"))
        if self.statistics_only and exposures:
            del graph.output[:]
        for exposure in exposures:
            _add_outputs(graph, exposure)
        if self.statistics_only and exposures:
            prune_to(graph, [output.name for output in graph.output])
        head.graph.CopyFrom(graph)
        return head, {e.plan.id: e for e in exposures}

    def _emitter(self) -> Emitter:
        self._emitters += 1
        return Emitter(self.model.opset, f"{PREFIX}{self._emitters}::")

    def _graph(self, source: onnx.GraphProto, scope: tuple[ScopeStep, ...],
               skip: tuple[str, ...] = ("node",)) -> tuple[onnx.GraphProto, list[Exposure]]:
        graph = onnx.GraphProto()
        for descriptor, value in source.ListFields():
            if descriptor.name not in skip:
                copy_field(graph, descriptor, value)
        here: dict[int, list[SitePlan]] = {}
        nested: set[int] = set()
        for plan in self.plans:
            site_scope = plan.site.scope
            if site_scope == scope:
                here.setdefault(plan.site.node_index, []).append(plan)
            elif site_scope[: len(scope)] == scope:
                nested.add(site_scope[len(scope)].node_index)
        exposures: list[Exposure] = []
        blocks: list[list[onnx.NodeProto]] = []
        for position, node in enumerate(source.node):
            if position in nested:
                copy, found = self._container(node, position, scope)
                graph.node.append(copy)
                exposures.extend(found)
            else:
                graph.node.append(node)
            for plan in here.get(position, []):
                em = self._emitter()
                emitted = self.emit(em, plan)
                blocks.append(em.nodes)
                exposures.append(Exposure(plan, emitted.stats, emitted.shape, emitted.stats_type, emitted.rows))
        # Main graph: the blocks go last, the first site's last. ONNX Runtime orders nodes by
        # a depth-first walk from the graph's leaves, the last-listed leaf first, so each
        # site's reductions then run right after the site, while its tensor is in cache, and
        # the tensor is freed at once; listed after their sites they would all run at the end.
        graph.node.extend(node for block in (blocks if scope else reversed(blocks)) for node in block)
        return graph, exposures

    def _container(self, node: onnx.NodeProto, position: int,
                   scope: tuple[ScopeStep, ...]) -> tuple[onnx.NodeProto, list[Exposure]]:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        inner: dict[str, list[Exposure]] = {}
        for attr in copy.attribute:
            if not attr.HasField("g"):
                continue
            step = ScopeStep(position, node_label(node), node.op_type, attr.name, -1)
            graph, found = self._graph(attr.g, (*scope, step))
            attr.g.CopyFrom(graph)
            inner[attr.name] = found
        if node.op_type == "If":
            return copy, self._thread_if(copy, inner)
        return copy, self._thread_loop(copy, inner.get("body", []))

    def _thread_if(self, node: onnx.NodeProto, inner: dict[str, list[Exposure]]) -> list[Exposure]:
        """If outputs become [original, then-branch sites, else-branch sites]; each branch
        gives empty stand-ins for the other branch's sites."""
        then_found, else_found = inner.get("then_branch", []), inner.get("else_branch", [])
        branches = {attr.name: attr.g for attr in node.attribute}
        then_graph, else_graph = branches["then_branch"], branches["else_branch"]
        em = self._emitter()
        for exposure in then_found:
            _add_outputs(then_graph, exposure)
        for exposure in else_found:
            _add_outputs(then_graph, _placeholder(em, exposure, then_graph))
        for exposure in then_found:
            _add_outputs(else_graph, _placeholder(em, exposure, else_graph))
        for exposure in else_found:
            _add_outputs(else_graph, exposure)
        return [self._node_outputs(node, em, e) for e in then_found + else_found]

    def _thread_loop(self, node: onnx.NodeProto, found: list[Exposure]) -> list[Exposure]:
        body = next(attr.g for attr in node.attribute if attr.name == "body")
        em = self._emitter()
        for exposure in found:
            _add_outputs(body, exposure)
        if node.op_type == "Scan":  # new scan outputs: stacked along axis 0, forward
            for attr in node.attribute:
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.extend([0] * sum(len(_names(e)) for e in found))
        return [self._node_outputs(node, em, e) for e in found]

    @staticmethod
    def _node_outputs(node: onnx.NodeProto, em: Emitter, exposure: Exposure) -> Exposure:
        """New outputs of a container node carrying one site's tensors out of its subgraph."""
        stats = em.fresh("stats_out")
        shape = em.fresh("shape_out") if exposure.shape else None
        node.output.extend([stats, shape] if shape else [stats])
        return Exposure(exposure.plan, stats, shape, exposure.stats_type, exposure.rows)


def prune_to(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Keep only the nodes that ``outputs`` depend on; they become the graph's outputs.

    Nodes are listed in topological order (ONNX requires it, and the reduction blocks
    are appended after every node they read), so one backward pass finds them. A node
    with subgraphs depends on every name its bodies read, which covers the values they
    take from the enclosing scope. Graph inputs stay, used or not: feeds are unchanged."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    known = {output.name: output for output in graph.output}
    del graph.output[:]
    graph.output.extend(known[name] for name in outputs)


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node reads: its inputs and, recursively, those of its subgraphs."""
    reads = {name for name in node.input if name}
    for attr in node.attribute:
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in body.node:
                reads |= node_reads(inner)
            reads.update(output.name for output in body.output)
    return reads


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of a graph (and their subgraphs) read, and its outputs."""
    reads = {output.name for output in graph.output}
    for node in graph.node:
        reads |= node_reads(node)
    return reads


def _names(exposure: Exposure) -> list[str]:
    """The graph outputs of one site: its statistics, and its shape where it has one."""
    return [exposure.stats, exposure.shape] if exposure.shape else [exposure.stats]


def _add_outputs(graph: onnx.GraphProto, exposure: Exposure) -> None:
    graph.output.append(helper.make_tensor_value_info(exposure.stats, exposure.stats_type, None))
    if exposure.shape:
        graph.output.append(helper.make_tensor_value_info(exposure.shape, TensorProto.INT64, None))


def _placeholder(em: Emitter, exposure: Exposure, graph: onnx.GraphProto) -> Exposure:
    """Empty stand-ins, in one If branch, for a site that sits in the other branch."""
    em.nodes = []
    stats = em.const(np.zeros((0,), dtype=helper.tensor_dtype_to_np_dtype(exposure.stats_type)), "empty_stats")
    shape = em.const(np.zeros((0,), dtype=np.int64), "empty_shape") if exposure.shape else None
    graph.node.extend(em.nodes)
    return Exposure(exposure.plan, stats, shape, exposure.stats_type, exposure.rows)


def model_bytes(head: onnx.ModelProto, initializers: Any) -> bytes:
    """Serialized model: the head, then the original initializers as graph fragments.

    Protobuf merges a repeated embedded message field, so ``graph { initializer: ... }``
    fragments after the head add to its graph without copying the weights into it.
    """
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    parts = [head.SerializeToString()]
    inner = [_length_delimited(init_field, t.SerializeToString()) for t in initializers]
    size = sum(len(p) for p in inner)
    parts.append(_varint(graph_field << 3 | 2) + _varint(size))
    parts.extend(inner)
    return b"".join(parts)


def used_initializers(head: onnx.ModelProto, initializers: Any) -> list[Any]:
    """The initializers that the head's nodes read, or that are also graph inputs (an
    input with a default): weights of pruned nodes are neither loaded nor kept."""
    used = graph_reads(head.graph) | {value.name for value in head.graph.input}
    return [tensor for tensor in initializers if tensor.name in used]


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


# --- sessions ----------------------------------------------------------------------------------


class SessionFactory:
    """Builds ONNX Runtime sessions for augmented versions of one model."""

    def __init__(self, model: OnnxModel, providers: list[Any], optimise: bool, kernel: Path | None = None) -> None:
        self.model = model
        self.providers = providers
        self.optimise = optimise
        self.kernel = kernel  # deadrelu's custom-op library, registered in every session's options
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimise
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        # The memory pattern pre-plans one block for every tensor of a run; with the taps'
        # temporaries its first-fit layout grew the peak by ~140 MiB on ResNet-50 (batch 8)
        # and bought no speed. The default execution order is kept: PRIORITY_BASED ran
        # the reductions late and held every tapped tensor (+800 MiB).
        options.enable_mem_pattern = False
        if self.kernel is not None:
            options.register_custom_ops_library(os.fspath(self.kernel))
        return options

    def session(self, head: onnx.ModelProto) -> Any:
        import onnxruntime as ort

        if self.kernel is not None and not any(o.domain == KERNEL_DOMAIN for o in head.opset_import):
            head.opset_import.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
        data = model_bytes(head, used_initializers(head, self.model.proto.graph.initializer))
        options = self.options()
        if self.model.has_external_data:
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, os.fspath(self.model.base_dir))
        try:
            return ort.InferenceSession(data, options, providers=self.providers)
        except Exception as exc:
            if self.model.has_external_data and "external" in str(exc).lower():
                return self.session_in_tempdir(data)
            raise ModelLoadError(f"{self.model.path}: onnxruntime cannot load the model: {_line(exc)}") from exc

    def session_in_tempdir(self, data: bytes) -> Any:
        """For onnxruntime builds without the external-data folder option: the augmented
        model goes to a temporary directory beside links to the external data files."""
        import onnxruntime as ort

        folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="deadrelu-onnx-")))
        for location in self.model.external_files:
            link = folder / location
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(self.model.base_dir / location, link)
        path = folder / "augmented.onnx"
        path.write_bytes(data)
        try:
            return ort.InferenceSession(os.fspath(path), self.options(), providers=self.providers)
        except Exception as exc:
            raise ModelLoadError(f"{self.model.path}: onnxruntime cannot load the model: {_line(exc)}") from exc


def _link(target: Path, link: Path) -> None:
    """A hard link where the file system allows it (newer onnxruntime builds refuse
    external data reached through a symbolic link out of the model's folder), else a
    symbolic link."""
    try:
        os.link(target, link)
    except OSError:
        os.symlink(target, link)


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# --- feeding data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and declared dims (int, symbol or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        if not self.dims or not isinstance(self.dims[0], int):
            return None
        return self.dims[0]

    def describe(self) -> str:
        if self.dims is None:
            return "any shape"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"

    def fits(self, shape: tuple[int, ...], batch_free: bool) -> bool:
        if self.dims is None:
            return True
        if len(shape) != len(self.dims):
            return False
        return all(not isinstance(d, int) or d == s or (i == 0 and batch_free)
                   for i, (d, s) in enumerate(zip(self.dims, shape)))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor = info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else np.dtype(np.float32)
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(_dim(d) for d in tensor.shape.dim)
        specs.append(InputSpec(info.name, np.dtype(dtype), dims))
    return specs


def _dim(dim: Any) -> int | str | None:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


@dataclass
class Feeder:
    """Turns `ModelInput` batches into ONNX Runtime feeds, checked against the graph inputs."""

    specs: list[InputSpec]
    model_path: Path
    left_out: int = 0  # samples dropped because the model takes batches of a fixed size

    @property
    def fixed_batch(self) -> int | None:
        sizes = {s.fixed_batch for s in self.specs}
        return sizes.pop() if len(sizes) == 1 else None

    def feeds(self, batch: ModelInput) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feed, samples) pairs: one, or several when the model's batch size is fixed."""
        arrays = self._by_name(batch)
        size = batch.size
        fixed = self.fixed_batch
        if fixed is None or fixed == size:
            yield self._checked(arrays, batch_free=fixed is None), size
            return
        whole = size - size % fixed
        self.left_out += size - whole
        for start in range(0, whole, fixed):
            yield self._checked({k: v[start:start + fixed] for k, v in arrays.items()}, batch_free=False), fixed

    def _by_name(self, batch: ModelInput) -> dict[str, np.ndarray]:
        names = [s.name for s in self.specs]
        if len(batch.args) > len(names):
            raise DataError(f"{self.model_path}: the data holds {len(batch.args) + len(batch.kwargs)} arrays, the "
                            f"model takes {len(names)} input(s) {names}; use an .npz with one array per input name")
        arrays = {name: _numpy(t) for name, t in zip(names, batch.args)}
        for key, tensor in batch.kwargs.items():
            if key not in names:
                raise DataError(f"{self.model_path}: the data has an array '{key}' but the model's inputs are {names}")
            arrays[key] = _numpy(tensor)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{self.model_path}: no data for input(s) {missing}; the model takes {names} "
                            "(use an .npz with one array per input name)")
        return arrays

    def _checked(self, arrays: dict[str, np.ndarray], batch_free: bool) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.specs:
            array = arrays[spec.name]
            if not spec.fits(array.shape, batch_free):
                raise DataError(f"{self.model_path}: input '{spec.name}' got data of shape {tuple(array.shape)}, "
                                f"the model expects {spec.describe()}")
            feed[spec.name] = _convert(array, spec, self.model_path)
        return feed


def _numpy(tensor: Any) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bfloat16
    return np.asarray(tensor)


def _convert(array: np.ndarray, spec: InputSpec, model_path: Path) -> np.ndarray:
    """The batch in the input's dtype, as the PyTorch path takes it: float data of another
    width is cast; integer or bool data for a float input is refused (uint8 pixels fed
    as 0..255 to a model trained on normalised floats would give statistics of nothing it
    sees), as are non-integral values for an integer input. (That float data is finite,
    `scan.model_batches` has checked.)"""
    if array.dtype == spec.dtype:
        return np.ascontiguousarray(array)
    if spec.dtype.kind == "f" and array.dtype.kind in "biu":
        raise DataError(f"{model_path}: input '{spec.name}' takes {spec.dtype} values, the data holds {array.dtype}; "
                        f"convert it first (e.g. scaled and normalised as in training)")
    if spec.dtype.kind in "iu" and array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DataError(f"{model_path}: input '{spec.name}' takes {spec.dtype} values, the data holds "
                        f"non-integral {array.dtype} values")
    return np.ascontiguousarray(array.astype(spec.dtype))


# --- the scanner ---------------------------------------------------------------------------------


class _Accumulator:
    """Running per-unit statistics of one site: one ``(9, units)`` float64 array in
    `MASKED_ROWS` order, folded with Chan's merge. The arithmetic of
    `deadrelu.reductions.chan_merge`, written again for numpy: that one is torch, whose
    per-call overhead made it 28 us per site and batch of 1024 units against 12 us here
    (about 1% of a batch of the benchmark MLP)."""

    def __init__(self, plan: SitePlan) -> None:
        self.plan = plan
        self.state: np.ndarray | None = None

    @property
    def units(self) -> int | None:
        return None if self.state is None else int(self.state.shape[1])

    def fold(self, rows: Rows) -> None:
        units = int(rows.shape[2])
        if self.state is None:
            self.state = np.zeros((len(MASKED_ROWS), units))
            self.state[MINIMUM], self.state[MAXIMUM] = np.inf, -np.inf
        elif self.units != units:
            raise ModelRunError(f"site '{self.plan.site.name}': {units} units along axis {self.plan.axis} in "
                                f"this batch, {self.units} before; the unit axis must have a fixed size")
        a = self.state
        for b in rows:
            delta = b[MEAN] - a[MEAN]
            a[COUNT] += b[COUNT]
            weight = b[COUNT] / np.maximum(a[COUNT], 1)
            a[M2] += b[M2] + delta * delta * (a[COUNT] - b[COUNT]) * weight
            a[MEAN] += delta * weight
            a[POSITIVE:MINIMUM] += b[POSITIVE:MINIMUM]  # positive, nan, inf
            a[RELU_SUM] += b[RELU_SUM]
            np.minimum(a[MINIMUM], b[MINIMUM], out=a[MINIMUM])
            np.maximum(a[MAXIMUM], b[MAXIMUM], out=a[MAXIMUM])

    def result(self) -> UnitSummary | None:
        if self.state is None:
            return None
        a = self.state
        whole = {name: a[row].astype(np.int64) for name, row in (("positive", POSITIVE), ("nan", NAN), ("inf", INF))}
        return UnitSummary(count=a[COUNT].copy(), minimum=a[MINIMUM].copy(), maximum=a[MAXIMUM].copy(),
                           mean=a[MEAN].copy(), m2=a[M2].copy(), relu_sum=a[RELU_SUM].copy(), **whole)


@dataclass
class OnnxScanner:
    """Sessions, feeds and accumulators for one scan of one ONNX model."""

    model: OnnxModel
    survey: Survey
    providers: list[Any]
    optimise: bool = True
    kernel: Path | None = None  # deadrelu's one-pass kernel library (`kernel`), CPU only
    plans: list[SitePlan] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.factory = SessionFactory(self.model, self.providers, self.optimise, self.kernel)
        self.emit: EmitFn = emit_kernel if self.kernel is not None else emit_fast
        self.feeder = Feeder(input_specs(self.model.proto), self.model.path)
        self._fast: tuple[Any, dict[int, Exposure]] | None = None
        self._masked: tuple[Any, dict[int, Exposure]] | None = None
        self._accumulators: dict[int, _Accumulator] = {}
        self._inexact: set[str] = set()  # sites whose float32 positive counts may be off
        self._far_units = False  # a unit far from zero was seen: the masked graph's precise moments from now on

    def __enter__(self) -> OnnxScanner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.factory.close()

    def run(self, batch: ModelInput) -> int:
        """Stream one batch; returns the samples that went through the model."""
        done = 0
        for feed, samples in self.feeder.feeds(batch):
            if self._fast is None:
                self._prepare(feed)
            self._run(feed)
            done += samples
        return done

    # building -------------------------------------------------------------------------

    def _prepare(self, first_feed: dict[str, np.ndarray]) -> None:
        ranks = self._discover_ranks(first_feed)
        for site in self.survey.sites:
            obstacle = site.obstacle()
            rank = site.rank if site.rank is not None else ranks.get(site.name)
            if obstacle is None and rank is None:
                obstacle = "the rank of its pre-activation is unknown"
            if obstacle:
                self.skipped.append(f"site '{site.name}' ({site.op_type} in {site.where}) was found but not "
                                    f"scanned: {obstacle}")
                continue
            plan = SitePlan(len(self.plans), site, rank, site.axis.resolve(rank))
            self.plans.append(plan)
            self._accumulators[plan.id] = _Accumulator(plan)
        self._fast = self._session(self.emit)

    def _session(self, emit: EmitFn) -> tuple[Any, dict[int, Exposure]]:
        head, exposures = Rewriter(self.model, self.plans, emit, statistics_only=True).head()
        return self.factory.session(head), exposures

    def _discover_ranks(self, feed: dict[str, np.ndarray]) -> dict[str, int]:
        """Ranks of main-graph pre-activations that shape inference left unknown, from one run."""
        unknown = [s for s in self.survey.sites if s.rank is None and not s.scope]
        if not unknown:
            return {}
        plans = [SitePlan(i, s, 2, 1) for i, s in enumerate(unknown)]
        head, exposures = Rewriter(self.model, plans, emit_shape, statistics_only=True).head()
        session = self.factory.session(head)
        outputs = self._call(session, [exposures[p.id].shape for p in plans], feed)
        return {p.site.name: int(np.asarray(out).size) for p, out in zip(plans, outputs)}

    # running --------------------------------------------------------------------------

    def _run(self, feed: dict[str, np.ndarray]) -> None:
        assert self._fast is not None
        decoded = None
        if not self._far_units:
            session, exposures = self._fast
            decoded = self._decode(self._fetch(session, exposures, feed), exposures)
        if decoded is None:
            if self._masked is None:
                self._masked = self._session(emit_masked)
            session, exposures = self._masked
            decoded = self._decode(self._fetch(session, exposures, feed), exposures)
        assert decoded is not None
        for plan_id, batch in decoded.items():
            self._accumulators[plan_id].fold(batch)

    def _fetch(self, session: Any, exposures: dict[int, Exposure],
               feed: dict[str, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        names = [_names(exposures[plan.id]) for plan in self.plans]
        if not names:
            return {}
        values = iter(self._call(session, [name for site in names for name in site], feed))
        no_shape = np.zeros(0, dtype=np.int64)
        return {plan.id: (next(values), next(values) if len(site) == 2 else no_shape)
                for plan, site in zip(self.plans, names)}

    def _call(self, session: Any, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return session.run(names, feed)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in feed.items())
            raise ModelRunError(f"{self.model.path}: onnxruntime failed on input {shapes}: {_line(exc)}") from exc

    def _decode(self, fetched: dict[int, tuple[np.ndarray, np.ndarray]],
                exposures: dict[int, Exposure]) -> dict[int, Rows] | None:
        """Each site's statistics of the batch; None when a fast-path site saw NaN/Inf."""
        decoded = {}
        for plan in self.plans:
            packed, shapes = fetched[plan.id]
            layout = exposures[plan.id].rows
            if layout == "kernel":
                rows = _kernel_rows(np.asarray(packed))
            else:
                rows = plan.unpack(np.asarray(packed), len(FAST_ROWS if layout == "fast" else MASKED_ROWS))
            if rows.shape[0] == 0:
                continue
            if layout != "fast":
                decoded[plan.id] = rows if layout == "kernel" else _masked_rows(rows)
                continue
            counts = plan.per_unit_counts(np.asarray(shapes), rows.shape[2], rows.shape[0])
            batch = _fast_rows(rows, counts)
            if batch is not None and plan.compute_type == TensorProto.FLOAT and _far_from_zero(rows):
                self._far_units = True  # a unit's values stay where they are: later batches go to the masked graph at once
                batch = None
            if batch is None:
                return None
            decoded[plan.id] = batch
            if counts.max(initial=0) > EXACT_FLOAT_COUNT and plan.compute_type == TensorProto.FLOAT:
                self._inexact.add(plan.site.name)
        return decoded

    # results --------------------------------------------------------------------------

    def observations(self) -> tuple[SiteObservation, ...]:
        found = []
        for plan in self.plans:
            summary = self._accumulators[plan.id].result()
            if summary is None:
                continue
            site = plan.site
            source = "scalar" if plan.flat else site.axis.source
            found.append(SiteObservation(site.name, site.op, plan.axis, source, summary,
                                         {"normalised_input": site.axis.normalised, "onnx": site.describe()}))
        return tuple(found)

    def notes(self) -> tuple[str, ...]:
        notes = list(self.survey.findings) + self.skipped
        for plan in self.plans:
            if self._accumulators[plan.id].units is None and self._fast is not None:
                notes.append(f"site '{plan.site.name}' ({plan.site.op_type} in {plan.site.where}) never ran on "
                             "this data: no statistics")
        if self._inexact:
            notes.append(f"sites {sorted(self._inexact)} see more than 2**24 values per unit in one batch: their "
                         "positive counts are float32 sums and may be off by a few (dead units stay exact); "
                         "a smaller --batch-size avoids it")
        if self.feeder.left_out:
            notes.append(f"{self.feeder.left_out} samples were left out: the model takes batches of exactly "
                         f"{self.feeder.fixed_batch}")
        return tuple(notes)
