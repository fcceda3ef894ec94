"""deadrelu's ONNX Runtime kernel (ai.deadrelu::ReluStats): its statistics, its build and
cache, and the scan with it against the scan with ONNX Runtime's own operators.

The truth is `reference.unit_stats` (numpy, float64, one unit at a time), independent of
the kernel's shifted float32 block sums and of `kernel_lib.reference_rows`. Without a C
compiler the kernel cannot exist: its tests skip and say so; with one, a kernel that fails
to build or to pass its self-check fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from deadrelu import ScanOptions, scan
from deadrelu.cli import app
from deadrelu.errors import UsageError
from deadrelu.load.onnx_format import OnnxModel
from deadrelu.onnx_sites import survey
from deadrelu.probe import kernel as kernel_lib, onnx_emit, onnx_graph, onnx_probe
from reference import unit_stats

FIX = Path(__file__).resolve().parent.parent / "fixtures"
ONNX_DIR = FIX / "onnx"
CASES = json.loads((FIX / "expected.json").read_text())["onnx_cases"]


@pytest.fixture(scope="module")
def kernel() -> Path:
    library = kernel_lib.kernel_library()
    if library.path is None:
        if kernel_lib.find_compiler() is None:
            pytest.skip(f"deadrelu's ONNX kernel cannot be built here: {library.reason}")
        pytest.fail(f"a C compiler is present but the kernel is unavailable: {library.reason}")
    return library.path


def run_kernel(library: Path, x: np.ndarray, axis: int, threads: int = 2) -> np.ndarray:
    """The kernel's (9, units) output for x, from a one-node model in ONNX Runtime."""
    node = helper.make_node(kernel_lib.OP_TYPE, ["x"], ["stats"], domain=kernel_lib.DOMAIN, axis=axis)
    graph = helper.make_graph([node], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("stats", TensorProto.DOUBLE, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(kernel_lib.DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def planted(shape: tuple[int, ...], axis: int, seed: int, nonfinite: bool) -> np.ndarray:
    """Per-unit offsets from -40 to +3 (some units far from zero), unit 0 dead, a few
    positive subnormals (active); with ``nonfinite``, NaN and +-Inf in the first slice
    along axis 0 only, so that the kernel's finite blocks and its careful re-reads of
    blocks with NaN/Inf both run."""
    rng = np.random.default_rng(seed)
    axis %= len(shape)
    offsets = np.linspace(-40.0, 3.0, shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))])
    x = (rng.standard_normal(shape) + offsets).astype(np.float32)
    dead = [slice(None)] * len(shape)
    dead[axis] = 0
    x[tuple(dead)] = -np.abs(x[tuple(dead)]) - 1  # unit 0: never > 0
    flat = x.reshape(-1)
    flat[17::61] = np.float32(1e-42)  # subnormal: positive, must count as active
    if nonfinite:
        first = x[:1].reshape(-1) if len(shape) > 1 else x[:5]
        first[2::7] = np.nan
        first[3::11] = np.inf
        first[5::13] = -np.inf
    return x


def assert_matches(got: np.ndarray, x: np.ndarray, axis: int) -> None:
    ref = unit_stats(x, axis)
    count, positive, nan, inf, minimum, maximum, mean, m2, relu_sum = got
    np.testing.assert_array_equal(count, ref["count"])
    np.testing.assert_array_equal(positive, ref["positive"])
    np.testing.assert_array_equal(nan, ref["nan"])
    np.testing.assert_array_equal(inf, ref["inf"])
    np.testing.assert_array_equal(minimum, ref["min"])  # extremes are values of x: exact
    np.testing.assert_array_equal(maximum, ref["max"])
    safe = np.maximum(count, 1)
    # float32 block sums: errors of ~1e-7 of the values' scale (|mean| + std), whatever the mean
    scale = np.abs(ref["mean"]) + ref["std"]
    for name, value in (("mean", mean), ("std", np.sqrt(m2 / safe)), ("relu_mean", relu_sum / safe)):
        error = np.abs(value - ref[name])
        assert np.all(error <= 1e-5 * np.abs(ref[name]) + 1e-6 * scale), (name, error.max())


# --- the kernel's statistics -------------------------------------------------------------------

SHAPES = {
    "conv-rows-with-tails": ((5, 12, 7, 7), 1),          # 49 values a row: 6 vectors + a tail
    "conv-rows-over-a-chunk": ((2, 3, 2100), 1),          # rows longer than one float32 block
    "dense-columns": ((300, 37), 1),                      # units last: vectorised across units
    "columns-with-inner": ((20, 9, 3), 1),                # 1 < inner < 8: columns fold into units
    "sequence-last-axis": ((6, 4, 19), 2),                # an LSTM's (T, N, H)
    "negative-axis": ((3, 4, 10), -1),
    "vector": ((23,), 0),
    "one-sample": ((1, 64, 3, 3), 1),
}


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_kernel_matches_brute_force(kernel: Path, name: str, nonfinite: bool) -> None:
    shape, axis = SHAPES[name]
    x = planted(shape, axis, seed=len(name), nonfinite=nonfinite)
    if nonfinite:
        assert not np.isfinite(x).all()
    got = run_kernel(kernel, x, axis)
    assert got.shape == (9, shape[axis])
    assert_matches(got, x, axis % len(shape))


def test_kernel_is_the_same_on_one_thread_and_many(kernel: Path) -> None:
    x = planted((4, 96, 14, 14), 1, seed=3, nonfinite=True)
    np.testing.assert_array_equal(run_kernel(kernel, x, 1, threads=1), run_kernel(kernel, x, 1, threads=2))


def test_kernel_moments_of_units_far_from_zero(kernel: Path) -> None:
    """A unit at 1000 +- 0.01: sums of x would cancel in float32; the kernel's shifted
    sums keep the variance to float32 rounding of the values themselves."""
    x = (np.random.default_rng(4).standard_normal((16, 8, 40)) * 0.01 + 1000).astype(np.float32)
    got = run_kernel(kernel, x, 1)
    ref = unit_stats(x, 1)
    np.testing.assert_allclose(np.sqrt(got[7] / got[0]), ref["std"], rtol=1e-4)


def test_kernel_on_an_empty_batch_reports_units_without_values(kernel: Path) -> None:
    got = run_kernel(kernel, np.zeros((0, 5, 4), np.float32), 1)
    assert got.shape == (9, 5)
    np.testing.assert_array_equal(got[:4], 0)
    assert np.all(got[4] == np.inf) and np.all(got[5] == -np.inf)


def test_kernel_rejects_an_axis_out_of_range(kernel: Path) -> None:
    with pytest.raises(Exception, match="axis 3 is out of range"):
        run_kernel(kernel, np.zeros((2, 3, 4), np.float32), 3)


# --- the scan with the kernel against the scan with ONNX Runtime's operators -------------------


def case_data(name: str, folder: Path) -> Path:
    """The hand-built case's calibration data (as tests/test_onnx.py builds it)."""
    import test_onnx

    return test_onnx.write_data(folder, test_onnx.case_arrays(name))


def scan_both(model: Path, data: Any) -> tuple[Any, Any]:
    options = {"device": "cpu", "batch_size": 16}
    return (scan(model, data, ScanOptions(compile="on", **options)),
            scan(model, data, ScanOptions(compile="off", **options)))


def assert_same_scan(kernel_report: Any, ops_report: Any) -> None:
    assert kernel_report.engine == "onnxruntime-kernel"
    assert ops_report.engine == "onnxruntime"
    assert [s.name for s in kernel_report.sites] == [s.name for s in ops_report.sites]
    for got, want in zip(kernel_report.sites, ops_report.sites):
        assert list(got.verdict.dead) == list(want.verdict.dead), got.name
        for field in ("count", "positive", "nan", "inf", "minimum", "maximum"):
            np.testing.assert_array_equal(getattr(got.stats, field), getattr(want.stats, field),
                                          err_msg=f"{got.name} {field}")
        for field in ("mean", "std", "relu_mean"):
            np.testing.assert_allclose(getattr(got.stats, field), getattr(want.stats, field), rtol=2e-5,
                                       atol=2e-5, err_msg=f"{got.name} {field}")
    assert [w for w in kernel_report.warnings] == [w for w in ops_report.warnings]


@pytest.mark.parametrize("name", ["convnet", "seqnet", "mlp"])
def test_scan_with_the_kernel_equals_scan_with_operators_on_fixtures(kernel: Path, name: str) -> None:
    assert_same_scan(*scan_both(FIX / f"{name}.onnx", FIX / f"{name}.calib.npy"))


@pytest.mark.parametrize("name", list(CASES))
def test_scan_with_the_kernel_equals_scan_with_operators_on_cases(kernel: Path, name: str, tmp_path: Path) -> None:
    """Every hand-built case: site kinds, If/Loop/Scan bodies, recurrent axes, opset 9,
    external data, dynamic axes, several inputs, float16, constants."""
    assert_same_scan(*scan_both(ONNX_DIR / f"{name}.onnx", case_data(name, tmp_path)))


def test_scan_with_the_kernel_counts_nan_and_inf_apart(kernel: Path, tmp_path: Path) -> None:
    import test_onnx

    path, _, arrays = test_onnx.nonfinite_inside(tmp_path)
    kernel_report, ops_report = scan_both(path, test_onnx.write_data(tmp_path, arrays))
    assert_same_scan(kernel_report, ops_report)
    assert kernel_report.sites[0].stats.nan.sum() + kernel_report.sites[0].stats.inf.sum() > 0


def test_the_kernel_graph_reads_each_pre_activation_once() -> None:
    """One ReluStats node per float site, fed the pre-activation itself; no Shape of the
    pre-activation (it would make ORT convert a blocked tensor to read it); the double
    site keeps the masked operator reductions."""
    import test_onnx

    for elem in (TensorProto.FLOAT, TensorProto.DOUBLE):
        model = test_onnx._paths_model(17, elem)
        sites = survey(model).sites
        plans = [onnx_emit.SitePlan(i, s, s.rank, s.axis.resolve(s.rank)) for i, s in enumerate(sites)]
        head, exposures = onnx_graph.Rewriter(OnnxModel(model, Path("p.onnx"), 17), plans, onnx_emit.emit_kernel).head()
        added = [n for n in head.graph.node if n.name.startswith(onnx_emit.PREFIX)]
        kernels = [n for n in added if n.op_type == kernel_lib.OP_TYPE]
        preacts = {s.preact for s in sites}
        if elem == TensorProto.FLOAT:
            assert sorted(n.input[0] for n in kernels) == sorted(preacts)
            assert all(n.domain == kernel_lib.DOMAIN for n in kernels)
            assert not [n for n in added if n.op_type == "Shape" and n.input[0] in preacts]
            assert {e.rows for e in exposures.values()} == {"kernel"}
        else:
            assert not kernels
            assert {e.rows for e in exposures.values()} == {"masked"}


# --- build, cache, and what a scan does without the kernel -------------------------------------


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DEADRELU_CACHE_DIR", str(tmp_path / "cache"))
    forget = kernel_lib.kernel_library.cache_clear  # (a test may patch kernel_library itself)
    forget()
    yield tmp_path / "cache"
    forget()


def test_the_kernel_is_built_once_and_then_taken_from_the_cache(kernel: Path, fresh_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    built = kernel_lib.kernel_library(messages.append)
    assert len(messages) == 1 and messages[0].startswith("building deadrelu's one-pass statistics kernel for this machine")
    assert built.path is not None and built.path.parent == fresh_cache
    assert built.path.with_suffix(".ok").exists()
    assert not [p for p in fresh_cache.iterdir() if ".tmp" in p.name]  # no half-written file left
    kernel_lib.kernel_library.cache_clear()
    monkeypatch.setattr(kernel_lib, "_compile", lambda *a: pytest.fail("compiled again"))
    assert kernel_lib.kernel_library(messages.append).path == built.path
    assert len(messages) == 1  # nothing to announce: found in the cache


def test_an_unwritable_cache_folder_builds_into_a_temporary_one(kernel: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DEADRELU_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    forget = kernel_lib.kernel_library.cache_clear
    forget()
    try:
        library = kernel_lib.kernel_library()
    finally:
        forget()
    assert library.path is not None and library.path.exists()
    assert not str(library.path).startswith(str(blocker))


def test_a_library_that_fails_its_self_check_is_not_used(kernel: Path, fresh_cache: Path) -> None:
    fresh_cache.mkdir(parents=True)
    broken = fresh_cache / "broken.so"
    broken.write_bytes(b"not a shared library")
    assert "self-check failed" in kernel_lib._check(broken)
    assert kernel_lib._check(kernel) == ""


def test_a_cached_failure_is_reported_not_rebuilt(kernel: Path, fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    fresh_cache.mkdir(parents=True)
    compiler = kernel_lib.find_compiler()
    assert compiler is not None
    bad = fresh_cache / f"relu_stats-{kernel_lib._build_key(compiler)}.bad"
    bad.write_text("its self-check failed: planted by a test\n")
    monkeypatch.setattr(kernel_lib, "_compile", lambda *a: pytest.fail("compiled despite the verdict"))
    library = kernel_lib.kernel_library()
    assert library.path is None and library.reason == "its self-check failed: planted by a test"
    messages: list[str] = []
    report = scan(FIX / "mlp.onnx", FIX / "mlp.calib.npy", ScanOptions(device="cpu"), notify=messages.append)
    assert report.engine == "onnxruntime"
    assert len(messages) == 1 and "planted by a test" in messages[0] and "\n" not in messages[0]
    with pytest.raises(UsageError, match="--compile on: the one-pass ONNX kernel is not available here"):
        scan(FIX / "mlp.onnx", FIX / "mlp.calib.npy", ScanOptions(device="cpu", compile="on"))


def test_without_a_compiler_the_scan_says_so_and_uses_operators(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(kernel_lib, "find_compiler", lambda: None)
    result = CliRunner().invoke(app, ["scan", str(FIX / "mlp.onnx"), "--data", str(FIX / "mlp.calib.npy"),
                                      "--device", "cpu", "--json", str(tmp_path / "r.json")], env={"COLUMNS": "200"})
    assert result.exit_code in (0, 1), result.output
    assert "no C compiler on PATH" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["engine"] == "onnxruntime"
    result = CliRunner().invoke(app, ["scan", str(FIX / "mlp.onnx"), "--data", str(FIX / "mlp.calib.npy"),
                                      "--device", "cpu", "--compile", "on"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--compile on: the one-pass ONNX kernel is not available here: no C compiler" in result.output
    assert "Traceback" not in result.output
    assert not fresh_cache.exists() or not list(fresh_cache.iterdir())


def test_compile_off_never_builds_the_kernel(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_lib, "kernel_library", lambda *a: pytest.fail("looked for the kernel"))
    monkeypatch.setattr(onnx_probe, "kernel_library", lambda *a: pytest.fail("looked for the kernel"))
    report = scan(FIX / "mlp.onnx", FIX / "mlp.calib.npy", ScanOptions(device="cpu", compile="off"))
    assert report.engine == "onnxruntime"


def test_the_kernel_sources_ship_with_the_package() -> None:
    """pyproject's package-data carries the C sources a fresh install builds from."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"kernels/*.c", "kernels/*.h"' in text
    for name in kernel_lib.SOURCES:
        assert (kernel_lib.kernel_sources() / name).is_file()


def test_a_compiler_that_refuses_the_tuning_flag_builds_portably(kernel: Path, fresh_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler wrapper that rejects -march=native (as some do on some CPUs): the kernel is
    built without it, checked, and used."""
    real = kernel_lib.find_compiler()
    assert real is not None
    wrapper = tmp_path / "picky-cc"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && {{ echo "error: unsupported '
                       f'option -march=native" >&2; exit 1; }}; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    library = kernel_lib.kernel_library()
    assert library.path is not None, library.reason
    x = planted((3, 10, 5, 5), 1, seed=2, nonfinite=True)
    assert_matches(run_kernel(library.path, x, 1), x, 1)


def test_a_compiler_that_fails_gives_its_last_line_as_the_reason(fresh_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text('#!/bin/sh\necho "fatal error: no space left on device" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    library = kernel_lib.kernel_library()
    assert library.path is None
    assert library.reason == "broken-cc failed on relu_stats.c: fatal error: no space left on device"


def test_an_old_failure_is_tried_again_and_a_timeout_is_not_kept(kernel: Path, fresh_cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    fresh_cache.mkdir(parents=True)
    compiler = kernel_lib.find_compiler()
    assert compiler is not None
    bad = fresh_cache / f"relu_stats-{kernel_lib._build_key(compiler)}.bad"
    bad.write_text("cc failed on relu_stats.c: a day ago\n")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(bad, (two_days_ago, two_days_ago))
    monkeypatch.setattr(kernel_lib, "_compile", lambda *a: "cc took over 120 s on relu_stats.c")
    library = kernel_lib.kernel_library()
    assert library.path is None and library.reason == "cc took over 120 s on relu_stats.c"
    assert bad.read_text() == "cc failed on relu_stats.c: a day ago\n"  # the timeout was not written
    monkeypatch.undo()
    monkeypatch.setenv("DEADRELU_CACHE_DIR", str(fresh_cache))
    kernel_lib.kernel_library.cache_clear()
    assert kernel_lib.kernel_library().path is not None  # built, checked, used
