"""Calibration sources behind one protocol (`CalibrationSource`): arrays read a batch at a
time, `.npy` shards, seeded random inputs, the user's loaders and datasets, image files."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deadrelu.data.inputs import ModelInput
from deadrelu.errors import DataError, DeadReluError, one_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0,), (1.0,)),
}


class CalibrationSource(Protocol):
    """Anything that yields raw batches (tensors, tuples or dicts) of calibration data."""

    description: str
    is_random: bool

    def total(self) -> int | None: ...

    def batches(self, batch_size: int) -> Iterator[Any]: ...


# --- arrays ------------------------------------------------------------------------------

class NpyRows:
    """A `.npy` array read by rows on demand: seek + read, no memory map.

    A memory map would keep every page it touched resident, so the process would grow
    with the file; reading each batch with a plain read keeps memory flat. ``start`` and
    ``size``: the array is a member stored (uncompressed) inside a larger file, as in an
    `.npz` archive written by `np.savez`; ``label`` names it in messages.
    """

    def __init__(self, path: Path, start: int = 0, size: int | None = None, label: str | None = None) -> None:
        self.path = path
        label = label or str(path)
        try:
            with path.open("rb") as handle:
                handle.seek(start)
                version = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = reader(handle)
                self.offset = handle.tell()
        except Exception as exc:
            raise DataError(f"{label}: not a readable .npy array ({error_line(exc)})") from exc
        if dtype.hasobject:
            raise DataError(f"{label}: array has dtype object (Python objects), expected real numbers")
        self._place(tuple(shape), dtype)
        self.fortran = bool(fortran) and self.ndim > 1
        available = path.stat().st_size if size is None else start + size
        if available < self.end:
            raise DataError(f"{label}: truncated .npy {'file' if size is None else 'member'} "
                            f"({available - start} bytes, header says {self.end - start})")

    @classmethod
    def raw(cls, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> NpyRows:
        """C-ordered rows at `offset` whose shape and dtype another header gave (a
        .safetensors file's); the caller checks they lie inside the file."""
        rows = cls.__new__(cls)
        rows.path, rows.offset, rows.fortran = path, offset, False
        rows._place(shape, dtype)
        return rows

    def _place(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape: tuple[int, ...] = shape
        self.dtype = dtype
        self.ndim = len(shape)
        self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.end = self.offset + shape[0] * self._row_bytes if shape else self.offset

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        count = max(stop - start, 0)
        if self.fortran:
            return self._fortran_rows(start, count)
        with self.path.open("rb") as handle:
            handle.seek(self.offset + start * self._row_bytes)
            flat = np.fromfile(handle, dtype=self.dtype, count=count * (self._row_bytes // max(self.dtype.itemsize, 1)))
        return flat.reshape((count, *self.shape[1:]))

    def _fortran_rows(self, start: int, count: int) -> np.ndarray:
        """Rows of a Fortran-ordered array (what `np.save` writes for a transposed one):
        each of its ``prod(shape[1:])`` columns holds the samples contiguously, so a batch
        is one read per column, and memory stays that of the batch."""
        columns = int(np.prod(self.shape[1:], dtype=np.int64))
        out = np.empty((columns, count), dtype=self.dtype)
        item = self.dtype.itemsize
        with self.path.open("rb") as handle:
            for column in range(columns):
                handle.seek(self.offset + (column * self.shape[0] + start) * item)
                handle.readinto(memoryview(out[column]).cast("B"))
        # column index c runs over shape[1:] first axis fastest: reversed dims, then the transpose
        return np.ascontiguousarray(out.reshape(*self.shape[1:][::-1], count).T)


class BFloat16Rows:
    """BF16 rows (a .safetensors tensor) read as 16-bit words by `NpyRows` and viewed as
    torch.bfloat16, which numpy has no type for; the same bits, no conversion."""

    dtype = torch.bfloat16

    def __init__(self, words: NpyRows) -> None:
        self.words = words
        self.path, self.shape, self.ndim, self.end = words.path, words.shape, words.ndim, words.end

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return torch.from_numpy(self.words[rows]).view(torch.bfloat16)


@dataclass
class ArraySource:
    """Arrays sharing a first (sample) axis; positional (tuple batches) or keyword (dicts)."""

    description: str
    positional: list[Any]
    keyword: dict[str, Any]
    is_random: bool = False

    def total(self) -> int:
        arrays = self.positional + list(self.keyword.values())
        return min(int(a.shape[0]) for a in arrays)

    def batches(self, batch_size: int) -> Iterator[ModelInput]:
        for start in range(0, self.total(), batch_size):
            stop = start + batch_size
            yield ModelInput(
                tuple(_tensor(a[start:stop]) for a in self.positional),
                {k: _tensor(a[start:stop]) for k, a in self.keyword.items()},
            )


@dataclass
class ShardSource:
    """A folder of `.npy` shards (sorted by name), streamed; batches span shard ends."""

    description: str
    shards: list[NpyRows]
    is_random: bool = False

    def total(self) -> int:
        return sum(len(s) for s in self.shards)

    def batches(self, batch_size: int) -> Iterator[ModelInput]:
        pending: list[np.ndarray] = []
        held = 0
        for shard in self.shards:
            for start in range(0, len(shard), batch_size):
                rows = shard[start:start + batch_size]
                pending.append(rows)
                held += len(rows)
                while held >= batch_size:
                    joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                    yield ModelInput((_tensor(joined[:batch_size]),))
                    rest = joined[batch_size:]
                    pending, held = ([rest] if len(rest) else []), len(rest)
        if held:
            yield ModelInput((_tensor(np.concatenate(pending)),))


@dataclass
class RandomSource:
    """Seeded Gaussian inputs of a given per-sample shape."""

    shape: tuple[int, ...]
    samples: int
    seed: int = 0
    is_random: bool = True

    @property
    def description(self) -> str:
        return f"random{list(self.shape)}"

    def total(self) -> int:
        return self.samples

    def batches(self, batch_size: int) -> Iterator[ModelInput]:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.samples, batch_size):
            size = min(batch_size, self.samples - start)
            try:
                batch = torch.randn((size, *self.shape), generator=generator)
            except RuntimeError as exc:  # torch's allocator: "can't allocate memory"
                gib = size * math.prod(self.shape) * 4 / 2**30
                raise DataError(f"--input-shape {','.join(map(str, self.shape))}: a batch of {size} such samples "
                                f"takes {gib:,.1f} GiB, more than this machine can allocate; check the shape, "
                                "or lower --batch-size") from exc
            yield ModelInput((batch,))


# --- user code and loaders ---------------------------------------------------------------

@dataclass
class IterableSource:
    """Batches from an iterable: the caller's DataLoader, list of tensors, generator."""

    iterable: Iterable[Any]
    description: str = "<iterable>"
    workers: int = 0
    is_random: bool = False

    def total(self) -> int | None:
        dataset = getattr(self.iterable, "dataset", None)
        if isinstance(self.iterable, torch.utils.data.DataLoader) and _sized(dataset):
            return len(dataset)  # type: ignore[arg-type]
        if isinstance(self.iterable, (list, tuple)):
            return sum(_batch_size(b) for b in self.iterable)
        return None

    def batches(self, batch_size: int) -> Iterator[Any]:
        iterable = self.iterable
        if _is_dataset(iterable):
            iterable = torch.utils.data.DataLoader(iterable, batch_size=batch_size, num_workers=self.workers)  # type: ignore[arg-type]
        iterator = iter(iterable)
        index = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DeadReluError:
                raise
            except Exception as exc:  # the user's Dataset or generator failed: name the data, not "internal error"
                raise DataError(f"--data {self.description}: reading batch {index} failed: "
                                f"{type(exc).__name__}: {one_line(_message(exc))}") from exc
            index += 1
            yield batch


def _message(exc: BaseException) -> str:
    """An exception's message; a KeyError's own text, not its repr (a DataLoader worker's
    error comes back as one of the original type, its message the worker's traceback)."""
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _sized(obj: Any) -> bool:
    try:
        len(obj)
    except TypeError:
        return False
    return True


def _is_dataset(obj: Any) -> bool:
    if isinstance(obj, torch.utils.data.DataLoader):
        return False
    return isinstance(obj, torch.utils.data.Dataset) or (
        hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (list, tuple, dict, torch.Tensor, np.ndarray)))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0]) if batch.ndim else 1  # (a 0-d batch is refused as it is read)
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def _refuse_shuffled_shards(obj: Any, description: str) -> None:
    """Under torchrun each rank takes every K-th batch of the loader's order; a shuffling
    loader has an order of its own per rank, so some samples would count twice and others
    never (live units reported dead)."""
    from deadrelu.distributed import ranks_from_env

    if (isinstance(obj, torch.utils.data.DataLoader) and isinstance(obj.sampler, torch.utils.data.RandomSampler)
            and ranks_from_env().size > 1):
        raise DataError(f"{description}: a DataLoader with shuffle=True under torchrun: each rank shuffles "
                        "its own order, so the ranks' shards would overlap; use shuffle=False (statistics do "
                        "not depend on the order)")


def source_from_object(obj: Any, description: str, workers: int = 0) -> CalibrationSource:
    """Wrap what a user function returned, or what the API was given."""
    if hasattr(obj, "batches") and hasattr(obj, "total"):
        return obj
    _refuse_shuffled_shards(obj, description)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if obj.ndim == 0:
            raise DataError(f"{description}: a 0-d array (a scalar), expected samples along the first axis")
        return ArraySource(description, [obj], {})
    if isinstance(obj, (str, bytes)) or not (isinstance(obj, Iterable) or _is_dataset(obj)):
        raise DataError(f"{description} gave a {type(obj).__name__}: expected a DataLoader, a Dataset or an iterable of batches")
    return IterableSource(obj, description, workers)


# --- images ------------------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Images decoded with Pillow: shorter side resized to `size`, centre-cropped to
    size x size, RGB, scaled to [0, 1], then normalised with mean/std. Runs in workers."""

    def __init__(self, files: list[Path], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.files, self.size = files, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                image, full_scale = _in_known_range(image)
                scale = self.size / min(image.size)
                resized = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))),
                                       Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable image ({error_line(exc)})") from exc
        left, top = (resized.width - self.size) // 2, (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(cropped, dtype=np.float32) / full_scale
        if array.ndim == 2:  # a 16-bit grayscale image, kept in floats: as RGB, every channel the same
            array = np.repeat(array[:, :, None], 3, axis=2)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return (tensor - self.mean) / self.std


# PNG's 16-bit grayscale, as Pillow opens it (older Pillow versions say "I")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _in_known_range(image: Any) -> tuple[Any, float]:
    """The image as 8-bit RGB (full scale 255) or, for a 16-bit grayscale PNG, as floats
    (full scale 65535): converting those to RGB clips every pixel to 255, an all-white image."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").convert("F"), 65535.0
    return image.convert("RGB"), 255.0


@dataclass(frozen=True)
class ImageOptions:
    size: int = 224
    mean: tuple[float, ...] = NORMALISATIONS["imagenet"][0]
    std: tuple[float, ...] = NORMALISATIONS["imagenet"][1]
    workers: int = 2


def parse_normalisation(mean: str | None, std: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`--mean`/`--std`: a preset name (imagenet, clip, half, none) or comma-separated numbers,
    one for all channels or three, one per RGB channel (images are decoded as RGB)."""
    def parse(text: str, index: int, flag: str) -> tuple[float, ...]:
        if text in NORMALISATIONS:
            return NORMALISATIONS[text][index]
        expected = f"expected a preset ({', '.join(NORMALISATIONS)}) or numbers like 0.5,0.5,0.5"
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise DataError(f"{flag} '{text}': {expected}") from None
        if len(values) not in (1, 3):
            raise DataError(f"{flag} '{text}': {len(values)} values, expected 3 (one per RGB channel; images are "
                            "decoded as RGB) or 1 for all channels")
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{flag} '{text}': {expected}, all finite")
        return values

    mean_v = parse(mean or "imagenet", 0, "--mean")
    std_v = parse(std or (mean if mean in NORMALISATIONS else "imagenet"), 1, "--std")
    if any(s <= 0 for s in std_v):
        raise DataError(f"--std '{std}': values must be positive (standard deviations)")
    return mean_v, std_v


def _tensor(array: Any) -> torch.Tensor:
    """One batch as a tensor: native byte order (a big-endian .npy), long double as float64
    (torch has neither), otherwise the array's own dtype."""
    if isinstance(array, torch.Tensor):
        return array
    if array.dtype == np.longdouble and np.dtype(np.longdouble).itemsize > 8:
        array = array.astype(np.float64)
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, copy=True, order="C")  # a writable copy of one batch
    return torch.from_numpy(array)


def error_line(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters: for messages that name a file."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
