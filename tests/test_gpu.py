"""The CUDA paths. CI has no GPU: these skip there, and run wherever torch sees one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deadrelu import ScanOptions, scan

FIX = Path(__file__).resolve().parent.parent / "fixtures"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("compile", ["off", "on"])
@pytest.mark.parametrize("model", ["convnet.pt2", "convnet.ts.pt", "seqnet.pt2", "mlp.ts.pt"])
def test_cuda_scan_equals_cpu_scan(model: str, compile: str) -> None:
    name = model.split(".")[0]
    cpu = scan(FIX / model, FIX / f"{name}.calib.npy", ScanOptions(device="cpu"))
    gpu = scan(FIX / model, FIX / f"{name}.calib.npy", ScanOptions(device="cuda", compile=compile))
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.sites, gpu.sites):
        assert a.name == b.name and a.verdict.dead == b.verdict.dead
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=1e-3, atol=1e-5)


def test_cuda_half_precision_accumulates_in_float64() -> None:
    report = scan(FIX / "convnet.pt2", FIX / "convnet.calib.npy", ScanOptions(device="cuda", dtype="float16"))
    assert report.sites[0].stats.mean.dtype == np.float64
    assert report.dead >= 13


def test_cuda_nonfinite_preactivations_without_host_sync() -> None:
    class Blowup(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * torch.tensor([1.0, float("inf")], device=x.device))

    report = scan(Blowup(), torch.randn(32, 2), ScanOptions(device="cuda"))
    stats = report.sites[0].stats
    assert stats.inf[1] + stats.nan[1] == 32 and np.isfinite(stats.mean[0])
