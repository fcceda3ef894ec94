"""Calibration data as users hold it: every source gives the same statistics as plain arrays."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fixture_models
from deadrelu import ScanOptions, scan
from deadrelu.data import DataOptions, ExactBatches, ImageOptions, InputSelector, ModelInput, NpyRows, open_data
from deadrelu.errors import DataError

FIX = Path(__file__).resolve().parent.parent / "fixtures"
CALIB = np.load(FIX / "mlp.calib.npy")


def mlp() -> torch.nn.Module:
    model = fixture_models.MLP()
    model.load_state_dict(torch.load(FIX / "mlp.state_dict.pt", weights_only=True))
    return model


def positives(report) -> list[list[int]]:
    return [s.stats.positive.tolist() for s in report.sites]


@pytest.fixture(scope="module")
def reference():
    return scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy", ScanOptions(device="cpu"))


def test_npy_is_read_by_seeking(tmp_path: Path) -> None:
    rows = NpyRows(FIX / "mlp.calib.npy")
    assert rows.shape == CALIB.shape
    np.testing.assert_array_equal(rows[10:20], CALIB[10:20])
    np.testing.assert_array_equal(rows[250:300], CALIB[250:])
    truncated = tmp_path / "t.npy"
    truncated.write_bytes((FIX / "mlp.calib.npy").read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        NpyRows(truncated)


def test_folder_of_npy_shards(tmp_path: Path, reference) -> None:
    for i, (start, stop) in enumerate([(0, 100), (100, 101), (101, 256)]):
        np.save(tmp_path / f"shard{i:02d}.npy", CALIB[start:stop])
    report = scan(FIX / "mlp.ts.pt", tmp_path, ScanOptions(device="cpu", batch_size=30))
    assert report.data.samples == 256
    assert positives(report) == positives(reference)


def test_a_folder_of_images_and_npy_shards_is_refused(tmp_path: Path) -> None:
    """Which of the two the user meant cannot be told; the images were taken silently before."""
    from PIL import Image

    np.save(tmp_path / "shard00.npy", CALIB[:10])
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.png")
    with pytest.raises(DataError, match=r"folder holds both images \(1\) and \.npy shards \(1\); point --data"):
        scan(FIX / "mlp.ts.pt", tmp_path, ScanOptions(device="cpu"))


def test_npz_by_input_name_and_safetensors(tmp_path: Path, reference) -> None:
    from safetensors.numpy import save_file

    np.savez(tmp_path / "named.npz", x=CALIB)
    save_file({"x": CALIB}, str(tmp_path / "data.safetensors"))
    torch.save({"x": torch.from_numpy(CALIB)}, tmp_path / "data.pt")
    for name in ("named.npz", "data.safetensors", "data.pt"):
        report = scan(FIX / "mlp.ts.pt", tmp_path / name, ScanOptions(device="cpu"))
        assert positives(report) == positives(reference), name


def test_bfloat16_safetensors_are_read_bit_for_bit_and_scan_as_their_float32_values(tmp_path: Path) -> None:
    """numpy has no bfloat16: the rows are read as 16-bit words and viewed as bfloat16.
    The batches equal the library's own load, bit for bit, and the scan equals one of the
    same values stored as float32 (bfloat16 -> float32 is exact)."""
    torch_file = pytest.importorskip("safetensors.torch")
    values = torch.from_numpy(CALIB).to(torch.bfloat16)
    torch_file.save_file({"x": values}, str(tmp_path / "bf16.safetensors"))
    source = open_data(str(tmp_path / "bf16.safetensors"))
    joined = torch.cat([batch.args[0] for batch in source.batches(100)])
    assert joined.dtype == torch.bfloat16
    assert torch.equal(joined.view(torch.int16), torch_file.load_file(str(tmp_path / "bf16.safetensors"))["x"].view(torch.int16))
    np.save(tmp_path / "same.npy", values.float().numpy())
    bf16 = scan(FIX / "mlp.ts.pt", tmp_path / "bf16.safetensors", ScanOptions(device="cpu", batch_size=100))
    same = scan(FIX / "mlp.ts.pt", tmp_path / "same.npy", ScanOptions(device="cpu", batch_size=100))
    assert positives(bf16) == positives(same)
    for a, b in zip(bf16.sites, same.sites):
        for name in ("count", "minimum", "maximum", "mean", "m2", "relu_sum"):
            np.testing.assert_array_equal(getattr(a.stats, name), getattr(b.stats, name), err_msg=name)


def test_user_function_returning_loader_dataset_or_generator(tmp_path: Path, reference) -> None:
    module = tmp_path / "calib_data.py"
    module.write_text(textwrap.dedent(f"""
        import numpy as np, torch
        from torch.utils.data import DataLoader, TensorDataset
        X = torch.from_numpy(np.load({str(FIX / 'mlp.calib.npy')!r}))
        Y = torch.zeros(len(X), dtype=torch.long)
        def loader():          # (inputs, labels) batches, with worker processes
            return DataLoader(TensorDataset(X, Y), batch_size=50, num_workers=2)
        def dataset():         # a map-style Dataset of (input, label) pairs
            return TensorDataset(X, Y)
        def generator():       # dict batches
            return ({{"x": X[i:i + 64]}} for i in range(0, len(X), 64))
        def broken():
            raise ValueError("no data today")
    """))
    for fn in ("loader", "dataset", "generator"):
        report = scan(FIX / "mlp.ts.pt", f"{module}:{fn}", ScanOptions(device="cpu", data=DataOptions(workers=1)))
        assert report.data.samples == 256, fn
        assert positives(report) == positives(reference), fn
    with pytest.raises(DataError, match="calling it raised ValueError: no data today"):
        scan(FIX / "mlp.ts.pt", f"{module}:broken", ScanOptions(device="cpu"))
    with pytest.raises(DataError, match="has no attribute 'nope'"):
        scan(FIX / "mlp.ts.pt", f"{module}:nope", ScanOptions(device="cpu"))


def test_image_folder_class_tree(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_data(str(tmp_path), DataOptions(workers=2, image=ImageOptions(size=16)))
    batches = list(source.batches(4))
    assert [b.shape for b in batches] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    first = batches[0][0]
    with Image.open(tmp_path / "cat" / "0.jpg") as image:
        raw = np.asarray(image.convert("RGB").resize((24, 16), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    crop = raw[:, 4:20].transpose(2, 0, 1)
    expected = (crop - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array([0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(first.numpy(), expected, atol=1e-5)


def test_image_folder_scan_end_to_end(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    model = fixture_models.ConvNet()
    report = scan(model, str(tmp_path), ScanOptions(device="cpu", batch_size=4,
                                                     data=DataOptions(workers=2, image=ImageOptions(size=16))))
    assert report.data.samples == 6 and len(report.sites) == 13


@pytest.mark.parametrize("mean, std, message", [
    ("0.5,0.5", None, r"--mean '0.5,0.5': 2 values, expected 3 \(one per RGB channel"),
    ("imagenet", "0.2,0.2,0.2,0.2", r"--std '0.2,0.2,0.2,0.2': 4 values, expected 3"),
    ("nan", "1", r"--mean 'nan': expected a preset .* all finite"),
    ("0.5", "0,1,1", r"--std '0,1,1': values must be positive \(standard deviations\)"),
    ("0.5", "-1", r"--std '-1': values must be positive"),
])
def test_normalisation_needs_one_value_or_one_per_rgb_channel(mean: str, std: str | None, message: str) -> None:
    from deadrelu.data import parse_normalisation

    with pytest.raises(DataError, match=message):
        parse_normalisation(mean, std)


def test_one_normalisation_value_applies_to_every_channel(tmp_path: Path) -> None:
    from PIL import Image

    from deadrelu.data import parse_normalisation

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)).save(tmp_path / "0.png")
    images = [next(iter(open_data(str(tmp_path), DataOptions(workers=0, image=ImageOptions(16, *normalise)))
                        .batches(1)))[0] for normalise in (parse_normalisation("0.5", "0.25"),
                                                           parse_normalisation("0.5,0.5,0.5", "0.25,0.25,0.25"))]
    np.testing.assert_array_equal(images[0].numpy(), images[1].numpy())
    assert images[0].shape == (3, 16, 16)


def test_a_wrong_normalisation_count_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from deadrelu.cli import app

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "0.png")
    result = CliRunner().invoke(app, ["scan", str(FIX / "convnet.pt2"), "--data", str(tmp_path), "--image-size", "16",
                                      "--mean", "0.5,0.5"])
    assert result.exit_code == 2, result.output
    assert "--mean '0.5,0.5': 2 values, expected 3" in result.output and "Traceback" not in result.output


def test_inputs_selector() -> None:
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert InputSelector(count=1).select((x, y)).args == (x,)  # (inputs, labels)
    assert InputSelector(count=2).select((x, y)).args == (x, y)
    assert InputSelector.parse("1", 1).select((x, y)).args == (y,)
    chosen = InputSelector.parse("a", None).select({"a": x, "b": y})
    assert list(chosen.kwargs) == ["a"]
    with pytest.raises(DataError, match="no key 'c'"):
        InputSelector.parse("c", None).select({"a": x})
    with pytest.raises(DataError, match="expected a tensor"):
        InputSelector(count=2).select((x, "label"))


def test_named_inputs_go_to_the_forward_parameters_of_those_names() -> None:
    image, mask, label = torch.ones(2, 3), torch.zeros(2, 3), torch.arange(2)
    selector = InputSelector.parse(None, 2, ("image", "mask"))
    for batch in ({"image": image, "mask": mask}, {"mask": mask, "label": label, "image": image}):
        chosen = selector.select(batch)
        assert chosen.kwargs == {} and chosen.args[0] is image and chosen.args[1] is mask
    one = InputSelector.parse(None, 1, ("x",)).select({"pixels": image})  # one array, one input
    assert one.args == (image,)
    picked = InputSelector.parse("pixels", 1, ("x",)).select({"pixels": image, "y": label})
    assert picked.args == (image,)
    optional = InputSelector.parse(None, 1, ("image", "mask")).select({"image": image, "label": label})
    assert optional.args == (image,)
    with pytest.raises(DataError, match="named img, msk but the model's forward takes image, mask"):
        selector.select({"img": image, "msk": mask})


def test_samples_cap_and_short_data_warning(reference) -> None:
    capped = scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy", ScanOptions(device="cpu", samples=100, batch_size=64))
    assert capped.data.samples == 100
    assert capped.sites[0].stats.count[0] == 100
    short = scan(FIX / "mlp.ts.pt", FIX / "mlp.calib.npy", ScanOptions(device="cpu", samples=1000))
    assert short.data.samples == 256
    assert any("asked for 1000 samples" in w and "used 256" in w for w in short.warnings)


@pytest.mark.parametrize("size", [1, 3, 7, 32])
def test_exact_batches_cut_the_stream_across_its_batch_ends(size: int) -> None:
    rng = np.random.default_rng(size)
    rows = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 2)
    ends = np.sort(rng.choice(np.arange(1, 100), 12, replace=False)).tolist()
    cuts = [0, *ends, 100]
    stream = (ModelInput((rows[a:b],), {"m": -rows[a:b]}) for a, b in zip(cuts, cuts[1:]))
    exact = ExactBatches(stream, size)
    batches = list(exact)
    assert {b.size for b in batches} == {size}
    used = len(batches) * size
    assert used == 100 - 100 % size and exact.left_out == 100 % size
    np.testing.assert_array_equal(torch.cat([b.args[0] for b in batches]), rows[:used])
    np.testing.assert_array_equal(torch.cat([b.kwargs["m"] for b in batches]), -rows[:used])


def test_exact_batches_without_a_size_pass_the_stream_through() -> None:
    parts = [ModelInput((torch.zeros(n, 2),)) for n in (5, 1, 9)]
    exact = ExactBatches(iter(parts), None)
    assert list(exact) == parts and exact.left_out == 0


@pytest.mark.parametrize("batch_size", [2, 5, 32])
def test_a_program_exported_with_a_fixed_batch_scans_every_whole_batch_of_the_data(
        tmp_path: Path, batch_size: int) -> None:
    """A static-batch `torch.export` program takes only batches of its size: the data is
    cut to it across its own batches, and only the samples at the end that make no whole
    batch are left out (the guard failed on the first batch of another size before)."""
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp().eval(), (torch.from_numpy(CALIB[:3]),)), str(path))
    data = tmp_path / "d.npy"
    np.save(data, CALIB[:200])
    report = scan(path, data, ScanOptions(device="cpu", batch_size=batch_size))
    assert report.data.samples == 198
    assert any("2 samples were left out: the model takes batches of exactly 3" in w for w in report.warnings)
    whole = scan(mlp(), [torch.from_numpy(CALIB[:198])], ScanOptions(device="cpu"))
    assert positives(report) == positives(whole)
    for got, want in zip(report.sites, whole.sites):
        np.testing.assert_allclose(got.stats.maximum, want.stats.maximum, rtol=1e-6)
        np.testing.assert_array_equal(got.stats.count, want.stats.count)
        np.testing.assert_allclose(got.stats.mean, want.stats.mean, rtol=1e-5, atol=1e-6)
    capped = scan(path, data, ScanOptions(device="cpu", samples=100))
    assert capped.data.samples == 99
    assert not any("asked for" in w for w in capped.warnings)


def test_data_shorter_than_a_fixed_batch_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(mlp().eval(), (torch.from_numpy(CALIB[:16]),)), str(path))
    np.save(tmp_path / "d.npy", CALIB[:10])
    with pytest.raises(DataError, match="10 samples, fewer than one batch of the 16 the model was exported to take"):
        scan(path, tmp_path / "d.npy", ScanOptions(device="cpu"))


@pytest.mark.parametrize(("samples", "batch_size"), [(34, 32), (100, 100), (7, 5), (66, 64)])
def test_a_program_with_a_bounded_dynamic_batch_gets_batches_in_its_range(
        tmp_path: Path, samples: int, batch_size: int) -> None:
    """Dim("b", min=4, max=64): a last batch under 4 joins the one before, a --batch-size
    over 64 is kept to 64 (the program's guard failed on either before); every sample is
    scanned and the statistics are those of the whole data."""
    path = tmp_path / "bounded.pt2"
    batch = torch.export.Dim("b", min=4, max=64)
    torch.export.save(torch.export.export(mlp().eval(), (torch.from_numpy(CALIB[:8]),), dynamic_shapes=({0: batch},)),
                      str(path))
    np.save(tmp_path / "d.npy", CALIB[:samples])
    report = scan(path, tmp_path / "d.npy", ScanOptions(device="cpu", batch_size=batch_size))
    assert report.data.samples == samples and not any("left out" in w for w in report.warnings)
    whole = scan(mlp(), [torch.from_numpy(CALIB[:samples])], ScanOptions(device="cpu"))
    assert positives(report) == positives(whole)
    for got, want in zip(report.sites, whole.sites):
        np.testing.assert_array_equal(got.stats.count, want.stats.count)
        np.testing.assert_allclose(got.stats.maximum, want.stats.maximum, rtol=1e-6)
        np.testing.assert_allclose(got.stats.mean, want.stats.mean, rtol=1e-5, atol=1e-6)
    np.save(tmp_path / "short.npy", CALIB[:3])
    with pytest.raises(DataError, match="3 samples, fewer than one batch of the at least 4 the model was exported"):
        scan(path, tmp_path / "short.npy", ScanOptions(device="cpu"))


@pytest.mark.parametrize(("sizes", "low", "high", "want", "left"), [
    ([32, 2], 4, 64, [34], 0), ([64, 2], 4, 64, [62, 4], 0), ([4, 4, 3], 4, 5, [4, 5], 2),
    ([1, 1, 1, 5], 4, None, [8], 0), ([2], 4, 8, [], 2), ([5, 2, 5], 4, 6, [6, 6], 0),
])
def test_bounded_batches_join_short_ones_and_cut_long_joins(sizes: list[int], low: int, high: int | None,
                                                             want: list[int], left: int) -> None:
    stream = [ModelInput((torch.arange(n, dtype=torch.float32) + 100 * i,)) for i, n in enumerate(sizes)]
    cut = ExactBatches(iter(stream), None, low, high)
    got = list(cut)
    assert [b.size for b in got] == want and cut.left_out == left
    assert all(low <= b.size and (high is None or b.size <= high) for b in got)
    kept = torch.cat([b.args[0] for b in got]) if got else torch.empty(0)
    assert torch.equal(kept, torch.cat([b.args[0] for b in stream])[:kept.numel()])  # in order, none twice


@pytest.mark.parametrize("make", [
    lambda p: np.save(p / "e.npy", np.zeros((0, 32), np.float32)) or p / "e.npy",
    lambda p: (p / "empty").mkdir() or p / "empty",
    lambda p: p / "nothing.npy",
])
def test_empty_or_missing_data_is_an_error(tmp_path: Path, make) -> None:
    with pytest.raises(DataError):
        scan(FIX / "mlp.ts.pt", str(make(tmp_path)), ScanOptions(device="cpu"))


def test_empty_iterable_is_an_error() -> None:
    with pytest.raises(DataError, match="no samples"):
        scan(mlp(), [], ScanOptions(device="cpu"))


def test_multi_input_model_from_npz(tmp_path: Path) -> None:
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(2, 3)

        def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.a(image) + self.b(meta))

    rng = np.random.default_rng(0)
    image, meta = rng.normal(size=(10, 4)).astype(np.float32), rng.normal(size=(10, 2)).astype(np.float32)
    np.savez(tmp_path / "named.npz", meta=meta, image=image)  # keyword, any order
    np.savez(tmp_path / "positional.npz", image, meta)  # arr_0, arr_1
    model = TwoInputs()
    a = scan(model, str(tmp_path / "named.npz"), ScanOptions(device="cpu"))
    b = scan(model, str(tmp_path / "positional.npz"), ScanOptions(device="cpu"))
    c = scan(model, [(torch.from_numpy(image), torch.from_numpy(meta))], ScanOptions(device="cpu"))
    assert positives(a) == positives(b) == positives(c)


@pytest.mark.parametrize("model", ["mlp.ts.pt", "mlp.onnx"])
def test_big_endian_and_long_double_arrays_give_the_same_statistics(tmp_path: Path, reference, model: str) -> None:
    np.save(tmp_path / "big.npy", CALIB.astype(">f4"))
    np.save(tmp_path / "long.npy", CALIB.astype(np.longdouble))
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / "shards" / "a.npy", CALIB[:100].astype(">f4"))
    np.save(tmp_path / "shards" / "b.npy", CALIB[100:].astype(">f4"))
    same = scan(FIX / model, FIX / "mlp.calib.npy", ScanOptions(device="cpu")) if model.endswith(".onnx") else reference
    for data in ("big.npy", "long.npy", "shards"):
        assert positives(scan(FIX / model, str(tmp_path / data), ScanOptions(device="cpu"))) == positives(same), data


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda p: torch.save(torch.tensor(3.0), p / "d.pt"), r"d\.pt: tensor is a scalar, expected samples"),
    (lambda p: torch.save((torch.ones(4, 32), torch.tensor(2.0)), p / "d.pt"), r"d\.pt: tensor 1 is a scalar"),
    (lambda p: torch.save({"x": torch.ones(4, 32, dtype=torch.complex64)}, p / "d.pt"),
     r"d\.pt: tensor 'x' has dtype complex64, expected real numbers"),
    (lambda p: np.save(p / "d.npy", np.ones((4, 32), np.complex64)), r"d\.npy: array has dtype complex64"),
    (lambda p: [(p / "d").mkdir(), np.save(p / "d" / "a.npy", np.float32(1)), np.save(p / "d" / "b.npy", np.float32(2))],
     r"a\.npy: array is a scalar"),
])
def test_unusable_arrays_are_one_line_data_errors(tmp_path: Path, make, pattern: str) -> None:
    make(tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.name.startswith("d"))
    with pytest.raises(DataError, match=pattern):
        scan(FIX / "mlp.ts.pt", str(data), ScanOptions(device="cpu"))


def test_inputs_choose_among_the_arrays_of_a_file(tmp_path: Path, reference) -> None:
    """--inputs (and, without it, the model's input count) applies to .npz and tuple .pt
    files as to a DataLoader's (inputs, labels) batches; it used to be ignored there."""
    labels = np.arange(len(CALIB), dtype=np.int64) % 10
    np.savez(tmp_path / "xy.npz", CALIB, labels)  # arr_0, arr_1: the labels are no model input
    np.savez(tmp_path / "yx.npz", labels, CALIB)
    torch.save((torch.from_numpy(labels), torch.from_numpy(CALIB)), tmp_path / "yx.pt")
    np.savez(tmp_path / "named.npz", x=CALIB, label=labels)
    cases = [("xy.npz", None), ("yx.npz", "1"), ("yx.pt", "1")]
    for name, inputs in cases:
        report = scan(FIX / "mlp.ts.pt", str(tmp_path / name), ScanOptions(device="cpu", inputs=inputs))
        assert positives(report) == positives(reference), name
    named = scan(mlp(), str(tmp_path / "named.npz"), ScanOptions(device="cpu", inputs="x"))
    assert positives(named) == positives(reference)
    with pytest.raises(DataError, match="the batch has only 2 elements"):
        scan(FIX / "mlp.ts.pt", str(tmp_path / "yx.npz"), ScanOptions(device="cpu", inputs="2"))


def test_fortran_ordered_arrays_read_as_their_values(tmp_path: Path, reference) -> None:
    """np.save of a transposed array writes it Fortran-ordered: valid, and once refused."""
    for shape in [(40, 10), (7, 3, 4, 5)]:
        array = np.asfortranarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        np.save(tmp_path / "f.npy", array)
        rows = NpyRows(tmp_path / "f.npy")
        for part in (slice(0, 3), slice(2, 7), slice(0, None)):
            np.testing.assert_array_equal(rows[part], array[part])
    np.save(tmp_path / "x.npy", np.asfortranarray(CALIB))
    np.savez(tmp_path / "x.npz", x=np.asfortranarray(CALIB))
    for name in ("x.npy", "x.npz"):
        report = scan(FIX / "mlp.ts.pt", str(tmp_path / name), ScanOptions(device="cpu"))
        assert positives(report) == positives(reference), name
        for site, ref in zip(report.sites, reference.sites):
            np.testing.assert_array_equal(site.stats.maximum, ref.stats.maximum)
            np.testing.assert_allclose(site.stats.mean, ref.stats.mean, rtol=1e-12)


def test_batches_without_samples_or_data_are_data_errors(tmp_path: Path) -> None:
    """0-d batches, a sparse or meta batch from user code, a random shape no machine holds:
    one-line data errors, not "internal error: <torch exception>"."""
    (tmp_path / "batches.py").write_text(textwrap.dedent("""
        import torch
        def scalars():
            return [torch.tensor(1.0), torch.tensor(2.0)]
        def sparse():
            return [torch.ones(4, 32).to_sparse()]
        def meta():
            return [torch.ones(4, 32, device="meta")]
        def scalar():
            return torch.tensor(3.0)
    """))
    cases = {"scalars": "input 0 is a 0-d tensor \\(a scalar\\), expected samples along the first axis",
             "sparse": "input 0 is a sparse_coo tensor, expected a dense one",
             "meta": "input 0 is on the meta device", "scalar": "a 0-d array \\(a scalar\\)"}
    for function, message in cases.items():
        with pytest.raises(DataError, match=rf"batches\.py:{function}: {message}"):
            scan(FIX / "mlp.ts.pt", f"{tmp_path / 'batches.py'}:{function}", ScanOptions(device="cpu"))
    huge = ScanOptions(device="cpu", data=DataOptions(input_shape=(10**11,)))
    with pytest.raises(DataError, match=r"--input-shape 100000000000: a batch of 32 such samples takes 11,920\.9 GiB"):
        scan(FIX / "mlp.ts.pt", "random", huge)


def test_positions_do_not_pick_named_entries(tmp_path: Path) -> None:
    """A named batch's entries are chosen by name: `--inputs 0` on an .npz of x and mask used to
    be ignored, feeding both (the mask then planted a dead unit that is not there)."""
    np.savez(tmp_path / "xm.npz", x=CALIB, mask=np.zeros_like(CALIB))
    for inputs in ("0", "1", "7"):
        with pytest.raises(DataError, match=rf"--inputs {inputs}: the data's inputs are named \(x, mask\), not "
                                            r"positional; choose them by name \(--inputs x\)"):
            scan(FIX / "mlp.ts.pt", str(tmp_path / "xm.npz"), ScanOptions(device="cpu", inputs=inputs))
    x = torch.ones(2, 3)
    with pytest.raises(DataError, match="named"):
        InputSelector.parse("0", 1).select({"x": x})
    picked = InputSelector.parse("0", 1, ("x",)).select(({"x": x}, torch.arange(2)))  # a position picks the dict
    assert picked.args == (x,)


def test_entries_the_model_does_not_take_are_left_unread(tmp_path: Path, reference) -> None:
    """Class names, a 0-d temperature: entries of a data file that are no model input and
    hold no samples are neither read nor checked once --inputs (or the model's input names)
    say which entries are inputs; without that they are refused with the way out."""
    x = torch.from_numpy(CALIB)
    np.savez(tmp_path / "classes.npz", x=CALIB, class_idx=np.arange(7))
    np.savez(tmp_path / "meta.npz", x=CALIB, temperature=np.float32(2.0))
    torch.save({"x": x, "classes": torch.arange(7)}, tmp_path / "classes.pt")
    for name in ("classes.npz", "meta.npz", "classes.pt"):
        report = scan(FIX / "mlp.ts.pt", str(tmp_path / name), ScanOptions(device="cpu", inputs="x"))
        assert positives(report) == positives(reference), name
        assert report.data.samples == len(CALIB)
        by_name = scan(mlp(), str(tmp_path / name), ScanOptions(device="cpu"))  # forward(x): x is the input
        assert positives(by_name) == positives(reference), name
    np.savez(tmp_path / "unnamed.npz", pixels=CALIB, temperature=np.float32(2.0))
    with pytest.raises(DataError, match="temperature is a scalar.*name the model's inputs with --inputs"):
        scan(FIX / "mlp.ts.pt", str(tmp_path / "unnamed.npz"), ScanOptions(device="cpu"))
    with pytest.raises(DataError, match=r"--inputs y: the file has no entry 'y' \(it has x, class_idx\)"):
        scan(FIX / "mlp.ts.pt", str(tmp_path / "classes.npz"), ScanOptions(device="cpu", inputs="y"))
    masked = scan(_OptionalMask(mlp()), str(tmp_path / "meta.npz"), ScanOptions(device="cpu"))  # mask not in it
    assert positives(masked) == positives(reference)


class _OptionalMask(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x if mask is None else x * mask)


def test_a_failing_user_dataset_or_generator_is_a_data_error_naming_the_batch() -> None:
    def generator():
        yield torch.ones(4, 32)
        raise ValueError("bad shard 7")

    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> torch.Tensor:
            if i == 5:
                raise KeyError("sample 5 missing")
            return torch.ones(32)

    with pytest.raises(DataError, match=r"reading batch 1 failed: ValueError: bad shard 7"):
        scan(FIX / "mlp.ts.pt", generator(), ScanOptions(device="cpu"))
    with pytest.raises(DataError, match=r"reading batch 1 failed: KeyError: sample 5 missing"):
        scan(FIX / "mlp.ts.pt", Broken(), ScanOptions(device="cpu", batch_size=4, data=DataOptions(workers=0)))
    with pytest.raises(DataError, match=r"reading batch 1 failed: KeyError: .sample 5 missing"):  # from a worker
        scan(FIX / "mlp.ts.pt", Broken(), ScanOptions(device="cpu", batch_size=4, data=DataOptions(workers=1)))


def test_npz_members_are_read_by_rows_and_compressed_ones_whole(tmp_path: Path) -> None:
    """np.savez stores its arrays as they are: read in place by rows (NpyRows at the
    member's offset); savez_compressed deflates them: read whole. Same batches either way,
    big-endian and integer arrays included; a truncated member is one line naming it."""
    rng = np.random.default_rng(3)
    arrays = {"image": rng.normal(size=(37, 3, 4)).astype(">f4"), "ids": rng.integers(0, 9, size=(37, 5))}
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    stored, packed = open_data(str(tmp_path / "stored.npz")), open_data(str(tmp_path / "packed.npz"))
    assert all(isinstance(a, NpyRows) for a in stored.keyword.values())
    assert not any(isinstance(a, NpyRows) for a in packed.keyword.values())
    for a, b in zip(stored.batches(8), packed.batches(8), strict=True):
        assert a.kwargs.keys() == b.kwargs.keys() == arrays.keys()
        for key in arrays:
            assert torch.equal(a.kwargs[key], b.kwargs[key])
    joined = torch.cat([batch.kwargs["image"] for batch in stored.batches(8)])
    assert torch.equal(joined, torch.from_numpy(arrays["image"].astype("<f4")))
    import zipfile

    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_STORED) as archive:
        with zipfile.ZipFile(tmp_path / "stored.npz") as source:
            archive.writestr("image.npy", source.read("image.npy")[:-12])
    with pytest.raises(DataError, match=r"short\.npz \(image\): truncated \.npy member"):
        open_data(str(tmp_path / "short.npz"))


def test_safetensors_tensors_are_read_by_rows_against_the_library(tmp_path: Path) -> None:
    """The header is read by deadrelu, the rows in place (memory flat); the values equal
    what the safetensors library itself loads. Float8 and a file cut short are one line each."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(4)
    arrays = {"image": rng.normal(size=(29, 3, 4)).astype(np.float32), "ids": rng.integers(0, 9, size=(29, 5)),
              "half": rng.normal(size=(29, 2)).astype(np.float16), "mask": rng.random((29, 3)) > 0.5}
    save_file(arrays, str(tmp_path / "d.safetensors"), metadata={"made_by": "test"})
    source = open_data(str(tmp_path / "d.safetensors"))
    assert all(isinstance(a, NpyRows) for a in source.keyword.values())
    loaded = load_file(str(tmp_path / "d.safetensors"))
    for key in arrays:
        joined = torch.cat([batch.kwargs[key] for batch in source.batches(8)])
        assert torch.equal(joined, torch.from_numpy(loaded[key])), key

    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-7])
    with pytest.raises(DataError, match=r"short\.safetensors: tensor '\w+': its byte range .*\(truncated"):
        open_data(str(tmp_path / "short.safetensors"))
    torch_file = pytest.importorskip("safetensors.torch")
    torch_file.save_file({"x": torch.ones(4, 2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(DataError, match=r"f8\.safetensors: tensor 'x' has dtype F8_E4M3; calibration data is read as"):
        open_data(str(tmp_path / "f8.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match=r"junk\.safetensors: not a readable \.safetensors file"):
        open_data(str(tmp_path / "junk.safetensors"))


def test_a_sixteen_bit_grayscale_png_is_scaled_by_its_full_range(tmp_path: Path) -> None:
    """Converting an I;16 PNG to RGB clips every pixel to 255: an all-white image, and dead units
    that are live on the real one. It is read as floats over 65535."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I;16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    report = scan(model, str(tmp_path), ScanOptions(device="cpu", data=DataOptions(
        image=ImageOptions(size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))))
    x = torch.from_numpy(np.stack([pixels.astype(np.float32) / 65535.0] * 3)[None])
    with torch.no_grad():
        pre = model[0](x)
    stats = report.sites[0].stats
    assert np.allclose(stats.mean, pre.mean((0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(stats.maximum, pre.amax((0, 2, 3)).numpy(), atol=1e-5)
    assert list(report.sites[0].verdict.dead) == [i for i in range(4) if not (pre[:, i] > 0).any()]
