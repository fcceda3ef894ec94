"""deadrelu's one-pass kernel: every statistic of a site in one read of its pre-activation.

The C kernel (``deadrelu/kernels/``) returns the nine `MASKED_ROWS` per unit in float64:
NaN/Inf counted apart, exact counts, shifted sums (``relu_stats_compute.h``). One shared
library serves both engines:

* ONNX Runtime, as the custom operator ``ai.deadrelu::ReluStats`` on ORT's intra-op
  threads (`onnx_probe`). ORT's standard operators read a tapped tensor once per statistic,
  some of them single-threaded; on ResNet-50 that held a scan at 1.6-1.7x plain inference,
  the kernel at ~1.2x (what remains is ORT converting each tapped convolution output out of
  its blocked NCHWc layout, and the ReLU that can no longer fuse into it);
* PyTorch on CPU, through ``deadrelu_relu_stats`` called with ctypes on the tensor's memory,
  on PyTorch's own OpenMP threads (`torch_kernel`).

It is C, so it is built on first use with the system C compiler (``$CC``, ``cc``, ``gcc``
or ``clang``) for this machine (``-O3 -march=native``, portable where that is refused) into
a cache folder (``$DEADRELU_CACHE_DIR``, else ``$XDG_CACHE_HOME/deadrelu``, else
``~/.cache/deadrelu``; a temporary folder for this process where that cannot be written),
under a name that hashes the sources, the compiler, the flags, the CPU's features and the
onnxruntime version. A fresh build is first checked in a subprocess against numpy on
planted values, through both entry points (a crash there costs the subprocess, not the
scan); the verdict is kept beside the library (a failure for a day, a timeout not at all).
Without a compiler, or when the check fails, scans use the reductions of ONNX Runtime's or
PyTorch's own operators and say so in one line.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN = "ai.deadrelu"
OP_TYPE = "ReluStats"
STAT_ROWS = 9  # the MASKED_ROWS, in order: count, positive, nan, inf, minimum, maximum, mean, m2, relu_sum
SOURCES = ("relu_stats.c", "relu_stats_compute.h")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")
TUNING = ("-march=native",)  # dropped, and the build retried, where the compiler refuses it
BUILD_TIMEOUT_S = 120
CHECK_TIMEOUT_S = 120
TIMED_OUT = "took over"  # in a failure reason: not kept as a verdict
RETRY_AFTER_S = 24 * 3600  # a failure verdict older than this is tried again


@dataclass(frozen=True)
class KernelLibrary:
    """The built kernel (``path``), or why there is none (``reason``)."""

    path: Path | None
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.path is not None


def kernel_sources() -> Path:
    return Path(__file__).resolve().parent.parent / "kernels"


def cache_dir() -> Path:
    explicit = os.environ.get("DEADRELU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deadrelu"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def kernel_library(announce: Callable[[str], None] | None = None) -> KernelLibrary:
    """The kernel for this machine: built, checked and cached on first use (then found in
    the cache folder; the answer is also kept for the process). ``announce`` hears one
    line before a build starts (a few seconds, once per machine)."""
    compiler = find_compiler()
    if compiler is None:
        return KernelLibrary(None, "no C compiler on PATH (cc, gcc or clang; or set $CC)")
    try:
        return _built(compiler, announce)
    except OSError as exc:
        return KernelLibrary(None, f"cannot build it: {exc}")


def _built(compiler: str, announce: Callable[[str], None] | None = None) -> KernelLibrary:
    from deadrelu.outputs import write_atomic  # here: the self-check runs this file without the package
    folder = _writable(cache_dir())
    library = folder / f"relu_stats-{_build_key(compiler)}.so"
    verdict_ok, verdict_bad = library.with_suffix(".ok"), library.with_suffix(".bad")
    if library.exists() and verdict_ok.exists():
        return KernelLibrary(library)
    if _recent(verdict_bad):
        return KernelLibrary(None, verdict_bad.read_text().strip())
    if announce:
        announce(f"building deadrelu's one-pass statistics kernel for this machine with {Path(compiler).name} "
                 f"(once; cached in {folder})")
    reason = _compile(compiler, library) or _check(library)
    if reason:
        if TIMED_OUT not in reason:  # a slow, loaded machine is no verdict on the kernel
            write_atomic(verdict_bad, reason + "\n")
        return KernelLibrary(None, reason)
    write_atomic(verdict_ok, "checked against numpy\n")
    verdict_bad.unlink(missing_ok=True)  # an old failure, now tried again and passed
    return KernelLibrary(library)


def _recent(verdict: Path) -> bool:
    """A failure verdict younger than `RETRY_AFTER_S` stands; an older one is tried again
    (the compiler may have been fixed or the disk freed since)."""
    try:
        return time.time() - verdict.stat().st_mtime < RETRY_AFTER_S
    except OSError:
        return False


def _writable(folder: Path) -> Path:
    """The cache folder; a temporary one, removed at exit, where it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except OSError:
        pass
    temporary = Path(tempfile.mkdtemp(prefix="deadrelu-kernel-"))
    atexit.register(shutil.rmtree, temporary, ignore_errors=True)
    return temporary


def _build_key(compiler: str) -> str:
    import onnxruntime

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((kernel_sources() / name).read_bytes())
    digest.update(" ".join(FLAGS + TUNING).encode())
    digest.update(_compiler_version(compiler).encode())
    digest.update(onnxruntime.__version__.encode())
    digest.update(platform.machine().encode())
    digest.update(_cpu_features().encode())
    return digest.hexdigest()[:16]


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return compiler
    return compiler + done.stdout


def _cpu_features() -> str:
    """-march=native builds for this CPU: a cache shared with another CPU must not reuse it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, library: Path) -> str:
    """Build into a temporary file beside `library`, then rename; an error line or ''.
    Tuned for this CPU where the compiler can (`TUNING`), else portable."""
    handle, temporary = tempfile.mkstemp(prefix=library.stem, suffix=".tmp.so", dir=library.parent)
    os.close(handle)
    source = str(kernel_sources() / "relu_stats.c")
    try:
        for tuning in (TUNING, ()):
            command = [compiler, *FLAGS, *tuning, "-o", temporary, source, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(temporary, library)
                return ""
        return f"{Path(compiler).name} failed on relu_stats.c: {_last_line(done.stderr)}"
    except subprocess.TimeoutExpired:
        return f"{Path(compiler).name} {TIMED_OUT} {BUILD_TIMEOUT_S} s on relu_stats.c"
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _check(library: Path) -> str:
    """Load the library into ONNX Runtime in a subprocess and compare with numpy; '' if right.

    The subprocess runs this file as a script: it needs numpy, onnx and onnxruntime, not
    the deadrelu package (nor torch), so it starts fast and finds everything it imports
    wherever deadrelu itself was imported from."""
    command = [sys.executable, str(Path(__file__).resolve()), str(library)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"its self-check {TIMED_OUT} {CHECK_TIMEOUT_S} s"
    if done.returncode == 0:
        return ""
    if done.returncode < 0:
        return f"its self-check died with signal {-done.returncode}"
    return f"its self-check failed: {_last_line(done.stderr or done.stdout)}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


# --- reference and self-check -------------------------------------------------------------------


def reference_rows(x: np.ndarray, axis: int) -> np.ndarray:
    """The kernel's (9, units) output computed with numpy in float64 (the self-check's truth)."""
    values = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0).reshape(x.shape[axis], -1)
    finite = np.isfinite(values)
    zeroed = np.where(finite, values, 0.0)
    count = finite.sum(axis=1).astype(np.float64)
    mean = zeroed.sum(axis=1) / np.maximum(count, 1)
    m2 = (np.where(finite, values - mean[:, None], 0.0) ** 2).sum(axis=1)
    return np.stack([
        count, (values > 0).sum(axis=1), np.isnan(values).sum(axis=1), np.isinf(values).sum(axis=1),
        np.where(finite, values, np.inf).min(axis=1, initial=np.inf),
        np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf),
        mean, m2, np.where(zeroed > 0, zeroed, 0.0).sum(axis=1),
    ]).astype(np.float64)


def check_cases() -> list[tuple[np.ndarray, int]]:
    """Tensors for the self-check: both loop orders, tails, subnormals, far-off units, each
    all finite and again with NaN/Inf in its first slice (finite blocks and re-read blocks)."""
    rng = np.random.default_rng(7)
    cases = []
    for shape, axis in [((3, 16, 9, 7), 1), ((37, 40), 1), ((140, 90), 1), ((5, 6, 3), 1), ((4, 3, 2100), 1),
                        ((9,), 0), ((2, 3, 4, 5), 3)]:
        offsets = rng.uniform(-3, 3, shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))])
        x = (rng.standard_normal(shape) + offsets).astype(np.float32)
        x.flat[7::13] = np.float32(1e-42)
        cases.append((x, axis))
        x = x.copy()
        first = x[:1].reshape(-1)
        first[::29] = np.nan
        first[3::41] = np.inf
        first[5::43] = -np.inf
        cases.append((x, axis))
    cases.append(((rng.standard_normal((6, 5, 64)) * 0.01 + 1000).astype(np.float32), 1))
    return cases


def self_check(library: Path) -> str:
    """'' when the library matches `reference_rows`, loaded into ONNX Runtime and called
    directly (`plain_rows`); else what differs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    plain = plain_entry(library)
    problem = fold_differs(plain_entry(library, "deadrelu_fold_rows"))
    if problem:
        return f"deadrelu_fold_rows: {problem}"
    for x, axis in check_cases():
        node = helper.make_node(OP_TYPE, ["x"], ["stats"], domain=DOMAIN, axis=axis)
        graph = helper.make_graph([node], "check", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("stats", TensorProto.DOUBLE, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        want = reference_rows(x, axis)
        for entry, got in (("ReluStats", session.run(None, {"x": x})[0]), ("deadrelu_relu_stats", plain_rows(plain, x, axis))):
            problem = rows_differ(got, want)
            if problem:
                return f"{entry}, shape {x.shape} axis {axis}: {problem}"
    return ""


def fold_differs(fold: Any) -> str:
    """What differs between folding the rows of two halves of a tensor and the rows of the
    whole ('' if nothing)."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((37, 40)) * rng.uniform(0.1, 3, 40) + rng.uniform(-5, 5, 40)).astype(np.float32)
    x[3, 5] = np.nan
    x[30, 6] = -np.inf
    acc = np.ascontiguousarray(reference_rows(x[:11], 1))
    batch = np.ascontiguousarray(reference_rows(x[11:], 1))
    fold(acc.ctypes.data, batch.ctypes.data, acc.shape[1])
    return rows_differ(acc, reference_rows(x, 1))


def rows_differ(got: np.ndarray, want: np.ndarray) -> str:
    """What differs between the kernel's rows and `reference_rows` ('' if nothing): counts
    and extremes exactly, moments to float32 rounding."""
    if got.shape != want.shape:
        return f"output {got.shape}, expected {want.shape}"
    exact = np.array_equal(got[:6], want[:6])
    close = all(np.allclose(got[r], want[r], rtol=1e-5, atol=1e-7 * float(np.abs(want[r]).max(initial=1.0)))
                for r in range(6, 9))
    return "" if exact and close else "statistics differ from numpy"


# The plain C entry points (relu_stats.c) and their signatures:
# deadrelu_relu_stats(data, out, outer, units, inner, threads, GOMP_parallel or NULL) and
# deadrelu_fold_rows(acc, batch, units).
PLAIN_ENTRIES = {
    "deadrelu_relu_stats": (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_uint, ctypes.c_void_p),
    "deadrelu_fold_rows": (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
}


def plain_entry(library: Path, name: str = "deadrelu_relu_stats") -> Any:
    """One of the library's plain C entry points, typed for ctypes (the library stays loaded)."""
    function = getattr(ctypes.CDLL(str(library)), name)
    function.argtypes = PLAIN_ENTRIES[name]
    function.restype = None
    return function


def plain_rows(function: Any, x: np.ndarray, axis: int, threads: int = 1, parallel: int | None = None) -> np.ndarray:
    """The (9, units) rows of a float32 array from the plain entry point."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    axis = axis % x.ndim if x.ndim else 0
    shape = x.shape or (1,)
    out = np.empty((STAT_ROWS, shape[axis]), dtype=np.float64)
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    function(x.ctypes.data, out.ctypes.data, outer, shape[axis], inner, threads, parallel)
    return out


def main(argv: list[str]) -> int:
    problem = self_check(Path(argv[0]))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
