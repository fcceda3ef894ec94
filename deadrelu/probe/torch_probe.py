"""Tap every ReLU-family call of a PyTorch model at the aten level.

A `TorchDispatchMode` sees each aten op that runs, whatever Python or TorchScript code
called it (``nn.ReLU``, ``F.relu``, ``Tensor.relu_``, a scripted or exported graph), with
its input *before* the op runs, so an inplace ReLU is read before it overwrites it. Site
names come from a *context source*: live module hooks for eager modules, the module
hierarchy recorded in the graph for TorchScript archives and exported programs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

import deadrelu
from deadrelu import sites
from deadrelu.errors import ModelRunError
from deadrelu.probe.kernel import STAT_ROWS
from deadrelu.probe.torch_graph import SiteCall
from deadrelu.probe.torch_sources import ArmSources, RuntimeSources, branch_candidate_sources
from deadrelu.reductions import BatchMoments, BatchReducer, PendingBatch, RowsKernel, kernel_moments, site_shift
from deadrelu.stats import UnitStats

# Ops whose output is max(input, 0): the positive count and the ReLU-output sum are read
# from it. (relu6's output is clipped at 6, so its sum is not the sum of max(x, 0).)
OUTPUT_IS_RELU = frozenset({"relu"})


class SiteShapeError(ModelRunError):
    """A site's unit count changed between batches (the model is not shape-stable)."""


class UnbatchedSampleError(ModelRunError):
    """A site ran on one unbatched sample while the batch held several: the data's first
    axis (the samples) became the model's channels or features."""


class ContextSource(Protocol):
    """Says in which module a candidate op is running."""

    def reset(self) -> None: ...

    def next(self, functional: str, source: str | None = None) -> sites.CallContext: ...

    def where(self) -> Any:
        """What tells the last call apart from other calls of its context (`SiteNamer`)."""
        ...


class StaticContexts:
    """Contexts read from a graph (TorchScript, FX), matched to calls in graph order.

    Each call takes the next graph entry of the same functional; entries skipped by
    control flow are passed over. Where the graph branches, entries also carry their
    `torch_sources` source, and a call takes the next entry whose source is its own (the
    arm that ran), the next of its functional when none is. A call with no entry left is
    placed at the root.
    """

    def __init__(self, entries: list[tuple[str, sites.CallContext]], sources: list[str | None] | None = None) -> None:
        self._entries = entries
        self._sources = sources if sources is not None and len(sources) == len(entries) else None
        self._cursor = 0
        self._last: int | None = None

    @property
    def needs_sources(self) -> bool:
        return self._sources is not None

    def reset(self) -> None:
        self._cursor = 0

    def next(self, functional: str, source: str | None = None) -> sites.CallContext:
        chosen = None
        for index in range(self._cursor, len(self._entries)):
            if self._entries[index][0] != functional:
                continue
            if chosen is None:
                chosen = index
            if self._sources is None or source is None or self._sources[index] == source:
                chosen = index
                break
        self._last = chosen
        if chosen is None:
            return sites.CallContext("", "")
        self._cursor = chosen + 1
        return self._entries[chosen][1]

    def where(self) -> int | None:
        return self._last  # the graph entry: the arms of a branch calling one module differ


class ModuleStack:
    """Contexts from forward hooks on every submodule of an eager model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._stack: list[sites.CallContext] = []
        self._handles: list[Any] = []
        for path, module in model.named_modules():
            ctx = sites.CallContext(path, type(module).__name__)
            self._handles.append(module.register_forward_pre_hook(self._enter(ctx)))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, ctx: sites.CallContext) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._stack.append(ctx)

        return hook

    def _leave(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def reset(self) -> None:
        self._stack.clear()

    def next(self, functional: str, source: str | None = None) -> sites.CallContext:
        return self._stack[-1] if self._stack else sites.CallContext("", "")

    def where(self) -> tuple[tuple[str, int], ...]:
        return _python_call_site()

    def failing_module(self) -> str | None:
        """After a forward raised: the innermost module that did not return."""
        return self._stack[-1].module_path if self._stack else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class SiteTap:
    """One site as it is being observed."""

    name: str
    op: str
    functional: str
    axis: sites.AxisChoice
    stats: UnitStats
    order: int
    batches: int = 0  # committed forward passes that reached this site
    normalised: bool = False  # a normalisation op feeds the pre-activation
    ndim: int = 0  # rank of the pre-activation
    shift: torch.Tensor | None = None  # per-unit shift of the fused path, from the first batch
    kernel_rows: torch.Tensor | None = None  # the C kernel's running (9, units) rows, not yet in `stats`
    batch_rows: torch.Tensor | None = None  # where the C kernel writes a batch's rows, reused every batch

    def rows_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The buffer for a batch's kernel rows (CPU sites only; made on first use)."""
        if x.device.type != "cpu":
            return None
        if self.batch_rows is None:
            self.batch_rows = torch.empty((STAT_ROWS, self.stats.units), dtype=torch.float64)
        return self.batch_rows

    def fold(self, moments: BatchMoments | None, rows: torch.Tensor | None, kernel: RowsKernel | None) -> None:
        """One committed batch (its moments, or the kernel's rows) into the site's statistics:
        rows into the kernel's own running rows (one C call), moments into `stats`."""
        if rows is None:
            assert moments is not None
            self.stats.fold(moments)
            return
        assert kernel is not None, "rows come only from the kernel"
        if self.kernel_rows is None:
            self.kernel_rows = rows.clone()  # (rows may be `batch_rows`, written again next batch)
        else:
            kernel.fold(self.kernel_rows, rows)

    def settle(self) -> None:
        """Move the kernel's running rows into `stats` (before anything reads them)."""
        if self.kernel_rows is not None:
            self.stats.fold(kernel_moments(self.kernel_rows))
            self.kernel_rows = None


class ReluProbe(TorchDispatchMode):
    """Accumulates per-unit statistics of every ReLU site while active.

    A ``torch.cond`` runs the arm its predicate picks, observed like any other code (the
    predicate is read on the host, as eager ``torch.cond`` reads it); another higher-order
    op runs unobserved, and is refused when a ReLU-family op sits inside it.
    """

    supports_higher_order_operators = True

    def __init__(self, contexts: ContextSource, reducer: BatchReducer | None = None,
                 sources: RuntimeSources | ArmSources | None = None,
                 unit_axes: Sequence[sites.AxisOverride] = (), weights: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.contexts = contexts
        self.unit_axes = tuple(unit_axes)  # --unit-axis: the user's unit axes for some sites
        self.weights = weights  # data pointers of the model's parameters and buffers
        self._sources = sources  # which arm of a TorchScript branch a call is in
        self.taps: dict[str, SiteTap] = {}
        self._namer = sites.SiteNamer()
        self._producers: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._normalised: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.reducer = reducer or BatchReducer()
        self._staged: list[tuple[SiteTap, BatchMoments | None, torch.Tensor | None]] = []  # moments or rows
        self._calls: list[SiteCall] = []
        self.first_pass_calls: list[SiteCall] | None = None  # ReLU-family calls of the first committed pass
        self._op_names: dict[Any, str] = {}  # aten op -> its packet name
        # The error an op raised in this pass: TorchScript's interpreter re-raises an error
        # from a dispatch mode with its message blanked, so the forward's error names this one.
        self.op_error: Exception | None = None
        self._samples = 0  # in this pass's batch, 0 when not known

    def begin_pass(self, samples: int = 0) -> None:
        """Call before each forward pass of ``samples`` samples (0: not known): names and
        graph cursors restart."""
        self._samples = samples
        self._namer.reset()
        self.contexts.reset()
        self._staged.clear()
        self._calls.clear()
        self.op_error = None

    def commit_pass(self) -> None:
        """The forward pass completed: fold its staged moments into every site's statistics.

        Staging makes a batch count everywhere or nowhere: a forward that raises (out of
        memory, Ctrl-C) leaves the statistics as they were before it.
        """
        for tap, moments, rows in self._staged:
            tap.fold(moments, rows, self.reducer.kernel)
            tap.batches += 1
        self._staged.clear()
        self.reducer.freeze()
        if self.first_pass_calls is None:
            self.first_pass_calls = list(self._calls)

    def discard_pass(self) -> None:
        self._staged.clear()

    def observed_taps(self) -> list[SiteTap]:
        """Sites that completed at least one batch, in first-call order, statistics settled."""
        for tap in self.taps.values():
            tap.settle()
        return sorted((t for t in self.taps.values() if t.batches), key=lambda t: t.order)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return self._run_higher_order(func, args, kwargs)
        op_name = self._op_names.get(func)
        if op_name is None:
            op_name = self._op_names[func] = sites.packet_name(func)
        functional = sites.CANDIDATE_OPS.get(op_name)
        try:
            observed = self._observe(functional, args, kwargs) if functional is not None else None
            out = func(*args, **kwargs)
        except Exception as exc:
            self.op_error = exc
            raise
        if self._sources is not None:
            self._sources.track(args, kwargs, out)
        recording = self.first_pass_calls is None  # the calls are kept for the first pass only
        if observed is not None:
            tap, pending, restored = observed
            x = args[0]
            # a kernel batch stays rows until it is folded (its moments' views cost ~14 us a site)
            moments = None if pending.rows is not None else pending.complete(
                out.unsqueeze(0) if restored else sites.scalar_view(out))
            self._staged.append((tap, moments, pending.rows))
            if recording:
                self._calls.append(SiteCall(tap.name, x.ndim, tap.stats.units, tap.axis.axis,
                                            x.numel() // max(tap.stats.units, 1)))
        elif functional is not None and recording:
            self._calls.append(SiteCall(None, 0, 0, 0, 0))
        self._track_producer(op_name, args, kwargs, out)
        return out

    def _run_higher_order(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A higher-order op (this mode is off while it runs: it is entered again for an arm)."""
        if sites.is_cond(func):
            pred, true_arm, false_arm, operands = args
            arm = true_arm if bool(pred) else false_arm
            entering = self._sources.entering(arm) if isinstance(self._sources, ArmSources) else nullcontext()
            with entering, self:
                return arm(*operands)
        inner = [a for a in args if isinstance(a, torch.fx.GraphModule) and sites.fx_candidate_contexts(a)]
        if inner:
            raise ModelRunError(f"the model calls torch.ops.higher_order.{func.name()} with a ReLU-family op inside, "
                                "where deadrelu cannot observe it (only torch.cond arms are observed)")
        return func(*args, **kwargs)

    def _observe(self, functional: str, args: tuple, kwargs: dict) -> tuple[SiteTap, PendingBatch, bool] | None:
        """Reduce the input of a candidate call (before it runs); None if it is no site.
        The flag says the pre-activation was given back the sample axis a squeeze took
        from a one-sample batch: a linear op's `(H,)` is read as `(1, H)`, a convolution's
        `(C, H, W)` as `(1, C, H, W)`, as the batch's other sizes are read."""
        x = args[0]
        ctx = self.contexts.next(functional, self._sources.of(x) if self._sources is not None
                                 and isinstance(x, torch.Tensor) else None)
        call_args = (args[0], kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                     kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)) if functional == "hardtanh" else args
        op = sites.site_op(functional, call_args)
        if op is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return None
        name = self._namer.name(sites.base_name(ctx, functional), self.contexts.where())
        tap = self.taps.get(name)
        # (the producer is looked up only when it can matter: a new site, or a one-sample batch)
        origin = self._producers.get(x) if tap is None or self._samples == 1 else None
        restored = self._samples == 1 and origin is not None and origin.lost_samples(x.ndim)
        ndim, x = (x.ndim + 1, x.unsqueeze(0)) if restored else (x.ndim, sites.scalar_view(x))
        if tap is None:
            if origin is not None and self._samples > 1 and origin.lost_samples(ndim):
                raise UnbatchedSampleError(
                    f"site '{name}' ran on one unbatched sample (pre-activation shape {tuple(args[0].shape)}) "
                    f"while the batch held {self._samples}: the data's first axis is taken as the samples, "
                    "so each sample needs the model's full input shape (a batch of vectors is (N, features), "
                    "of images (N, C, H, W))")
            axis = sites.overridden_axis(self.unit_axes, name, ndim, sites.choose_axis(ndim, origin))
            units = x.shape[axis.axis]
            tap = SiteTap(name, op, functional, axis, UnitStats(units, x.device), len(self.taps),
                          normalised=bool(self._normalised.get(args[0], False)), ndim=ndim)
            self.taps[name] = tap
        elif x.ndim <= tap.axis.axis or x.shape[tap.axis.axis] != tap.stats.units:
            raise SiteShapeError(f"site '{name}' had {tap.stats.units} units along dim {tap.axis.axis}, "
                                 f"now its pre-activation has shape {tuple(args[0].shape)}")
        if tap.shift is None:
            tap.shift = site_shift(x, tap.axis.axis)
        return tap, self.reducer.begin(x, tap.axis.axis, op in OUTPUT_IS_RELU, tap.shift, tap.rows_buffer(x)), restored

    def _origin(self, op_name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> sites.UnitOrigin | None:
        """Where the units of an op's output are, if it made them or passed them on."""
        if op_name == "einsum" and len(args) > 1 and isinstance(args[0], str):
            weights = [self._is_weight(t) for t in args[1]]
            return sites.UnitOrigin("linear", sites.einsum_unit_axis(args[0], weights, out.ndim))
        kind = sites.producer_kind(op_name)
        if kind is not None:
            weight = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
            return sites.UnitOrigin.of(kind, out.ndim, weight.ndim if weight is not None else None)
        if op_name not in sites.AXIS_FOLLOWING:
            return None
        source = self._tracked_input(args)
        upstream = self._producers.get(source) if source is not None else None
        if upstream is None:
            return None
        if op_name in sites.PERMUTES:
            order = sites.permutation(op_name, args, source.ndim)
            return upstream.after_permute(source.ndim, order) if order is not None else None
        if op_name in sites.RESHAPES:
            return upstream.reshaped(tuple(source.shape), tuple(out.shape))
        if op_name in sites.REDUCTIONS:
            reduced = sites.reduced_dims(args, kwargs, tuple(source.shape))
            if reduced is None or (upstream.axis_from_end + source.ndim) in reduced[0]:
                return None
            return upstream if reduced[1] else upstream.without(source.ndim, reduced[0])
        if op_name == "index":
            return upstream.after_indexing(source.ndim, args[1] if len(args) > 1 else None, out.ndim)
        if op_name == "unfold":
            return upstream.after_unfold(source.ndim, args[1] if len(args) > 1 else None)
        if op_name in sites.DIM_REMOVING:
            removed = sites.removed_dims(op_name, args, tuple(source.shape))
            return upstream.without(source.ndim, removed) if removed is not None else None
        if op_name in sites.DIM_INSERTING:
            inserted = sites.inserted_dims(op_name, args, out.ndim)
            return upstream.with_inserted(out.ndim, inserted) if inserted is not None else None
        return upstream  # layout-preserving ops and splits

    def _is_weight(self, operand: Any) -> bool:
        """Whether an operand is one of the model's weights: a parameter or buffer of it (as
        ONNX's constants are), or a tensor that needs a gradient (the data, and what the
        probe computes from it under inference mode, do not)."""
        if isinstance(operand, torch.nn.Parameter) or bool(getattr(operand, "requires_grad", False)):
            return True
        return isinstance(operand, torch.Tensor) and operand.numel() > 0 and operand.data_ptr() in self.weights

    def _tracked_input(self, args: tuple) -> torch.Tensor | None:
        """The first input whose units are known (a list's, for cat and stack)."""
        tensors = args[0] if args and isinstance(args[0], (list, tuple)) else args
        return next((a for a in tensors if isinstance(a, torch.Tensor) and a in self._producers), None)

    def _track_producer(self, op_name: str, args: tuple, kwargs: dict, out: Any) -> None:
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(first, torch.Tensor):
            return
        origin = self._origin(op_name, args, kwargs, first)
        if origin is not None:
            self._producers[first] = origin
            # every piece, not only the first; a recurrent layer's final states (h_n, c_n) too
            if op_name in sites.SPLITS or op_name == "unbind" or op_name in sites.RECURRENT_PRODUCERS:
                for piece in out if isinstance(out, (tuple, list)) else ():
                    if isinstance(piece, torch.Tensor):
                        self._producers[piece] = origin
        if op_name in sites.NORM_OPS or (op_name in sites.ELEMENTWISE and any(
                isinstance(a, torch.Tensor) and self._normalised.get(a, False) for a in args)):
            self._normalised[first] = True


@contextmanager
def probing(model: Any, reducer: BatchReducer | None = None,
            unit_axes: Sequence[sites.AxisOverride] = ()) -> Iterator[tuple[ReluProbe, ModuleStack | None]]:
    """A probe for a model of any PyTorch flavour; hooks are removed on exit."""
    stack: ModuleStack | None = None
    sources: RuntimeSources | None = None
    if isinstance(model, torch.jit.ScriptModule):
        static = StaticContexts(sites.torchscript_candidate_contexts(model),
                                branch_candidate_sources(model))
        sources = RuntimeSources(model) if static.needs_sources else None
        contexts: ContextSource = static
    elif isinstance(model, torch.fx.GraphModule) and _is_exported(model):
        arms = sites.fx_candidate_arms(model)
        contexts = StaticContexts(sites.fx_candidate_contexts(model), arms)
        sources = ArmSources(model) if arms is not None else None
    else:
        stack = ModuleStack(model)
        contexts = stack
    try:
        yield ReluProbe(contexts, reducer, sources, unit_axes, _weight_pointers(model)), stack
    finally:
        if stack is not None:
            stack.remove()


def _weight_pointers(model: Any) -> frozenset[int]:
    """Where the model's parameters and buffers live (an einsum's weight operand is one)."""
    try:
        tensors = [*model.parameters(), *model.buffers()]
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(t.data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 0)


def _is_exported(model: torch.fx.GraphModule) -> bool:
    return any("nn_module_stack" in node.meta for node in model.graph.nodes)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(deadrelu.__file__) + os.sep


def _python_call_site() -> tuple[tuple[str, int], ...]:
    """The lines of the model's own Python code running a call, innermost first: the frames
    between the probe and the loop feeding the model, less torch's own (``F.relu``,
    ``Module.__call__``). Two arms of an ``if`` calling the same ``F.relu`` differ here."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIR):
        frame = frame.f_back  # the probe itself
    lines: list[tuple[str, int]] = []
    while frame is not None and not frame.f_code.co_filename.startswith(_OWN_DIR):
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            lines.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return tuple(lines)
