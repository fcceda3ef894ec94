"""Cost of an ONNX scan against plain ONNX Runtime and against ORT's MinMax calibrator.

    python tests/bench/bench_onnx.py [--models resnet50,resnet18,mlp,mlp_head] [--batches N] [--repeats 7]
                                     [--batch B] [--size S] [--no-memory] [--quick]

Each model (tests/bench/models.py, random weights) is exported to ONNX in a temporary
directory at the size of issue #7's targets: ResNet-50 at 224 px and ResNet-18 at 112 px,
batch 8, and the 6 x 1024 MLP at batch 256 (``--batch``/``--size`` override them); on request
also ``mlp_head``, that MLP with an 8192-wide output layer, whose head a scan does not run. On the
same batches, interleaved, several times, it times

* plain: ``onnxruntime.InferenceSession`` of the unmodified model (default options:
  every graph optimisation, as many threads as physical cores);
* deadrelu: the scan's streaming path (`deadrelu.probe.onnx_probe.OnnxScanner.run`) as a
  CPU scan runs by default: deadrelu's one-pass kernel (`deadrelu.probe.kernel`,
  built on first use) at every ReLU site, nine per-unit statistics, folded on the host;
* deadrelu-ops: the same scan with ONNX Runtime's own operators (``--compile off``);
* calibrator: ``onnxruntime.quantization.calibrate``'s MinMax calibrator ``collect_data``
  (per-tensor min/max of every tensor, its default), and, without ``--quick``, the same
  restricted to the tensors around Relu nodes (``op_types_to_calibrate=["Relu"]``).

Sessions are built once, before timing (the steady state of a long scan); the build time
of each is printed apart. Each timed block starts with one untimed batch, so that threads
another mode's session left spinning are not charged to it; the order of the modes is
reversed every other repeat. Ratios are medians of per-repeat ratios (with their range),
so a neighbour's load that slows one repeat slows every mode of it. Peak memory (VmHWM) is
measured for each mode in a fresh subprocess that loads the same modules and runs the
same batches. Nothing is asserted: speed is a ratio measured in one run, never an
absolute time in a test.

``--quick`` (under two minutes on two cores): a quarter of the batches, three repeats,
no calibrator-relu mode.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from deadrelu.data import ModelInput  # noqa: E402
from deadrelu.load.onnx_format import load_onnx  # noqa: E402
from deadrelu.onnx_sites import survey  # noqa: E402
from deadrelu.probe.kernel import kernel_library  # noqa: E402
from deadrelu.probe.onnx_probe import OnnxScanner  # noqa: E402

MODES = ("plain", "deadrelu", "deadrelu-ops", "calibrator", "calibrator-relu")
QUICK_MODES = ("plain", "deadrelu", "deadrelu-ops", "calibrator")
SCANS = ("deadrelu", "deadrelu-ops")
# issue #7: ResNet-50 224 px batch 8, ResNet-18 (112 px batch 8), the 6 x 1024 MLP (batch 256);
# (batch, image side, batches per timed block: enough for ~0.5 s, so one scheduler hiccup
# on a shared machine does not decide a repeat)
DEFAULTS = {"resnet50": (8, 224, 4), "resnet18": (8, 112, 16), "mlp": (256, 0, 24), "mlp_head": (256, 0, 24)}
DEFAULT_MODELS = "resnet50,resnet18,mlp"  # mlp_head (the MLP with an 8192-wide output layer) on request
TARGETS = "targets (issue #7): scan <= 1.20x plain, calibrator >= 1.40x scan, scan peak <= 1.5x plain peak"


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (784,) if self.model.startswith("mlp") else (3, self.size, self.size)

    def describe(self) -> str:
        return f"{self.model}, input {self.batch} x {'x'.join(map(str, self.shape))}"


def export(name: str, shape: tuple[int, ...], folder: Path) -> Path:
    """Export a benchmark model (random weights, eval mode) to ONNX with a dynamic batch."""
    torch.manual_seed(0)
    model = getattr(models, name)().eval()
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


class Reader:
    """`CalibrationDataReader` over a list of batches (restartable)."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"input": self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


class Runner:
    """One mode, built once; `run` streams every batch through it."""

    def __init__(self, mode: str, path: Path, batches: list[np.ndarray], folder: Path) -> None:
        self.mode = mode
        self.batches = batches
        start = time.perf_counter()
        if mode == "plain":
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        elif mode in SCANS:
            model = load_onnx(path)
            kernel = kernel_library().path if mode == "deadrelu" else None
            if mode == "deadrelu" and kernel is None:
                raise SystemExit(f"deadrelu's ONNX kernel is not available: {kernel_library().reason}")
            self.scanner = OnnxScanner(model, survey(model.proto), ["CPUExecutionProvider"], kernel=kernel)
            self.scanner.run(ModelInput((torch.from_numpy(batches[0]),)))  # builds the session
        else:
            from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

            ops = ["Relu"] if mode == "calibrator-relu" else None
            self.calibrator = create_calibrator(path, ops, augmented_model_path=str(folder / f"{mode}.onnx"),
                                                calibrate_method=CalibrationMethod.MinMax,
                                                providers=["CPUExecutionProvider"])
        self.build_seconds = time.perf_counter() - start

    def run(self, batches: list[np.ndarray] | None = None) -> float:
        """Seconds to stream the batches (all of this runner's by default)."""
        batches = self.batches if batches is None else batches
        start = time.perf_counter()
        if self.mode == "plain":
            for batch in batches:
                self.session.run(None, {"input": batch})
        elif self.mode in SCANS:
            for batch in batches:
                self.scanner.run(ModelInput((torch.from_numpy(batch),)))
        else:
            self.calibrator.collect_data(Reader(batches))
        return time.perf_counter() - start

    def timed(self) -> float:
        """One untimed batch first: the previous mode's ORT threads may still be spinning
        on the cores, which would be charged to whichever mode runs next."""
        self.run(self.batches[:1])
        return self.run()

    def close(self) -> None:
        if self.mode in SCANS:
            self.scanner.factory.close()


def peak_memory(mode: str, path: Path, data: Path) -> tuple[float, float]:
    """(MiB before building, peak MiB) of a fresh process running one mode once."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(data)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    before, peak = out.stdout.split()[-2:]
    return float(before), float(peak)


def child(mode: str, path: str, data: str) -> None:
    batches = list(np.load(data))
    with tempfile.TemporaryDirectory(prefix="deadrelu-bench-") as folder:
        before = peak_rss_mib()
        Runner(mode, Path(path), batches, Path(folder)).run()
        peak = peak_rss_mib()
    print(f"{before:.0f} {peak:.0f}")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss
    carries the parent's peak over fork + exec."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (f"{platform.system()} {platform.machine()}, {cpu}, cpu_count={os.cpu_count()}, python "
            f"{platform.python_version()}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def bench(case: Case, args: Any, modes: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((case.batch, *case.shape)).astype(np.float32) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory(prefix="deadrelu-bench-") as tmp:
        folder = Path(tmp)
        path = export(case.model, case.shape, folder)
        memory: dict[str, tuple[float, float]] = {}
        if not args.no_memory:  # first, while no session of this process holds memory or threads
            data = folder / "batches.npy"
            np.save(data, np.stack(batches))
            memory = {mode: peak_memory(mode, path, data) for mode in modes}
        runners = {mode: Runner(mode, path, batches, folder) for mode in modes}
        for runner in runners.values():
            runner.run()  # warm-up
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            order = list(runners.items()) if repeat % 2 == 0 else list(runners.items())[::-1]
            for mode, runner in order:
                times[mode].append(runner.timed())
        report(case, args, runners, times, memory)
        for runner in runners.values():
            runner.close()


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def report(case: Case, args: Any, runners: dict[str, Runner], times: dict[str, list[float]],
           memory: dict[str, tuple[float, float]]) -> None:
    sites = len(runners["deadrelu"].scanner.plans)
    print(f"\nmodel: {case.describe()}; {args.batches} batches x {args.repeats} interleaved repeats "
          f"(medians; [range] of the per-repeat ratios); {sites} ReLU sites; load average now {load()}")
    print(f"{'mode':16s} {'s/batch':>8s} {'img/s':>8s} {'vs plain':>20s} {'build s':>8s} {'start MiB':>9s} "
          f"{'peak MiB':>9s}")
    plain = times["plain"]
    for mode, measured in times.items():
        per_batch = statistics.median(measured) / args.batches
        before, peak = memory.get(mode, (float("nan"), float("nan")))
        print(f"{mode:16s} {per_batch:8.3f} {case.batch / per_batch:8.1f} "
              f"{_ratio([m / p for m, p in zip(measured, plain)]):>20s} {runners[mode].build_seconds:8.2f} "
              f"{before:9.0f} {peak:9.0f}")
    scan, calib = times["deadrelu"], times["calibrator"]
    summary = (f"summary {case.model}: scan / plain {_ratio([s / p for s, p in zip(scan, plain)])}, "
               f"calibrator / scan {_ratio([c / s for c, s in zip(calib, scan)])}")
    if memory:
        summary += f", peak memory scan / plain {memory['deadrelu'][1] / memory['plain'][1]:.2f}x"
    print(summary)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated, from {', '.join(DEFAULTS)} (default {DEFAULT_MODELS})")
    parser.add_argument("--model", help="one model (same as --models MODEL)")
    parser.add_argument("--batch", type=int, help="batch size for every model (default: per model, see above)")
    parser.add_argument("--size", type=int, help="image side for the ResNets (default: per model)")
    parser.add_argument("--batches", type=int, help="batches per timed block (default: per model, see above)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="a quarter of the batches, 3 repeats, no calibrator-relu")
    args = parser.parse_args()
    names = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(DEFAULTS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(DEFAULTS)}")
    modes = MODES
    if args.quick:
        args.repeats, modes = 3, QUICK_MODES
    print(f"machine: {machine()}; load average {load()}")
    print(TARGETS)
    for name in names:
        batch, size, blocks = DEFAULTS[name]
        batches = args.batches or (max(2, blocks // 4) if args.quick else blocks)
        bench(Case(name, args.batch or batch, args.size or size), argparse.Namespace(**{**vars(args), "batches": batches}),
              modes)


if __name__ == "__main__":
    main()
