"""ReLUs on rank-0/1 pre-activations (one value per sample, e.g. ``fc(x).squeeze(-1)``) are
one unit on every path: eager, compiled, ONNX; fix rewrites them; batch size does not matter."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deadrelu import ScanOptions, scan
from deadrelu.fix import FixOptions, PlanOptions, RewriteOptions, run_fix
from reference import assert_site_stats, unit_stats

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on CPU needs a C++ compiler")


class ScalarHeads(nn.Module):
    """Two scalar heads: `alive` fires on about half the samples, `dead` never (bias -100)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.alive = nn.Linear(8, 1)
        self.dead = nn.Linear(8, 1)
        with torch.no_grad():
            self.dead.bias.fill_(-100.0)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.body(x))
        return torch.stack([torch.relu(self.alive(h).squeeze(-1)), torch.relu(self.dead(h).squeeze(-1))], dim=1)

    def preacts(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        h = self.act(self.body(x))
        return {"alive": self.alive(h).squeeze(-1).detach().numpy(), "dead": self.dead(h).squeeze(-1).detach().numpy()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scalar")
    model = ScalarHeads().eval()
    data = np.random.default_rng(1).standard_normal((70, 6)).astype(np.float32)
    np.save(folder / "x.npy", data)
    example = (torch.from_numpy(data[:8]),)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("n")},)),
                      str(folder / "m.pt2"))
    torch.jit.save(torch.jit.trace(model, example), str(folder / "m.ts.pt"))
    torch.onnx.export(model, example, str(folder / "m.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    return {"pt2": folder / "m.pt2", "ts": folder / "m.ts.pt", "onnx": folder / "m.onnx", "data": folder / "x.npy"}


def truth(saved: dict[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    preacts = ScalarHeads().eval().preacts(torch.from_numpy(np.load(saved["data"])))
    return {name: unit_stats(values.reshape(-1, 1), 1) for name, values in preacts.items()}


def check_scalar_sites(report, expected: dict[str, dict[str, np.ndarray]]) -> None:
    scalar = [s for s in report.sites if s.axis_source == "scalar"]
    assert len(scalar) == 2, [(s.name, s.units, s.axis_source) for s in report.sites]
    for site, name in zip(scalar, ("alive", "dead")):
        ref = expected[name]
        assert site.units == 1 and site.unit_axis == 1
        np.testing.assert_array_equal(site.stats.count, ref["count"], err_msg=name)
        np.testing.assert_array_equal(site.stats.positive, ref["positive"], err_msg=name)
        np.testing.assert_allclose(site.stats.mean, ref["mean"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(site.stats.std, ref["std"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(site.stats.maximum, ref["max"], rtol=1e-6)
    alive, dead = scalar
    assert 0 < alive.stats.positive[0] < 70 and alive.dead == 0
    assert dead.dead == 1 and dead.verdict.collapsed


@pytest.mark.parametrize("fmt", ["pt2", "ts", "onnx"])
@pytest.mark.parametrize("batch_size", [32, 35])  # 70 samples: 35 divides them, 32 leaves a last batch of 6
def test_a_vector_pre_activation_is_one_unit(saved: dict[str, Path], fmt: str, batch_size: int) -> None:
    report = scan(saved[fmt], saved["data"], ScanOptions(device="cpu", batch_size=batch_size))
    check_scalar_sites(report, truth(saved))
    assert report.to_dict()["sites"][1]["axis_source"] == "scalar"


@needs_compiler
def test_the_compiled_graph_takes_the_same_one_unit(saved: dict[str, Path]) -> None:
    said: list[str] = []
    report = scan(saved["pt2"], saved["data"], ScanOptions(device="cpu", batch_size=35, compile="on"),
                  notify=said.append)
    assert report.engine == "torch-compiled-graph", said
    check_scalar_sites(report, truth(saved))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("to", ["prelu", "bn"])
def test_fix_rewrites_a_scalar_site(saved: dict[str, Path], fmt: str, to: str, tmp_path: Path) -> None:
    out = tmp_path / f"fixed.{'onnx' if fmt == 'onnx' else 'pt2'}"
    options = FixOptions(PlanOptions(to=to), RewriteOptions(slope=0.0, bn_init="identity"), True, out)
    result = run_fix(saved[fmt], str(saved["data"]), options, ScanOptions(device="cpu", batch_size=32))
    assert [f.units for f in result.plan] == [1], result.plan
    assert result.deviation.relative <= 1e-5, result.deviation
    rescanned = scan(out, saved["data"], ScanOptions(device="cpu", batch_size=32))
    assert [s.units for s in rescanned.sites][-2:] == [1, 1]  # (a rewritten site may see the (values, 1) view)
    assert rescanned.sites[-1].op == ("prelu" if to == "prelu" else "relu")
    assert rescanned.sites[-1].dead == 1  # slope 0 and the identity BatchNorm keep the outputs, so the unit



class Squeezing(nn.Module):
    """`.squeeze()` with no dims, a common idiom, also takes the batch axis of a one-sample
    batch: ``lin`` gets ``(6,)`` for ``(1, 6)``, ``conv`` gets ``(4, 5)`` for ``(1, 4, 5)``.
    Unit 2 of ``lin`` and channel 1 of ``conv`` are planted dead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(10, 6)
        self.c = nn.Conv2d(1, 4, (1, 3))
        with torch.no_grad():
            self.l.weight[2] = 0
            self.l.bias[2] = -1.0
            self.c.weight[1] = 0
            self.c.bias[1] = -0.5

    def preacts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.l(x.unsqueeze(1)).squeeze(), self.c(x[:, None, None, :7]).squeeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin, conv = self.preacts(x)
        return torch.relu(lin).sum(-1) + torch.relu(conv).sum((-2, -1))


@pytest.mark.parametrize("fmt", ["eager", "script", "onnx"])
@pytest.mark.parametrize("batch_size", [1, 32])  # 33 samples: -b 32 leaves a last batch of one
def test_a_squeeze_that_takes_a_one_sample_batch_axis_keeps_the_units(tmp_path: Path, fmt: str,
                                                                       batch_size: int) -> None:
    model = Squeezing().eval()
    data = np.random.default_rng(3).standard_normal((33, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    if fmt == "script":
        path = tmp_path / "m.ts.pt"
        torch.jit.save(torch.jit.script(model), str(path))
    elif fmt == "onnx":  # an axis-less Squeeze: batches of at least 2 (a last one of one joins its neighbour)
        path = tmp_path / "m.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notice that squeeze() on a dynamic dim is ambiguous
            torch.onnx.export(model, (torch.from_numpy(data[:4]),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}})
    else:
        path = tmp_path / "m.pt"
        torch.save(model, path)
    report = scan(path, tmp_path / "x.npy", ScanOptions(device="cpu", batch_size=batch_size, trust_pickle=True))
    lin, conv = (p.detach().numpy() for p in model.preacts(torch.from_numpy(data)))
    expected = {"lin": (unit_stats(lin, 1), [2]), "conv": (unit_stats(conv, 1), [1])}
    assert [(s.units, s.unit_axis) for s in report.sites] == [(6, 1), (4, 1)], report.sites
    for site, (ref, dead) in zip(report.sites, expected.values()):
        assert list(site.verdict.dead) == dead, site.name
        assert_site_stats(site, ref, rtol=1e-6, atol=1e-6)
