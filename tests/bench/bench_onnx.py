"""Cost of an ONNX scan against plain ONNX Runtime and against ORT's MinMax calibrator.

    python tests/bench/bench_onnx.py [--model resnet18|resnet50|mlp] [--batch 8] [--size 112]
                                     [--batches 4] [--repeats 5] [--no-memory]

The model (tests/bench/models.py, random weights) is exported to ONNX in a temporary
directory. On the same batches, interleaved, several times, it times

* plain: ``onnxruntime.InferenceSession`` of the unmodified model (default optimisations);
* deadrelu: the scan's streaming path (`deadrelu.probe.onnx_probe.OnnxScanner.run`), which
  computes six per-unit statistics at every ReLU site;
* calibrator: ``onnxruntime.quantization.calibrate`` MinMax calibrator's ``collect_data``
  (per-tensor min/max of every tensor, its default), and the same restricted to the tensors
  around Relu nodes (``op_types_to_calibrate=["Relu"]``).

Sessions are built once, before timing (the steady state of a long scan); the build time of
each is printed apart. Each timed block starts with one untimed batch, so that threads
another mode's session left spinning are not charged to it. Peak memory (``ru_maxrss``) is measured for each mode in a fresh
subprocess that loads the same modules and runs the same batches. Nothing is asserted:
speed is a ratio measured in one run, never an absolute time in a test.
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
from deadrelu.probe.onnx_probe import OnnxScanner  # noqa: E402

MODES = ("plain", "deadrelu", "calibrator", "calibrator-relu")


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
        elif mode == "deadrelu":
            model = load_onnx(path)
            self.scanner = OnnxScanner(model, survey(model.proto), ["CPUExecutionProvider"])
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
        elif self.mode == "deadrelu":
            for batch in batches:
                self.scanner.run(ModelInput((torch.from_numpy(batch),)))
        else:
            self.calibrator.collect_data(Reader(batches))
        return time.perf_counter() - start

    def timed(self) -> float:
        """One untimed batch first: the previous mode's ORT threads may still be spinning
        on the cores (2 cores here), which would be charged to whichever mode runs next."""
        self.run(self.batches[:1])
        return self.run()


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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "mlp"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="image side for the ResNets")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    shape = (784,) if args.model == "mlp" else (3, args.size, args.size)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((args.batch, *shape)).astype(np.float32) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory(prefix="deadrelu-bench-") as tmp:
        folder = Path(tmp)
        path = export(args.model, shape, folder)
        runners = {mode: Runner(mode, path, batches, folder) for mode in MODES}
        for runner in runners.values():
            runner.run()  # warm-up
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, runner in runners.items():
                times[mode].append(runner.timed())
        memory: dict[str, tuple[float, float]] = {}
        if not args.no_memory:
            data = folder / "batches.npy"
            np.save(data, np.stack(batches))
            memory = {mode: peak_memory(mode, path, data) for mode in MODES}
        report(args, runners, times, memory)


def report(args: Any, runners: dict[str, Runner], times: dict[str, list[float]],
           memory: dict[str, tuple[float, float]]) -> None:
    samples = args.batch * args.batches
    print(f"machine: {platform.system()} {platform.machine()} {platform.processor() or ''} "
          f"cpu_count={os.cpu_count()} onnxruntime={ort.__version__} torch={torch.__version__}")
    print(f"model: {args.model}, input {args.batch} x {'784' if args.model == 'mlp' else f'3x{args.size}x{args.size}'}, "
          f"{args.batches} batches x {args.repeats} interleaved repeats (medians)")
    sites = len(runners["deadrelu"].scanner.plans)
    print(f"deadrelu: {sites} ReLU sites, 6 per-unit statistics each; its build time includes one batch "
          "(the session is built on the first batch)")
    print(f"{'mode':16s} {'median s':>9s} {'img/s':>8s} {'vs plain':>9s} {'vs calib':>9s} {'build s':>8s} "
          f"{'start MiB':>9s} {'peak MiB':>9s}")
    plain = times["plain"]
    calib = times["calibrator"]
    for mode, measured in times.items():
        median = statistics.median(measured)
        vs_plain = statistics.median(m / p for m, p in zip(measured, plain))
        vs_calib = statistics.median(m / c for m, c in zip(measured, calib))
        before, peak = memory.get(mode, (float("nan"), float("nan")))
        print(f"{mode:16s} {median:9.3f} {samples / median:8.1f} {vs_plain:8.2f}x {vs_calib:8.2f}x "
              f"{runners[mode].build_seconds:8.2f} {before:9.0f} {peak:9.0f}")


if __name__ == "__main__":
    main()
