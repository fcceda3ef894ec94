"""The Python API: same pipeline as the CLI, and the caller's model is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fixture_models
from deadrelu import ScanOptions, ScanReport, scan
from deadrelu.errors import ModelRunError
from typer.testing import CliRunner

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def convnet() -> nn.Module:
    model = fixture_models.ConvNet()
    model.load_state_dict(torch.load(FIX / "convnet.state_dict.pt", weights_only=True))
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dtype": [p.dtype for p in model.parameters()],
        "device": [p.device for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("training", "hooks", "requires_grad", "dtype", "device"):
        assert before[key] == after[key], key
    for name, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][name]), name


def test_model_left_untouched_after_success() -> None:
    model = convnet().train()
    model.layer2.train(False)  # a mixed state must come back exactly
    model.stem.conv.weight.requires_grad_(False)
    before = snapshot(model)
    data = torch.from_numpy(np.load(FIX / "convnet.calib.npy"))
    report = scan(model, data, ScanOptions(device="cpu", batch_size=16, dtype="bfloat16"))
    assert isinstance(report, ScanReport)
    assert report.dead == 14  # the planted dead units stay dead in bfloat16
    assert_same(before, snapshot(model))


def test_model_left_untouched_after_an_exception() -> None:
    model = convnet().train()
    before = snapshot(model)
    with pytest.raises(ModelRunError):
        scan(model, [torch.randn(2, 5, 16, 16)], ScanOptions(device="cpu"))
    assert_same(before, snapshot(model))


def test_api_report_equals_cli_json(tmp_path: Path) -> None:
    from deadrelu.cli import app

    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["scan", str(FIX / "seqnet.pt2"), "--data", str(FIX / "seqnet.calib.npy"),
                                      "--json", str(out)])
    assert result.exit_code == 0
    api = scan(FIX / "seqnet.pt2", FIX / "seqnet.calib.npy").to_dict()
    cli = json.loads(out.read_text())
    assert api == cli


def test_any_iterable_of_batches() -> None:
    data = torch.from_numpy(np.load(FIX / "convnet.calib.npy"))
    as_tensor = scan(convnet(), data, ScanOptions(device="cpu", batch_size=16))
    as_list = scan(convnet(), list(data.split(16)), ScanOptions(device="cpu"))
    as_pairs = scan(convnet(), ((x, torch.zeros(len(x))) for x in data.split(10)), ScanOptions(device="cpu"))
    as_loader = scan(convnet(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8),
                     ScanOptions(device="cpu"))
    for other in (as_list, as_pairs, as_loader):
        assert [s.verdict.dead for s in other.sites] == [s.verdict.dead for s in as_tensor.sites]
        assert other.data.samples == 64


def test_a_float64_model_sums_its_relu_outputs_in_float64() -> None:
    """A float64 model's values may not fit float32 (3e41) or need its precision (1e12 + x)."""

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2).double()
            with torch.no_grad():
                self.fc.bias.copy_(torch.tensor([1e12, 3e41], dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    model = Wide().eval()
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    report = scan(model, [x[:25], x[25:]], ScanOptions(device="cpu"))
    want = torch.relu(model.fc(x)).detach().numpy().mean(axis=0)
    np.testing.assert_allclose(report.sites[0].stats.relu_mean, want, rtol=1e-12)
