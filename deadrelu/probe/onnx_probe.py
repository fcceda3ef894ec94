"""Per-unit statistics of ONNX ReLU sites, reduced inside the graph while data streams.

Three phases, like ONNX Runtime's calibrators, without their costs:

1. *Augment.* Right after each site, nodes reduce its pre-activation over every axis but
   the unit axis and bring out one small tensor per site, threaded out of ``If`` branches
   and ``Loop``/``Scan`` bodies. Whole pre-activations never leave ONNX Runtime. On CPU,
   by default, that is one node of deadrelu's own kernel (`onnx_emit.emit_kernel`,
   `deadrelu.probe.kernel`): nine statistics from one read, ``(9, units)`` float64.
   Otherwise ONNX Runtime's own operators compute max, min, mean, variance, positive count
   and ReLU mean (`onnx_emit.emit_fast`; see it for how few passes they take) into ``(6, units)``
   float32, plus the pre-activation's ``Shape``. The model is built in memory; its weights
   are appended as serialized protobuf fragments, not copied into a second model, and
   external data stays where it is. The model's own outputs are dropped, and with them
   every node (and weight) that no site's statistics depend on (`onnx_graph.prune_to`).
2. *Collect.* One session run per batch; each site's rows become the nine `MASKED_ROWS`
   and are folded on the host into one float64 array per site with Chan's merge (the
   arithmetic of `deadrelu.stats.UnitStats.fold`).
3. *Result.* A `UnitSummary` per site.

Graph optimisations stay on (ORT_ENABLE_ALL: its blocked NCHWc convolutions make plain
inference of a ResNet ~1.4x faster than EXTENDED). A tapped tensor has consumers besides
its ReLU, so ONNX Runtime cannot fuse the ReLU into its producer or drop the tensor; the
tests check the results against a session with every optimisation off. The reduction
nodes are listed so that ONNX Runtime runs each site's right after the site (see
`onnx_graph.Rewriter._graph`): each pre-activation is reduced while in cache and freed at once, not
kept to the end.

The kernel counts NaN and +-Inf apart by itself. The operator reductions assume finite
values: when a batch's statistics come back not finite, that batch runs again through a
second, lazily built session whose reductions count NaN and +-Inf apart and keep them out
of min/max/moments (the split of `deadrelu.stats`). Their per-batch partial sums are
float32 (float64 for double models): positive counts are exact below 2**24 elements per
unit per batch, and "dead" (no value > 0) is exact at any size; the kernel's counts are
exact at any size.

The parts: `onnx_emit` (the reduction nodes and their rows), `onnx_graph` (rewriting and
serializing the graph), `onnx_session` (ONNX Runtime sessions), `onnx_feed` (inputs), and
here the scanner that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from deadrelu.data import ModelInput
from deadrelu.errors import ModelRunError, UsageError
from deadrelu.load import LoadedModel
from deadrelu.load.onnx_format import OnnxModel
from deadrelu.onnx_sites import AxisTrace, OnnxSite, Survey, survey
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.probe.kernel import kernel_library
from deadrelu.probe.onnx_emit import (COUNT, EXACT_FLOAT_COUNT, FAST_ROWS, INF, M2, MASKED_ROWS, MAXIMUM, MEAN,
                                     MINIMUM, NAN, POSITIVE, RELU_SUM, EmitFn, Rows, SitePlan, emit_fast, emit_kernel,
                                     emit_masked, emit_shape, far_from_zero, fast_rows, kernel_rows, masked_rows)
from deadrelu.probe.onnx_feed import Feeder, input_specs
from deadrelu.probe.onnx_graph import Exposure, Rewriter, exposed_names
from deadrelu.probe.onnx_session import SessionFactory, error_line
from deadrelu.sites import AxisChoice, AxisOverride, overridden_axis
from deadrelu.stats import UnitSummary

ProgressFn = Callable[[int], None]


# --- public entry ----------------------------------------------------------------------------


def stream_onnx(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device,
                progress: ProgressFn | None, compile_mode: str = "auto",
                notify: Callable[[str], None] | None = None,
                unit_axes: Sequence[AxisOverride] = ()) -> StreamResult:
    """Run every batch through the ONNX model with in-graph reductions at each ReLU site.

    ``compile_mode`` (``--compile``) decides about deadrelu's one-pass kernel on CPU:
    "auto" uses it when it can be built here (else says so through ``notify`` and uses
    ONNX Runtime's operators), "on" requires it, "off" never builds it."""
    kernel = choose_kernel(device, compile_mode, notify)
    result = scan_batches(loaded.module, batches, execution_providers(device), progress, kernel=kernel,
                          unit_axes=unit_axes)
    if device.type == "cpu" and _declares_half(loaded.module.proto):
        result = replace(result, notes=(*result.notes, HALF_ON_CPU_NOTE))
    return result


# Measured with this project's onnxruntime on CPU: a float16 Gemm -> Relu -> Gemm graph passes a
# pre-activation of 2**-30 (0 in float16) on to the next Gemm, so that unit is alive there.
HALF_ON_CPU_NOTE = ("the graph computes in float16, which ONNX Runtime's CPU provider runs in float32 "
                    "(it casts around the operators it has no float16 kernel for and drops the casts between "
                    "them): the statistics are of the float32 values this engine computes and passes on, so "
                    "a unit with only tiny positive values (below float16's 6e-8) is alive here but would be "
                    "dead on an engine computing in float16 (ONNX Runtime's CUDA provider), and extremes can "
                    "differ from float16 values in the 4th digit")


def _declares_half(proto: Any) -> bool:
    """Whether the graph's inputs or weights (an onnx.ModelProto's) are float16/bfloat16."""
    half = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return (any(t.data_type in half for t in proto.graph.initializer)
            or any(i.type.tensor_type.elem_type in half for i in proto.graph.input))


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
                 kernel: Path | None = None, unit_axes: Sequence[AxisOverride] = ()) -> StreamResult:
    """`stream_onnx` with explicit providers; ``optimise=False`` turns every ORT graph
    optimisation off (the reference the tests compare against); ``kernel``: the library
    of deadrelu's one-pass kernel (None: ONNX Runtime's operators)."""
    with OnnxScanner(model, survey(model.proto), providers, optimise, kernel, tuple(unit_axes)) as scanner:
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
    unit_axes: tuple[AxisOverride, ...] = ()  # --unit-axis
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
            site = self._with_user_axis(site, rank)
            plan = SitePlan(len(self.plans), site, rank, site.axis.resolve(rank))
            self.plans.append(plan)
            self._accumulators[plan.id] = _Accumulator(plan)
        self._fast = self._session(self.emit)

    def _with_user_axis(self, site: OnnxSite, rank: int) -> OnnxSite:
        """The site with the unit axis a --unit-axis gives it, if one matches."""
        guess = AxisChoice(site.axis.resolve(rank), site.axis.source)
        chosen = overridden_axis(self.unit_axes, site.name, rank, guess)
        if chosen is guess:
            return site
        return replace(site, axis=AxisTrace(chosen.axis, chosen.source, "given by --unit-axis", site.axis.normalised))

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
        names = [exposed_names(exposures[plan.id]) for plan in self.plans]
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
            raise ModelRunError(f"{self.model.path}: onnxruntime failed on input {shapes}: {error_line(exc)}") from exc

    def _decode(self, fetched: dict[int, tuple[np.ndarray, np.ndarray]],
                exposures: dict[int, Exposure]) -> dict[int, Rows] | None:
        """Each site's statistics of the batch; None when a fast-path site saw NaN/Inf."""
        decoded = {}
        for plan in self.plans:
            packed, shapes = fetched[plan.id]
            layout = exposures[plan.id].rows
            if layout == "kernel":
                rows = kernel_rows(np.asarray(packed))
            else:
                rows = plan.unpack(np.asarray(packed), len(FAST_ROWS if layout == "fast" else MASKED_ROWS))
            if rows.shape[0] == 0:
                continue
            if layout != "fast":
                decoded[plan.id] = rows if layout == "kernel" else masked_rows(rows)
                continue
            counts = plan.per_unit_counts(np.asarray(shapes), rows.shape[2], rows.shape[0])
            batch = fast_rows(rows, counts)
            if batch is not None and plan.compute_type == TensorProto.FLOAT and far_from_zero(rows):
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
                                         {"normalised_input": site.axis.normalised, "preact_ndim": plan.rank,
                                          "onnx": site.describe()}))
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
