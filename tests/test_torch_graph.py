"""deadrelu/probe/torch_graph.py (`--compile`): the whole model and its sites' statistics as one compiled program.

The compiled program computes the model with fused kernels (e.g. batch norm folded into
the kernel that feeds the ReLU), so a pre-activation can differ from eager in its last
float32 bits: a value within rounding of 0 may count as positive on one path and not on
the other. Dead sets must agree exactly; counts and moments to float tolerance.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bruteforce
from deadrelu import ScanOptions, scan
from deadrelu.probe.torch_kernel import torch_kernel
from reference import unit_stats

FIX = Path(__file__).resolve().parent.parent / "fixtures"
# Inductor builds CPU kernels with the machine's C++ compiler; without one torch.compile
# fails and the scan (rightly) falls back to eager, which these tests would read as a bug.
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="no C++ compiler for torch.compile's CPU kernels")
FORMATS = {
    "pt2": lambda name: (f"{name}.pt2", {}),
    "pickle": lambda name: (f"{name}.pickle.pt", {"trust_pickle": True}),
}


@functools.cache
def truth(name: str) -> tuple[dict, ...]:
    return tuple(bruteforce.bruteforce(name))


def assert_close_to_truth(report, want, positive_slack: float = 1e-3) -> None:
    assert [s.name for s in report.sites] == [w["name"] for w in want]
    for site, ref in zip(report.sites, want):
        unit, s = ref["per_unit"], site.stats
        assert list(site.verdict.dead) == ref["dead_units"], site.name
        np.testing.assert_array_equal(s.count, unit["count"], err_msg=site.name)
        slack = 2 + positive_slack * np.asarray(unit["count"])
        assert np.all(np.abs(s.positive - np.asarray(unit["positive"])) <= slack), site.name
        np.testing.assert_allclose(s.minimum, unit["min"], rtol=1e-4, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(s.maximum, unit["max"], rtol=1e-4, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(s.mean, unit["mean"], rtol=1e-4, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(s.std, unit["std"], rtol=1e-4, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(s.relu_mean, unit["relu_mean"], rtol=1e-4, atol=1e-4, err_msg=site.name)


@needs_compiler
@pytest.mark.parametrize("name, fmt", [("convnet", "pt2"), ("convnet", "pickle"), ("seqnet", "pt2"), ("mlp", "pickle")])
def test_compiled_graph_matches_brute_force(name: str, fmt: str) -> None:
    filename, extra = FORMATS[fmt](name)
    said: list[str] = []
    # batch 13 leaves a shorter last batch: it runs on the eager path, the rest compiled
    report = scan(FIX / filename, FIX / f"{name}.calib.npy",
                  ScanOptions(device="cpu", compile="on", batch_size=13, **extra), notify=said.append)
    assert report.engine == "torch-compiled-graph", said
    assert_close_to_truth(report, truth(name))
    doc = report.to_dict()
    assert doc["engine"] == "torch-compiled-graph"


@needs_compiler
def test_torchscript_compiles_per_site_reductions() -> None:
    report = scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy", ScanOptions(device="cpu", compile="on"))
    assert report.engine == "torch-compiled-reductions"
    off = scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy", ScanOptions(device="cpu", compile="off"))
    assert off.engine == "torch-eager"


class Overflowing(nn.Module):
    """Finite inputs, but x * 1e18 overflows to +-Inf where |x| > ~3.4e20."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.relu(x * 1e18) * 1e-18))


@needs_compiler
def test_non_finite_batch_leaves_the_compiled_program_for_the_exact_path() -> None:
    torch.manual_seed(0)
    data = torch.randn(40, 4)
    data[25, 1] = 1e21  # +Inf at the first site, in the third batch of 10
    data[33, 2] = -1e21  # -Inf, in the fourth
    model = Overflowing().eval()
    report = scan(model, data, ScanOptions(device="cpu", compile="on", batch_size=10))
    assert report.engine == "torch-compiled-graph"
    ref = unit_stats((data * 1e18).numpy(), 1)
    s = report.sites[0].stats
    np.testing.assert_array_equal(s.inf, [0, 1, 1, 0])
    np.testing.assert_array_equal(s.count, ref["count"])
    np.testing.assert_array_equal(s.positive, ref["positive"])
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=1e-5)
    np.testing.assert_allclose(s.maximum, ref["max"], rtol=1e-6)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow: torch.export cannot capture it
            return torch.relu(h)
        return torch.relu(-h)


def test_uncapturable_model_stays_eager_and_says_so() -> None:
    torch.manual_seed(0)
    data = torch.randn(64, 4)
    model = Branchy().eval()
    said: list[str] = []
    compiled = scan(model, data, ScanOptions(device="cpu", compile="on", batch_size=16), notify=said.append)
    eager = scan(model, data, ScanOptions(device="cpu", compile="off", batch_size=16))
    assert compiled.engine == eager_engine()
    assert any("not possible" in m for m in said), said
    for a, b in zip(compiled.sites, eager.sites):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_allclose(a.stats.mean, b.stats.mean)


def test_compiler_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(program, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    said: list[str] = []
    report = scan(FIX / "convnet.pt2", FIX / "convnet.calib.npy", ScanOptions(device="cpu", compile="on"),
                  notify=said.append)
    assert report.engine == eager_engine()
    assert any("torch.compile failed (inductor exploded)" in m for m in said), said
    want = truth("convnet")
    for site, ref in zip(report.sites, want):  # the eager path is exact
        np.testing.assert_array_equal(site.stats.positive, ref["per_unit"]["positive"])
        np.testing.assert_allclose(site.stats.mean, ref["per_unit"]["mean"], rtol=1e-5, atol=1e-5)


@needs_compiler
def test_auto_compiles_only_when_the_eager_rest_would_be_long(monkeypatch: pytest.MonkeyPatch) -> None:
    from deadrelu.probe import torch_stream

    options = ScanOptions(device="cpu", compile="auto", batch_size=16)
    data = FIX / "mlp.calib.npy"
    assert scan(FIX / "mlp.pickle.pt", data, replace_opts(options, trust_pickle=True)).engine == eager_engine()
    monkeypatch.setattr(torch_stream, "COMPILE_REPAYS_AFTER_S", 0.0)  # any eager time is too long
    assert scan(FIX / "mlp.pickle.pt", data, replace_opts(options, trust_pickle=True)).engine == "torch-compiled-graph"
    # data of unknown length: auto cannot tell, and stays eager
    batches = (torch.from_numpy(b) for b in np.array_split(np.load(data), 4))
    assert scan(bruteforce.load_eager_model("mlp"), batches, options).engine == eager_engine()


def eager_engine() -> str:
    """The eager probe's engine here: its CPU reductions run in deadrelu's C kernel where
    one can be built (`--compile off` keeps them in PyTorch's operators)."""
    return "torch-kernel" if torch_kernel() is not None else "torch-eager"


def replace_opts(options: ScanOptions, **changes) -> ScanOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)


@needs_compiler
def test_in_memory_model_untouched_by_the_compiled_path() -> None:
    from test_api import assert_same, snapshot

    model = bruteforce.load_eager_model("convnet").train()
    before = snapshot(model)
    report = scan(model, FIX / "convnet.calib.npy", ScanOptions(device="cpu", compile="on"))
    assert report.engine == "torch-compiled-graph"
    assert_same(before, snapshot(model))
    assert not [name for name, _ in model.named_buffers() if "deadrelu" in name]


@pytest.mark.parametrize("shape, axis", [((6, 5, 4, 3), 1), ((6, 5, 7), 1), ((6, 5), 1), ((4, 7, 5), 2)])
def test_masked_rows_match_brute_force(shape: tuple[int, ...], axis: int) -> None:
    """The accelerator reductions (one-stage and two-stage), NaN/Inf included, on CPU."""
    from deadrelu.probe import torch_graph
    from deadrelu.reductions import reduce_dims

    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    x.view(-1)[::7] = float("nan")
    x.view(-1)[3::11] = float("inf")
    x.view(-1)[5::13] = -float("inf")
    dims = list(reduce_dims(x.ndim, axis))
    shift_shape = [1] * x.ndim
    shift_shape[axis] = shape[axis]
    shift = torch.randn(shift_shape)
    ref = unit_stats(x.numpy(), axis)
    for reduce in (torch_graph.site_reductions, torch_graph.site_reductions_two_stage):
        rows = reduce(x, shift, dims).double()
        centred_sum, squares, minimum, maximum, positive, relu_sum, nan, inf = rows
        count = torch.from_numpy(ref["count"]).double()
        flat_shift = shift.reshape(-1).double()
        np.testing.assert_array_equal(nan.numpy(), ref["nan"])
        np.testing.assert_array_equal(inf.numpy(), ref["inf"])
        np.testing.assert_array_equal(positive.numpy(), np.moveaxis(x.numpy() > 0, axis, 0).reshape(shape[axis], -1).sum(1))
        np.testing.assert_allclose(minimum.numpy(), ref["min"], rtol=1e-6)
        np.testing.assert_allclose(maximum.numpy(), ref["max"], rtol=1e-6)
        np.testing.assert_allclose((flat_shift + centred_sum / count).numpy(), ref["mean"], rtol=1e-5, atol=1e-6)
        var = (squares - centred_sum ** 2 / count) / count
        np.testing.assert_allclose(var.sqrt().numpy(), ref["std"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose((relu_sum / count).numpy(), ref["relu_mean"], rtol=1e-5, atol=1e-6)


def test_fold_batch_equals_unit_stats_over_batches() -> None:
    """The program's in-graph Chan merge against `UnitStats` folding the same batches."""
    from deadrelu.probe import torch_graph
    from deadrelu.stats import UnitStats

    torch.manual_seed(1)
    batches = [torch.randn(5, 3, 4) * 2 - 40 for _ in range(4)]
    batches[2][1, 2, 3] = float("nan")
    shift = batches[0].mean(dim=(0, 2), keepdim=True)
    acc = torch_graph.empty_accumulators(3, torch.device("cpu"))
    per_unit = torch.full((3,), 20.0, dtype=torch.float64)
    reference = UnitStats(3)
    for x in batches:
        rows = torch_graph.site_reductions(x, shift, [0, 2])
        acc, bad = torch_graph.fold_batch(acc, rows, shift.reshape(-1).double(), per_unit)
        assert not bool(bad)
        reference.update(x, 1)
    for row, name in enumerate(torch_graph.ACC_ROWS):
        np.testing.assert_allclose(acc[row].numpy(), getattr(reference, name).double().numpy(), rtol=1e-6, err_msg=name)


def test_counts_stay_exact_past_float32_integers() -> None:
    """2**24 + 1 positives in one batch of one unit: a float32 sum would say 2**24."""
    from deadrelu.probe import torch_graph

    n = (1 << 24) + 1
    x = torch.ones(n + 1, 1)
    x[0, 0] = float("nan")  # the masked rows count it apart: n positives, 1 NaN
    shift = torch.zeros(1, 1)
    masked = torch_graph.site_reductions(x, shift, [0])
    assert masked[4, 0].item() == n and masked[6, 0].item() == 1
    unmasked = torch_graph.site_reductions_unmasked(x[1:], shift, [0])
    assert unmasked[4, 0].item() == n and unmasked.dtype == torch.float64


class Masked(nn.Module):
    """Two inputs, the second by keyword: relu(fc(x) * mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x) * mask)


@needs_compiler
def test_keyword_inputs_are_captured() -> None:
    torch.manual_seed(0)
    model = Masked().eval()
    batches = [{"mask": (torch.rand(8, 3) > 0.3).float(), "x": torch.randn(8, 4)} for _ in range(5)]
    compiled = scan(model, batches, ScanOptions(device="cpu", compile="on"))
    assert compiled.engine == "torch-compiled-graph"
    eager = scan(model, batches, ScanOptions(device="cpu", compile="off"))
    for a, b in zip(compiled.sites, eager.sites):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.stats.maximum, b.stats.maximum, rtol=1e-6)
    x = torch.cat([b["x"] for b in batches])
    mask = torch.cat([b["mask"] for b in batches])
    with torch.no_grad():
        ref = unit_stats((model.fc(x) * mask).numpy(), 1)
    np.testing.assert_array_equal(compiled.sites[0].stats.positive, ref["positive"])
