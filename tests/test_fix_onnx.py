"""deadrelu fix on ONNX models: the rewritten graph, its files, and its verification.

Mirrors tests/test_fix.py: exact reproduction with slope 0 checks the wiring, op counts
check that only the planned sites changed, and every written model must pass the ONNX
checker with its opset and graph inputs/outputs kept.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from deadrelu.cli import app
from deadrelu.errors import UsageError
from deadrelu.fix import FixOptions, PlanOptions, RewriteOptions, run_fix
from deadrelu.fix.onnx_rewrite import rewrite_onnx
from deadrelu.fix.plan import SiteFix
from deadrelu.fix.torch_rewrite import RewriteError
from deadrelu.load import load_model
from deadrelu.scan import ScanOptions, scan

FIX = Path(__file__).resolve().parent.parent / "fixtures"
ONNX_DIR = FIX / "onnx"
CASES = json.loads((FIX / "expected.json").read_text())["onnx_cases"]
PLANNED = {"convnet": 10, "seqnet": 2, "mlp": 2}  # convnet: 13 sites, 2 already leaky, 1 without dead units


def fix(model: Path, data: Path, out: Path, to: str | None = None, slope: float | None = None,
        bn_init: str = "identity", sites: tuple[str, ...] = ()):
    options = FixOptions(PlanOptions(to=to, sites=sites), RewriteOptions(slope=slope, bn_init=bn_init), True, out)
    return run_fix(model, str(data), options, ScanOptions(device="cpu", batch_size=16))


def fix_exported(name: str, tmp_path: Path, **kw):
    out = tmp_path / f"{name}.fixed.onnx"
    return fix(FIX / f"{name}.onnx", FIX / f"{name}.calib.npy", out, **kw), out


def case_data(name: str, folder: Path, samples: int = 64) -> Path:
    """Seeded data for a hand-built case (as tests/test_onnx.py makes it)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    (shape, dtype), = CASES[name]["inputs"].values()
    x = rng.standard_normal((samples, *shape)).astype(dtype)
    if name == "subgraphs":  # feature 0's sign alternates per batch of 16: both If branches run
        x[:, 0] = np.abs(x[:, 0]) * np.where(np.arange(samples) // 16 % 2 == 0, 1.0, -1.0)
    np.save(folder / "calib.npy", x)
    return folder / "calib.npy"


def ops(path: Path) -> Counter:
    """op_type counts over the whole model, subgraphs included."""
    counts: Counter = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else attr.graphs):
                    visit(sub)

    visit(onnx.load(str(path), load_external_data=False).graph)
    return counts


def initializers(path: Path, fragment: str) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    found = {}

    def visit(graph: onnx.GraphProto) -> None:
        found.update({t.name: numpy_helper.to_array(t) for t in graph.initializer if fragment in t.name})
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else attr.graphs):
                    visit(sub)

    visit(model.graph)
    return found


def assert_valid(out: Path, original: Path) -> None:
    """Passes the checker (path-based: external data is found beside it); keeps the opset,
    IR version and graph inputs/outputs of the original."""
    onnx.checker.check_model(str(out), full_check=True)
    new, old = onnx.load(str(out), load_external_data=False), onnx.load(str(original), load_external_data=False)
    assert [(o.domain, o.version) for o in new.opset_import] == [(o.domain, o.version) for o in old.opset_import]
    assert new.ir_version == old.ir_version
    assert [i.name for i in new.graph.input] == [i.name for i in old.graph.input]
    assert [o.name for o in new.graph.output] == [o.name for o in old.graph.output]


# --- the exported fixtures -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PLANNED))
@pytest.mark.parametrize("to", ["leaky", "prelu"])
def test_slope_zero_swap_reproduces_outputs_exactly(name: str, to: str, tmp_path: Path) -> None:
    before = (FIX / f"{name}.onnx").read_bytes()
    result, out = fix_exported(name, tmp_path, to=to, slope=0.0)
    assert (FIX / f"{name}.onnx").read_bytes() == before  # the input is never touched
    assert result.applied and len(result.plan) == PLANNED[name]
    assert result.deviation.max_abs == 0.0
    assert result.deviation.top1_agreement in (1.0, None)
    assert_valid(out, FIX / f"{name}.onnx")
    old, new = ops(FIX / f"{name}.onnx"), ops(out)
    swapped, other = ("LeakyRelu", "PRelu") if to == "leaky" else ("PRelu", "LeakyRelu")
    assert new[swapped] == old[swapped] + PLANNED[name]
    assert new[other] == old[other] and new["Relu"] == 0
    if name == "convnet":  # 2 of the 3 relu6 Clip sites were planned: they keep their cap as a Min
        assert new["Clip"] == 1 and new["Min"] == 2
        assert new["Constant"] == old["Constant"] - 4  # the replaced Clips' bounds are gone
    assert [c.site for c in result.changes] == [c.site_after for c in result.changes] == [f.site for f in result.plan]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # one file, no temporary left


def test_prelu_slope_broadcasts_along_the_unit_axis(tmp_path: Path) -> None:
    _, out = fix_exported("seqnet", tmp_path, to="prelu")
    slopes = initializers(out, "prelu_slope")
    # conv1d output (N, C, T), unit axis 1: (C, 1); sequence (N, T, F), unit axis 2: (F,)
    assert sorted(s.shape for s in slopes.values()) == [(8, 1), (12,)]
    assert all(np.all(s == np.float32(0.25)) for s in slopes.values())
    _, out = fix_exported("convnet", tmp_path, to="prelu", sites=("/stem/*", "/Relu"))
    assert sorted(s.shape for s in initializers(out, "prelu_slope").values()) == [(8, 1, 1), (32,)]


@pytest.mark.parametrize("name", list(PLANNED))
def test_batchnorm_identity_keeps_outputs(name: str, tmp_path: Path) -> None:
    result, out = fix_exported(name, tmp_path, to="bn")
    assert result.deviation.relative <= 1e-5
    assert result.deviation.top1_agreement in (1.0, None)
    assert_valid(out, FIX / f"{name}.onnx")
    old, new = ops(FIX / f"{name}.onnx"), ops(out)
    assert new["BatchNormalization"] == old["BatchNormalization"] + PLANNED[name]
    assert new["Relu"] == old["Relu"] and new["Clip"] == old["Clip"]
    if name == "seqnet":  # the sequence site's units are on axis 2: BatchNorm sits between two Transposes
        assert new["Transpose"] == old["Transpose"] + 2
    params = initializers(out, "deadrelu_bn")
    for f in result.plan:  # (x - mean) / sqrt(var + eps) * scale + B with scale = sqrt(var + eps), B = mean
        stats = result.scan.sites[f.index].stats
        np.testing.assert_allclose(params[f"{f.site}/deadrelu_bn_scale"], np.sqrt(stats.std ** 2 + 1e-5), rtol=1e-5)
        np.testing.assert_allclose(params[f"{f.site}/deadrelu_bn_bias"], stats.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(params[f"{f.site}/deadrelu_bn_mean"], stats.mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(PLANNED))
def test_batchnorm_revive_brings_dead_units_back(name: str, tmp_path: Path) -> None:
    result, out = fix_exported(name, tmp_path, to="bn", bn_init="revive")
    assert_valid(out, FIX / f"{name}.onnx")
    for change in result.changes:
        assert change.dead_before > 0
        assert change.dead_after == len(change.zero_variance_units), change
    assert all(np.all(v == 1) for v in initializers(out, "deadrelu_bn_scale").values())


def test_batchnorm_statistics_are_measured_after_earlier_changes(tmp_path: Path) -> None:
    """With revive, each BatchNorm must centre what reaches it once the earlier ones are in."""
    result, out = fix_exported("mlp", tmp_path, to="bn", bn_init="revive")
    after = scan(out, FIX / "mlp.calib.npy", ScanOptions(device="cpu"))
    for f in result.plan:
        stats = after.sites[f.index].stats
        live = stats.std > 0
        np.testing.assert_allclose(stats.mean[live], 0.0, atol=1e-4)
        np.testing.assert_allclose(stats.std[live], 1.0, atol=1e-3)


def test_only_chosen_sites_change(tmp_path: Path) -> None:
    result, out = fix_exported("convnet", tmp_path, to="leaky", sites=("/layer2/*",))
    assert [f.site for f in result.plan] == ["/layer2/Relu", "/layer2/Relu_1", "/layer2/Relu_2"]
    new = ops(out)
    assert new["LeakyRelu"] == 3 + 1  # plus the model's own LeakyReLU
    assert new["Relu"] == 8 - 3  # of 8 plain Relu sites, the 3 in layer2 were swapped
    before = {n.name: n.op_type for n in onnx.load(str(FIX / "convnet.onnx")).graph.node}
    after = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert after == {name: ("LeakyRelu" if name.startswith("/layer2/Relu") else op) for name, op in before.items()}


# --- hand-built cases: subgraphs, opset 9, float16, Clip kinds, external data ----------------------


@pytest.mark.parametrize("name", ["subgraphs", "recurrent", "opset9", "float16", "sitekinds"])
def test_hand_built_cases(name: str, tmp_path: Path) -> None:
    data = case_data(name, tmp_path)
    model = ONNX_DIR / f"{name}.onnx"
    leaky = fix(model, data, tmp_path / "leaky.onnx", to="leaky", slope=0.0)
    assert leaky.deviation.max_abs == 0.0
    assert_valid(tmp_path / "leaky.onnx", model)
    assert ops(tmp_path / "leaky.onnx")["LeakyRelu"] == ops(model)["LeakyRelu"] + len(leaky.plan)
    revive = fix(model, data, tmp_path / "revive.onnx", to="bn", bn_init="revive")
    assert_valid(tmp_path / "revive.onnx", model)
    assert ops(tmp_path / "revive.onnx")["BatchNormalization"] == ops(model)["BatchNormalization"] + len(revive.plan)
    for change in revive.changes:
        assert change.dead_after == len(change.zero_variance_units), change
    if name == "subgraphs":  # the If branches and the Loop body were rewritten in place
        assert [f.site for f in leaky.plan] == ["then_relu", "else_relu", "loop_relu"]
    if name == "sitekinds":  # Clip(0, 6) and Clip(0, 3) keep their caps; their bounds are gone
        caps = initializers(tmp_path / "leaky.onnx", "deadrelu_cap_value")
        assert sorted(float(v) for v in caps.values()) == [3.0, 6.0]
        written = onnx.load(str(tmp_path / "leaky.onnx"))
        read = {i for n in written.graph.node for i in n.input}
        assert all(t.name in read for t in written.graph.initializer)


def test_external_data_in_and_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_file = ONNX_DIR / "external.onnx.data"
    before = data_file.read_bytes()
    data = case_data("external", tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out" / "fixed.onnx"
    result = fix(ONNX_DIR / "external.onnx", data, out, to="prelu", slope=0.0)
    assert result.deviation.max_abs == 0.0
    assert data_file.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fixed.onnx", "fixed.onnx.data"]
    assert not any((tmp_path / "cwd").iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.parent.iterdir()} == {0o666 & ~umask}  # ordinary files
    assert_valid(out, ONNX_DIR / "external.onnx")
    written = onnx.load(str(out), load_external_data=False)
    external = [t for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(external) == 4
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"fixed.onnx.data"}
    assert (tmp_path / "out" / "fixed.onnx.data").stat().st_size == len(before)
    # loaded with its data, the weights are the original's
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ONNX_DIR / "external.onnx")).graph.initializer}
    for tensor in onnx.load(str(out)).graph.initializer:
        if tensor.name in original:
            np.testing.assert_array_equal(numpy_helper.to_array(tensor), original[tensor.name])


def test_external_data_never_overwrites_the_inputs_data_file(tmp_path: Path) -> None:
    shutil.copy(ONNX_DIR / "external.onnx", tmp_path / "model.onnx")  # still reads external.onnx.data
    shutil.copy(ONNX_DIR / "external.onnx.data", tmp_path / "external.onnx.data")
    loaded = load_model(tmp_path / "model.onnx")
    plan = (SiteFix("relu1", 0, "relu", 1, 12, (5,), "leaky", "test"),)
    with pytest.raises(UsageError, match="external.onnx.data, which is a file of the input model"):
        rewrite_onnx(loaded, plan, {}, RewriteOptions(), tmp_path / "external.onnx")
    assert (tmp_path / "external.onnx.data").read_bytes() == (ONNX_DIR / "external.onnx.data").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external.onnx.data", "model.onnx"]


def test_a_plan_that_does_not_match_the_graph_is_refused(tmp_path: Path) -> None:
    loaded = load_model(FIX / "mlp.onnx")
    wrong_op = (SiteFix("/layers.1/Relu", 0, "relu6", 1, 64, (), "leaky", "test"),)
    with pytest.raises(RewriteError, match=r"site /layers.1/Relu \(#0, relu6\) does not match the graph \(relu there\)"):
        rewrite_onnx(loaded, wrong_op, {}, RewriteOptions(), tmp_path / "o.onnx")
    missing = (SiteFix("nowhere", 5, "relu", 1, 64, (), "leaky", "test"),)
    with pytest.raises(RewriteError, match="nothing there"):
        rewrite_onnx(loaded, missing, {}, RewriteOptions(), tmp_path / "o.onnx")
    assert not any(tmp_path.iterdir())


# --- the command line ------------------------------------------------------------------------------


def cli(*args: object):
    return CliRunner().invoke(app, ["fix", *map(str, args)], env={"COLUMNS": "200"})


def test_cli_apply_writes_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = cli(FIX / "mlp.onnx", "--data", FIX / "mlp.calib.npy", "--to", "prelu", "--apply", "-o", out,
                 "--json", tmp_path / "fix.json")
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}" in result.stdout
    assert "Verification" in result.stdout and "top-1 agreement" in result.stdout
    doc = json.loads((tmp_path / "fix.json").read_text())
    assert doc["output"] == str(out) and [s["dead_before"] for s in doc["verification"]["sites"]] == [2, 1]
    assert doc["class_changes"] == [] and doc["state_dict"] is None
    assert_valid(out, FIX / "mlp.onnx")
    assert ops(out)["PRelu"] == 2


def test_refusals(tmp_path: Path) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes((FIX / "mlp.onnx").read_bytes())
    same = cli(copy, "--data", FIX / "mlp.calib.npy", "--apply", "-o", copy)
    assert same.exit_code == 2 and "never overwrites" in same.stderr
    assert copy.read_bytes() == (FIX / "mlp.onnx").read_bytes()
    glob = cli(copy, "--data", FIX / "mlp.calib.npy", "--sites", "nothing.*")
    assert glob.exit_code == 2 and "matches no site" in glob.stderr
    report = tmp_path / "convnet.json"
    scanned = CliRunner().invoke(app, ["scan", str(FIX / "convnet.onnx"), "--data", str(FIX / "convnet.calib.npy"),
                                       "--json", str(report)])
    assert scanned.exit_code == 0
    other = cli(copy, "--report", report)
    assert other.exit_code == 2 and "another model" in other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convnet.json", "m.onnx"]


def test_saved_report_of_the_same_model_is_used(tmp_path: Path) -> None:
    report = tmp_path / "mlp.json"
    CliRunner().invoke(app, ["scan", str(FIX / "mlp.onnx"), "--data", str(FIX / "mlp.calib.npy"), "--json", str(report)])
    result = cli(FIX / "mlp.onnx", "--report", report, "--to", "leaky", "--apply", "-o", tmp_path / "o.onnx", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [p["site"] for p in doc["plan"]] == ["/layers.1/Relu", "/layers.3/Relu"]
    assert [s["dead_after"] for s in doc["verification"]["sites"]] == [2, 1]


def test_nothing_to_do(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.full(4, 10.0, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "alive", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w, b])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    str(tmp_path / "alive.onnx"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    result = cli(tmp_path / "alive.onnx", "--data", tmp_path / "x.npy", "--batch-size", "2", "--apply",
                 "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "Nothing to fix" in result.stdout
    assert not (tmp_path / "o.onnx").exists()


def test_onnx_sites_say_whether_a_normalisation_feeds_them(tmp_path: Path) -> None:
    """A BatchNormalization node between producer and ReLU makes the planner choose LeakyReLU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deadrelu import ScanOptions, scan
    from deadrelu.fix.plan import PlanOptions, plan_fixes

    c = 3
    w = numpy_helper.from_array(np.eye(c, dtype=np.float32).reshape(c, c, 1, 1), "w")
    scale, bias = numpy_helper.from_array(np.ones(c, np.float32), "s"), numpy_helper.from_array(np.array([0, 0, -50], np.float32), "b")
    mean, var = numpy_helper.from_array(np.zeros(c, np.float32), "m"), numpy_helper.from_array(np.ones(c, np.float32), "v")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="after_bn"),
             helper.make_node("Conv", ["r", "w"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["y"], name="after_conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 4, 4])],
                              [w, scale, bias, mean, var])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, c, 4, 4)).astype(np.float32))
    report = scan(tmp_path / "m.onnx", tmp_path / "x.npy", ScanOptions(device="cpu"))
    assert [s.extra["normalised_input"] for s in report.sites] == [True, False]
    plan = plan_fixes(report, PlanOptions(sites=("after_bn", "after_conv")))
    assert [f.change for f in plan] == ["leaky", "bn"]
