"""The whole model and every site's statistics compiled as one program (`--compile`).

The eager probe pays for each site's reductions with separate kernels, each reading the
pre-activation again. Here, after the first batch has run under the eager probe (which
names the sites and picks their unit axes and shifts), the model is captured as an FX
graph -- the exported program itself, or `torch.export` of an eager module -- and a
reduction is attached to the pre-activation of every site:

    model graph --(drop the model's outputs)--> per-site fused reductions --> one [9, units] tensor

`torch.compile` then fuses each reduction into the kernels around it, so a pre-activation
is read once (often while it is still being produced), and the model's own outputs,
which the scan does not need, are never computed. Each batch is one call that returns the
float32 statistics of every unit; they are folded into float64 accumulators on the device
(Chan's merge, no host sync), and a batch counts everywhere or nowhere, as on the eager
path. Shapes are static: a batch of another shape (the last, shorter one) runs eagerly.

Capture maps the graph's ReLU-family calls to the sites the eager probe saw, in call
order; when they do not line up (data-dependent control flow), or export or compilation
fails, the scan says so in one line and stays on the eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deadrelu import sites
from deadrelu.data import ModelInput
from deadrelu.reductions import BatchMoments, fast_reductions, fused_reductions, moments_from_fused, reduce_dims
from deadrelu.stats import UnitStats


class CaptureError(Exception):
    """The model could not be captured as one graph; the eager path carries on."""


@dataclass(frozen=True)
class SiteCall:
    """One ReLU-family call of the eager probe's first pass, in call order."""

    site: str | None  # the site's name; None for a call that is no site (e.g. hardtanh(-1, 1))
    ndim: int
    units: int
    axis: int
    per_unit: int  # elements per unit in that pass's batch


@dataclass(frozen=True)
class SiteSlot:
    """Where one site's units sit in the program's flat statistics."""

    site: str
    start: int
    units: int


def site_reductions(x: torch.Tensor, shift: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Every statistic of one site's batch, NaN/Inf masked, as rows of a [9, units]
    float32 tensor (accelerators: no host sync is needed to trust it)."""
    return torch.stack([p.float() for p in fused_reductions(x.float(), dims, shift)])


def site_reductions_unmasked(x: torch.Tensor, shift: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """The statistics of an all-finite batch as rows of a [6, units] float32 tensor (CPU:
    fewer operations per element; a batch that was not all finite shows as a non-finite
    sum or bound, and is run again on the exact eager path)."""
    return torch.stack([p.float() for p in fast_reductions(x.float(), shift, dims)])


class GraphScan:
    """A compiled program returning all sites' statistics, and their running accumulators."""

    def __init__(self, program: Callable[..., torch.Tensor], slots: list[SiteSlot], shifts: list[torch.Tensor],
                 per_unit: list[int], masked: bool, example: ModelInput) -> None:
        self.program = program
        self.slots = slots
        self.shifts = shifts
        self.masked = masked
        self.flat_shift = torch.cat([s.reshape(-1) for s in shifts])
        device = self.flat_shift.device
        self.per_unit = torch.cat([torch.full((slot.units,), float(n), dtype=torch.float64, device=device)
                                   for slot, n in zip(slots, per_unit)])
        self.signature = _signature(example)
        self.stats = UnitStats(int(self.flat_shift.numel()), device)
        self.batches = 0

    def accepts(self, inputs: ModelInput) -> bool:
        return _signature(inputs) == self.signature

    def run(self, inputs: ModelInput) -> bool:
        """One batch through the compiled program, folded once it completed. False (and
        nothing folded) when an unmasked program met a value that is not finite."""
        parts = tuple(self.program(*inputs.args, *self.shifts).unbind(0))
        moments = moments_from_fused(parts, self.flat_shift) if self.masked else self._unmasked(parts)
        if moments is None:
            return False
        self.stats.fold(moments)
        self.batches += 1
        return True

    def _unmasked(self, parts: tuple[torch.Tensor, ...]) -> BatchMoments | None:
        total, squares, minimum, maximum, positive, relu_sum = (p.double() for p in parts)
        if not bool(torch.isfinite(total + squares + minimum + maximum).all()):  # a host check: CPU only
            return None
        offset = total / self.per_unit
        return BatchMoments(count=self.per_unit, positive=positive.round().to(torch.int64), nan=0, inf=0,
                            minimum=minimum, maximum=maximum, mean=self.flat_shift.double() + offset,
                            m2=(squares - total * offset).clamp_min(0.0), relu_sum=relu_sum)

    def site_stats(self) -> dict[str, UnitStats]:
        """Each site's share of the accumulators."""
        out = {}
        for slot in self.slots:
            stats = UnitStats(slot.units, self.stats.count.device)
            for name in ("count", "positive", "nan", "inf", "minimum", "maximum", "mean", "m2", "relu_sum"):
                setattr(stats, name, getattr(self.stats, name)[slot.start: slot.start + slot.units].clone())
            out[slot.site] = stats
        return out


def _signature(inputs: ModelInput) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
                 for t in inputs.args) + (bool(inputs.kwargs),)


def capture(module: Any, example: ModelInput, calls: Sequence[SiteCall], shifts: dict[str, torch.Tensor],
            compile_fn: Callable[[torch.fx.GraphModule], Callable[..., torch.Tensor]] | None = None) -> GraphScan:
    """The model and its sites' reductions as one program (compiled by `compile_fn`).

    Raises `CaptureError` when the model cannot be captured or its graph's ReLU calls do
    not match the eager probe's `calls`.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise CaptureError("TorchScript models cannot be captured")
    if example.kwargs or not all(isinstance(a, torch.Tensor) for a in example.args):
        raise CaptureError("only models fed positional tensors are captured")
    graph_module = _graph_of(module, example)
    graph = torch.fx.Graph()
    output = graph.graph_copy(graph_module.graph, {})
    del output  # the model's own outputs are dropped
    candidates = [n for n in graph.nodes if n.op == "call_function"
                  and sites.packet_name(n.target) in sites.CANDIDATE_OPS]
    if len(candidates) != len(calls):
        raise CaptureError(f"the graph has {len(candidates)} ReLU-family calls, the model ran {len(calls)}")
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    masked = example.args[0].device.type != "cpu"
    reduce = site_reductions if masked else site_reductions_unmasked
    slots, site_shifts, per_unit, results, start = [], [], [], [], 0
    for node, call in zip(candidates, calls):
        if call.site is None:
            continue
        x = node.args[0]
        _check_shape(x, call)
        with graph.inserting_after(last_input):
            shift_input = graph.placeholder(f"deadrelu_shift_{len(slots)}")
        last_input = shift_input
        with graph.inserting_before(node):  # before: the op may be inplace (relu_)
            results.append(graph.call_function(reduce, (x, shift_input, list(reduce_dims(call.ndim, call.axis)))))
        slots.append(SiteSlot(call.site, start, call.units))
        per_unit.append(call.per_unit)
        site_shifts.append(shifts[call.site])
        start += call.units
    if not slots:
        raise CaptureError("no site to capture")
    graph.output(graph.call_function(torch.cat, (results, 1)))
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs, one output
    program = torch.fx.GraphModule(graph_module, graph)
    program.graph.eliminate_dead_code()
    program.graph.lint()
    program.recompile()
    compiled = compile_fn(program) if compile_fn else program
    return GraphScan(compiled, slots, site_shifts, per_unit, masked, example)


def _graph_of(module: Any, example: ModelInput) -> torch.fx.GraphModule:
    """The model as an aten-level FX graph: an exported program's own, or torch.export's."""
    if isinstance(module, torch.fx.GraphModule) and any("nn_module_stack" in n.meta for n in module.graph.nodes):
        return module
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"cannot capture a {type(module).__name__}")
    with torch.inference_mode(False), torch.no_grad():
        args = tuple(a.clone() for a in example.args)  # export rejects inference-mode tensors
        try:
            return torch.export.export(module, args, strict=False).module()
        except Exception as exc:  # export's failures are many and varied; none may end the scan
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CaptureError(f"torch.export failed ({first})") from exc


def _check_shape(x: Any, call: SiteCall) -> None:
    value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise CaptureError("a site's pre-activation has no recorded shape in the graph")
    if value.ndim != call.ndim or str(value.shape[call.axis]) != str(call.units):
        raise CaptureError(f"site '{call.site}': the graph's pre-activation {tuple(value.shape)} does not match "
                           f"the model's ({call.units} units along dim {call.axis})")
