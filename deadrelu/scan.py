"""The scan pipeline in one place: load -> find sites -> stream -> accumulate -> judge -> report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deadrelu.data import CalibrationSource, ModelInput, open_data
from deadrelu.errors import DataError, ModelRunError, UsageError
from deadrelu.judge import Thresholds
from deadrelu.load import LoadedModel, load_model
from deadrelu.load.detect import ModelFormat
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.probe.torch_probe import ReluProbe, probing
from deadrelu.report import DataInfo, ModelInfo, ScanReport, site_report

ProgressFn = Callable[[int], None]  # called with the number of samples just processed


@dataclass(frozen=True)
class ScanOptions:
    """Everything that changes what a scan does, besides the model and the data."""

    arch: str | None = None
    trust_pickle: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32
    samples: int | None = None  # cap on the number of samples
    input_shape: tuple[int, ...] | None = None  # for data 'random'
    thresholds: Thresholds = field(default_factory=Thresholds)


def scan(model: str | Path | torch.nn.Module, data: str | Path | CalibrationSource | Iterable[Any],
         options: ScanOptions | None = None, *, progress: ProgressFn | None = None,
         on_start: Callable[[int | None], None] | None = None) -> ScanReport:
    """Scan a model's ReLU sites over calibration data and return the report.

    Args:
        model: a model file (any supported format) or an in-memory ``nn.Module``. An
            in-memory module is left as it was: hooks removed, train/eval mode and device
            restored, even when the scan raises.
        data: a ``--data`` spec (``.npy``/``.npz``/``.pt`` path or ``"random"``), a
            `CalibrationSource`, or any iterable of batches (tensor, tuple of tensors, or
            dict of tensors).
        options: see `ScanOptions`.
        progress: called after each batch with its number of samples.
        on_start: called once with the number of samples to expect (None if unknown).

    Example:
        >>> report = scan("fixtures/convnet.ts.pt", "fixtures/convnet.calib.npy")
        >>> report.dead, [s.name for s in report.sites if s.dead]
    """
    options = options or ScanOptions()
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    device = resolve_device(options.device)
    loaded = _load(model, options)
    source = _open(data, options)
    total = _expected_samples(source, options.samples)
    if on_start:
        on_start(total)
    batches = _capped(_batches(source, options.batch_size), options.samples)
    stream = stream_onnx if loaded.format is ModelFormat.ONNX else stream_torch
    result = stream(loaded, batches, device, progress)
    if result.samples == 0 and not result.partial:
        raise DataError(f"{_describe(source)}: no samples to scan")
    sites = tuple(site_report(o.name, o.op, o.axis, o.axis_source, o.stats, options.thresholds, o.extra)
                  for o in result.sites)
    return ScanReport(
        model=ModelInfo(loaded.path, loaded.format.value, loaded.sha256),
        data=DataInfo(_describe(source), result.samples, bool(getattr(source, "is_random", False))),
        sites=sites,
        thresholds=options.thresholds,
        device=str(device),
        partial=result.partial,
        warnings=_warnings(source, result.samples, options.samples) + result.notes,
    )


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device '{spec}': expected auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device '{spec}': expected auto, cpu or cuda[:N]")
    return device


def model_dtype(module: Any) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 if none)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


# --- load ----------------------------------------------------------------------------------

def _load(model: str | Path | torch.nn.Module, options: ScanOptions) -> LoadedModel:
    if isinstance(model, torch.nn.Module):
        return LoadedModel(module=model, format=_in_memory_format(model), path=f"<{type(model).__name__}>", sha256="")
    return load_model(model, arch=options.arch, trust_pickle=options.trust_pickle)


def _in_memory_format(model: torch.nn.Module) -> ModelFormat:
    return ModelFormat.TORCHSCRIPT if isinstance(model, torch.jit.ScriptModule) else ModelFormat.PICKLE


@contextmanager
def prepared(module: Any, device: torch.device) -> Iterator[Any]:
    """The module in eval mode on `device`; its modes and device are restored afterwards."""
    modes = [(m, m.training) for m in module.modules()] if hasattr(module, "modules") else []
    original = next((t.device for t in list(module.parameters()) + list(module.buffers())), None)
    try:
        if not _is_exported(module):
            module.eval()
        if original is not None and original != device:
            module.to(device)
        yield module
    finally:
        if original is not None and original != device:
            module.to(original)
        for sub, training in modes:
            sub.training = training


def _is_exported(module: Any) -> bool:
    return isinstance(module, torch.fx.GraphModule) and any("nn_module_stack" in n.meta for n in module.graph.nodes)


# --- data ----------------------------------------------------------------------------------

def _open(data: Any, options: ScanOptions) -> Any:
    if isinstance(data, (str, Path)):
        return open_data(str(data), input_shape=options.input_shape, random_samples=options.samples or 64)
    if hasattr(data, "batches"):
        return data
    if isinstance(data, torch.Tensor):
        return _IterableSource(list(data.split(options.batch_size)))
    return _IterableSource(data)


class _IterableSource:
    """Batches from the caller's own iterable (DataLoader, list of tensors, generator)."""

    description = "<iterable>"
    is_random = False

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable

    def total(self) -> int | None:
        return None

    def batches(self, batch_size: int) -> Iterator[ModelInput]:
        for batch in self.iterable:
            yield as_model_input(batch)


def as_model_input(batch: Any) -> ModelInput:
    if isinstance(batch, ModelInput):
        return batch
    if isinstance(batch, torch.Tensor):
        return ModelInput((batch,))
    if isinstance(batch, dict):
        return ModelInput((), dict(batch))
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return ModelInput(tuple(batch))
    raise DataError(f"a batch of type {type(batch).__name__}: expected a tensor, a tuple of tensors or a dict")


def _batches(source: Any, batch_size: int) -> Iterator[ModelInput]:
    return iter(source.batches(batch_size))


def _capped(batches: Iterator[ModelInput], cap: int | None) -> Iterator[ModelInput]:
    seen = 0
    for batch in batches:
        if cap is not None and seen >= cap:
            return
        if cap is not None and seen + batch.size > cap:
            keep = cap - seen
            batch = batch.map(lambda t: t[:keep])
        seen += batch.size
        yield batch


def _expected_samples(source: Any, cap: int | None) -> int | None:
    total = source.total()
    if total is None:
        return cap
    return min(total, cap) if cap is not None else total


def _describe(source: Any) -> str:
    return str(getattr(source, "description", "<data>"))


# --- stream --------------------------------------------------------------------------------

def stream_torch(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device,
                 progress: ProgressFn | None) -> StreamResult:
    """Run every batch through a PyTorch model under the probe."""
    with prepared(loaded.module, device) as module, probing(module) as (probe, stack):
        dtype = model_dtype(module)
        samples, partial = 0, False
        with torch.inference_mode():
            try:
                for batch in batches:
                    inputs = batch.map(lambda t: _to_model(t, device, dtype))
                    _forward(module, probe, stack, inputs)
                    samples += batch.size
                    if progress:
                        progress(batch.size)
            except KeyboardInterrupt:
                partial = True
        observed = tuple(_observations(probe))
    return StreamResult(observed, samples, partial)


def stream_onnx(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device,
                progress: ProgressFn | None) -> StreamResult:
    from deadrelu.probe.onnx_probe import stream_onnx as run

    return run(loaded, batches, device, progress)


def _to_model(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.to(device, non_blocking=True)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _forward(module: Any, probe: ReluProbe, stack: Any, inputs: ModelInput) -> None:
    probe.begin_pass()
    try:
        with probe:
            module(*inputs.args, **inputs.kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        where = stack.failing_module() if stack is not None else None
        location = f" in module '{where}'" if where else ""
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        if stack is not None:
            stack.reset()
        expected = _declared_input_shapes(module)
        if expected:
            message += f" (the program was exported for input shape {expected})"
        raise ModelRunError(f"model forward failed{location} on input of shape {inputs.shapes()}: {message}") from exc


def _declared_input_shapes(module: Any) -> str:
    """Input shapes an exported program declares, symbolic dims by name ('' if unknown)."""
    if not _is_exported(module):
        return ""
    shapes = []
    for node in module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and not node.name.startswith(("p_", "b_", "c_")):
            shapes.append("(" + ", ".join(str(d) for d in value.shape) + ")")
    return ", ".join(shapes)


# --- report --------------------------------------------------------------------------------

def _observations(probe: ReluProbe) -> Iterator[SiteObservation]:
    for tap in sorted(probe.taps.values(), key=lambda t: t.order):
        yield SiteObservation(tap.name, tap.op, tap.axis.axis, tap.axis.source, tap.stats.result())


def _warnings(source: Any, samples: int, cap: int | None) -> tuple[str, ...]:
    """What the reader of the report should know about the data."""
    warnings = []
    if getattr(source, "is_random", False):
        warnings.append("random data: dead units on random inputs say little about a trained model on real data")
    if cap is not None and samples < cap:
        warnings.append(f"asked for {cap} samples, the data held {samples}")
    return tuple(warnings)
