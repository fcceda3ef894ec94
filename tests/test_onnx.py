"""ONNX models: loading, sites and axes, in-graph statistics, data feeds, errors.

References are independent of deadrelu's in-graph reductions: the PyTorch scan and the
eager brute force for the exported fixtures; for the hand-built cases, the unmodified model
run by ONNX Runtime with every optimisation off and its pre-activations exposed as outputs,
reduced with numpy in float64 (subgraph bodies are recomputed in numpy).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bruteforce
from deadrelu import ScanOptions, scan
from deadrelu.cli import app
from deadrelu.data import ModelInput
from deadrelu.errors import DataError, ModelLoadError, UsageError
from deadrelu.load import load_model
from deadrelu.load.onnx_format import OnnxModel, initializer_spans, load_onnx
from deadrelu.onnx_sites import GraphIndex, survey, trace_axis
from deadrelu.probe import onnx_emit, onnx_graph, onnx_probe
from deadrelu.probe.onnx_probe import SessionFactory, execution_providers, scan_batches
from reference import unit_stats

FIX = Path(__file__).resolve().parent.parent / "fixtures"
ONNX_DIR = FIX / "onnx"
EXPORTED = ("convnet", "seqnet", "mlp")
CASES = json.loads((FIX / "expected.json").read_text())["onnx_cases"]
BATCH = 16
CPU = ["CPUExecutionProvider"]


# --- helpers ---------------------------------------------------------------------------------


def options(**kwargs: Any) -> ScanOptions:
    return ScanOptions(device="cpu", batch_size=BATCH, **kwargs)


def case_arrays(name: str, samples: int = 64) -> dict[str, np.ndarray]:
    """Seeded calibration data for a hand-built case (see fixtures/expected.json)."""
    case = CASES[name]
    if case["calib"]:
        return {next(iter(case["inputs"])): np.load(FIX / case["calib"])}
    rng = np.random.default_rng(sum(map(ord, name)))
    arrays = {}
    for key, (shape, dtype) in case["inputs"].items():
        if dtype == "int64":
            arrays[key] = rng.integers(0, 10, (samples, *shape))
        else:
            arrays[key] = rng.standard_normal((samples, *shape)).astype(dtype)
    if name == "subgraphs":  # feature 0's sign alternates per batch: both If branches run
        sign = np.where(np.arange(samples) // BATCH % 2 == 0, 1.0, -1.0)
        arrays["x"][:, 0] = np.abs(arrays["x"][:, 0]) * sign
    return arrays


def write_data(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    if len(arrays) == 1:
        path = folder / "calib.npy"
        np.save(path, next(iter(arrays.values())))
    else:
        path = folder / "calib.npz"
        np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def case_report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Scan of a hand-built case on its data (each case scanned once per module)."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            data = write_data(tmp_path_factory.mktemp(name), case_arrays(name))
            cache[name] = scan(ONNX_DIR / f"{name}.onnx", data, options())
        return cache[name]

    return get


def exposed_preacts(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]],
                    optimised: bool = False) -> list[np.ndarray]:
    """The named tensors of an unmodified model (optimisations off unless `optimised`: then
    the values the scan's optimised session computes), concatenated over batches."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in tensors:
        model.graph.output.append(helper.ValueInfoProto(name=name))
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised
                                                else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), session_options, providers=CPU)
    runs = [session.run(tensors, feed) for feed in feeds]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(tensors))]


def batched_feeds(arrays: dict[str, np.ndarray], dtypes: dict[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    total = len(next(iter(arrays.values())))
    dtypes = dtypes or {}
    return [{k: v[i:i + BATCH].astype(dtypes.get(k, v.dtype)) for k, v in arrays.items()}
            for i in range(0, total, BATCH)]


def assert_stats(site: Any, ref: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-5) -> None:
    s = site.stats
    np.testing.assert_array_equal(s.count, ref["count"], err_msg=site.name)
    np.testing.assert_array_equal(s.positive, ref["positive"], err_msg=site.name)
    np.testing.assert_array_equal(s.nan, ref["nan"], err_msg=site.name)
    np.testing.assert_array_equal(s.inf, ref["inf"], err_msg=site.name)
    np.testing.assert_allclose(s.minimum, ref["min"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.maximum, ref["max"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.mean, ref["mean"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.std, ref["std"], rtol=rtol, atol=atol, err_msg=site.name)
    np.testing.assert_allclose(s.relu_mean, ref["relu_mean"], rtol=rtol, atol=atol, err_msg=site.name)


def site_preact(model: onnx.ModelProto, site_name: str) -> str:
    return next(s.preact for s in survey(model).sites if s.name == site_name)


def tiny_model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any] = (),
               opset: int = 17, **kwargs: Any) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *kwargs.pop("extra_opsets", [])],
                             ir_version=8, **kwargs)


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save_model(model, str(path))
    return path


def stream(model_path: Path, batches: list[ModelInput], optimise: bool = True):
    return scan_batches(load_onnx(model_path), iter(batches), CPU, optimise=optimise)


# --- the exported fixtures: parity with the PyTorch scan and the brute force -----------------


ROUNDING_BAND = 1e-5  # of a unit's largest |pre-activation|: float32 convolutions of two engines differ there


@functools.cache
def eager_unit_matrices(name: str) -> tuple[np.ndarray, ...]:
    """The eager PyTorch fixture's pre-activations per site, as (positions, units) float64."""
    recorded = bruteforce.record_preactivations(bruteforce.load_eager_model(name), bruteforce.load_calibration(name))
    return tuple(bruteforce.unit_matrix(preact, axis) for axis, preact in recorded.values())


def assert_positive_counts_up_to_rounding(got: np.ndarray, matrix: np.ndarray, site: str) -> None:
    """ONNX Runtime's and PyTorch's float32 kernels round differently, so a pre-activation
    within rounding of 0 may fall on either side of it. Every count must lie between the
    count of values clearly above 0 and the count of values not clearly below 0 (the
    eager values within `ROUNDING_BAND` of 0 are a handful per site), and the dead
    units (no value > 0) must be the same."""
    band = ROUNDING_BAND * np.abs(matrix).max(axis=0)
    clearly_positive = (matrix > band).sum(axis=0)
    not_clearly_negative = (matrix > -band).sum(axis=0)
    outside = np.flatnonzero((got < clearly_positive) | (got > not_clearly_negative))
    assert outside.size == 0, (f"{site}: positive counts of units {outside.tolist()} are {got[outside].tolist()}, "
                               f"outside [{clearly_positive[outside].tolist()}, {not_clearly_negative[outside].tolist()}]")
    np.testing.assert_array_equal(got == 0, (matrix > 0).sum(axis=0) == 0, err_msg=site)


@functools.cache
def pair(name: str, batch_size: int = BATCH):
    calib = FIX / f"{name}.calib.npy"
    opts = ScanOptions(device="cpu", batch_size=batch_size)
    return scan(FIX / f"{name}.onnx", calib, opts), scan(FIX / f"{name}.ts.pt", calib, opts)


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_fixture_matches_pytorch_scan(name: str) -> None:
    onnx_report, torch_report = pair(name)
    assert onnx_report.model.format == "onnx"
    assert len(onnx_report.sites) == len(torch_report.sites)
    matrices = eager_unit_matrices(name)
    assert len(matrices) == len(onnx_report.sites)
    for got, want, matrix in zip(onnx_report.sites, torch_report.sites, matrices):  # matched by execution order
        assert (got.op, got.units, got.unit_axis, got.axis_source) == \
            (want.op, want.units, want.unit_axis, want.axis_source), (got.name, want.name)
        assert got.verdict == want.verdict, (got.name, want.name)
        assert_positive_counts_up_to_rounding(got.stats.positive, matrix, got.name)
        np.testing.assert_array_equal(got.stats.count, want.stats.count, err_msg=got.name)
        for field in ("minimum", "maximum", "mean", "std", "relu_mean"):
            np.testing.assert_allclose(getattr(got.stats, field), getattr(want.stats, field), rtol=1e-5, atol=1e-4,
                                       err_msg=f"{got.name} {field}")
    assert onnx_report.summary()["dead"] == torch_report.summary()["dead"]


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_fixture_matches_brute_force(name: str, expected: dict) -> None:
    report, _ = pair(name)
    truth = bruteforce.bruteforce(name)
    planted = [s["dead_units"] for s in expected["models"][name]["sites"]]
    assert [list(s.verdict.dead) for s in report.sites] == [t["dead_units"] for t in truth] == planted
    assert [list(s.verdict.near_dead) for s in report.sites] == [t["near_dead_units"] for t in truth]
    for site, ref, matrix in zip(report.sites, truth, eager_unit_matrices(name), strict=True):
        unit = ref["per_unit"]
        assert_positive_counts_up_to_rounding(site.stats.positive, matrix, site.name)
        np.testing.assert_allclose(site.stats.mean, unit["mean"], rtol=1e-5, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(site.stats.std, unit["std"], rtol=1e-5, atol=1e-4, err_msg=site.name)
        np.testing.assert_allclose(site.stats.relu_mean, unit["relu_mean"], rtol=1e-5, atol=1e-5, err_msg=site.name)
        extra = site.extra["onnx"]
        assert extra["preact_tensor"] and extra["node"] == site.name and extra["axis_reason"]


def test_batch_size_does_not_change_results() -> None:
    """Another batch size may change how ORT's float32 GEMMs round (not what a unit sees):
    the same positions are counted, the dead sets are equal, and each positive count lies
    within rounding of the eager PyTorch values."""
    a, _ = pair("convnet", 16)
    b, _ = pair("convnet", 7)
    for x, y, matrix in zip(a.sites, b.sites, eager_unit_matrices("convnet"), strict=True):
        assert x.verdict == y.verdict
        np.testing.assert_array_equal(x.stats.count, y.stats.count, err_msg=x.name)
        for report in (x, y):
            assert_positive_counts_up_to_rounding(report.stats.positive, matrix, x.name)
        np.testing.assert_allclose(x.stats.mean, y.stats.mean, rtol=1e-6, atol=1e-6)
        # the model's own float32 outputs round differently with another batch size
        np.testing.assert_allclose(x.stats.m2, y.stats.m2, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("path", [FIX / "convnet.onnx", ONNX_DIR / "sitekinds.onnx"], ids=["convnet", "sitekinds"])
def test_graph_optimisations_do_not_change_the_watched_tensors(path: Path) -> None:
    """ORT fuses Conv+Relu and BN into Conv when it can: the taps must prevent it. The
    unoptimised scan counts exactly what the unmodified, unoptimised model computes; a
    folded BatchNorm may round a value near 0 the other way, so the optimised scan's
    positive counts are checked up to rounding of those values."""
    shape = [4, 6, 6] if "sitekinds" in path.name else [3, 16, 16]
    data = np.random.default_rng(5).standard_normal((48, *shape)).astype(np.float32)
    batches = [ModelInput((torch.from_numpy(data[i:i + BATCH]),)) for i in range(0, 48, BATCH)]
    optimised, reference = stream(path, batches), stream(path, batches, optimise=False)
    assert [s.name for s in optimised.sites] == [s.name for s in reference.sites]
    model = onnx.load(str(path))
    input_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    tensors = [site.extra["onnx"]["preact_tensor"] for site in reference.sites]
    preacts = exposed_preacts(model, tensors, [{input_name: data[i:i + BATCH]} for i in range(0, 48, BATCH)])
    for got, want, preact in zip(optimised.sites, reference.sites, preacts, strict=True):
        matrix = bruteforce.unit_matrix(preact, want.axis)
        np.testing.assert_array_equal(want.stats.positive, (matrix > 0).sum(axis=0), err_msg=want.name)
        assert_positive_counts_up_to_rounding(got.stats.positive, matrix, got.name)
        for field in ("minimum", "maximum", "mean", "m2", "relu_sum"):
            np.testing.assert_allclose(getattr(got.stats, field), getattr(want.stats, field), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{got.name} {field}")


def test_json_document_has_the_same_fields_as_pytorch(tmp_path: Path) -> None:
    onnx_report, torch_report = pair("convnet")
    onnx_doc, torch_doc = json.loads(onnx_report.to_json()), json.loads(torch_report.to_json())
    assert onnx_doc["model"]["format"] == "onnx"
    assert set(onnx_doc) == set(torch_doc)
    assert set(onnx_doc["sites"][0]) - set(torch_doc["sites"][0]) == {"onnx"}
    assert set(onnx_doc["sites"][0]["per_unit"]) == set(torch_doc["sites"][0]["per_unit"])
    jsonschema = pytest.importorskip("jsonschema")
    from deadrelu.report import json_schema

    jsonschema.validate(onnx_doc, json_schema())


def test_cli_scans_an_onnx_model(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["scan", str(FIX / "mlp.onnx"), "--data", str(FIX / "mlp.calib.npy"),
                                      "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code in (0, 1), result.output
    doc = json.loads(out.read_text())
    assert doc["model"]["format"] == "onnx"
    assert [s["dead_units"] for s in doc["sites"]] == [[3, 40], [17]]
    assert doc["sites"][0]["onnx"]["preact_tensor"] == "/layers.0/Gemm_output_0"


# --- hand-built cases: sites, axes, findings, statistics ------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_case_sites_axes_and_planted_dead_units(name: str, case_report: Any) -> None:
    report = case_report(name)
    got = [(s.name, s.op, s.unit_axis, s.axis_source, list(s.verdict.dead)) for s in report.sites]
    want = [(s["name"], s["op"], s["axis"], s["axis_source"], s["dead_units"]) for s in CASES[name]["sites"]]
    assert got == want
    for note in CASES[name]["notes"]:
        assert any(note in w for w in report.warnings), (note, report.warnings)


@pytest.mark.parametrize("name", ["sitekinds", "opset9", "external", "dynamic", "multi_input", "float16", "constants"])
def test_case_statistics_match_the_unmodified_model(name: str, case_report: Any) -> None:
    report = case_report(name)
    model = onnx.load(str(ONNX_DIR / f"{name}.onnx"))
    inputs = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    feeds = batched_feeds(case_arrays(name), inputs)
    preacts = exposed_preacts(model, [site_preact(model, s.name) for s in report.sites], feeds)
    tolerance = 2e-3 if name == "float16" else 1e-5
    for site, preact in zip(report.sites, preacts):
        assert_stats(site, unit_stats(preact.astype(np.float32), site.unit_axis), rtol=tolerance, atol=tolerance)


def _relu_layer_weights(model: onnx.ModelProto, relu: str) -> tuple[np.ndarray, np.ndarray]:
    """W and b of a MatMul + Add + Relu named `relu` (fixtures' _relu_layer)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {}

    def collect(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            nodes[node.name] = node
            for attr in node.attribute:
                if attr.HasField("g"):
                    collect(attr.g)

    collect(model.graph)
    matmul = next(n for name, n in nodes.items() if name.startswith(f"{relu}_mm"))
    add = next(n for name, n in nodes.items() if name.startswith(f"{relu}_pre"))
    return values[matmul.input[1]], values[add.input[1]]


def test_subgraph_statistics_match_numpy(case_report: Any) -> None:
    """If branches and a Loop body, recomputed in numpy (inner If: not scanned, but run)."""
    report = case_report("subgraphs")
    model = onnx.load(str(ONNX_DIR / "subgraphs.onnx"))
    x = case_arrays("subgraphs")["x"].astype(np.float64)
    layer = {name: _relu_layer_weights(model, name) for name in ("then_relu", "else_relu", "loop_relu", "inner_relu")}
    pre: dict[str, list[np.ndarray]] = {"then_relu": [], "else_relu": [], "loop_relu": []}
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        branch = "then_relu" if batch[:, 0].astype(np.float32).sum() > 0 else "else_relu"
        w, b = layer[branch]
        pre[branch].append(batch @ w + b)
        h = np.maximum(pre[branch][-1], 0)
        for i in range(3):
            w, b = layer["loop_relu"]
            pre["loop_relu"].append(h @ w + b)
            h = np.maximum(pre["loop_relu"][-1], 0)
            if i % 2:
                w, b = layer["inner_relu"]
                h = np.maximum(h @ w + b, 0)
    for site in report.sites:
        assert_stats(site, unit_stats(np.concatenate(pre[site.name]), 1), rtol=1e-4, atol=1e-4)
    assert site.extra["onnx"]["subgraph"] == "Loop 'repeat' body"


def test_recurrent_statistics(case_report: Any) -> None:
    """LSTM hidden state as (T, N, H): units along H; a Scan body recomputed in numpy."""
    report = case_report("recurrent")
    model = onnx.load(str(ONNX_DIR / "recurrent.onnx"))
    x = case_arrays("recurrent")["x"]
    (lstm_h,) = exposed_preacts(model, ["lstm_h"], batched_feeds({"x": x}))
    lstm, scan_site = report.sites
    assert lstm.units == 6 and "LSTM 'lstm'" in lstm.extra["onnx"]["axis_reason"]
    assert_stats(lstm, unit_stats(lstm_h, 2))
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    body = next(a.g for n in model.graph.node if n.op_type == "Scan" for a in n.attribute if a.name == "body")
    weight = {n.name: values[n.input[1]] for n in body.node if n.name in ("xw", "su", "pre")}
    state, pres = np.zeros((len(x), 4)), []
    for t in range(x.shape[1]):
        pres.append(x[:, t].astype(np.float64) @ weight["xw"] + state @ weight["su"] + weight["pre"])
        state = np.maximum(pres[-1], 0)
    batches = [np.stack(pres)[:, i:i + BATCH].reshape(-1, 4) for i in range(0, len(x), BATCH)]
    assert_stats(scan_site, unit_stats(np.concatenate(batches), 1), rtol=1e-4, atol=1e-4)


def test_an_if_branch_that_never_runs_is_reported(tmp_path: Path) -> None:
    x = np.abs(np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32))
    report = scan(ONNX_DIR / "subgraphs.onnx", write_data(tmp_path, {"x": x}), options())
    assert [s.name for s in report.sites] == ["then_relu", "loop_relu"]
    assert any("'else_relu'" in w and "never ran" in w for w in report.warnings)


def test_site_kinds_in_the_json(case_report: Any) -> None:
    report = case_report("sitekinds")
    doc = {s["name"]: s for s in report.to_dict()["sites"]}
    assert doc["capped"]["onnx"]["clip"] == {"min": 0.0, "max": 3.0}
    assert doc["relu6"]["onnx"]["clip"] == {"min": 0.0, "max": 6.0}
    assert doc["clipmin_out"]["onnx"]["node"] == "" and doc["clipmin_out"]["onnx"]["clip"]["max"] is None
    assert doc["relu_bn"]["onnx"]["axis_reason"] == "dim 1 (channels) of Conv 'conv_bn', through BatchNormalization"
    assert doc["leaky"]["onnx"]["axis_reason"].endswith("through Mul, Add")
    assert doc["leaky"]["leaky"] and doc["prelu"]["leaky"]
    assert "hardswish_clip" not in doc and "hardsigmoid_clip" not in doc and "hardtanh" not in doc


# --- the fast in-graph reductions: each path against the brute force ---------------------------


def _paths_model(opset: int, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Three sites, one per reduction layout: a convolution's NCHW output (32 channels, so
    ONNX Runtime runs it in its blocked NCHWc layout; one channel biased to be dead, one
    far from zero), a (N, F) matmul output, and a (N, T, F) output with units last."""
    rng = np.random.default_rng(11)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    bias = rng.standard_normal(32) * 0.1
    bias[3], bias[7] = -50.0, 50.0

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    nodes = [
        helper.make_node("Relu", ["mm"], ["mm_out"], name="dense_relu"),
        helper.make_node("MatMul", ["seq", "ws"], ["sm"], name="seq_mm"),
        helper.make_node("Relu", ["sm"], ["seq_out"], name="seq_relu"),
    ]
    inits = [const("wd", rng.standard_normal((6, 5))), const("ws", rng.standard_normal((4, 3)))]
    inputs = [_value("dense", ["n", 6], elem), _value("seq", ["n", 7, 4], elem)]
    outputs = [_value("mm_out", ["n", 5], elem), _value("seq_out", ["n", 7, 3], elem)]
    nodes.insert(0, helper.make_node("MatMul", ["dense", "wd"], ["mm"], name="dense_mm"))
    if elem == TensorProto.FLOAT:  # ONNX Runtime's CPU Conv takes float only
        nodes[:0] = [helper.make_node("Conv", ["image", "wc", "bc"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
                     helper.make_node("Relu", ["conv"], ["conv_out"], name="conv_relu")]
        inits += [const("wc", rng.standard_normal((32, 16, 3, 3)) * 0.1), const("bc", bias)]
        inputs.insert(0, _value("image", ["n", 16, 6, 6], elem))
        outputs.insert(0, _value("conv_out", ["n", 32, 6, 6], elem))
    return tiny_model(nodes, inputs, outputs, inits, opset=opset)


@pytest.mark.parametrize("opset, elem", [(17, TensorProto.FLOAT), (13, TensorProto.FLOAT), (17, TensorProto.DOUBLE)],
                         ids=["batchnorm-float", "opset13-float", "batchnorm-double"])
def test_every_reduction_path_matches_the_brute_force(tmp_path: Path, opset: int, elem: int) -> None:
    """Opset 14+ takes mean and variance from one training-mode BatchNormalization (of the
    transposed rows when the units are last, where max and min read those rows too), and
    the ReLU mean of a 4-D site from a GlobalAveragePool of the Relu's own output; opset
    13 takes Mean/Sub/Mul. Each path must
    give exact positive counts, dead sets and extremes, and close moments, over several
    batches (the host folds per-element variances and ReLU means back to sums)."""
    model = _paths_model(opset, elem)
    path = save(model, tmp_path)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(12)
    arrays = {"dense": rng.standard_normal((40, 6)), "seq": rng.standard_normal((40, 7, 4))}
    if elem == TensorProto.FLOAT:
        arrays["image"] = rng.standard_normal((40, 16, 6, 6))
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    feeds = batched_feeds(arrays)
    result = stream(path, [ModelInput((), {k: torch.from_numpy(v) for k, v in feed.items()}) for feed in feeds])
    sites = {s.name: s for s in result.sites}
    names = [s.name for s in survey(model).sites]
    assert list(sites) == names
    # optimised: a fused, blocked-layout convolution rounds differently from the plain one
    preacts = exposed_preacts(model, [site_preact(model, n) for n in names], feeds, optimised=True)
    axes = {"conv_relu": 1, "dense_relu": 1, "seq_relu": 2}
    for name, preact in zip(names, preacts):
        site, ref = sites[name], unit_stats(preact, axes[name])
        assert site.axis == axes[name]
        np.testing.assert_array_equal(site.stats.minimum, ref["min"], err_msg=name)
        np.testing.assert_array_equal(site.stats.maximum, ref["max"], err_msg=name)
        assert_stats(SimpleNamespace(name=name, stats=site.stats), ref, rtol=1e-5 if elem == TensorProto.FLOAT else 1e-9)
    if elem == TensorProto.FLOAT:
        assert list(np.flatnonzero(sites["conv_relu"].stats.positive == 0)) == [3]


@pytest.mark.parametrize("path_kind", ["operators", "kernel"])
def test_units_far_from_zero_keep_their_std(tmp_path: Path, path_kind: str) -> None:
    """Units with |mean| / std near 1e6 (std 0.01 at 1e4): the fast graph's float32 batch
    moments were 0.1-0.4% off there; those batches take the masked graph's corrected
    two-pass moments, in float64. Conv (BatchNormalization moments) and Gemm sites."""
    rng = np.random.default_rng(5)
    conv_bias = np.array([-1e4, 1e4, 0.5, -3.0], np.float32)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.003).astype(np.float32), "wc"),
             numpy_helper.from_array(conv_bias, "bc"),
             numpy_helper.from_array((rng.standard_normal((4, 3)) * 0.01).astype(np.float32), "wd"),
             numpy_helper.from_array(np.array([-1e4, 2e4, 0.5], np.float32), "bd")]
    model = tiny_model(
        [helper.make_node("Conv", ["image", "wc", "bc"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["conv_out"], name="conv_relu"),
         helper.make_node("Gemm", ["dense", "wd", "bd"], ["mm"], name="dense"),
         helper.make_node("Relu", ["mm"], ["mm_out"], name="dense_relu")],
        [_value("image", ["n", 3, 5, 5]), _value("dense", ["n", 4])],
        [_value("conv_out", ["n", 4, 5, 5]), _value("mm_out", ["n", 3])], inits)
    path = save(model, tmp_path)
    arrays = {"image": rng.standard_normal((96, 3, 5, 5)).astype(np.float32),
              "dense": rng.standard_normal((96, 4)).astype(np.float32)}
    feeds = batched_feeds(arrays)
    batches = [ModelInput((), {k: torch.from_numpy(v) for k, v in feed.items()}) for feed in feeds]
    preacts = exposed_preacts(model, ["conv", "mm"], feeds, optimised=True)
    kernel = None
    if path_kind == "kernel":
        kernel = onnx_probe.kernel_library().path
        if kernel is None:
            pytest.skip("deadrelu's ONNX kernel cannot be built here")
    result = scan_batches(load_onnx(path), iter(batches), CPU, kernel=kernel)
    for site, preact in zip(result.sites, preacts):
        ref = unit_stats(preact, 1)
        assert (np.abs(ref["mean"]) / ref["std"]).max() > 5e5  # the case this is about
        np.testing.assert_allclose(site.stats.std, ref["std"], rtol=1e-6, err_msg=site.name)
        np.testing.assert_allclose(site.stats.mean, ref["mean"], rtol=1e-9, atol=1e-9, err_msg=site.name)
        np.testing.assert_array_equal(site.stats.positive, ref["positive"], err_msg=site.name)


def test_the_fast_graph_reads_the_relu_output_and_takes_moments_from_one_batch_norm() -> None:
    """What makes the fast path cheap, checked on the rewritten graph: no float64 cast of
    a pre-activation, one BatchNormalization (training mode, momentum 0) per site, the
    units-last sites transposed once to units-first rows, the ReLU mean of the 4-D site
    pooled from the Relu's own output, and BatchNormalization parameters computed in
    the run (from the positive count), never constants: ORT writes its running
    statistics into them."""
    model = _paths_model(17)
    loaded = OnnxModel(model, Path("paths.onnx"), 17)
    plans = [onnx_emit.SitePlan(i, site, site.rank, site.axis.resolve(site.rank)) for i, site in enumerate(survey(model).sites)]
    head, _ = onnx_graph.Rewriter(loaded, plans, onnx_emit.emit_fast).head()
    added = [n for n in head.graph.node if n.name.startswith(onnx_emit.PREFIX)]
    assert not [n for n in added if n.op_type == "Cast" and helper.get_attribute_value(n.attribute[0]) == TensorProto.DOUBLE]
    norms = [n for n in added if n.op_type == "BatchNormalization"]
    assert len(norms) == 3
    assert sorted(n.input[0] for n in added if n.op_type == "Transpose") == ["mm", "sm"]  # units last
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute} == {"training_mode": 1, "momentum": 0.0}
               for n in norms)
    assert [n.input[0] for n in added if n.op_type == "GlobalAveragePool"] == ["conv_out"]
    assert not [n for n in added if n.op_type in ("ConstantOfShape", "Slice")]
    constants = {o for n in head.graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {i.name for i in head.graph.initializer}
    assert all(n.input[3] not in constants and n.input[4] not in constants for n in norms)


def test_batch_norm_moments_inside_loop_and_if_bodies(case_report: Any, tmp_path: Path) -> None:
    """The subgraph fixture (opset 13, Mean/Sub/Mul path) raised to opset 17: the same
    statistics from BatchNormalization nodes placed inside If branches and a Loop body."""
    model = onnx.load(str(ONNX_DIR / "subgraphs.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    data = write_data(tmp_path, case_arrays("subgraphs"))
    raised = scan(save(model, tmp_path, "subgraphs17.onnx"), data, options())
    loaded = load_onnx(tmp_path / "subgraphs17.onnx")
    found = survey(loaded.proto).sites
    plans = [onnx_emit.SitePlan(i, s, s.rank, s.axis.resolve(s.rank)) for i, s in enumerate(found) if not s.obstacle()]
    head, _ = onnx_graph.Rewriter(loaded, plans, onnx_emit.emit_fast).head()
    assert "BatchNormalization" in str(head.graph)  # inside the bodies
    original = case_report("subgraphs")
    assert [s.name for s in raised.sites] == [s.name for s in original.sites]
    for got, want in zip(raised.sites, original.sites):
        np.testing.assert_array_equal(got.stats.positive, want.stats.positive, err_msg=got.name)
        np.testing.assert_array_equal(got.stats.count, want.stats.count, err_msg=got.name)
        for field in ("minimum", "maximum", "mean", "m2", "relu_sum"):
            np.testing.assert_allclose(getattr(got.stats, field), getattr(want.stats, field), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{got.name} {field}")


def test_model_weights_equal_to_batch_norm_parameters_are_not_overwritten(tmp_path: Path) -> None:
    """ONNX Runtime's training-mode BatchNormalization writes its running mean and
    variance into its input_mean and input_var buffers. They used to be constant ones
    and zeros, which ORT shares with an equal initializer of the model: a LayerNorm's
    scale (ones) and bias (zeros) were overwritten by the previous site's moments, and
    the next site read wrong values (false dead units). Checked with ORT's operators
    (the fast graph), at the optimisation level the scan runs, against the unmodified
    model's tensors."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 7)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(7).astype(np.float32), "b"),
             numpy_helper.from_array(np.ones(7, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(7, np.float32), "ln_bias")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["fc"], name="fc"),
             helper.make_node("Relu", ["fc"], ["h"], name="relu1"),
             helper.make_node("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1),
             helper.make_node("Relu", ["ln"], ["y"], name="relu2")]
    model = tiny_model(nodes, [_value("x", ["n", 6, 4])], [_value("y", ["n", 6, 7])], inits)
    path = save(model, tmp_path)
    data = rng.standard_normal((20, 6, 4)).astype(np.float32)
    feeds = [{"x": data[i:i + 4]} for i in range(0, 20, 4)]
    batches = [ModelInput((torch.from_numpy(f["x"]),)) for f in feeds]
    loaded = load_onnx(path)
    found = survey(loaded.proto).sites
    plans = [onnx_emit.SitePlan(i, s, s.rank, s.axis.resolve(s.rank)) for i, s in enumerate(found)]
    head, _ = onnx_graph.Rewriter(loaded, plans, onnx_emit.emit_fast).head()
    assert sum(n.op_type == "BatchNormalization" for n in head.graph.node) == 2  # the path under test
    result = scan_batches(loaded, iter(batches), CPU)  # no kernel: ORT's operators
    preacts = exposed_preacts(model, ["fc", "ln"], feeds)
    for site, preact in zip(result.sites, preacts, strict=True):
        assert site.axis == 2
        ref = unit_stats(preact, 2)
        assert ref["positive"].min() > 0  # nothing is dead
        assert_stats(SimpleNamespace(name=site.name, stats=site.stats), ref)


def test_declared_shapes_that_contradict_the_data_do_not_break_the_scan(tmp_path: Path) -> None:
    """A stale value_info (5 units declared as 7, which ONNX Runtime only warns about):
    the unit count is always taken from the data, never from shape inference."""
    w = numpy_helper.from_array(np.random.default_rng(6).standard_normal((6, 5)).astype(np.float32), "w")
    model = tiny_model([helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
                        helper.make_node("Relu", ["mm"], ["y"], name="relu")],
                       [_value("x", ["n", 6])], [_value("y", ["n", 5])], [w])
    model.graph.value_info.append(_value("mm", ["n", 7]))
    x = np.random.default_rng(7).standard_normal((32, 6)).astype(np.float32)
    (site,) = stream(save(model, tmp_path), [ModelInput((torch.from_numpy(x[i:i + BATCH]),)) for i in (0, BATCH)]).sites
    assert site.stats.units == 5
    assert_stats(SimpleNamespace(name="relu", stats=site.stats), unit_stats(x.astype(np.float64) @ numpy_helper.to_array(w), 1),
                 rtol=1e-5, atol=1e-5)


# --- nan / inf --------------------------------------------------------------------------------


def nonfinite_inside(folder: Path, samples: int = 48) -> tuple[Path, onnx.ModelProto, dict[str, np.ndarray]]:
    """The opset-9 fixture with its input divided by a second input ``d`` first, and data
    whose zeros in ``d`` give NaN (0/0), +Inf and -Inf inside the model (calibration data
    itself must be finite)."""
    model = onnx.load(str(ONNX_DIR / "opset9.onnx"))
    for node in model.graph.node:
        node.input[:] = ["x_over_d" if name == "x" else name for name in node.input]
    model.graph.node.insert(0, helper.make_node("Div", ["x", "d"], ["x_over_d"], name="divide"))
    divisor = model.graph.input.add()
    divisor.CopyFrom(model.graph.input[0])
    divisor.name = "d"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((samples, 6)).astype(np.float32)
    d = np.ones((samples, 6), np.float32)
    x[5, 2], d[5, 2] = 0.0, 0.0  # NaN
    x[20, 0], d[20, 0] = 1.0, 0.0  # +Inf
    x[33, :], d[33, :] = -1.0, 0.0  # -Inf in every feature
    folder.mkdir(exist_ok=True)
    return save(model, folder, "nonfinite.onnx"), model, {"x": x, "d": d}


def test_nan_and_inf_are_counted_apart_at_opset_9(tmp_path: Path) -> None:
    """Opset 9 has no IsInf; non-finite batches go through the masked reductions."""
    path, model, arrays = nonfinite_inside(tmp_path)
    report = scan(path, write_data(tmp_path, arrays), options())
    preacts = exposed_preacts(model, [site_preact(model, s.name) for s in report.sites], batched_feeds(arrays))
    for site, preact in zip(report.sites, preacts):
        ref = unit_stats(preact, 1)
        assert ref["nan"].sum() > 0  # (ONNX Runtime's GEMM turns the Infs into NaN too)
        assert_stats(site, ref)
    assert report.sites[0].to_dict()["nonfinite"]["nan"] > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_data_is_refused(tmp_path: Path, bad: float) -> None:
    x = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
    x[37, 1] = bad
    with pytest.raises(DataError, match=r"calib\.npy: sample 37 holds NaN or Inf in input 0: calibration data must be finite"):
        scan(ONNX_DIR / "opset9.onnx", write_data(tmp_path, {"x": x}), options())


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_integer_data_for_a_float_input_is_refused(tmp_path: Path, dtype: Any) -> None:
    x = np.random.default_rng(4).integers(0, 2, (40, 6)).astype(dtype)
    with pytest.raises(DataError, match=rf"input 'x' takes float32 values, the data holds {np.dtype(dtype)}; convert"):
        scan(ONNX_DIR / "opset9.onnx", write_data(tmp_path, {"x": x}), options())


# --- site finding and axes ---------------------------------------------------------------------


def _value(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def test_axis_follows_transpose_and_defaults_say_why() -> None:
    w = numpy_helper.from_array(np.ones((5, 4, 1), np.float32), "w")
    model = tiny_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Transpose", ["c"], ["t"], name="swap", perm=[0, 2, 1]),
         helper.make_node("Relu", ["t"], ["y"], name="after_transpose"),
         helper.make_node("Relu", ["x"], ["z"], name="on_input")],
        [_value("x", ["n", 4, 7])], [_value("y", ["n", 7, 5]), _value("z", ["n", 4, 7])], [w])
    sites = {s.name: s for s in survey(model).sites}
    moved = sites["after_transpose"]
    assert moved.axis.resolve(moved.rank) == 2 and moved.axis.source == "conv"
    assert moved.axis.reason == "dim 1 (channels) of Conv 'conv', through Transpose"
    default = sites["on_input"]
    assert default.axis.source == "default" and "'x' is a graph input" in default.axis.reason
    assert trace_axis(GraphIndex.build(model.graph), "c").anchor == 1


def test_repeated_node_names_get_suffixes_and_unnamed_nodes_use_their_output() -> None:
    model = tiny_model([helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Relu", ["a"], ["b"], name="r"),
                        helper.make_node("LeakyRelu", ["b"], ["c"])],
                       [_value("x", ["n", 3])], [_value("c", ["n", 3])])
    assert [s.name for s in survey(model).sites] == ["r", "r_1", "c"]


def test_fused_activations_and_functions_and_runtime_clip_bounds_are_reported(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    relu_fn = helper.make_function("local", "MyAct", ["i"], ["o"], [helper.make_node("Relu", ["i"], ["o"])],
                                   [helper.make_opsetid("", 17)])
    model = tiny_model(
        [helper.make_node("FusedConv", ["x", "w"], ["f"], name="fused", domain="com.microsoft", activation="Relu"),
         helper.make_node("MyAct", ["f"], ["g"], name="call", domain="local"),
         helper.make_node("ReduceMin", ["g"], ["low"], name="low", keepdims=0),
         helper.make_node("Clip", ["g", "low"], ["y"], name="runtime_clip")],
        [_value("x", [2, 4, 3, 3])], [_value("y", [2, 4, 3, 3])], [w],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("local", 1)], functions=[relu_fn])
    report = scan(save(model, tmp_path), [torch.randn(2, 4, 3, 3)], options())
    text = "\n".join(report.warnings)
    assert report.sites == ()
    assert "'fused' (com.microsoft FusedConv with a fused Relu) hides its pre-activation" in text
    assert "function 'MyAct' holds 1 ReLU-family node(s), which were not scanned" in text
    assert "Clip 'runtime_clip' has bounds computed at run time" in text


def test_unknown_ranks_are_found_by_running_one_batch(tmp_path: Path) -> None:
    """A Reshape to a shape computed at run time defeats shape inference."""
    model = tiny_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["k"]),
         helper.make_node("Div", ["k", "k"], ["unit"]), helper.make_node("Add", ["unit", "unit"], ["two"]),
         helper.make_node("Slice", ["s", "zero", "two"], ["shape"]),
         helper.make_node("Reshape", ["x", "shape"], ["y"]), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        [_value("x", ["n", 5])], [_value("z", ["n", 5])],
        [numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([0], np.int64), "zero")])
    assert survey(model).sites[0].rank is None
    x = np.random.default_rng(2).standard_normal((20, 5)).astype(np.float32)
    report = scan(save(model, tmp_path), write_data(tmp_path, {"x": x}), options())
    (site,) = report.sites
    assert site.units == 5 and site.unit_axis == 1
    assert_stats(site, unit_stats(x, 1))


# --- data feeds ---------------------------------------------------------------------------------


def test_multi_input_npz_by_name_with_integral_float_ids(tmp_path: Path) -> None:
    arrays = case_arrays("multi_input")
    arrays["ids"] = arrays["ids"].astype(np.float32)  # converted to the graph's int64
    report = scan(ONNX_DIR / "multi_input.onnx", write_data(tmp_path, arrays), options())
    assert [s.name for s in report.sites] == ["image_relu", "meta_relu", "ids_relu"]
    arrays["ids"][0, 0] = 0.5
    with pytest.raises(DataError, match="input 'ids' takes int64 values, the data holds non-integral float32"):
        scan(ONNX_DIR / "multi_input.onnx", write_data(tmp_path, arrays), options())


def test_arrays_that_are_no_graph_input_are_left_out(tmp_path: Path) -> None:
    """As for a PyTorch model: a `label` beside the inputs is not fed, and the inputs go by
    name whatever order the file holds them in."""
    arrays = case_arrays("multi_input")
    plain = scan(ONNX_DIR / "multi_input.onnx", write_data(tmp_path, arrays), options())
    labelled = {"label": np.arange(len(arrays["ids"])), **dict(reversed(list(arrays.items())))}
    report = scan(ONNX_DIR / "multi_input.onnx", write_data(tmp_path, labelled), options())
    for a, b in zip(plain.sites, report.sites, strict=True):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_array_equal(a.stats.maximum, b.stats.maximum)


def test_one_input_graph_takes_its_array_beside_a_label_or_under_another_name(tmp_path: Path) -> None:
    x = np.random.default_rng(6).standard_normal((20, 5)).astype(np.float32)
    model = save(tiny_model([helper.make_node("Relu", ["x"], ["z"], name="relu")],
                            [_value("x", ["n", 5])], [_value("z", ["n", 5])]), tmp_path)
    for arrays, inputs in (({"x": x, "label": np.zeros(20)}, None), ({"pixels": x, "label": np.zeros(20)}, "pixels")):
        (site,) = scan(model, write_data(tmp_path, arrays), options(inputs=inputs)).sites
        assert_stats(site, unit_stats(x, 1))


def test_multi_input_model_with_one_array_names_its_inputs(tmp_path: Path) -> None:
    data = tmp_path / "one.npy"
    np.save(data, np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"no data for input\(s\) \['meta', 'ids'\]"):
        scan(ONNX_DIR / "multi_input.onnx", data, options())


def test_shape_mismatch_names_the_input_and_the_expected_shape(tmp_path: Path) -> None:
    data = tmp_path / "small.npy"
    np.save(data, np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"input 'input' got data of shape \(4, 3, 8, 8\), the model expects "
                                        r"\(batch, 3, 16, 16\)"):
        scan(FIX / "convnet.onnx", data, options())


def test_dynamic_axes_take_any_length(tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((32, 4, 23)).astype(np.float32)
    report = scan(ONNX_DIR / "dynamic.onnx", write_data(tmp_path, {"x": x}), options())
    assert [list(s.verdict.dead) for s in report.sites] == [[4], [3]]
    assert report.sites[1].stats.count[0] == 32 * 23


def test_float16_model_takes_float32_data(tmp_path: Path, case_report: Any) -> None:
    report = case_report("float16")
    assert case_arrays("float16")["x"].dtype == np.float16
    x = case_arrays("float16")["x"].astype(np.float32)
    again = scan(ONNX_DIR / "float16.onnx", write_data(tmp_path, {"x": x}), options())
    for a, b in zip(report.sites, again.sites):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)


@pytest.mark.parametrize("fixed, used", [(4, 48), (7, 49), (3, 48)])
def test_fixed_batch_models_get_batches_of_their_size(tmp_path: Path, fixed: int, used: int) -> None:
    """Batches are cut to the model's size across the data's own batch ends (of 32 here):
    only the last samples that make no whole batch are left out, not a remainder a batch."""
    model = onnx.load(str(FIX / "mlp.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = fixed
    path = save(model, tmp_path, "fixed.onnx")
    data = np.load(FIX / "mlp.calib.npy")[:50]
    np.save(tmp_path / "d.npy", data)
    report = scan(path, tmp_path / "d.npy", options())
    assert report.data.samples == used
    left_out = {48: "2 samples were", 49: "1 sample was"}[used]
    assert any(f"{left_out} left out: the model takes batches of exactly {fixed}" in w for w in report.warnings)
    reference = scan(FIX / "mlp.onnx", [torch.from_numpy(data[:used])], options())
    for a, b in zip(report.sites, reference.sites):
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)


def test_ctrl_c_gives_a_partial_result() -> None:
    data = torch.from_numpy(np.load(FIX / "mlp.calib.npy"))

    def batches():
        yield ModelInput((data[:16],))
        raise KeyboardInterrupt

    result = stream(FIX / "mlp.onnx", batches())
    assert result.partial and result.samples == 16 and len(result.sites) == 2


# --- loading and errors ---------------------------------------------------------------------------


def test_embedded_weights_are_read_from_the_model_file() -> None:
    model = load_onnx(FIX / "convnet.onnx")
    assert model.external_files == ("convnet.onnx",)
    offloaded = [t for t in model.proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert offloaded and not any(t.raw_data for t in offloaded)
    spans = initializer_spans(FIX / "convnet.onnx")
    original = {t.name: t for t in onnx.load(str(FIX / "convnet.onnx")).graph.initializer}
    raw = (FIX / "convnet.onnx").read_bytes()
    for tensor in offloaded:
        offset, length = spans[tensor.name]
        assert raw[offset:offset + length] == original[tensor.name].raw_data


def test_external_data_beside_the_model(case_report: Any) -> None:
    model = load_onnx(ONNX_DIR / "external.onnx")
    assert model.external_files == ("external.onnx.data",)
    report = case_report("external")
    assert [list(s.verdict.dead) for s in report.sites] == [[5], [0, 11]]


def test_missing_external_data_is_a_load_error(tmp_path: Path) -> None:
    shutil.copy(ONNX_DIR / "external.onnx", tmp_path)
    with pytest.raises(ModelLoadError, match=r"external data file 'external.onnx.data' for initializer '.*' is missing"):
        load_model(tmp_path / "external.onnx")
    (tmp_path / "external.onnx.data").write_bytes((ONNX_DIR / "external.onnx.data").read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="holds 100 bytes, initializer .* expects .*; the file is truncated"):
        load_model(tmp_path / "external.onnx")


def test_fallback_session_from_a_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For onnxruntime builds without the external-data folder option."""
    monkeypatch.chdir(tmp_path)
    model = load_onnx(ONNX_DIR / "external.onnx")
    factory = SessionFactory(model, CPU, optimise=True)
    head, _ = onnx_graph.Rewriter(model, [], onnx_emit.emit_fast).head()
    session = factory.session_in_tempdir(onnx_graph.model_bytes(head, model.proto.graph.initializer))
    (y,) = session.run(None, {"x": np.ones((2, 8), np.float32)})
    factory.close()
    assert y.shape == (2, 12) and list(tmp_path.iterdir()) == []


def test_no_file_is_written_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scan(ONNX_DIR / "external.onnx", [torch.randn(8, 8)], options())
    path, _, arrays = nonfinite_inside(tmp_path / "elsewhere")  # the masked graph too
    scan(path, [{k: torch.from_numpy(v) for k, v in arrays.items()}], options())
    assert [p.name for p in tmp_path.iterdir()] == ["elsewhere"]


@pytest.mark.parametrize("content, pattern", [
    (b"\x08\x07garbage that is not protobuf \xff\xff\xff", "not a valid ONNX model"),
    (None, "not a valid ONNX model"),
], ids=["garbage", "truncated"])
def test_invalid_files_are_one_line_errors_exit_2(tmp_path: Path, content: bytes | None, pattern: str) -> None:
    path = tmp_path / "bad.onnx"
    raw = (FIX / "convnet.onnx").read_bytes()
    path.write_bytes(content if content is not None else raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(path)
    result = CliRunner().invoke(app, ["scan", str(path), "--data", str(FIX / "convnet.calib.npy")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "bad.onnx" in result.output


def test_missing_external_data_exits_2(tmp_path: Path) -> None:
    shutil.copy(ONNX_DIR / "external.onnx", tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float32))
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "external.onnx"), "--data", str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "external.onnx.data" in result.output


def test_cuda_without_onnxruntime_gpu_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UsageError, match="pip uninstall onnxruntime && pip install onnxruntime-gpu"):
        execution_providers(torch.device("cuda"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert execution_providers(torch.device("cuda:1"))[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert execution_providers(torch.device("cpu")) == CPU


# --- the scan computes what its statistics need, not the model's head ------------------------


def _model_with_a_head(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> MatMul -> Relu (site) -> MatMul (a wide head, 64 -> 4096) -> Softmax -> y."""
    weights = {"w": rng.standard_normal((8, 64)).astype(np.float32),
               "head_w": rng.standard_normal((64, 4096)).astype(np.float32)}
    model = tiny_model([helper.make_node("MatMul", ["x", "w"], ["pre"], name="mm"),
                        helper.make_node("Relu", ["pre"], ["act"], name="relu"),
                        helper.make_node("MatMul", ["act", "head_w"], ["logits"], name="head"),
                        helper.make_node("Softmax", ["logits"], ["y"], name="softmax")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4096])],
                       [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return model, weights


@pytest.mark.parametrize("emit", ["emit_fast", "emit_kernel", "emit_masked"])
def test_the_head_after_the_last_site_is_neither_run_nor_loaded(emit: str) -> None:
    model, _ = _model_with_a_head(np.random.default_rng(11))
    loaded = OnnxModel(model, Path("head.onnx"), 17)
    plans = [onnx_emit.SitePlan(i, s, 2, 1) for i, s in enumerate(survey(model).sites)]
    head, exposures = onnx_graph.Rewriter(loaded, plans, getattr(onnx_emit, emit), statistics_only=True).head()
    names = [node.name for node in head.graph.node]
    assert "mm" in names and "head" not in names and "softmax" not in names
    assert [o.name for o in head.graph.output] == onnx_graph.exposed_names(exposures[0])
    used = [t.name for t in onnx_graph.used_initializers(head, model.graph.initializer)]
    assert "w" in used and "head_w" not in used
    # without statistics_only (what `deadrelu fix` verifies outputs with) the head stays
    whole, _ = onnx_graph.Rewriter(loaded, [], onnx_emit.emit_fast).head()
    assert [node.name for node in whole.graph.node] == ["mm", "relu", "head", "softmax"]
    assert [o.name for o in whole.graph.output] == ["y"]


def test_a_pruned_scan_gives_the_brute_force_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    model, weights = _model_with_a_head(rng)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    report = scan(save(model, tmp_path), write_data(tmp_path, {"x": x}), options())
    (site,) = report.sites
    assert_stats(site, unit_stats(x.astype(np.float64) @ weights["w"], 1), rtol=1e-4, atol=1e-4)
    # the scanner's own session (what a scan runs) has no model output and no head
    loaded = load_onnx(tmp_path / "model.onnx")
    with onnx_probe.OnnxScanner(loaded, survey(loaded.proto), CPU) as scanner:
        scanner.run(ModelInput((torch.from_numpy(x[:BATCH]),)))
        session = scanner._fast[0]
        assert "y" not in [o.name for o in session.get_outputs()]


def test_values_a_subgraph_reads_from_the_enclosing_graph_are_kept(tmp_path: Path) -> None:
    """The If's branches read `scaled`, which nothing in the main graph reads: pruning must
    see the bodies' reads, or the session would not load."""
    def branch(name: str, sign: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Mul", ["scaled", f"{name}_sign"], [f"{name}_pre"], name=f"{name}_mul"),
             helper.make_node("Relu", [f"{name}_pre"], [f"{name}_out"], name=f"{name}_relu")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.array(sign, np.float32), f"{name}_sign")])

    model = tiny_model([helper.make_node("Mul", ["x", "two"], ["scaled"], name="scale"),
                        helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
                        helper.make_node("Greater", ["total", "zero"], ["cond"], name="cond"),
                        helper.make_node("If", ["cond"], ["y"], name="if",
                                         then_branch=branch("then", 1.0), else_branch=branch("else", -1.0))],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                        numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    x = np.abs(np.random.default_rng(13).standard_normal((16, 3)).astype(np.float32))  # total > 0: then
    report = scan(save(model, tmp_path), write_data(tmp_path, {"x": x}), options())
    assert [s.name for s in report.sites] == ["then_relu"]
    assert_stats(report.sites[0], unit_stats(2.0 * x.astype(np.float64), 1))


def test_a_node_name_with_control_characters_stays_one_line_in_every_report(tmp_path: Path) -> None:
    """A node named 'act<newline>::error ...<ESC>[31m' (the model file is the user's, or
    anyone's): its site name escapes them, so no report line is a GitHub workflow command
    or a terminal escape, and fix finds the site and keeps the node's own name."""
    name = "act\n::error file=README.md,line=1::injected\x1b[31m"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["h"], name="add"), helper.make_node("Relu", ["h"], ["y"], name=name)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([-50.0, 0.0, 0.0], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "d.npy", np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32))
    runner = CliRunner()
    base = ["scan", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npy"), "--fail-on", "dead"]
    for fmt in ("table", "github", "markdown", "junit", "sarif"):
        result = runner.invoke(app, [*base, "-f", fmt])
        assert result.exit_code == 1, (fmt, result.output)
        for line in (*result.stdout.splitlines(), *result.stderr.splitlines()):
            assert not line.lstrip().startswith("::error file=") and "\x1b" not in line, (fmt, line)
    saved = json.loads(runner.invoke(app, [*base, "--json", "-"]).stdout)
    assert saved["sites"][0]["name"] == "act\\n::error file=README.md,line=1::injected\\x1b[31m"
    fixed = runner.invoke(app, ["fix", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npy"), "--to", "leaky",
                                "--sites", "act*", "--apply", "-o", str(tmp_path / "f.onnx")])
    assert fixed.exit_code == 0, fixed.output
    assert [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.name == name] == ["LeakyRelu"]


def test_an_onnx_runtime_failure_is_one_line_on_stderr(tmp_path: Path) -> None:
    """ORT logs a failing kernel itself, in colour, beside deadrelu's own line; only
    deadrelu's line reaches stderr (token ids out of an embedding's vocabulary here)."""
    import subprocess
    import sys

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 8])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "emb.onnx")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 40, (12, 6)))
    proc = subprocess.run([sys.executable, "-m", "deadrelu", "scan", str(tmp_path / "emb.onnx"), "--data",
                           str(tmp_path / "ids.npy"), "-q"], capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Gather" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "\x1b[" not in proc.stderr, proc.stderr
    assert errors[0].startswith("deadrelu: error: ") and "emb.onnx" in errors[0] and "Gather" in errors[0]


@pytest.mark.parametrize("compile_mode", ["auto", "off"])
def test_a_float16_graph_is_scanned_as_onnx_runtime_on_cpu_computes_it(tmp_path: Path, compile_mode: str) -> None:
    """ORT's CPU provider runs float16 Gemm/Relu in float32 and drops the casts between
    them: unit 0's pre-activation 2**-30 (0 in float16) reaches the next Gemm, whose output
    shows it (2**-30 * 2**15). The scan reports those values, unit 0 alive, and says why."""
    first = np.zeros((3, 4), np.float16)
    first[0, 0] = 2.0 ** -15
    first[1] = [0.3, -0.7, 0.2, 0.9]
    second = np.zeros((1, 3), np.float16)
    second[0, 0] = 2.0 ** 15
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 1])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "half.onnx")
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float16)
    x[:, 0] = 2.0 ** -15
    np.save(tmp_path / "x.npy", x)
    out = ort.InferenceSession(str(tmp_path / "half.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, np.float16(2.0 ** -15))  # the engine passed 2**-30 on
    report = scan(tmp_path / "half.onnx", tmp_path / "x.npy", ScanOptions(device="cpu", compile=compile_mode))
    stats = report.sites[0].stats
    assert list(report.sites[0].verdict.dead) == [2] and stats.maximum[0] == 2.0 ** -30
    reference = x.astype(np.float32) @ first.astype(np.float32).T  # float32 arithmetic, as the engine's
    np.testing.assert_allclose(stats.minimum, reference.min(0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-5, atol=1e-9)
    assert any("ONNX Runtime's CPU provider runs in float32" in w for w in report.warnings), report.warnings
