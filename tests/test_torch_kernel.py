"""deadrelu's C kernel on PyTorch CPU tensors (`probe.torch_kernel`, `reductions.kernel_batch`)
against numpy brute force, and the eager scan that uses it.

The truth is `reference.unit_stats` (numpy, float64, one unit at a time). Without a C
compiler the kernel cannot exist: these tests skip and say so; with one, a kernel that
fails to build or load fails them instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bruteforce
from deadrelu import ScanOptions, scan
from deadrelu.cli import app
from deadrelu.probe import kernel as kernel_lib
from deadrelu.probe import torch_kernel as torch_kernel_module
from deadrelu.probe.torch_kernel import TorchKernel, dense_view, openmp_parallel, torch_kernel
from deadrelu.reductions import kernel_batch, kernel_moments
from deadrelu.stats import UnitStats
from reference import assert_unit_stats_match
from reference import unit_stats as brute

FIX = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def kernel() -> TorchKernel:
    found = torch_kernel()
    if found is None:
        if kernel_lib.find_compiler() is None:
            pytest.skip("deadrelu's statistics kernel cannot be built here: no C compiler")
        pytest.fail(f"a C compiler is present but the kernel is unavailable: {kernel_lib.kernel_library().reason}")
    return found


def accumulate(kernel: TorchKernel, batches: list[torch.Tensor], axis: int) -> UnitStats:
    stats = UnitStats(batches[0].shape[axis] if batches[0].ndim else 1)
    for batch in batches:
        stats.fold(kernel_batch(kernel, batch, axis).complete())
    return stats


def check(result, expected, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    for field, key in (("count", "count"), ("positive", "positive"), ("nan", "nan"), ("inf", "inf"),
                       ("minimum", "min"), ("maximum", "max")):
        np.testing.assert_array_equal(getattr(result, field), expected[key], err_msg=field)
    np.testing.assert_allclose(result.mean, expected["mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.std, expected["std"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(result.relu_mean, expected["relu_mean"], rtol=rtol, atol=atol)


@pytest.mark.parametrize(("shape", "axis"), [((5, 3, 4, 4), 1), ((7, 6), 1), ((4, 9, 5), 2), ((3, 2, 8), 1),
                                             ((2, 3, 2, 2, 2), 1), ((3, 40, 2100), 1), ((37, 300), 1), ((9, 1), 1)])
def test_matches_brute_force_over_batches(kernel: TorchKernel, shape: tuple[int, ...], axis: int) -> None:
    """Both loop orders (units in rows, units across rows), vector tails, several batches."""
    gen = torch.Generator().manual_seed(sum(shape))
    batches = [torch.randn(shape, generator=gen) * 3 - 1 for _ in range(4)]
    check(accumulate(kernel, batches, axis).result(), brute(torch.cat(batches).numpy(), axis))


@pytest.mark.parametrize(("shape", "axis"), [((300, 1100), 1), ((300, 90), 1), ((140, 50, 3), 1), ((21, 200), 1)])
def test_units_across_rows_read_in_row_groups(kernel: TorchKernel, shape: tuple[int, ...], axis: int) -> None:
    """The column path (units across rows) in blocks of up to 128 columns, read 8 rows at a
    time: several 128-row windows, blocks with an odd number of vectors and a scalar tail
    (90 units: blocks of 32, 32, 26), units spread over inner positions, rows that are not a
    multiple of 8; NaN/Inf in one vector of one window, re-read carefully."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.rand(shape[1], *shape[2:], generator=gen) * 4 - 0.5
    if shape[0] > 130:
        x[130, 40:43] = torch.tensor([torch.nan, torch.inf, -torch.inf]).reshape(3, *[1] * (x.ndim - 2))
    check(accumulate(kernel, [x], axis).result(), brute(x.numpy(), axis), atol=1e-5)  # (float32 lane sums, std <= 4)


def test_rows_are_written_into_a_given_buffer(kernel: TorchKernel) -> None:
    """The probe reuses one buffer per site for every batch: the kernel overwrites all of it."""
    buffer = torch.full((kernel_lib.STAT_ROWS, 30), 7.0, dtype=torch.float64)
    first, second = torch.randn(9, 30), torch.randn(9, 30) * 5
    kernel.rows(first, 1, buffer)
    assert kernel.rows(second, 1, buffer) is buffer
    torch.testing.assert_close(buffer, kernel.rows(second, 1), rtol=0, atol=0)
    with pytest.raises(AssertionError):
        kernel.rows(second, 1, torch.empty((kernel_lib.STAT_ROWS, 29), dtype=torch.float64))


def test_an_eager_scan_of_many_batches_reuses_each_site_s_buffer(kernel: TorchKernel) -> None:
    """Eleven batches (the last one short) through one rows buffer per site, against brute force."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 300), nn.ReLU(), nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 2)).eval()
    model[0].bias.data[:5] = -50.0
    data = torch.randn(330, 6)
    report = scan(model, data, ScanOptions(device="cpu", batch_size=32))
    assert report.engine == "torch-kernel"
    with torch.no_grad():
        first = model[0](data)
        second = model[2](torch.relu(first))
    for site, preact in zip(report.sites, (first, second)):
        expected = brute(preact.numpy(), 1)
        np.testing.assert_array_equal(site.stats.count, expected["count"])
        np.testing.assert_allclose(site.stats.minimum, expected["min"], rtol=1e-6, atol=1e-6)  # (batched GEMMs
        np.testing.assert_allclose(site.stats.maximum, expected["max"], rtol=1e-6, atol=1e-6)  # may round apart)
        np.testing.assert_allclose(site.stats.mean, expected["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(site.stats.std, expected["std"], rtol=1e-5, atol=1e-6)
    assert list(report.sites[0].verdict.dead) == [0, 1, 2, 3, 4]


def test_the_kernel_s_fold_equals_chan_s_merge(kernel: TorchKernel) -> None:
    """Running rows folded in C (`TorchKernel.fold`) against brute force over all batches,
    with NaN/Inf, a unit far from zero and a unit with no finite value in one batch."""
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn((7, 6, 3), generator=gen) * 2 + 0.5 for _ in range(5)]
    batches[1][:, 2] = torch.nan
    batches[3][0, 1, 0] = -torch.inf
    for b in batches:
        b[:, 4] += 1e4
    acc = kernel.rows(batches[0], 1)
    for b in batches[1:]:
        kernel.fold(acc, kernel.rows(b, 1))
    stats = UnitStats(6)
    stats.fold(kernel_moments(acc))
    check(stats.result(), brute(torch.cat(batches).numpy(), 1), rtol=1e-6, atol=1e-5)


def test_non_finite_values_are_counted_apart(kernel: TorchKernel) -> None:
    x = torch.randn(6, 5, 4, 4)
    x[0, 0, 0, :2] = torch.nan
    x[1, 1, 2, 3] = torch.inf
    x[2, 1, 0, 0] = -torch.inf
    x[:, 4] = torch.nan  # a unit with no finite value at all
    result = accumulate(kernel, [x], 1).result()
    expected = brute(x.numpy(), 1)
    check(result, expected)
    assert result.positive[1] == expected["positive"][1]  # +Inf counts as positive


def test_std_of_a_unit_far_from_zero_in_small_batches(kernel: TorchKernel) -> None:
    """Mean -1e4, std 0.01: the kernel's moments are shifted by each unit's first value."""
    gen = torch.Generator().manual_seed(3)
    batches = [(-1e4 + 0.01 * torch.randn((8, 3, 2, 2), generator=gen, dtype=torch.float64)).float()
               for _ in range(100)]
    result = accumulate(kernel, batches, 1).result()
    np.testing.assert_allclose(result.std, brute(torch.cat(batches).numpy(), 1)["std"], rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_read_exactly(kernel: TorchKernel, dtype: torch.dtype) -> None:
    x = (torch.randn(16, 8, 3) * 4).to(dtype)
    check(accumulate(kernel, [x], 1).result(), brute(x.float().numpy(), 1))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
def test_tensors_that_are_not_contiguous(kernel: TorchKernel, layout: str) -> None:
    """Read in their own memory order where that is dense (channels-last, a transpose),
    copied where it is not (every other channel)."""
    base = torch.randn(4, 6, 5, 7) - 0.5
    x = {"channels_last": base.contiguous(memory_format=torch.channels_last),
         "transposed": base.transpose(2, 3),
         "strided": base[:, ::2]}[layout]
    assert not x.is_contiguous()
    view, axis = dense_view(x, 1)
    assert view.is_contiguous() and view.shape[axis] == x.shape[1]
    assert (view.data_ptr() == x.data_ptr()) == (layout != "strided")
    check(accumulate(kernel, [x], 1).result(), brute(x.numpy(), 1))


def test_openmp_threads_give_the_single_thread_result_bit_for_bit(kernel: TorchKernel) -> None:
    """Work items go to whichever OpenMP thread is free; each is one thread's from start to
    end, so the result is the same to the bit."""
    if kernel.parallel is None:
        pytest.skip("PyTorch here runs no OpenMP runtime the kernel can use")
    single = TorchKernel(kernel.reduce, kernel.fold_rows, None)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)  # more threads than this machine's cores: any schedule at all
    try:
        for shape in [(8, 64, 28, 28), (256, 1024), (3, 500, 9)]:
            x = torch.randn(shape) * 2 + 0.3
            x.view(-1)[::997] = torch.nan
            torch.testing.assert_close(kernel.rows(x, 1), single.rows(x, 1), rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(previous)


def test_pytorch_s_openmp_runtime_is_found_where_it_uses_one() -> None:
    """On Linux, a PyTorch with the OpenMP backend: the kernel runs on that runtime's team."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not Path("/proc/self/maps").exists():
        pytest.skip("PyTorch here does not use OpenMP, or this system has no /proc/self/maps")
    assert openmp_parallel() is not None


# --- the eager scan with and without the kernel ---------------------------------------------------


@pytest.mark.parametrize("name", ["convnet", "seqnet", "mlp"])
def test_the_eager_scan_uses_the_kernel_and_matches_brute_force(kernel: TorchKernel, name: str) -> None:
    report = scan(FIX / f"{name}.ts.pt", FIX / f"{name}.calib.npy", ScanOptions(device="cpu", batch_size=16))
    assert report.engine == "torch-kernel"
    assert_unit_stats_match(report, tuple(bruteforce.bruteforce(name)))


@pytest.mark.parametrize("name", ["convnet", "seqnet", "mlp"])
def test_compile_off_reduces_with_pytorch_operators_and_never_builds_the_kernel(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from deadrelu.probe import torch_stream

    monkeypatch.setattr(torch_stream, "torch_kernel", lambda *a: pytest.fail("looked for the kernel"))
    report = scan(FIX / f"{name}.ts.pt", FIX / f"{name}.calib.npy", ScanOptions(device="cpu", compile="off"))
    assert report.engine == "torch-eager"
    assert_unit_stats_match(report, tuple(bruteforce.bruteforce(name)))


def test_an_inplace_relu_is_read_before_it_overwrites_its_input(kernel: TorchKernel) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(inplace=True), nn.Linear(12, 3)).eval()
    model[0].bias.data[:4] = -100.0  # four dead units, pre-activations near -100
    data = torch.randn(40, 5)
    report = scan(model, data, ScanOptions(device="cpu", batch_size=16))
    assert report.engine == "torch-kernel"
    with torch.no_grad():
        preact = model[0](data).numpy()
    expected = brute(preact, 1)
    site = report.sites[0]
    assert list(site.verdict.dead) == [0, 1, 2, 3]
    np.testing.assert_allclose(site.stats.minimum, expected["min"], rtol=1e-6)
    np.testing.assert_allclose(site.stats.mean, expected["mean"], rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_scan_says_so_in_one_line_and_uses_pytorch_operators(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEADRELU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel_lib, "find_compiler", lambda: None)
    kernel_lib.kernel_library.cache_clear()
    try:
        result = CliRunner().invoke(app, ["scan", str(FIX / "mlp.ts.pt"), "--data", str(FIX / "mlp.calib.npy"),
                                          "--device", "cpu", "--format", "json"], env={"COLUMNS": "200"})
    finally:
        kernel_lib.kernel_library.cache_clear()
    assert result.exit_code in (0, 1), result.output
    lines = [line for line in result.stderr.splitlines() if "kernel is not available" in line]
    assert len(lines) == 1, result.stderr
    assert "(no C compiler on PATH" in lines[0] and lines[0].endswith("reduces with PyTorch's operators")
    assert '"engine": "torch-eager"' in result.stdout


def test_a_library_without_the_plain_entry_point_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel library that cannot be loaded here (say, a cached build of an older
    deadrelu): the scan says why and reduces with PyTorch's operators."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in library")
    source = tmp_path / "other.c"
    source.write_text("int something_else(void) { return 1; }\n")
    library = tmp_path / "other.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    monkeypatch.setattr(torch_kernel_module, "kernel_library", lambda *a: kernel_lib.KernelLibrary(library))
    said: list[str] = []
    assert torch_kernel(said.append) is None
    assert len(said) == 1 and "cannot load other.so" in said[0] and "\n" not in said[0]
