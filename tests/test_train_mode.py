"""A graph saved in training mode (a torch.export program or a trace made before
model.eval()) is scanned and fixed as in eval mode, with a warning; statistics against a
brute force of the eval-mode model; the model's own F.dropout(training=True) stays live."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deadrelu import ScanOptions, scan
from deadrelu.fix import FixOptions, PlanOptions, RewriteOptions, run_fix
from deadrelu.load import load_model
from reference import assert_site_stats, unit_stats


class TrainedNet(nn.Module):
    """conv -> BatchNorm -> ReLU `r`, mean, Dropout, linear -> ReLU. In eval mode channel 2
    (a constant conv output of -5, running stats 0/1) and channel 4 (BN bias -100) of `r`
    are dead, and feature 3 of the head; with BatchNorm on batch statistics channel 2 is
    centred to 0 and alive."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.r = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.c.weight[2] = 0
            self.c.bias[2] = -5.0
            self.bn.bias[4] = -100.0
            self.fc.weight[3] = 0
            self.fc.bias[3] = -2.0

    def preacts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.bn(self.c(x))
        return first, self.fc(self.drop(self.r(first).mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.preacts(x)[1])


class MonteCarlo(nn.Module):
    """The model's own code asks for dropout in every mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(F.dropout(x, 0.5, training=True)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("train_mode")
    data = torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    np.save(folder / "x.npy", data.numpy())
    example = (data[:4],)
    batch = {0: torch.export.Dim("n")}
    torch.export.save(torch.export.export(TrainedNet().train(), example, dynamic_shapes=(batch,)),
                      str(folder / "train.pt2"))
    torch.export.save(torch.export.export(TrainedNet().eval(), example, dynamic_shapes=(batch,)),
                      str(folder / "eval.pt2"))
    traced = TrainedNet().train()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(traced, example, check_trace=False)  # (the trace updates BN's running stats)
    scripted.load_state_dict(TrainedNet().state_dict())  # the planted running stats back
    torch.jit.save(scripted, str(folder / "train.ts.pt"))
    x6 = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    np.save(folder / "x6.npy", x6.numpy())
    torch.export.save(torch.export.export(MonteCarlo().eval(), (x6[:4],), dynamic_shapes=(batch,)),
                      str(folder / "mc.pt2"))
    return {"train.pt2": folder / "train.pt2", "eval.pt2": folder / "eval.pt2", "train.ts.pt": folder / "train.ts.pt",
            "mc.pt2": folder / "mc.pt2", "x": folder / "x.npy", "x6": folder / "x6.npy"}


def eval_truth(data: Path) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        preacts = TrainedNet().eval().preacts(torch.from_numpy(np.load(data)))
    return [unit_stats(p.numpy(), 1) for p in preacts]


@pytest.mark.parametrize("name", ["train.pt2", "train.ts.pt"])
def test_a_graph_saved_in_training_mode_is_scanned_as_in_eval_mode(saved: dict[str, Path], name: str) -> None:
    reports = [scan(saved[name], saved["x"], ScanOptions(device="cpu", batch_size=16)) for _ in range(2)]
    truth = eval_truth(saved["x"])
    dead = [list(np.flatnonzero(ref["positive"] == 0)) for ref in truth]
    assert 2 in dead[0] and 4 in dead[0] and 3 in dead[1]  # the planted units
    for report in reports:
        assert [list(s.verdict.dead) for s in report.sites] == dead
        for site, ref in zip(report.sites, truth):
            assert_site_stats(site, ref)
        said = [w for w in report.warnings if "training mode" in w]
        assert len(said) == 1 and name in said[0] and "BatchNorm and Dropout" in said[0], report.warnings
    np.testing.assert_array_equal(reports[0].sites[1].stats.m2, reports[1].sites[1].stats.m2)  # no live dropout


def test_a_graph_saved_in_eval_mode_is_left_as_it_is(saved: dict[str, Path]) -> None:
    report = scan(saved["eval.pt2"], saved["x"], ScanOptions(device="cpu", batch_size=16))
    assert not [w for w in report.warnings if "training mode" in w]
    assert [list(s.verdict.dead) for s in report.sites] == [list(np.flatnonzero(ref["positive"] == 0))
                                                            for ref in eval_truth(saved["x"])]


def test_the_models_own_training_dropout_stays_live(saved: dict[str, Path]) -> None:
    loaded = load_model(saved["mc.pt2"])
    assert loaded.training_flags_off == () and loaded.notes == ()
    x = torch.from_numpy(np.load(saved["x6"]))
    assert not torch.equal(loaded.module(x), loaded.module(x))  # dropout still draws


def test_fix_of_a_program_saved_in_training_mode_matches_its_eval_mode(saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fixed.pt2"
    options = FixOptions(PlanOptions(to="prelu"), RewriteOptions(slope=0.0), True, out)
    result = run_fix(saved["train.pt2"], str(saved["x"]), options, ScanOptions(device="cpu", batch_size=16))
    assert result.deviation.relative <= 1e-5, result.deviation  # slope 0: the eval-mode outputs, exactly
    rescanned = scan(out, saved["x"], ScanOptions(device="cpu", batch_size=16))
    assert [list(s.verdict.dead) for s in rescanned.sites] == [list(np.flatnonzero(ref["positive"] == 0))
                                                               for ref in eval_truth(saved["x"])]
    assert not [w for w in rescanned.warnings if "training mode" in w]  # written in eval mode
