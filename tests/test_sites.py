"""Every way of writing a ReLU is a site, named and given a unit axis, in every flavour of module."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deadrelu import ScanOptions, scan
from deadrelu.errors import DataError
from deadrelu.sites import context_from_torchscript


class Forms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.r6 = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.2)
        self.prelu = nn.PReLU(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        x = self.act(x - 0.5)  # same module, second call
        x = F.relu(x - 0.1)
        x = torch.relu(x)
        x = (x - 0.2).relu()
        x = (x - 0.3).relu_()
        x = self.r6(x * 10)
        x = F.relu6(x - 1)
        x = F.hardtanh(x - 1, 0.0, 6.0)
        x = F.hardtanh(x, -1.0, 1.0)  # not a ReLU
        x = self.leaky(x - 2)
        x = self.prelu(x)
        return F.relu(self.fc(x.mean((2, 3))))


EXPECTED = [
    ("act", "relu"), ("act_1", "relu"), ("relu", "relu"), ("relu_1", "relu"), ("relu_2", "relu"),
    ("relu_3", "relu"), ("r6", "relu6"), ("relu6", "relu6"), ("hardtanh", "relu6"), ("leaky", "leaky_relu"),
    ("prelu", "prelu"), ("relu_4", "relu"),
]


def data() -> torch.Tensor:
    return torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("flavour", ["eager", "trace", "script", "export"])
def test_every_form_is_a_site(flavour: str) -> None:
    model = Forms().eval()
    x = data()
    if flavour == "trace":
        model = torch.jit.trace(model, x)
    elif flavour == "script":
        model = torch.jit.script(model)
    elif flavour == "export":
        batch = torch.export.Dim("batch", min=1, max=64)
        model = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}).module()
    report = scan(model, [x[:3], x[3:]], ScanOptions(device="cpu"))
    assert [(s.name, s.op) for s in report.sites] == EXPECTED
    assert [s.unit_axis for s in report.sites] == [1] * 11 + [1]
    assert report.sites[9].leaky and report.sites[10].leaky and not report.sites[0].leaky


def test_inplace_relu_is_read_before_it_runs() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-100.0, 0.0, 100.0]))
    x = torch.randn(10, 4)
    report = scan(model, [x], ScanOptions(device="cpu"))
    site = report.sites[0]
    pre = model[0](x).detach().numpy()
    np.testing.assert_allclose(site.stats.minimum, pre.min(0), rtol=1e-6)
    assert site.stats.minimum[0] < -50  # the negative side was seen: read before relu_
    assert list(site.verdict.dead) == [0]


class Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c3 = nn.Conv3d(2, 4, 1)
        self.seq = nn.Linear(6, 7)
        self.emb = nn.Embedding(10, 5)

    def forward(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        return [
            F.relu(self.c1(a)),  # (N, 3, L): dim 1
            F.relu(self.c3(b) + 1.0),  # (N, 4, D, H, W) through a bias add: dim 1
            F.relu(self.seq(s)),  # (N, T, 7): last dim
            F.relu(self.emb(t)),  # (N, T, 5): last dim
            F.relu(s.permute(0, 2, 1)),  # unknown producer: dim 1
        ]


def test_unit_axis_follows_the_producer() -> None:
    batch = (torch.randn(2, 2, 8), torch.randn(2, 2, 3, 3, 3), torch.randn(2, 9, 6), torch.randint(0, 10, (2, 4)))
    report = scan(Shapes(), [batch], ScanOptions(device="cpu"))
    got = [(s.unit_axis, s.units, s.axis_source) for s in report.sites]
    assert got == [(1, 3, "conv"), (1, 4, "conv"), (2, 7, "linear"), (2, 5, "linear"), (1, 6, "default")]


def test_keyword_and_positional_inputs() -> None:
    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.relu(a - b)

    a, b = torch.randn(4, 3), torch.zeros(4, 3)
    by_position = scan(TwoInputs(), [(a, b)], ScanOptions(device="cpu"))
    by_name = scan(TwoInputs(), [{"a": a, "b": b}], ScanOptions(device="cpu"))
    np.testing.assert_array_equal(by_position.sites[0].stats.positive, by_name.sites[0].stats.positive)


class ImageAndMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(image) * mask)


def test_named_arrays_in_a_file_reach_the_parameters_of_those_names(tmp_path) -> None:
    """An .npz's arrays go to the forward's parameters by name, in whatever order the file
    holds them, extra arrays (labels) left out; a torch.export program, which takes no
    keywords, gets them as positional arguments."""
    model = ImageAndMask().eval()
    rng = np.random.default_rng(0)
    image = rng.standard_normal((24, 3)).astype(np.float32)
    mask = (rng.random((24, 4)) > 0.5).astype(np.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    example = (torch.from_numpy(image[:2]), torch.from_numpy(mask[:2]))
    program = torch.export.export(model, example, dynamic_shapes={"image": {0: batch}, "mask": {0: batch}})
    torch.export.save(program, tmp_path / "two.pt2")
    torch.jit.save(torch.jit.trace(model, example), tmp_path / "two.ts.pt")
    np.savez(tmp_path / "ordered.npz", image=image, mask=mask)
    np.savez(tmp_path / "reversed.npz", label=np.arange(24), mask=mask, image=image)
    truth = (model.fc(torch.from_numpy(image)) * torch.from_numpy(mask)).detach().numpy()
    options = ScanOptions(device="cpu", batch_size=8)
    for model_file in ("two.pt2", "two.ts.pt"):
        for data_file in ("ordered.npz", "reversed.npz"):
            report = scan(tmp_path / model_file, tmp_path / data_file, options)
            np.testing.assert_array_equal(report.sites[0].stats.positive, (truth > 0).sum(axis=0))
    np.savez(tmp_path / "misnamed.npz", img=image, msk=mask)
    with pytest.raises(DataError, match="named img, msk but the model's forward takes image, mask"):
        scan(tmp_path / "two.pt2", tmp_path / "misnamed.npz", options)
    renamed = scan(tmp_path / "two.pt2", tmp_path / "misnamed.npz", replace(options, inputs="img,msk"))
    np.testing.assert_array_equal(renamed.sites[0].stats.positive, (truth > 0).sum(axis=0))  # in the order given
    # --inputs partly the forward's names: no keyword arguments (a .pt2 takes none), one clear line
    for inputs, message in (("image,label", r"--inputs image,label: 'label' is not among its parameters, the others "
                                            r"are; the model's forward takes \(image, mask\)"),
                            ("mask", r"--inputs mask: .* so 'mask' needs 'image' before it")):
        with pytest.raises(DataError, match=message):
            scan(tmp_path / "two.pt2", tmp_path / "reversed.npz", replace(options, inputs=inputs))


def test_torchscript_hierarchy_parsing() -> None:
    ctx = context_from_torchscript("layer1(Sequential).0(B).relu(ReLU).UNKNOWN_INSTANCE(UNKNOWN_TYPE)")
    assert (ctx.module_path, ctx.module_type) == ("layer1.0.relu", "ReLU")
    assert context_from_torchscript("").module_path == ""


def test_names_are_stable_across_runs() -> None:
    names = [tuple(s.name for s in scan(Forms(), [data()], ScanOptions(device="cpu")).sites) for _ in range(2)]
    assert names[0] == names[1]


class Moved(nn.Module):
    """Units moved by permute, transpose and reshape: a channels-last ReLU, a ViT-style
    patch embedding (conv -> flatten(2) -> transpose), a linear output transposed, and a
    conv output whose channels a reshape merges with its rows (lost: the default axis)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 5, 3)
        self.patch = nn.Conv2d(3, 6, 4, 4)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)  # (N, 5, 6, 6)
        last = torch.relu(c.permute(0, 2, 3, 1))  # (N, 6, 6, 5): units on dim 3
        tokens = torch.relu(self.patch(x).flatten(2).transpose(1, 2))  # (N, 4, 6): units on dim 2
        fc = torch.relu(self.fc(last).transpose(1, 3) + 1.0)  # (N, 4, 6, 6): units on dim 1
        merged = torch.relu(c.reshape(c.shape[0], 30, 6))  # channels merged with rows: lost, the default dim 1
        return last.sum() + tokens.sum() + fc.sum() + merged.sum()

    def preacts(self, x: torch.Tensor) -> list[tuple[np.ndarray, int]]:
        c = self.conv(x)
        last = c.permute(0, 2, 3, 1)
        return [(last.detach().numpy(), 3),
                (self.patch(x).flatten(2).transpose(1, 2).detach().numpy(), 2),
                ((self.fc(torch.relu(last)).transpose(1, 3) + 1.0).detach().numpy(), 1),
                (c.reshape(c.shape[0], 30, 6).detach().numpy(), 1)]


@pytest.mark.parametrize("flavour", ["eager", "onnx"])
def test_unit_axis_follows_permutes_and_reshapes(flavour: str, tmp_path) -> None:
    """PyTorch and ONNX find the same unit axes, and the statistics along them are the brute force's."""
    from reference import unit_stats

    model = Moved().eval()
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    target = model
    if flavour == "onnx":
        target = tmp_path / "moved.onnx"
        torch.onnx.export(model, (batches[0],), str(target), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    report = scan(target, batches, ScanOptions(device="cpu"))
    assert [(s.unit_axis, s.axis_source, s.units) for s in report.sites] == [
        (3, "conv", 5), (2, "conv", 6), (1, "linear", 4), (1, "default", 30)]
    with torch.no_grad():
        recorded = [model.preacts(b) for b in batches]
    for index, site in enumerate(report.sites):
        axis = recorded[0][index][1]
        ref = unit_stats(np.concatenate([r[index][0] for r in recorded]), axis)
        np.testing.assert_array_equal(site.stats.positive, ref["positive"], err_msg=site.name)
        np.testing.assert_allclose(site.stats.mean, ref["mean"], rtol=1e-4, atol=1e-5, err_msg=site.name)
        np.testing.assert_allclose(site.stats.std, ref["std"], rtol=1e-4, atol=1e-5, err_msg=site.name)


class SlicedFeatures(nn.Module):
    """A linear layer's (N, T, F) output through slices, splits, pads, reductions, a mask,
    squeezes, unsqueezes and concatenation before its ReLUs: the units stay its features
    (a split of the features keeps those it holds). Features 1 and 6 are dead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc = nn.Linear(6, 8)
        with torch.no_grad():
            self.fc.bias[1] = self.fc.bias[6] = -30.0

    def preacts(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.fc(x)  # (N, 4, 8)
        return [h[:, 1:], h.chunk(2, dim=-1)[0], h.unsqueeze(1), F.pad(h, (0, 0, 1, 1)), h.mean(1, keepdim=True),
                h.amax(1), h.masked_fill(x[..., :1] > 50, 0.0), h[:, :1].squeeze(1), torch.cat([h, h[:, :2]], dim=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = (torch.relu(p) for p in self.preacts(x))
        gate = self.fc(x).chunk(2, dim=-1)[1]
        return first.sum() + (rest[0] * gate).sum() + sum(r.sum() for r in rest[1:])


@pytest.mark.parametrize("flavour", ["eager", "pt2", "onnx"])
def test_unit_axis_follows_slices_splits_pads_and_reductions(flavour: str, tmp_path) -> None:
    """Behind a linear layer the units are its features whatever keeps that dim: the same
    axes from PyTorch and ONNX, and the brute force's dead units and statistics along them."""
    from reference import unit_stats

    model = SlicedFeatures().eval()
    batches = [torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    target: object = model
    if flavour == "pt2":
        target = tmp_path / "sliced.pt2"
        torch.export.save(torch.export.export(model, (batches[0],), dynamic_shapes=({0: torch.export.Dim("n")},)),
                          str(target))
    elif flavour == "onnx":
        target = tmp_path / "sliced.onnx"
        torch.onnx.export(model, (batches[0],), str(target), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    report = scan(target, batches, ScanOptions(device="cpu"))
    assert [(s.unit_axis, s.units) for s in report.sites] == [(2, 8), (2, 4), (3, 8), (2, 8), (2, 8), (1, 8), (2, 8),
                                                               (1, 8), (2, 8)]
    assert {s.axis_source for s in report.sites} == {"linear"}
    with torch.no_grad():
        recorded = [model.preacts(b) for b in batches]
    for index, site in enumerate(report.sites):
        values = np.concatenate([r[index].numpy() for r in recorded])
        ref = unit_stats(values, site.unit_axis)
        assert tuple(site.verdict.dead) == tuple(int(u) for u in np.flatnonzero(ref["positive"] == 0)), site.name
        assert tuple(site.verdict.dead) == ((1,) if site.units == 4 else (1, 6)), site.name
        np.testing.assert_array_equal(site.stats.positive, ref["positive"], err_msg=site.name)
        np.testing.assert_allclose(site.stats.mean, ref["mean"], rtol=1e-4, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(site.stats.std, ref["std"], rtol=1e-4, atol=1e-4, err_msg=site.name)


class LoopOverModuleLists(nn.Module):
    """Layers kept in ModuleLists and called from the parent's forward: a trace records
    each call by the called module alone ('0(ReLU)', '1(ReLU)'), without the list."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linears = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 5)])
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(5, 4), nn.ReLU()),
                                     nn.Sequential(nn.Linear(4, 3), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, act in zip(self.linears, self.acts):
            x = act(linear(x))
        for block in self.blocks:
            x = block[1](block[0](x))
        return x


def test_traced_relus_called_from_module_lists_keep_their_own_module_paths(tmp_path) -> None:
    model = LoopOverModuleLists().eval()
    x = torch.randn(16, 4)
    torch.jit.save(torch.jit.trace(model, x[:2]), tmp_path / "loop.ts.pt")
    expected = [("acts.0", 6), ("acts.1", 5), ("blocks.0.1", 4), ("blocks.1.1", 3)]
    for source in (model, tmp_path / "loop.ts.pt"):
        report = scan(source, [x], ScanOptions(device="cpu"))
        assert [(s.name, s.units) for s in report.sites] == expected, source


class Routed(nn.Module):
    """A data-dependent branch: each batch runs one arm. Both arms call the shared `act`
    module and `F.relu` on layers of the same widths, so merging the arms' calls by call
    order would go unnoticed but for the statistics (and fc_b's dead unit 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a, self.bn_a = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv_b = nn.Conv2d(4, 5, 1)
        self.act = nn.ReLU()
        self.fc_a, self.fc_b = nn.Linear(5, 3), nn.Linear(5, 3)
        with torch.no_grad():
            self.conv_a.weight[1] = 0.0
            self.conv_a.bias[1] = -1.0
            self.fc_b.weight[0] = 0.0
            self.fc_b.bias[0] = -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if bool(x.mean() > 0):
            y = self.act(self.bn_a(self.conv_a(x)))
            return F.relu(self.fc_a(y.mean((2, 3))))
        y = self.act(self.conv_b(x))
        return F.relu(self.fc_b(y.mean((2, 3))))

    def preactivations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Brute force: each arm's pre-activations, under the names the scan gives them."""
        x = self.stem(x)
        if bool(x.mean() > 0):
            pre = self.bn_a(self.conv_a(x))
            return {"act": pre, "relu": self.fc_a(pre.relu().mean((2, 3)))}
        pre = self.conv_b(x)
        return {"act_1": pre, "relu_1": self.fc_b(pre.relu().mean((2, 3)))}


def _routed_batches() -> list[torch.Tensor]:
    """Batches that take the two arms in turn."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 6, 6, generator=gen) + shift for shift in (3.0, -3.0, 3.0, -3.0)]


def _arm_preactivations(model: Routed, batches: list[torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Brute force: every batch's pre-activations per site of the arm it ran."""
    with torch.no_grad():
        seen: dict[str, list[np.ndarray]] = {}
        for batch in batches:
            for name, pre in model.preactivations(batch).items():
                seen.setdefault(name, []).append(pre.numpy())
    assert sorted(seen) == ["act", "act_1", "relu", "relu_1"]  # both arms ran
    return seen


@pytest.mark.parametrize("flavour", ["eager", "script"])
def test_the_arms_of_a_data_dependent_branch_are_separate_sites(flavour: str, tmp_path) -> None:
    from reference import assert_site_stats, unit_stats
    model = Routed().eval()
    batches = _routed_batches()
    source: object = model
    if flavour == "script":
        torch.jit.save(torch.jit.script(model), tmp_path / "routed.ts.pt")
        source = tmp_path / "routed.ts.pt"
    seen = _arm_preactivations(model, batches)
    report = scan(source, batches, ScanOptions(device="cpu"))
    assert [s.name for s in report.sites] == ["act", "relu", "act_1", "relu_1"]
    for site in report.sites:
        ref = unit_stats(np.concatenate(seen[site.name]), 1)
        assert_site_stats(site, ref)
        assert list(site.verdict.dead) == list(np.flatnonzero(ref["positive"] == 0)), site.name
    dead = {s.name: list(s.verdict.dead) for s in report.sites}
    assert 1 in dead["act"] and 0 in dead["relu_1"] and not dead["act_1"]  # the planted units, one arm each


class CondRouted(Routed):
    """`Routed`'s branch as `torch.export` holds one: a `torch.cond` whose arms are subgraphs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)

        def arm_a(x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc_a(self.act(self.bn_a(self.conv_a(x))).mean((2, 3))))

        def arm_b(x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc_b(self.act(self.conv_b(x)).mean((2, 3))))

        return torch.cond(x.mean() > 0, arm_a, arm_b, (x,))


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_the_arms_of_a_torch_cond_in_an_exported_program_are_separate_sites(compile_mode: str, tmp_path) -> None:
    """Each batch runs the arm its predicate picks; the arms' sites are told apart by arm
    (their graphs carry no module path, so they take the calling module's name), and every
    statistic matches a brute force over the arm that ran. `--compile on` cannot capture a
    cond and stays on the eager path with the same result."""
    from reference import assert_site_stats, unit_stats
    model = CondRouted().eval()
    batches = _routed_batches()
    torch.export.save(torch.export.export(model, (batches[0],)), tmp_path / "cond.pt2")
    seen = _arm_preactivations(model, batches)
    report = scan(tmp_path / "cond.pt2", batches, ScanOptions(device="cpu", compile=compile_mode))
    assert [s.name for s in report.sites] == ["relu", "relu_1", "relu_2", "relu_3"]
    for site, brute in zip(report.sites, ["act", "relu", "act_1", "relu_1"]):
        ref = unit_stats(np.concatenate(seen[brute]), 1)
        assert_site_stats(site, ref)
        assert list(site.verdict.dead) == list(np.flatnonzero(ref["positive"] == 0)), site.name
    dead = [list(s.verdict.dead) for s in report.sites]
    assert 1 in dead[0] and 0 in dead[3] and not dead[2]  # the planted units, one arm each


def test_a_relu_inside_another_higher_order_op_is_refused_not_missed(tmp_path) -> None:
    """A `while_loop` body is not observed: a ReLU inside it is an error naming the op."""
    from deadrelu.errors import DeadReluError

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def cond_fn(i: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
                return i < 2

            def body_fn(i: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return i + 1, F.relu(self.fc(h))

            from torch._higher_order_ops.while_loop import while_loop
            return while_loop(cond_fn, body_fn, (torch.zeros((), dtype=torch.int64), x))[1]

    x = torch.randn(4, 3)
    try:
        program = torch.export.export(Looped().eval(), (x,))
    except Exception as exc:  # pragma: no cover - an older torch without while_loop export
        pytest.skip(f"torch.export cannot hold this while_loop here: {exc}")
    torch.export.save(program, tmp_path / "loop.pt2")
    with pytest.raises(DeadReluError, match="higher_order.while_loop with a ReLU-family op inside"):
        scan(tmp_path / "loop.pt2", [x], ScanOptions(device="cpu"))


class Producer(nn.Module):
    """One ReLU behind one kind of producer (``make`` gives the pre-activation), with dead
    units planted: the brute force reads them along ``axis``."""

    def __init__(self, make, axis: int, dead: tuple[int, ...]) -> None:
        super().__init__()
        self.make, self.axis, self.dead = make, axis, dead

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        return self.make(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.preact(x)).sum()


def _embedding(m: Producer, x: torch.Tensor) -> torch.Tensor:
    return m.table(x)


def _einsum(equation: str, weight_first: bool = False):
    def make(m: Producer, x: torch.Tensor) -> torch.Tensor:
        operands = (m.w, x) if weight_first else (x, m.w)
        return torch.einsum(equation, *operands) + m.b
    return make


def _attention(m: Producer, x: torch.Tensor) -> torch.Tensor:
    return m.attn(x, x, x, need_weights=False)[0]


def _recurrent(m: Producer, x: torch.Tensor) -> torch.Tensor:
    return m.rnn(x)[0]


def _producer(case: str) -> tuple[Producer, torch.Tensor]:
    """A model for ``case`` and a batch for it."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(3)
    if case == "embedding":
        m = Producer(_embedding, 2, (2, 4))
        m.table = nn.Embedding(20, 6)
        with torch.no_grad():
            m.table.weight[:, [2, 4]] = -torch.rand(20, 2) - 0.1
        return m, torch.randint(0, 20, (16, 5), generator=g)
    einsums = {  # equation, weight shape, bias shape, input shape, unit axis, weight first
        "einsum btf,fg->btg": ("btf,fg->btg", (4, 7), (7,), (16, 3, 4), 2, False),
        "einsum btg,gk->bkt": ("btg,gk->bkt", (4, 7), (7, 1), (16, 3, 4), 1, False),
        "einsum oc,bchw->bohw": ("oc,bchw->bohw", (7, 4), (7, 1, 1), (16, 4, 3, 3), 1, True),
        "einsum ...f,fg->...g": ("...f,fg->...g", (4, 7), (7,), (16, 3, 4), 2, False),
        "einsum bi,ij": ("bi,ij", (4, 7), (7,), (16, 4), 1, False),
    }
    if case in einsums:
        equation, w_shape, b_shape, x_shape, axis, first = einsums[case]
        m = Producer(_einsum(equation, first), axis, (1, 5))
        m.w = nn.Parameter(torch.randn(*w_shape) * 0.3)
        bias = torch.zeros(7)
        bias[[1, 5]] = -30.0
        m.b = nn.Parameter(bias.reshape(b_shape))
        return m, torch.randn(*x_shape, generator=g)
    if case == "bilinear":
        m = Producer(lambda m, x: m.bil(x, x.flip(1)), 2, (4,))
        m.bil = nn.Bilinear(4, 4, 6)
        with torch.no_grad():
            m.bil.bias[4] = -30.0
        return m, torch.randn(16, 3, 4, generator=g) * 2.0
    if case == "tensordot":
        m = Producer(lambda m, x: torch.tensordot(x, m.w, dims=1) + m.b, 2, (0,))
        m.w, m.b = nn.Parameter(torch.randn(4, 6) * 0.3), nn.Parameter(torch.tensor([-30.0, 0, 0, 0, 0, 0]))
        return m, torch.randn(16, 3, 4, generator=g)
    if case == "scaled dot-product attention":  # (N, heads, T, head features): the features
        def make(m: Producer, x: torch.Tensor) -> torch.Tensor:
            q = m.q(x).reshape(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)
        m = Producer(make, 3, (1,))
        m.q = nn.Linear(4, 8)
        with torch.no_grad():  # every value's feature 1 of both heads negative: so is their average
            m.q.bias[[1, 5]] = -30.0
        return m, torch.randn(16, 5, 4, generator=g)
    through = {  # a linear layer's (N, T, F) features through an op that keeps them on dim 2
        "flip": lambda h: torch.flip(h, [1]), "roll": lambda h: torch.roll(h, 1, 1),
        "indexed by a vector": lambda h: h[:, torch.tensor([0, 2, 3])], "unfold": lambda h: h.unfold(1, 2, 1),
    }
    if case in through:
        m = Producer(lambda m, x, op=through[case]: op(m.fc(x)), 2, (2,))
        m.fc = nn.Linear(4, 6)
        with torch.no_grad():
            m.fc.bias[2] = -30.0
        return m, torch.randn(16, 5, 4, generator=g)
    if case == "einsum weight buffer":  # a frozen projection held in a buffer (ONNX: a constant)
        m = Producer(lambda m, x: torch.einsum("gk,btg->bkt", m.wb, x) + m.b, 1, (3,))
        m.register_buffer("wb", torch.randn(4, 7) * 0.3)
        m.register_buffer("b", torch.tensor([0.0, 0, 0, -30, 0, 0, 0]).reshape(7, 1))
        return m, torch.randn(16, 5, 4, generator=g)
    if case == "heads split":  # (N, heads, T, head features): a feature dead in every head
        m = Producer(lambda m, x: m.q(x).view(x.shape[0], x.shape[1], 2, 4).permute(0, 2, 1, 3), 3, (1,))
        m.q = nn.Linear(4, 8)
        with torch.no_grad():
            m.q.bias[[1, 5]] = -30.0
        return m, torch.randn(16, 5, 4, generator=g)
    if case == "gru final state":  # h_n: (layers, N, H)
        m = Producer(lambda m, x: m.rnn(x)[1], 2, (2,))
        m.rnn = nn.GRU(4, 5, num_layers=2, batch_first=True)
        with torch.no_grad():
            m.rnn.bias_ih_l0[2 * 5 + 2] = m.rnn.bias_ih_l1[2 * 5 + 2] = -30.0
        return m, torch.randn(16, 6, 4, generator=g)
    if case == "attention":
        m = Producer(_attention, 2, (3,))
        m.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        with torch.no_grad():
            m.attn.out_proj.bias[3] = -30.0
        return m, torch.randn(16, 5, 6, generator=g)
    batch_first = case.endswith("batch first")
    m = Producer(_recurrent, 2, (2,))
    if case.startswith("lstm"):
        m.rnn = nn.LSTM(4, 5, batch_first=batch_first)
        with torch.no_grad():  # cell input pinned at -1: the cell and the output stay negative
            m.rnn.bias_ih_l0[2 * 5 + 2] = -30.0
    else:
        m.rnn = nn.GRU(4, 5, batch_first=batch_first)
        with torch.no_grad():  # candidate pinned at -1 from a zero state: the output stays negative
            m.rnn.bias_ih_l0[2 * 5 + 2] = -30.0
    return m, torch.randn(*((16, 6, 4) if batch_first else (6, 16, 4)), generator=g)


def _saved_as(flavour: str, model: nn.Module, example: torch.Tensor, folder) -> object:
    """The model itself ("eager") or saved in that format, its input named x with a dynamic
    first dim (ONNX)."""
    if flavour == "torchscript":
        torch.jit.save(torch.jit.trace(model, (example,), check_trace=False), str(folder / "m.ts.pt"))
        return folder / "m.ts.pt"
    if flavour == "pt2":
        torch.export.save(torch.export.export(model, (example,)), str(folder / "m.pt2"))
        return folder / "m.pt2"
    if flavour == "onnx":
        torch.onnx.export(model, (example,), str(folder / "m.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
        return folder / "m.onnx"
    return model


PRODUCER_CASES = ["embedding", "einsum btf,fg->btg", "einsum btg,gk->bkt", "einsum oc,bchw->bohw",
                  "einsum ...f,fg->...g", "einsum bi,ij", "bilinear", "tensordot", "scaled dot-product attention",
                  "heads split", "flip", "roll", "indexed by a vector", "unfold", "einsum weight buffer",
                  "attention", "lstm batch first", "gru", "gru final state"]


@pytest.mark.parametrize("flavour", ["eager", "torchscript", "pt2", "onnx"])
@pytest.mark.parametrize("case", PRODUCER_CASES)
def test_unit_axis_of_embeddings_einsums_attention_and_recurrent_layers(case: str, flavour: str, tmp_path) -> None:
    """The units of an embedding, an einsum (the output subscript only its weight carries),
    a fused `nn.MultiheadAttention` and an LSTM/GRU are the same in every format, and the
    dead units planted along them are the brute force's (a wrong axis hid them)."""
    from reference import assert_site_stats, unit_stats

    if case == "bilinear" and flavour == "onnx":
        pytest.skip("torch.onnx does not export aten::bilinear")
    model, x = _producer(case)
    model.eval()
    # a sequence-first GRU's data is (T, N, F): the batches split its samples, dim 1
    batches = [x[:, :8], x[:, 8:]] if case == "gru" else [x[:8], x[8:]]
    report = scan(_saved_as(flavour, model, batches[0], tmp_path), batches, ScanOptions(device="cpu"))
    (site,) = report.sites
    assert site.unit_axis == model.axis, (site.unit_axis, site.axis_source)
    assert site.axis_source == ("recurrent" if case.startswith(("lstm", "gru")) else "linear")
    with torch.no_grad():
        values = np.concatenate([model.preact(b).numpy() for b in batches])
    ref = unit_stats(values, model.axis)
    assert tuple(site.verdict.dead) == model.dead == tuple(int(u) for u in np.flatnonzero(ref["positive"] == 0))
    assert_site_stats(site, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("equation", "weights", "ndim", "axis"), [
    ("btg,gk->bkt", [False, True], 3, -2),  # k: dim 1 of 3
    ("gk,btg->bkt", [True, False], 3, -2),  # the weight first
    ("btg,gk->bkt", [False, False], 3, -2),  # no weight known: the last operand plays it
    ("bqd,bkd->bqk", [False, False], 3, -1),  # attention scores: the keys (last operand's own k)
    ("...f,fg->...g", [False, True], 4, -1),
    ("fg,f...->g...", [True, False], 4, -4),  # an ellipsis after the units: counted from the front
    ("bi,ij", [False, True], 2, -1),  # implicit output 'bj'
    ("bi,bi->b", [False, True], 1, -1),  # no subscript of the weight's own: the last dim
    ("b1,1k->bk", [False, True], 2, -1),  # not an equation: the last dim
])
def test_the_einsum_unit_axis_is_the_output_subscript_of_the_weight_alone(equation: str, weights: list[bool],
                                                                          ndim: int, axis: int) -> None:
    from deadrelu.sites import einsum_unit_axis

    assert einsum_unit_axis(equation, weights, ndim) == axis


class UnknownProducer(nn.Module):
    """ReLUs of the input itself: no producer says where the units are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * 2.0).sum() + torch.relu(x[:, 0]).sum() + torch.relu(x.flatten(1)).sum()


@pytest.mark.parametrize("flavour", ["eager", "onnx"])
def test_sites_of_rank_three_with_the_default_axis_are_named_in_a_warning(flavour: str, tmp_path) -> None:
    """Dim 1 of a rank-3 pre-activation with no known producer may be positions: the report
    says which sites took it; a rank-2 site (dim 1 is all there is beside the samples) is
    not named."""
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    target: object = UnknownProducer()
    if flavour == "onnx":
        target = tmp_path / "unknown.onnx"
        torch.onnx.export(UnknownProducer(), (x,), str(target), dynamo=False, input_names=["x"])
    report = scan(target, [x], ScanOptions(device="cpu"))
    assert [(s.unit_axis, s.axis_source) for s in report.sites] == [(1, "default")] * 3
    first, *rest = [s.name for s in report.sites]
    (note,) = [w for w in report.warnings if "unit axis unknown" in w]
    assert note.startswith(f"unit axis unknown at site '{first}': dim 1 taken as the units"), note
    assert not any(name in note for name in rest), note


class Features(nn.Module):
    """A ReLU of its input's features (no producer tells) and one behind a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * 2.0).sum() + torch.relu(self.fc(x)).sum()


@pytest.mark.parametrize("flavour", ["eager", "torchscript", "onnx"])
def test_a_unit_axis_given_by_the_user_replaces_the_guess(flavour: str, tmp_path) -> None:
    """--unit-axis GLOB=DIM: the sites it matches have their units there (source 'user'),
    negative dims from the end; the dead units and statistics along it are the brute
    force's; the others keep their producer's axis."""
    from reference import assert_site_stats, unit_stats

    from deadrelu import AxisOverride

    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 5, generator=g) for _ in range(2)]
    for b in batches:
        b[:, :, 3] = -b[:, :, 3].abs()  # feature 3 of the input never positive
    model = Features().eval()
    target = _saved_as(flavour, model, batches[0], tmp_path)
    guessed = scan(target, batches, ScanOptions(device="cpu"))
    first = guessed.sites[0].name
    assert [(s.unit_axis, s.axis_source) for s in guessed.sites] == [(1, "default"), (2, "linear")]
    assert any("unit axis unknown" in w for w in guessed.warnings)
    given = scan(target, batches, ScanOptions(device="cpu", unit_axes=(AxisOverride(first, -1),
                                                                       AxisOverride("*", 1))))
    assert [(s.unit_axis, s.axis_source) for s in given.sites] == [(2, "user"), (1, "user")]
    assert not any("unit axis unknown" in w for w in given.warnings)
    values = np.concatenate([(b * 2.0).numpy() for b in batches])
    ref = unit_stats(values, 2)
    assert tuple(given.sites[0].verdict.dead) == (3,) == tuple(np.flatnonzero(ref["positive"] == 0))
    assert_site_stats(given.sites[0], ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hidden = np.concatenate([model.fc(b).numpy() for b in batches])
    assert_site_stats(given.sites[1], unit_stats(hidden, 1), rtol=1e-4, atol=1e-4)


def test_a_unit_axis_the_site_lacks_or_matching_nothing(tmp_path) -> None:
    """A dim beyond the site's rank is a one-line usage error naming the site (exit 2); a
    glob that matches no site that ran is a warning, not silence."""
    from typer.testing import CliRunner

    from deadrelu.cli import app

    x = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    torch.jit.save(torch.jit.trace(Features().eval(), (x,)), str(tmp_path / "m.ts.pt"))
    runner = CliRunner()
    base = ["scan", str(tmp_path / "m.ts.pt"), "--data", str(tmp_path / "x.npy")]
    wrong = runner.invoke(app, [*base, "--unit-axis", "relu=3"])
    assert wrong.exit_code == 2, wrong.output
    assert wrong.stderr.strip() == ("deadrelu: error: --unit-axis relu=3: site 'relu' has a rank-3 pre-activation: "
                                    "expected a dim from 1 to 2 (or -1 to -2); dim 0 holds the samples"), wrong.stderr
    unmatched = runner.invoke(app, [*base, "--unit-axis", "encoder.*=2", "-f", "json"])
    assert unmatched.exit_code == 0, unmatched.output
    assert "--unit-axis encoder.*=2 matched no site that ran" in json.loads(unmatched.stdout)["warnings"]


@pytest.mark.parametrize(("source", "destination", "ndim"), [(2, 1, 3), (1, -1, 4), ([0, 3], [2, 1], 5), (-1, 0, 4)])
def test_the_units_follow_movedim(source, destination, ndim: int) -> None:
    """movedim's dim order (output dim i is input dim order[i]) is torch's own."""
    from deadrelu.sites import permutation

    x = torch.empty(*range(2, 2 + ndim))
    order = permutation("movedim", (x, source, destination), ndim)
    assert [x.shape[d] for d in order] == list(torch.movedim(x, source, destination).shape)
