"""The CUDA paths. CI has no GPU: these skip there, and run wherever torch sees one.

On a GPU the pre-activations themselves differ from the CPU's in their last bits (cuDNN
picks other algorithms, and convolutions use TF32 by default), so a value within rounding
of 0 can be positive on one device and not on the other. Hence two kinds of check:
exact, against a brute force of the pre-activations recorded on the same GPU; and close,
against the CPU scan (dead sets equal, counts and moments to a tolerance).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bruteforce
import fixture_models
from deadrelu import ScanOptions, scan

FIX = Path(__file__).resolve().parent.parent / "fixtures"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
BATCH = 16


@functools.cache
def cuda_truth(name: str) -> tuple[dict, ...]:
    """Brute force (numpy, float64) of the pre-activations the eager model makes on the GPU."""
    model = bruteforce.load_eager_model(name).cuda()
    data = np.load(FIX / f"{name}.calib.npy")
    recorded: dict[str, list[np.ndarray]] = {}
    axes: dict[str, int] = {}
    previous, fixture_models.RECORDER = fixture_models.RECORDER, []
    try:
        with torch.no_grad():
            for start in range(0, len(data), BATCH):
                fixture_models.RECORDER.clear()
                model(torch.from_numpy(data[start:start + BATCH]).cuda())
                for site, axis, preact in fixture_models.RECORDER:
                    recorded.setdefault(site, []).append(preact.cpu().numpy())
                    axes[site] = axis
    finally:
        fixture_models.RECORDER = previous
    out = []
    for site, parts in recorded.items():
        x = np.concatenate(parts).astype(np.float64)
        moved = np.moveaxis(x, axes[site], 0).reshape(x.shape[axes[site]], -1)
        out.append({"name": site, "positive": (moved > 0).sum(1), "count": np.full(len(moved), moved.shape[1]),
                    "min": moved.min(1), "max": moved.max(1), "mean": moved.mean(1), "std": moved.std(1),
                    "dead": list(np.flatnonzero((moved > 0).sum(1) == 0))})
    return tuple(out)


def scan_eager_model(name: str, **options) -> object:
    model = bruteforce.load_eager_model(name)
    return scan(model, FIX / f"{name}.calib.npy", ScanOptions(device="cuda", batch_size=BATCH, **options))


@pytest.mark.parametrize("name", ["convnet", "seqnet", "mlp"])
def test_cuda_eager_scan_is_exact_against_same_device_brute_force(name: str) -> None:
    report = scan_eager_model(name, compile="off")
    assert report.device.startswith("cuda") and report.engine == "torch-eager"
    truth = cuda_truth(name)
    assert [s.name for s in report.sites] == [t["name"] for t in truth]
    for site, ref in zip(report.sites, truth):
        s = site.stats
        assert list(site.verdict.dead) == ref["dead"], site.name
        np.testing.assert_array_equal(s.positive, ref["positive"], err_msg=site.name)
        np.testing.assert_array_equal(s.count, ref["count"], err_msg=site.name)
        np.testing.assert_allclose(s.minimum, ref["min"], rtol=1e-6, err_msg=site.name)
        np.testing.assert_allclose(s.maximum, ref["max"], rtol=1e-6, err_msg=site.name)
        np.testing.assert_allclose(s.mean, ref["mean"], rtol=1e-5, atol=1e-5, err_msg=site.name)
        np.testing.assert_allclose(s.std, ref["std"], rtol=1e-5, atol=1e-5, err_msg=site.name)


def assert_close(report, reference, positive_slack: float = 2e-3, moment_tol: float = 2e-3) -> None:
    """Dead sets equal; counts and moments within what fused kernels / TF32 change."""
    assert [s.name for s in report.sites] == [s.name for s in reference.sites]
    for a, b in zip(report.sites, reference.sites):
        assert list(a.verdict.dead) == list(b.verdict.dead), a.name
        np.testing.assert_array_equal(a.stats.count, b.stats.count, err_msg=a.name)
        slack = 2 + positive_slack * b.stats.count
        assert np.all(np.abs(a.stats.positive - b.stats.positive) <= slack), a.name
        scale = np.maximum(b.stats.std, 1e-3)
        assert np.all(np.abs(a.stats.mean - b.stats.mean) <= moment_tol * scale + 1e-5), a.name
        np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=10 * moment_tol, atol=1e-4, err_msg=a.name)


@pytest.mark.parametrize("name", ["convnet", "seqnet", "mlp"])
def test_cuda_compiled_graph_against_same_device_eager(name: str) -> None:
    eager = scan_eager_model(name, compile="off")
    said: list[str] = []
    model = bruteforce.load_eager_model(name)
    compiled = scan(model, FIX / f"{name}.calib.npy", ScanOptions(device="cuda", batch_size=BATCH, compile="on"),
                    notify=said.append)
    assert compiled.engine == "torch-compiled-graph", said
    assert_close(compiled, eager)


@pytest.mark.parametrize("compile", ["off", "on"])
@pytest.mark.parametrize("model", ["convnet.pt2", "convnet.ts.pt", "seqnet.pt2", "mlp.ts.pt"])
def test_cuda_scan_close_to_cpu_scan(model: str, compile: str) -> None:
    name = model.split(".")[0]
    cpu = scan(FIX / model, FIX / f"{name}.calib.npy", ScanOptions(device="cpu"))
    gpu = scan(FIX / model, FIX / f"{name}.calib.npy", ScanOptions(device="cuda", compile=compile))
    assert gpu.device.startswith("cuda")
    want = {("off", True): "torch-eager", ("off", False): "torch-eager",
            ("on", True): "torch-compiled-reductions", ("on", False): "torch-compiled-graph"}
    assert gpu.engine == want[(compile, model.endswith(".ts.pt"))]
    assert_close(gpu, cpu, moment_tol=1e-2)  # TF32 convolutions upstream


@pytest.mark.parametrize("compile", ["off", "on"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_accumulates_in_float64(dtype: str, compile: str) -> None:
    cpu = scan(FIX / "convnet.pt2", FIX / "convnet.calib.npy", ScanOptions(device="cpu"))
    report = scan(FIX / "convnet.pt2", FIX / "convnet.calib.npy",
                  ScanOptions(device="cuda", dtype=dtype, compile=compile))
    assert report.sites[0].stats.mean.dtype == np.float64
    assert [list(s.verdict.dead) for s in report.sites] == [list(s.verdict.dead) for s in cpu.sites]


@pytest.mark.parametrize("compile", ["off", "on"])
def test_cuda_nonfinite_preactivations_without_host_sync(compile: str) -> None:
    class Blowup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor([1.0, float("inf")]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * self.scale)

    torch.manual_seed(0)
    data = torch.randn(64, 2)
    report = scan(Blowup(), data, ScanOptions(device="cuda", compile=compile, batch_size=16))
    stats = report.sites[0].stats
    x = data[:, 1].numpy()
    assert stats.inf[1] == int((x != 0).sum()) and stats.nan[1] == int((x == 0).sum())
    np.testing.assert_allclose(stats.mean[0], data[:, 0].double().mean().item(), rtol=1e-5, atol=1e-6)
    assert stats.positive[0] == int((data[:, 0] > 0).sum())


@pytest.mark.parametrize("compile", ["off", "on"])
def test_cuda_batches_cause_no_host_sync(compile: str) -> None:
    """After warm-up (first batch, compilation), streaming batches never waits on the GPU."""
    model = bruteforce.load_eager_model("convnet")
    data = torch.from_numpy(np.load(FIX / "convnet.calib.npy")).cuda()  # (a pageable copy would sync)
    caught: list[warnings.WarningMessage] = []

    def batches():
        for index, start in enumerate(range(0, len(data) - BATCH + 1, BATCH)):
            if index == 2:
                torch.cuda.set_sync_debug_mode("warn")
            yield data[start:start + BATCH]
        torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scan(model, batches(), ScanOptions(device="cuda", compile=compile))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert not syncs, syncs[:3]
