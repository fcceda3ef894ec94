"""Streaming batches through a PyTorch model under the probe.

Each batch is one forward pass whose statistics count everywhere or nowhere (the probe
stages them until the pass completes), which is what makes the recoveries here exact:
an out-of-memory batch is re-run in halves, and Ctrl-C ends the scan with the batches
that completed.
"""

from __future__ import annotations

import copy
import functools
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from deadrelu.data import ModelInput
from deadrelu.errors import DataError, ModelRunError, UsageError, led_by
from deadrelu.load import LoadedModel
from deadrelu.probe import SiteObservation, StreamResult
from deadrelu.probe.torch_graph import CaptureError, GraphScan, capture
from deadrelu.probe.torch_kernel import torch_kernel
from deadrelu.probe.torch_probe import ModuleStack, ReluProbe, probing
from deadrelu.reductions import BatchReducer
from deadrelu.sites import AxisOverride

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class StreamSettings:
    dtype: torch.dtype | None = None  # force the model and its float inputs to this dtype
    notify: Callable[[str], None] | None = None  # one-off messages for the user (stderr)
    compile: str = "auto"  # auto | on | off (see stream_torch)
    large: bool = False  # TorchScript, "auto": the data is large enough to repay compiling per-site reductions
    expected_samples: int | None = None  # samples the stream will hold, when known (for "auto")
    graph_mode: str = "auto"  # torch.compile mode of the whole-model program (auto: CUDA graphs on CUDA)
    unit_axes: tuple[AxisOverride, ...] = ()  # --unit-axis


def stream_torch(loaded: LoadedModel, batches: Iterator[ModelInput], device: torch.device,
                 progress: ProgressFn | None, settings: StreamSettings | None = None) -> StreamResult:
    """Run every batch through a PyTorch model under the probe; statistics per site.

    The first batch runs under the eager probe. With compilation "on" -- or "auto" when
    the rest of the data would take the eager path over `COMPILE_REPAYS_AFTER_S`, judged
    by that first batch -- the rest runs through one compiled program of the model and
    all its sites' reductions (`torch_graph`). TorchScript cannot be captured: there,
    "on" (or "auto" with `large` data) compiles the per-site reductions instead.
    """
    settings = settings or StreamSettings()
    runner = _Runner(settings)
    capture_wanted = settings.compile != "off" and not isinstance(loaded.module, torch.jit.ScriptModule)
    kernel = functools.partial(torch_kernel, settings.notify) if settings.compile != "off" else None
    reducer = BatchReducer("off" if capture_wanted else settings.compile, settings.large, settings.notify, kernel)
    with prepared(loaded.module, device, settings.dtype, loaded.owned) as module, \
            probing(module, reducer, settings.unit_axes) as (probe, stack):
        dtype = settings.dtype or model_dtype(module)
        samples, partial = 0, False
        with torch.inference_mode(), _watching_interrupts():
            try:
                for batch in batches:
                    inputs = batch.map(lambda t: _to_model(t, device, dtype))
                    started = time.perf_counter()
                    if not runner.run_graph(inputs):
                        runner.run(module, probe, stack, inputs)
                    if capture_wanted and probe.first_pass_calls is not None:
                        capture_wanted = False
                        if _compile_repays(settings, _seconds_since(started, device), batch.size, samples):
                            runner.capture(module, inputs, probe)
                    samples += batch.size
                    if progress:
                        progress(batch.size)
            except KeyboardInterrupt:
                probe.discard_pass()
                partial = True
            except ModelRunError as exc:
                if loaded.path.startswith("<"):  # an in-memory module ("<Sequential>"): no file to name
                    raise
                raise led_by(exc, loaded.path) from exc  # as ONNX Runtime's failures name it
            runner.fold_graph_into(probe)
        observed = tuple(SiteObservation(t.name, t.op, t.axis.axis, t.axis.source, t.stats.result(),
                                         {"normalised_input": t.normalised, "preact_ndim": t.ndim})
                         for t in probe.observed_taps())
    return StreamResult(observed, samples, partial, tuple(runner.notes), runner.engine(reducer))


# `--compile auto` compiles the whole model when the eager path would take longer than this
# over the rest of the data: capture and compilation took 15 s (6x1024 MLP) and 27 s
# (ResNet-50) on 2 CPU cores with a cold Inductor cache, 6 s and 18 s with a warm one;
# the compiled scan then runs 1.2x (CPU, the MLP) to 8x (H100, ResNet-50) faster than the
# eager probe.
COMPILE_REPAYS_AFTER_S = 60.0


def _compile_repays(settings: StreamSettings, first_batch_s: float, batch_size: int, done: int) -> bool:
    """Whether to compile after the first batch, which took `first_batch_s` eagerly."""
    if settings.compile == "on":
        return True
    if settings.compile != "auto" or settings.expected_samples is None or batch_size <= 0:
        return False
    remaining = settings.expected_samples - done - batch_size
    return remaining / batch_size * first_batch_s > COMPILE_REPAYS_AFTER_S


def _seconds_since(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # once, after the first batch: its real duration
    return time.perf_counter() - started


@contextmanager
def _compiler_hints_silenced() -> Iterator[None]:
    """Inductor's advice to the model's author (e.g. "TensorFloat32 tensor cores ... not
    enabled") is noise on a scan's stderr, which carries only deadrelu's own lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._inductor")
        yield


def model_dtype(module: Any) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 if none)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


@contextmanager
def prepared(module: Any, device: torch.device, dtype: torch.dtype | None = None, owned: bool = True) -> Iterator[Any]:
    """The module in eval mode on `device` (and `dtype`); modes and device restored after.

    A dtype cast is lossy, so a module the caller still holds (`owned` False) is cast as
    a copy; its own weights are never touched.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    original_dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    if dtype is not None and original_dtype is not None and original_dtype != dtype:
        if not owned:
            module = copy.deepcopy(module)
        module.to(dtype)
    modes = [(m, m.training) for m in module.modules() if hasattr(m, "training")]  # a frozen script has none
    original_device = next((t.device for t in tensors), None)
    moved = original_device is not None and original_device != device
    try:
        if not _is_exported(module) and hasattr(module, "training"):
            module.eval()
        if moved:
            module.to(device)
        yield module
    finally:
        if moved:
            module.to(original_device)
        for sub, training in modes:
            sub.training = training


def _to_model(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.to(device, non_blocking=True)
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _is_exported(module: Any) -> bool:
    return isinstance(module, torch.fx.GraphModule) and any("nn_module_stack" in n.meta for n in module.graph.nodes)


class _Runner:
    """One forward pass per batch, with out-of-memory retries in halves."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.notes: list[str] = []
        self._said_oom = False
        self.graph: GraphScan | None = None
        self._graph_live = False

    def capture(self, module: Any, example: ModelInput, probe: ReluProbe) -> None:
        """Capture the model and its sites' reductions as one compiled program, or say why not."""
        shifts = {t.name: t.shift.float() for t in probe.taps.values() if t.shift is not None}
        try:
            self.graph = capture(module, example, probe.first_pass_calls or [], shifts, self._graph_mode(example))
        except Exception as exc:  # capture is an optimisation: whatever fails, the eager path goes on
            reason = str(exc) if isinstance(exc, CaptureError) else f"{type(exc).__name__}: {exc}"
            self._say(f"compiling the whole model is not possible ({reason[:200]}); the scan stays on the eager path")
            return
        self._graph_live = True
        self._say("compiling the model with every site's statistics (torch.compile, once)")

    def _graph_mode(self, example: ModelInput) -> str:
        """torch.compile's mode for the program: CUDA graphs on CUDA, where they took the
        scan of ResNet-50 (batch 128, H100) from 1.38x to 1.35x of compiled plain inference."""
        if self.settings.graph_mode != "auto":
            return self.settings.graph_mode
        on_cuda = any(t.device.type == "cuda" for t in (*example.args, *example.kwargs.values()))
        return "reduce-overhead" if on_cuda else "default"

    def run_graph(self, inputs: ModelInput) -> bool:
        """Run a batch through the compiled program if it fits; False to run it eagerly."""
        if not self._graph_live or self.graph is None or not self.graph.accepts(inputs):
            return False
        try:
            with _compiler_hints_silenced():
                return self.graph.run(inputs)  # False: a value was not finite, the eager path takes it
        except KeyboardInterrupt:
            raise
        except torch.cuda.OutOfMemoryError:
            self._graph_live = False
            return False
        except Exception as exc:  # a compiler failure must not cost the scan
            self._graph_live = False
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            self._say(f"torch.compile failed ({first}); using the eager path")
            return False

    def fold_graph_into(self, probe: ReluProbe) -> None:
        """Add the compiled program's statistics to the probe's sites."""
        if self.graph is None or not self.graph.batches:
            return
        for name, stats in self.graph.site_stats().items():
            tap = probe.taps[name]
            tap.settle()
            tap.stats.merge(stats)
            tap.batches += self.graph.batches

    def engine(self, reducer: BatchReducer) -> str:
        """How the statistics were computed: "torch-compiled-graph" when batches ran through the
        compiled whole-model program, "torch-compiled-reductions" when per-site reductions
        were compiled, "torch-kernel" when deadrelu's C kernel reduced them, else "torch-eager"."""
        if self.graph is not None and self.graph.batches:
            return "torch-compiled-graph"
        if reducer.compiled_any:
            return "torch-compiled-reductions"
        return "torch-kernel" if reducer.kernel_used else "torch-eager"

    def _say(self, message: str) -> None:
        if self.settings.notify:
            self.settings.notify(message)

    def run(self, module: Any, probe: ReluProbe, stack: ModuleStack | None, inputs: ModelInput) -> None:
        try:
            self._forward(module, probe, stack, inputs)
        except torch.cuda.OutOfMemoryError:
            probe.discard_pass()
            if inputs.size <= 1:
                raise ModelRunError(f"CUDA out of memory even at batch size 1 (input shape {inputs.shapes()}); "
                                    "try --dtype float16 or a smaller input") from None
            self._say_oom(inputs.size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for half in inputs.split(2):
                self.run(module, probe, stack, half)

    def _say_oom(self, size: int) -> None:
        if self._said_oom:
            return
        self._said_oom = True
        message = f"CUDA out of memory at batch size {size}: retrying the batch in halves (down to 1)"
        self.notes.append(message)
        if self.settings.notify:
            self.settings.notify(message)

    def _forward(self, module: Any, probe: ReluProbe, stack: ModuleStack | None, inputs: ModelInput) -> None:
        probe.begin_pass(inputs.size)
        try:
            with probe:
                module(*inputs.args, **inputs.kwargs)
        except (KeyboardInterrupt, torch.cuda.OutOfMemoryError):
            probe.discard_pass()
            raise
        except (DataError, UsageError):  # (ours: a site whose --unit-axis it does not have)
            probe.discard_pass()
            raise
        except Exception as exc:
            probe.discard_pass()
            where = stack.failing_module() if stack is not None else None
            if stack is not None:
                stack.reset()
            if _interrupted(exc):
                raise KeyboardInterrupt from exc
            if isinstance(probe.op_error, (DataError, ModelRunError, UsageError)) and _TORCHSCRIPT_TRACEBACK in str(exc):
                raise probe.op_error from exc  # ours, raised inside TorchScript (no try/except there): as it was
            raise ModelRunError(describe_failure(module, inputs, exc, where, probe.op_error)) from exc
        probe.commit_pass()


def _interrupted(exc: BaseException) -> bool:
    """Whether a forward's error is a Ctrl-C: one that arrives inside our dispatch hook
    while TorchScript runs it comes back as an empty RuntimeError of the interpreter."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return _INTERRUPTS.pending


class _InterruptFlag:
    """Set by our SIGINT handler (which still raises KeyboardInterrupt) while a scan runs."""

    pending = False

    def handle(self, signum: int, frame: Any) -> None:
        self.pending = True
        raise KeyboardInterrupt


_INTERRUPTS = _InterruptFlag()


@contextmanager
def _watching_interrupts() -> Iterator[None]:
    """Note every Ctrl-C during the scan, so a swallowed one still ends it as Ctrl-C
    (outside the main thread, where no handler can be set, only unwrapped ones do)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _INTERRUPTS.pending = False
    signal.signal(signal.SIGINT, _INTERRUPTS.handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _INTERRUPTS.pending = False


def describe_failure(module: Any, inputs: ModelInput, exc: Exception, where: str | None,
                     op_error: Exception | None = None) -> str:
    """One line: where the forward failed, on what input, why, and what the model expects."""
    message = _error_message(exc, op_error)[:300]
    location = f" in module '{where}'" if where else ""
    hints = [h for h in (_dtype_hint(module, inputs), _shape_hint(module)) if h]
    suffix = f" ({'; '.join(hints)})" if hints else ""
    return f"model forward failed{location} on {inputs.shapes() and 'input of shape ' + inputs.shapes()}: {message}{suffix}"


_TORCHSCRIPT_TRACEBACK = "The following operation failed in the TorchScript interpreter"
_RAISED_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def _error_message(exc: Exception, op_error: Exception | None = None) -> str:
    """The error's own first line. TorchScript's interpreter wraps an error in its traceback,
    whose last 'SomeError: message' line says what went wrong, or, for an op run under our
    dispatch mode, blanks it: then the op's own error (``op_error``) says it."""
    lines = str(exc).strip().splitlines()
    if lines and lines[0].startswith(_TORCHSCRIPT_TRACEBACK):
        raised = [m.group(1).strip() for m in map(_RAISED_LINE.match, lines) if m]
        if raised:
            return raised[-1]
        lines = str(op_error).strip().splitlines() if op_error is not None else lines
    return lines[0] if lines else type(exc).__name__


def _dtype_hint(module: Any, inputs: ModelInput) -> str:
    dtype = model_dtype(module)
    wrong = [f"{name} has dtype {str(t.dtype).replace('torch.', '')}" for name, t in inputs.named()
             if not t.is_floating_point() and not t.is_complex()]
    if not wrong:
        return ""
    return f"{', '.join(wrong)}; the model's weights are {str(dtype).replace('torch.', '')}: integer data is only right for index inputs such as token ids"


def _shape_hint(module: Any) -> str:
    declared = _declared_input_shapes(module)
    if declared:
        return f"the program was exported for input shape {declared}"
    for name, param in module.named_parameters():
        if name.endswith("weight") and param.ndim >= 3:
            spatial = {3: "L", 4: "H, W", 5: "D, H, W"}.get(param.ndim, "...")
            return f"its first weight {name} {tuple(param.shape)} expects input (N, {param.shape[1]}, {spatial})"
        if name.endswith("weight") and param.ndim == 2:
            return f"its first weight {name} {tuple(param.shape)} expects input (..., {param.shape[1]}) if it is a linear layer"
    return ""


def _declared_input_shapes(module: Any) -> str:
    """Input shapes an exported program declares, symbolic dims by name ('' if unknown)."""
    if not _is_exported(module):
        return ""
    shapes = []
    for node in module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            shapes.append("(" + ", ".join(str(d) for d in value.shape) + ")")
    return ", ".join(shapes)
