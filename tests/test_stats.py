"""UnitStats against numpy brute force on random tensors, including hard cases."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from deadrelu.stats import UnitStats
from reference import unit_stats as brute


def accumulate(batches: list[torch.Tensor], axis: int) -> UnitStats:
    stats = UnitStats(batches[0].shape[axis])
    for batch in batches:
        stats.update(batch, axis)
    return stats


def check(result, expected, rtol=1e-6, atol=1e-6) -> None:
    np.testing.assert_array_equal(result.count, expected["count"])
    np.testing.assert_array_equal(result.positive, expected["positive"])
    np.testing.assert_array_equal(result.nan, expected["nan"])
    np.testing.assert_array_equal(result.inf, expected["inf"])
    np.testing.assert_allclose(result.minimum, expected["min"], rtol=rtol)
    np.testing.assert_allclose(result.maximum, expected["max"], rtol=rtol)
    np.testing.assert_allclose(result.mean, expected["mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(result.std, expected["std"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(result.relu_mean, expected["relu_mean"], rtol=rtol, atol=atol)


@pytest.mark.parametrize(("shape", "axis"), [((5, 3, 4, 4), 1), ((7, 6), 1), ((4, 9, 5), 2), ((3, 2, 8), 1), ((2, 3, 2, 2, 2), 1)])
def test_matches_brute_force_over_batches(shape: tuple[int, ...], axis: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    batches = [torch.randn(shape, generator=gen) * 3 - 1 for _ in range(4)]
    stats = accumulate(batches, axis)
    whole = torch.cat(batches).numpy()
    check(stats.result(), brute(whole, axis))


def test_large_offset_keeps_variance() -> None:
    """Pre-activations of 1e4 with std 1: naive sum-of-squares in float32 would give garbage."""
    gen = torch.Generator().manual_seed(0)
    batches = [1e4 + torch.randn(64, 3, 8, 8, generator=gen) for _ in range(5)]
    result = accumulate(batches, 1).result()
    whole = torch.cat(batches).numpy()
    np.testing.assert_allclose(result.std, brute(whole, 1)["std"], rtol=1e-3)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 2, 2), (32, 3)])
def test_std_of_a_unit_far_from_zero_in_small_batches(shape: tuple[int, ...]) -> None:
    """Mean -1e4, std 0.01 (1e-6 of the mean), batches of 8 to 32 samples: the float32
    rounding of each batch's mean must not enter the variance (it made it 0.3% off)."""
    gen = torch.Generator().manual_seed(3)
    batches = [(-1e4 + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)).float() for _ in range(200)]
    result = accumulate(batches, 1).result()
    expected = brute(torch.cat(batches).numpy(), 1)
    np.testing.assert_allclose(result.std, expected["std"], rtol=1e-6)
    np.testing.assert_allclose(result.mean, expected["mean"], rtol=1e-12)


def test_non_finite_values_are_counted_apart() -> None:
    x = torch.randn(6, 4, 3, 3)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")
    x[2, 2, 2, 2] = float("-inf")
    x[:, 3] = float("nan")  # a unit with no finite value at all
    clean = torch.randn(6, 4, 3, 3)
    stats = accumulate([clean, x], 1)
    result = stats.result()
    expected = brute(torch.cat([clean, x]).numpy(), 1)
    check(result, expected)
    assert result.nan[0] == 1 and result.inf[1] == 1 and result.inf[2] == 1
    assert np.isfinite(result.mean).all() and np.isfinite(result.std).all()


def test_dead_is_strictly_positive() -> None:
    x = torch.zeros(4, 3)
    x[:, 1] = -1e-45  # a negative denormal is not > 0
    x[0, 2] = 1e-45  # a positive denormal is
    result = accumulate([x], 1).result()
    assert list(result.positive) == [0, 0, 1]


def test_merge_equals_one_pass() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 5, 2, generator=gen) + i for i in range(6)]
    one = accumulate(batches, 1)
    left, right = accumulate(batches[:2], 1), accumulate(batches[2:], 1)
    left.merge(right)
    a, b = one.result(), left.result()
    for field in ("count", "positive", "minimum", "maximum"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-10)


def test_empty_batch_is_a_no_op() -> None:
    stats = UnitStats(3)
    stats.update(torch.empty(0, 3), 1)
    assert stats.result().count.sum() == 0


def test_half_precision_is_accumulated_in_float64() -> None:
    x = (torch.randn(16, 4, 8) * 100).half()
    result = accumulate([x, x], 1).result()
    np.testing.assert_allclose(result.mean, brute(torch.cat([x, x]).float().numpy(), 1)["mean"], rtol=1e-4, atol=1e-3)
    assert result.mean.dtype == np.float64


# --- the fused, sync-free path (the one accelerators take) ------------------------------------

from deadrelu.reductions import fused_reductions, moments_from_rows, site_shift  # noqa: E402


def fused(batches: list[torch.Tensor], axis: int) -> UnitStats:
    stats = UnitStats(batches[0].shape[axis])
    shift = site_shift(batches[0], axis)
    dims = [d for d in range(batches[0].ndim) if d != axis]
    for batch in batches:
        per_unit = float(batch.numel() // batch.shape[axis])
        stats.fold(moments_from_rows(fused_reductions(batch, dims, shift), shift, per_unit))
    return stats


@pytest.mark.parametrize(("shape", "axis"), [((5, 3, 4, 4), 1), ((7, 6), 1), ((4, 9, 5), 2)])
def test_fused_path_matches_brute_force(shape: tuple[int, ...], axis: int) -> None:
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(shape, generator=gen) * 2 + 0.5 for _ in range(3)]
    check(fused(batches, axis).result(), brute(torch.cat(batches).numpy(), axis), rtol=1e-5, atol=1e-5)


def test_fused_path_with_non_finite_values_and_large_offsets() -> None:
    gen = torch.Generator().manual_seed(2)  # every draw seeded: the result must not depend on test order
    x = 1e4 + torch.randn(6, 4, 3, 3, generator=gen)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 1, 1] = float("inf")
    x[:, 3] = -1e4 + torch.randn(6, 3, 3, generator=gen)
    y = 1e4 + torch.randn(6, 4, 3, 3, generator=gen)
    result = fused([x, y], 1).result()
    expected = brute(torch.cat([x, y]).numpy(), 1)
    # Unit 3 jumps from -1e4 (its shift, from the first batch) to +1e4: float32 sums of
    # values 2e4 from the shift round at ~1e-3 each, so its mean (~0) is good to ~1e-2.
    check(result, expected, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(result.std, expected["std"], rtol=1e-3)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="no C++ compiler for torch.compile's CPU kernels")
def test_compiled_reductions_equal_eager() -> None:
    """`--compile on`: one torch.compile'd reduction per batch, same results as eager."""
    from deadrelu import ScanOptions, scan
    from pathlib import Path

    fix = Path(__file__).resolve().parent.parent / "fixtures"
    eager = scan(fix / "mlp.ts.pt", fix / "mlp.calib.npy", ScanOptions(device="cpu", compile="off"))
    said: list[str] = []
    compiled = scan(fix / "mlp.ts.pt", fix / "mlp.calib.npy", ScanOptions(device="cpu", compile="on"), notify=said.append)
    assert not said, said  # no fallback happened
    for a, b in zip(eager.sites, compiled.sites):
        assert a.verdict == b.verdict
        np.testing.assert_array_equal(a.stats.positive, b.stats.positive)
        np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.stats.std, b.stats.std, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.stats.maximum, b.stats.maximum, rtol=1e-6)


def test_fused_counts_stay_exact_past_float32_integers() -> None:
    """The accelerator path's counts: 2**24 + 3 positives (odd: no float32 holds it) in
    one batch of one unit."""
    from deadrelu.reductions import fused_reductions, moments_from_rows

    n = (1 << 24) + 3
    x = torch.ones(n, 1)
    x[0, 0] = float("inf")
    shift = torch.zeros(1, 1)
    moments = moments_from_rows(fused_reductions(x, [0], shift), shift, float(n))
    assert int(moments.positive[0]) == n  # +Inf is positive
    assert int(moments.inf[0]) == 1 and float(moments.count[0]) == n - 1
