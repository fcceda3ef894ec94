"""deadrelu's one-pass kernel (`kernel`) on PyTorch CPU tensors, for the eager probe.

PyTorch's operators read a pre-activation once per statistic (sum, min, max, x*x, x>0,
the finite check), six to eight passes; the C kernel reads it once and returns all nine
`MASKED_ROWS` with NaN/Inf counted apart. Measured on 2 cores: (8, 64, 112, 112) in 0.8 ms
against 9 ms; a ResNet-50 forward with every site reduced 1.01x of plain inference against
1.17x, a 6x1024 MLP 1.06x against 1.19x.

Threads: the kernel's work items run on PyTorch's own OpenMP team, through the
``GOMP_parallel`` of the OpenMP runtime that libtorch already loaded (libgomp, or LLVM's and
Intel's, which provide the same entry point). Threads of the kernel's own ran 1.14-1.30x:
after each parallel region PyTorch's OpenMP threads spin for a while, and on a machine
with as many threads as cores the two sets compete. Where no such runtime is found
(PyTorch built with another parallel backend, a system without ``/proc/self/maps``) the
kernel runs on the calling thread alone.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deadrelu.probe.kernel import STAT_ROWS, kernel_library, plain_entry

# file names of the OpenMP runtimes that provide GOMP_parallel
_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@dataclass(frozen=True)
class TorchKernel:
    """The kernel's plain entry point and the OpenMP runtime it runs its work items on."""

    reduce: Any  # `kernel.plain_entry`: deadrelu_relu_stats
    fold_rows: Any  # deadrelu_fold_rows
    parallel: int | None  # address of GOMP_parallel; None: the calling thread alone

    def rows(self, x: torch.Tensor, axis: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The (9, units) float64 `MASKED_ROWS` of a float32 CPU tensor along ``axis``, into
        `out` where given (a contiguous float64 tensor of that shape, reused across batches:
        writing a fresh one cost ~50 us more on a 1024-unit site just written by a matmul).

        A tensor whose memory is dense in some order of its dims (contiguous, channels-last,
        a transpose) is read where it lies; any other is copied to contiguous first.
        """
        view, axis = dense_view(x, axis)
        units = view.shape[axis]
        outer, inner = math.prod(view.shape[:axis]), math.prod(view.shape[axis + 1:])
        if out is None:
            out = torch.empty((STAT_ROWS, units), dtype=torch.float64)
        assert out.dtype == torch.float64 and out.is_contiguous() and out.shape == (STAT_ROWS, units)
        threads = torch.get_num_threads() if self.parallel is not None else 1
        self.reduce(view.data_ptr(), out.data_ptr(), outer, units, inner, threads, self.parallel)
        return out

    def fold(self, acc: torch.Tensor, rows: torch.Tensor) -> None:
        """acc += rows, both contiguous (9, units) float64 CPU tensors of `rows`: counts and
        sums add, extremes combine, mean and M2 by Chan's formula (`reductions.chan_merge`),
        in place and in one call."""
        assert acc.is_contiguous() and rows.is_contiguous() and acc.shape == rows.shape == (STAT_ROWS, acc.shape[1])
        self.fold_rows(acc.data_ptr(), rows.data_ptr(), acc.shape[1])


def dense_view(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """x with its dims in memory order, and where `axis` went; a contiguous copy if no order
    of its dims is dense."""
    if x.is_contiguous():
        return x, axis
    order = sorted(range(x.ndim), key=lambda d: (-x.stride(d), d))
    permuted = x.permute(order)
    if permuted.is_contiguous():
        return permuted, order.index(axis)
    return x.contiguous(), axis


def torch_kernel(notify: Callable[[str], None] | None = None) -> TorchKernel | None:
    """The kernel for PyTorch CPU tensors, built and checked on first use (`kernel_library`);
    None, said once through `notify`, where it is not available."""
    library = kernel_library(notify)
    reason = library.reason
    if library.path is not None:
        try:
            return _loaded(library.path)
        except (OSError, AttributeError) as exc:
            reason = f"cannot load {library.path.name}: {exc}"
    if notify:
        notify(f"the one-pass statistics kernel is not available ({reason}); "
               "the PyTorch CPU scan reduces with PyTorch's operators")
    return None


@functools.cache
def _loaded(library: Path) -> TorchKernel:
    return TorchKernel(plain_entry(library), plain_entry(library, "deadrelu_fold_rows"), openmp_parallel())


def openmp_parallel() -> int | None:
    """The address of GOMP_parallel in the OpenMP runtime PyTorch runs its threads on, or
    None when PyTorch does not use OpenMP or its runtime cannot be told apart."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtime = _loaded_openmp_runtime()
    if runtime is None:
        return None
    try:
        # RTLD_NOLOAD: the copy already in the process, never a second one
        handle = ctypes.CDLL(str(runtime), mode=os.RTLD_NOW | getattr(os, "RTLD_NOLOAD", 0))
        return ctypes.cast(handle.GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _loaded_openmp_runtime() -> Path | None:
    """The OpenMP runtime mapped into this process: the one PyTorch ships (in its folder, or
    beside it in ``torch.libs``) if several are."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    mapped = {Path(line.split(maxsplit=5)[5]) for line in maps.splitlines() if len(line.split(maxsplit=5)) == 6}
    runtimes = sorted(p for p in mapped if p.name.startswith(_OPENMP_RUNTIMES) and ".so" in p.name)
    if len(runtimes) > 1:
        torch_folder = Path(torch.__file__).resolve().parent
        shipped = (torch_folder, torch_folder.parent / "torch.libs")
        runtimes = [p for p in runtimes if any(folder in p.resolve().parents for folder in shipped)]
    return runtimes[0] if len(runtimes) == 1 else None
