"""The scan pipeline in one place: load -> find sites -> stream -> accumulate -> judge -> report."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deadrelu.data import (CalibrationSource, DataOptions, ExactBatches, InputSelector, ModelInput, open_data,
                           WantedEntries, source_from_object)
from deadrelu.distributed import finish, gather, ranks_from_env, shard, start
from deadrelu.errors import DataError, UsageError, led_by
from deadrelu.judge import Thresholds
from deadrelu.load import LoadedModel, load_model
from deadrelu.load.detect import ModelFormat
from deadrelu.load.torch_formats import refuse_meta
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.probe.torch_stream import StreamSettings, stream_torch
from deadrelu.report import DataInfo, ModelInfo, ScanReport, site_report
from deadrelu.sites import AxisOverride

ProgressFn = Callable[[int], None]  # called with the number of samples just processed
StartFn = Callable[[int | None], None]  # called once with the number of samples to expect (None: unknown)
# Starts one stage of a longer job (fix: its scans, the comparison of outputs) by its label:
# gives the stage's (on_start, progress) callbacks.
Stage = Callable[[str], tuple[StartFn, ProgressFn]]

# TorchScript models (whose graph cannot be captured whole): `--compile auto` compiles their
# per-site reductions only for at least this many samples -- compiling costs a few seconds
# per site shape once, and saves a little on every batch. Other models: see
# `torch_stream.COMPILE_REPAYS_AFTER_S`.
COMPILE_REPAYS_AT_SAMPLES = 20_000

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class ScanOptions:
    """Everything that changes what a scan does, besides the model and the data."""

    arch: str | None = None
    trust_pickle: bool = False
    weights_key: str | None = None  # the checkpoint entry holding the weights (default: the first of the usual)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # float32 | float16 | bfloat16 | float64: cast model and float inputs
    batch_size: int = 32
    samples: int | None = None  # cap on the number of samples
    inputs: str | None = None  # which batch elements are model inputs: "0", "0,1", "image,mask"
    compile: str = "auto"  # auto | on | off: torch.compile the model with its statistics; ONNX: deadrelu's kernel
    data: DataOptions = field(default_factory=DataOptions)
    thresholds: Thresholds = field(default_factory=Thresholds)
    unit_axes: tuple[AxisOverride, ...] = ()  # --unit-axis GLOB=DIM: the units of those sites, whatever runs


def scan(model: str | Path | torch.nn.Module | LoadedModel, data: str | Path | CalibrationSource | Iterable[Any],
         options: ScanOptions | None = None, *, progress: ProgressFn | None = None,
         on_start: StartFn | None = None,
         notify: Callable[[str], None] | None = None) -> ScanReport:
    """Scan a model's ReLU sites over calibration data and return the report.

    Args:
        model: a model file (any supported format) or an in-memory ``nn.Module``. An
            in-memory module is left as it was: hooks removed, train/eval modes, device
            and dtype restored, even when the scan raises.
        data: a ``--data`` spec (see `deadrelu.data.open_data`), a `CalibrationSource`, a
            tensor (samples along dim 0), a ``Dataset``/``DataLoader``, or any iterable of
            batches (tensor, tuple of tensors, or dict of tensors).
        options: see `ScanOptions`.
        progress: called after each batch with its number of samples.
        on_start: called once with the number of samples to expect (None if unknown).
        notify: called with one-off messages worth telling the user at once.

    Returns:
        The `ScanReport`; ``report.partial`` is True when Ctrl-C ended the stream early
        (the statistics then cover the batches that completed).

    Example:
        >>> report = scan("fixtures/convnet.ts.pt", "fixtures/convnet.calib.npy")
        >>> report.dead, [s.name for s in report.sites if s.dead]
    """
    options = options or ScanOptions()
    _check(options)
    ranks = ranks_from_env()
    loaded = _load(model, options)
    if options.dtype and loaded.format is ModelFormat.ONNX:
        raise UsageError("--dtype applies to PyTorch models; an ONNX graph runs in the dtypes it declares")
    device, joined = start(ranks, resolve_device(options.device, loaded.format))
    try:
        source = _open(data, options, loaded)
        total = _expected_samples(source, options.samples)
        if on_start:
            on_start(total)
        inputs = model_batches(loaded, source, options)
        settings = StreamSettings(DTYPES.get(options.dtype or ""), notify, options.compile,
                                  large=(total or 0) >= COMPILE_REPAYS_AT_SAMPLES, expected_samples=total,
                                  unit_axes=options.unit_axes)
        result = _stream(loaded, shard(inputs, ranks), device, progress, settings)
        result = gather(result, ranks)
    finally:
        finish(joined)
    if result.samples == 0 and not result.partial and ranks.is_main:  # another rank may just have had no batch
        if inputs.left_out:
            held = f"{inputs.left_out} sample{'s' if inputs.left_out > 1 else ''}"
            least = "" if inputs.size is not None else " at least"
            raise DataError(f"{source.description}: {held}, fewer than one batch of the{least} "
                            f"{inputs.size or inputs.low} the model was exported to take")
        raise DataError(f"{source.description}: no samples to scan (the data is empty)")
    sites = tuple(site_report(o.name, o.op, o.axis, o.axis_source, o.stats, options.thresholds, o.extra)
                  for o in result.sites)
    return ScanReport(
        model=ModelInfo(loaded.path, loaded.format.value, loaded.sha256),
        data=DataInfo(source.description, result.samples, bool(getattr(source, "is_random", False))),
        sites=sites,
        thresholds=options.thresholds,
        device=str(device),
        partial=result.partial,
        warnings=loaded.notes + _warnings(source, result, options, inputs),
        engine=result.engine,
    )


def _check(options: ScanOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.samples is not None and options.samples < 1:
        raise UsageError("--samples must be at least 1")
    if options.compile not in ("auto", "on", "off"):
        raise UsageError(f"--compile '{options.compile}': expected auto, on or off")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise UsageError(f"--dtype '{options.dtype}': expected one of {', '.join(DTYPES)}")


def resolve_device(spec: str, fmt: ModelFormat | None = None) -> torch.device:
    """The device to scan on. For ONNX models CUDA means ONNX Runtime's CUDA execution
    provider (checked by the ONNX backend), whatever torch build is installed."""
    onnx = fmt is ModelFormat.ONNX
    if spec == "auto":
        return torch.device("cuda" if (_ort_has_cuda() if onnx else torch.cuda.is_available()) else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device '{spec}': expected auto, cpu or cuda[:N]") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device '{spec}': expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not onnx and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__})")
    return device


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# --- load ----------------------------------------------------------------------------------

def _load(model: str | Path | torch.nn.Module | LoadedModel, options: ScanOptions) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        fmt = ModelFormat.TORCHSCRIPT if isinstance(model, torch.jit.ScriptModule) else ModelFormat.PICKLE
        refuse_meta(model, f"<{type(model).__name__}>")
        return LoadedModel(module=model, format=fmt, path=f"<{type(model).__name__}>", sha256="", owned=False)
    if not isinstance(model, (str, Path)):
        raise UsageError(f"model: expected a path or an nn.Module, got {type(model).__name__}")
    return load_model(model, arch=options.arch, trust_pickle=options.trust_pickle, weights_key=options.weights_key)


def count_model_inputs(loaded: LoadedModel) -> int | None:
    """How many positional inputs the model's forward requires (None if unknown)."""
    module = loaded.module
    if loaded.format is ModelFormat.ONNX:
        counter = getattr(module, "input_count", None)
        return counter() if callable(counter) else None
    parameters = _forward_parameters(module)
    if parameters is None:
        return None
    return sum(1 for _, required in parameters if required)


def model_input_names(loaded: LoadedModel) -> tuple[str, ...] | None:
    """The names of the model's inputs, in order: an ONNX graph's inputs, or the forward's
    positional parameters (None when they cannot be read). Named data entries that are none
    of them (a `label` beside `x`) are then left out for either kind of model."""
    if loaded.format is ModelFormat.ONNX:
        names = getattr(loaded.module, "input_names", None)
        return tuple(names()) if callable(names) else None
    parameters = _forward_parameters(loaded.module)
    return None if parameters is None else tuple(name for name, _ in parameters)


def _forward_parameters(module: Any) -> list[tuple[str, bool]] | None:
    """(name, required) of each positional parameter of `module`'s forward."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            return [(a.name, not a.has_default_value()) for a in module.forward.schema.arguments[1:]]
        parameters = inspect.signature(module.forward).parameters.values()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [(p.name, p.default is inspect.Parameter.empty) for p in parameters if p.kind in kinds]


# --- data ----------------------------------------------------------------------------------

def _open(data: Any, options: ScanOptions, loaded: LoadedModel | None = None) -> CalibrationSource:
    if isinstance(data, (str, Path)):
        data_options = options.data
        if options.samples and data_options.random_samples == DataOptions().random_samples:
            data_options = replace(data_options, random_samples=options.samples)
        if loaded is not None:
            keys = InputSelector.parse(options.inputs, None).keys
            data_options = replace(data_options, wanted=WantedEntries(tuple(keys or _named_inputs(loaded, options) or ()),
                                                                    by_user=keys is not None))
        return open_data(str(data), data_options)
    return source_from_object(data, f"<{type(data).__name__}>", options.data.workers)


def model_batches(loaded: LoadedModel, source: CalibrationSource, options: ScanOptions) -> ExactBatches:
    """The source's batches as model inputs (`--inputs`), capped at `--samples`, finite;
    for a model with a fixed batch size, cut to that size (read in whole multiples of it
    up to `--batch-size`, so that cutting takes no copy where the source keeps to it)."""
    selector = InputSelector.parse(options.inputs, count_model_inputs(loaded), model_input_names(loaded))
    fixed = fixed_batch_size(loaded)
    low, high = (1, None) if fixed is not None else dynamic_batch_range(loaded)
    if fixed is not None:
        read = fixed * max(1, options.batch_size // fixed)
    else:
        read = max(low, min(options.batch_size, high or options.batch_size))  # --batch-size kept to the range
    batches = _capped(_selected(source, selector, read), options.samples)
    return ExactBatches(_finite(batches, source.description), fixed, low, high)


def dynamic_batch_range(loaded: LoadedModel) -> tuple[int, int | None]:
    """The batch sizes a `torch.export` program's dynamic batch dimension admits (its
    range constraints: `Dim("b", min=4, max=64)` gives (4, 64)); (1, None) when it is
    unbounded, or the model is no exported program. A program's own lower bound of 2
    (`Dim.AUTO`) runs a batch of 1 all the same, so it is kept only above 2."""
    if loaded.format is ModelFormat.ONNX:
        return (2, None) if _squeezes_any_unit_dim(loaded.module.proto) else (1, None)
    program = loaded.exported_program
    if program is None:
        return 1, None
    user_inputs = set(program.graph_signature.user_inputs)
    lows, highs = [1], []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if not isinstance(value, torch.Tensor) or not value.ndim or not isinstance(value.shape[0], torch.SymInt):
            continue
        bounds = program.range_constraints.get(value.shape[0].node.expr)
        if bounds is None:
            continue
        low, high = _finite_int(bounds.lower), _finite_int(bounds.upper)
        if low is not None and low > 2:
            lows.append(low)
        if high is not None:
            highs.append(high)
    return max(lows), (min(highs) if highs else None)


def _squeezes_any_unit_dim(proto: Any) -> bool:
    """Whether an ONNX graph holds a Squeeze with no axes (what `x.squeeze()` exports as),
    anywhere, subgraphs included. Run on a batch of one sample, it takes the batch axis
    too, and a pre-activation behind it loses the axis its units were read from (a linear
    site's `(1, H)` becomes `(H,)`); such a model gets batches of at least 2 samples (a
    last batch of one joins the one before it), which read as every other batch does."""
    def axis_less(node: Any) -> bool:
        return node.op_type == "Squeeze" and len([i for i in node.input if i]) < 2 and \
            not any(a.name == "axes" for a in node.attribute)

    def walk(graph: Any) -> bool:
        return any(axis_less(node) or any(walk(a.g) for a in node.attribute if a.g.node) for node in graph.node)

    return walk(proto.graph)


def _finite_int(bound: Any) -> int | None:
    """A range bound as an int; None for torch's `int_oo` or sympy's `oo` (sympy's own
    `is_finite` and `int()` fail on `int_oo` in ways that vary, so the type says it)."""
    import sympy

    return int(bound) if isinstance(bound, (int, sympy.Integer)) and not isinstance(bound, bool) else None


def fixed_batch_size(loaded: LoadedModel) -> int | None:
    """The one batch size the model takes, when every input declares the same static
    first dimension (an ONNX graph or a `torch.export` program exported without a dynamic
    batch); None when it takes any."""
    if loaded.format is ModelFormat.ONNX:
        from deadrelu.probe.onnx_feed import input_specs

        firsts = {spec.fixed_batch for spec in input_specs(loaded.module.proto)}
    elif loaded.exported_program is not None:
        program = loaded.exported_program
        user_inputs = set(program.graph_signature.user_inputs)
        values = [node.meta.get("val") for node in program.graph.nodes
                  if node.op == "placeholder" and node.name in user_inputs]
        firsts = {int(v.shape[0]) if isinstance(v, torch.Tensor) and v.ndim and isinstance(v.shape[0], int) else None
                  for v in values}
    else:
        return None
    return firsts.pop() if len(firsts) == 1 else None


def _selected(source: CalibrationSource, selector: InputSelector, batch_size: int) -> Iterator[ModelInput]:
    """The model inputs of each batch; a batch that has none names the data it came from."""
    for batch in source.batches(batch_size):
        try:
            chosen = selector.select(batch)
            chosen.check_usable()
        except DataError as exc:
            raise led_by(exc, source.description) from exc
        yield chosen


def _finite(batches: Iterator[ModelInput], description: str) -> Iterator[ModelInput]:
    seen = 0
    for batch in batches:
        batch.check_finite(seen, description)
        seen += batch.size
        yield batch


def open_source(data: Any, options: ScanOptions, loaded: LoadedModel | None = None) -> CalibrationSource:
    """`data` as a `CalibrationSource` (a --data spec, a source, a tensor or any iterable);
    with `loaded`, named entries of a file that the model does not take are left unread."""
    return _open(data, options, loaded)


def _named_inputs(loaded: LoadedModel, options: ScanOptions) -> tuple[str, ...] | None:
    """The model's input names, for a data file's entries (None with --inputs positions)."""
    return None if options.inputs else model_input_names(loaded)


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


def _expected_samples(source: CalibrationSource, cap: int | None) -> int | None:
    total = source.total()
    if total is None:
        return cap
    return min(total, cap) if cap is not None else total


# --- stream --------------------------------------------------------------------------------

def _stream(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device, progress: ProgressFn | None,
            settings: StreamSettings) -> StreamResult:
    if loaded.format is ModelFormat.ONNX:
        from deadrelu.probe.onnx_probe import stream_onnx

        return stream_onnx(loaded, batches, device, progress, settings.compile, settings.notify, settings.unit_axes)
    return stream_torch(loaded, batches, device, progress, settings)


# --- report --------------------------------------------------------------------------------

def _guessed_axes(sites: Sequence[SiteObservation]) -> str | None:
    """A note naming the sites of rank 3 or more whose unit axis is the default dim 1: no
    producer deadrelu knows (a convolution, a linear op, ...) says where their units are,
    so dim 1 may hold positions, not channels or features. (At rank 2, dim 1 is the only
    axis that is not the samples.)"""
    names = [o.name for o in sites if o.axis_source == "default" and o.extra.get("preact_ndim", 0) >= 3]
    if not names:
        return None
    quoted = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    which = f"site {quoted}" if len(names) == 1 else f"{len(names)} sites ({quoted})"
    return (f"unit axis unknown at {which}: dim 1 taken as the units (no convolution, linear or other producer "
            "deadrelu knows comes before; dim 1 may hold positions rather than channels or features)")


def _warnings(source: CalibrationSource, result: StreamResult, options: ScanOptions,
              inputs: ExactBatches) -> tuple[str, ...]:
    """What the reader of the report should know about the data and the run."""
    cap = options.samples
    warnings = list(result.notes)
    guessed = _guessed_axes(result.sites)
    if guessed:
        warnings.append(guessed)
    for override in options.unit_axes:
        if not any(fnmatch.fnmatchcase(o.name, override.pattern) for o in result.sites):
            warnings.append(f"--unit-axis {override} matched no site that ran")
    if getattr(source, "is_random", False):
        warnings.append("random data: dead units on random inputs say little about a trained model on real data")
    if inputs.left_out:
        were = "sample was" if inputs.left_out == 1 else "samples were"
        warnings.append(f"{inputs.left_out} {were} left out: the model takes batches {inputs.takes}")
    held = result.samples + inputs.left_out
    if cap is not None and held < cap and not result.partial:
        warnings.append(f"asked for {cap} samples, the data held {held}: used {result.samples}")
    if result.partial:
        warnings.append(f"interrupted: statistics cover the first {result.samples} samples only")
    return tuple(warnings)
