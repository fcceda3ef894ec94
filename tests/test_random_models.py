"""Randomly drawn small architectures (MLPs, 1-d and 2-d convnets with BatchNorm and a
dense head, sequence models; ReLU, ReLU6, LeakyReLU, PReLU; planted dead units) scanned
in four flavours (in-memory module, traced TorchScript, torch.export, ONNX) against a
brute force: every ReLU module's input recorded by a forward pre-hook and reduced with
numpy (tests/reference.py). The seeds are fixed, so a failure reproduces.

Batches differ between the brute force and the scans (so do the kernels: ORT's, say), so
values agree to float32 rounding: a unit's extremes and moments within 2e-5 of its scale,
and a positive count or a dead verdict may differ only by values that close to zero.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deadrelu import ScanOptions, scan
from reference import unit_stats

FLAVOURS = ("module", "torchscript", "export", "onnx")
SEEDS = range(14)


class Activation(nn.Module):
    """A ReLU-family call whose input the brute force records."""

    def __init__(self, kind: str, units: int) -> None:
        super().__init__()
        self.kind = kind
        self.prelu = nn.PReLU(units) if kind == "prelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prelu is not None:
            return self.prelu(x)
        return {"relu": F.relu, "relu6": F.relu6, "leaky": lambda t: F.leaky_relu(t, 0.1)}[self.kind](x)


def _kinds(rng: random.Random, prelu: bool = True) -> str:
    return rng.choice(["relu", "relu6", "leaky"] + (["prelu"] if prelu else []))


def draw_model(seed: int) -> tuple[nn.Module, tuple[int, ...], int]:
    """A model, its per-sample input shape and the axis of its units (1, or -1 for sequences)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    family = ("mlp", "conv1d", "conv2d", "sequence")[seed % 4]
    layers: list[nn.Module] = []
    if family == "mlp":
        shape: tuple[int, ...] = (rng.choice([5, 16]),)
        width = shape[0]
        for _ in range(rng.randint(1, 4)):
            out = rng.choice([3, 8, 17])
            layers += [nn.Linear(width, out), *([nn.BatchNorm1d(out)] if rng.random() < 0.3 else []),
                       Activation(_kinds(rng), out)]
            width = out
    elif family == "sequence":
        shape, width = (rng.choice([3, 6]), 5), 5
        for _ in range(rng.randint(1, 3)):
            out = rng.choice([4, 9])
            layers += [nn.Linear(width, out), Activation(_kinds(rng, prelu=False), out)]
            width = out
    else:
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if family == "conv1d" else (nn.Conv2d, nn.BatchNorm2d)
        width = rng.choice([1, 3])
        shape = (width,) + (16,) * (1 if family == "conv1d" else 2)
        for _ in range(rng.randint(1, 3)):
            out = rng.choice([2, 5, 8])
            layers += [conv(width, out, 3, padding=1, stride=rng.choice([1, 2])),
                       *([norm(out)] if rng.random() < 0.4 else []), Activation(_kinds(rng), out)]
            width = out
        if rng.random() < 0.5:
            with torch.no_grad():
                flat = nn.Sequential(*layers)(torch.zeros(2, *shape)).flatten(1).shape[1]
            layers += [nn.Flatten(), nn.Linear(flat, 6), Activation("relu", 6)]
    model = nn.Sequential(*layers).eval()
    _perturb(model, rng)
    return model, shape, -1 if family == "sequence" else 1


def _perturb(model: nn.Module, rng: random.Random) -> None:
    """Spread the biases and normalisation statistics; plant dead units (bias -1000)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.bias.add_(torch.randn_like(m.bias) * 1.5)
                if rng.random() < 0.5:
                    m.bias[rng.randrange(m.bias.shape[0])] = -1e3
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                if rng.random() < 0.5:
                    m.bias[0] = -1e3


def brute_force(model: nn.Module, x: torch.Tensor, axis: int) -> list[dict[str, np.ndarray]]:
    calls = [m for m in model.modules() if isinstance(m, Activation)]
    seen: dict[int, list[np.ndarray]] = {i: [] for i in range(len(calls))}
    hooks = [m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].numpy().copy()))
             for i, m in enumerate(calls)]
    try:
        with torch.no_grad():
            for batch in x.split(7):
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    refs = []
    for i in range(len(calls)):
        preact = np.concatenate(seen[i])
        unit_axis = axis % preact.ndim
        ref = unit_stats(preact, unit_axis)
        ref["scale"] = np.abs(ref["min"]) + np.abs(ref["max"]) + 1e-3
        near_zero = np.abs(np.moveaxis(preact, unit_axis, 0).reshape(preact.shape[unit_axis], -1)) <= 2e-5 * ref["scale"][:, None]
        ref["near_zero"] = near_zero.sum(1)
        ref["axis"] = unit_axis
        refs.append(ref)
    return refs


def scanned(flavour: str, model: nn.Module, x: torch.Tensor, tmp_path: Path):
    np.save(tmp_path / "x.npy", x.numpy())
    data = str(tmp_path / "x.npy")
    if flavour == "module":
        return scan(model, x, ScanOptions(device="cpu", batch_size=16))
    if flavour == "torchscript":
        torch.jit.trace(model, x[:2]).save(str(tmp_path / "m.ts.pt"))
        return scan(tmp_path / "m.ts.pt", data, ScanOptions(device="cpu", batch_size=5))
    if flavour == "export":
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},)), str(tmp_path / "m.pt2"))
        return scan(tmp_path / "m.pt2", data, ScanOptions(device="cpu", batch_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:4],), str(tmp_path / "m.onnx"), input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return scan(tmp_path / "m.onnx", data, ScanOptions(device="cpu", batch_size=6))


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_architectures_match_the_brute_force(seed: int, flavour: str, tmp_path: Path) -> None:
    model, shape, axis = draw_model(seed)
    x = torch.randn(random.Random(seed).choice([9, 20, 33]), *shape)
    refs = brute_force(model, x, axis)
    report = scanned(flavour, model, x, tmp_path)
    assert len(report.sites) == len(refs), [s.name for s in report.sites]
    for site, ref in zip(report.sites, refs):
        s, tol = site.stats, 2e-5 * ref["scale"]
        assert (site.units, site.unit_axis) == (len(ref["count"]), ref["axis"]), site.name
        np.testing.assert_array_equal(s.count, ref["count"], err_msg=site.name)
        assert (np.abs(s.positive - ref["positive"]) <= ref["near_zero"]).all(), site.name
        dead = np.zeros(site.units, bool)
        dead[list(site.verdict.dead)] = True
        ambiguous = np.abs(ref["max"]) <= tol
        np.testing.assert_array_equal(dead[~ambiguous], (ref["max"] <= 0)[~ambiguous], err_msg=site.name)
        for key, got in (("min", s.minimum), ("max", s.maximum), ("mean", s.mean), ("std", s.std)):
            assert (np.abs(np.asarray(got, np.float64) - ref[key]) <= tol).all(), (site.name, key)


@pytest.mark.parametrize("change", ["leaky", "bn"])
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fixes_that_keep_the_function_keep_the_outputs(seed: int, fmt: str, change: str, tmp_path: Path) -> None:
    """A LeakyReLU swap of slope 0 and an identity BatchNorm compute what the model did:
    the written model's outputs equal the original's, and the swapped sites' dead counts
    do not move (checked on the random architectures, every planned site changed)."""
    from deadrelu.fix import FixOptions, PlanOptions, RewriteOptions, run_fix

    model, shape, _ = draw_model(seed)
    x = torch.randn(random.Random(seed).choice([9, 20, 33]), *shape)
    np.save(tmp_path / "x.npy", x.numpy())
    if fmt == "pt2":
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(model, (x[:4],), dynamic_shapes=({0: batch},)), str(tmp_path / "m.pt2"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:4],), str(tmp_path / "m.onnx"), input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    rewrite = RewriteOptions(slope=0.0) if change == "leaky" else RewriteOptions(bn_init="identity")
    options = FixOptions(PlanOptions(to=change), rewrite, True, tmp_path / f"fixed.{fmt}")
    result = run_fix(tmp_path / f"m.{fmt}", str(tmp_path / "x.npy"), options, ScanOptions(device="cpu", batch_size=8))
    assert result.plan and result.applied, result.nothing_planned
    scale = float(np.abs(model(x).detach().numpy()).max()) + 1.0
    assert result.deviation.max_abs <= 1e-5 * scale, result.deviation
    assert [c.dead_after for c in result.changes] == [c.dead_before for c in result.changes]
