"""Calibration data sources behind one protocol: an iterator of model inputs.

`open_data` turns a ``--data`` spec into a `CalibrationSource`:

* ``file.npy`` -- read a batch at a time by seeking in the file (memory stays flat);
* ``file.npz`` / ``file.safetensors`` -- one array per model input (by input name; names
  ``arr_0, arr_1, ...`` or a single array are positional); read whole;
* ``file.pt`` -- a tensor, a tuple of tensors or a dict of tensors (``weights_only=True``);
* a folder of ``.npy`` shards -- streamed shard after shard, batches spanning shards;
* a folder of images (JPEG/PNG, flat or one sub-folder per class) -- decoded with Pillow
  in `DataLoader` worker processes;
* ``pkg.module:function`` or ``path/to/file.py:function`` -- the function (your code)
  returns a `DataLoader`, a `Dataset`, or any iterable of batches;
* ``random`` -- seeded Gaussian inputs of ``--input-shape``.

A batch may be a tensor, a tuple/list of tensors (positional inputs) or a dict (keyword
inputs). Which elements of a tuple batch are model inputs: `InputSelector` -- by default
the leading elements, as many as the model's forward takes positionally, so the usual
``(inputs, labels)`` batch of a classification `DataLoader` feeds only ``inputs``.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deadrelu.errors import DataError, DeadReluError, one_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class ModelInput:
    """One batch as the model takes it: positional and keyword tensors."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        first = next(iter(self.args), None)
        if first is None:
            first = next(iter(self.kwargs.values()))
        return int(first.shape[0]) if first.ndim else 1

    def map(self, fn: Any) -> ModelInput:
        return ModelInput(tuple(fn(a) for a in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs: positional inputs are named 'input 0', 'input 1', ..."""
        return [(f"input {i}", a) for i, a in enumerate(self.args)] + [(f"input '{k}'", v) for k, v in self.kwargs.items()]

    def check_finite(self, first_sample: int, description: str) -> None:
        """Non-finite calibration data is a data error naming the data, the sample (counted
        over the whole stream from 0) and the input. CPU tensors only: a check of data
        already on the GPU would cost a host sync a batch."""
        for name, tensor in self.named():
            if tensor.is_floating_point() and tensor.device.type == "cpu" and not _all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(1).nonzero()[0])
                raise DataError(f"{description}: sample {first_sample + bad} holds NaN or Inf in {name}: "
                                "calibration data must be finite")

    def shapes(self) -> str:
        parts = [str(tuple(a.shape)) for a in self.args] + [f"{k}={tuple(v.shape)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def split(self, parts: int) -> list[ModelInput]:
        """The batch cut into `parts` nearly equal batches along the sample axis."""
        size = math.ceil(self.size / parts)
        chunks = [ModelInput(tuple(a[i:i + size] for a in self.args), {k: v[i:i + size] for k, v in self.kwargs.items()})
                  for i in range(0, self.size, size)]
        return chunks


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reduction and no temporary (a twentieth of the cost of `isfinite(x).all()`): NaN
    or Inf anywhere makes the sum non-finite, and a sum that overflowed from finite values
    is tested value by value. (A CPU tensor: its sum is read as a Python float; testing the
    sum as a tensor took 18 us a (32, 32) batch, this takes 6 us.)"""
    half = tensor.dtype in (torch.float16, torch.bfloat16)
    total = tensor.sum(dtype=torch.float32 if half else None).item()
    return math.isfinite(total) or bool(torch.isfinite(tensor).all())


@dataclass(frozen=True)
class InputSelector:
    """Which parts of a batch are model inputs.

    `positions` picks elements of a tuple batch (e.g. (0,) for ``(images, labels)``);
    `keys` picks entries of a dict batch. `count` is how many positional inputs the
    model takes (used when nothing was chosen explicitly).
    """

    positions: tuple[int, ...] | None = None
    keys: tuple[str, ...] | None = None
    count: int | None = None
    names: tuple[str, ...] | None = None  # the forward's positional parameters, in order, when known

    @staticmethod
    def parse(spec: str | None, count: int | None, names: tuple[str, ...] | None = None) -> InputSelector:
        """``--inputs 0`` / ``--inputs 0,1`` (positions) or ``--inputs image,mask`` (keys)."""
        if not spec:
            return InputSelector(count=count, names=names)
        parts = tuple(p.strip() for p in spec.split(",") if p.strip())
        if parts and all(p.isdigit() for p in parts):
            return InputSelector(positions=tuple(int(p) for p in parts), count=count, names=names)
        return InputSelector(keys=parts, count=count, names=names)

    def select(self, batch: Any) -> ModelInput:
        if isinstance(batch, ModelInput):  # arrays from a file (.npz, tuple .pt): the same choice applies
            if batch.args and not batch.kwargs:
                return self._from_sequence(batch.args)
            if batch.kwargs and not batch.args and (self.keys is not None or self.names is not None):
                return self._from_dict(batch.kwargs)
            return batch
        if isinstance(batch, torch.Tensor):
            return ModelInput((batch,))
        if isinstance(batch, np.ndarray):
            return ModelInput((torch.from_numpy(batch),))
        if isinstance(batch, dict):
            return self._from_dict(batch)
        if isinstance(batch, (tuple, list)):
            return self._from_sequence(batch)
        raise DataError(f"a batch of type {type(batch).__name__}: expected a tensor, a tuple/list of tensors or a dict of tensors")

    def _from_sequence(self, batch: Sequence[Any]) -> ModelInput:
        if self.positions is not None:
            if max(self.positions) >= len(batch):
                raise DataError(f"--inputs {','.join(map(str, self.positions))}: the batch has only {len(batch)} "
                                f"element{'' if len(batch) == 1 else 's'} (positions count from 0)")
            chosen = [batch[i] for i in self.positions]
        elif self.count is not None and len(batch) > self.count:
            chosen = list(batch[: self.count])  # (inputs, labels): the labels are not model inputs
        else:
            chosen = list(batch)
        if len(chosen) == 1 and isinstance(chosen[0], dict):
            return self._from_dict(chosen[0])
        return ModelInput(tuple(_as_tensor(x, f"batch element {i}") for i, x in enumerate(chosen)))

    def _from_dict(self, batch: dict[str, Any]) -> ModelInput:
        """Named inputs go to the forward's parameters of those names, as positional
        arguments (a torch.export program takes no keywords); without --inputs, entries the
        forward does not take (labels) are left out."""
        keys = self.keys if self.keys is not None else self._default_keys(batch)
        missing = [k for k in keys if k not in batch]
        if missing:
            raise DataError(f"--inputs: the batch has no key {missing[0]!r} (it has {', '.join(map(str, batch))})")
        tensors = {k: _as_tensor(batch[k], f"batch key {k!r}") for k in keys}
        if self.names is None:
            return ModelInput((), tensors)
        leading = self.names[:len(keys)]
        if set(keys) == set(leading):
            return ModelInput(tuple(tensors[k] for k in leading))
        if not set(keys) & set(self.names):  # --inputs pixels for forward(x): in the order given
            return ModelInput(tuple(tensors.values()))
        raise DataError(self._unplaceable(keys))

    def _unplaceable(self, keys: tuple[str, ...]) -> str:
        """Why named inputs that are partly the forward's parameters cannot be passed: inputs
        go by position (a torch.export program takes no keywords), so they must be its
        leading parameters, or all be other names (taken in the order given)."""
        assert self.names is not None
        takes = f"the model's forward takes ({', '.join(self.names)})"
        unknown = [k for k in keys if k not in self.names]
        if unknown:
            return (f"--inputs {','.join(keys)}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
                    f"not among its parameters, the others are; {takes}")
        last = max(self.names.index(k) for k in keys)
        skipped = [n for n in self.names[:last] if n not in keys]
        return (f"--inputs {','.join(keys)}: {takes} and inputs go by position, so {self.names[last]!r} needs "
                f"{', '.join(map(repr, skipped))} before it")

    def _default_keys(self, batch: dict[str, Any]) -> tuple[str, ...]:
        if self.names is None:
            return tuple(batch)
        taken = tuple(k for k in self.names if k in batch)
        required = self.names[:self.count] if self.count is not None else self.names[:1]
        if all(k in batch for k in required) and taken:
            return taken
        if len(batch) == 1 and len(required) <= 1:
            return tuple(batch)  # one array for a one-input model, whatever its name
        raise DataError(f"--data: the inputs are named {', '.join(map(str, batch))} but the model's forward takes "
                        f"{', '.join(self.names) or 'no named parameters'}; name them after its parameters, "
                        "or choose them with --inputs")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{what} is a {type(value).__name__}, expected a tensor (use --inputs to choose the model inputs)")


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
    with the file; reading each batch with a plain read keeps memory flat.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                version = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = reader(handle)
                self.offset = handle.tell()
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npy array ({_line(exc)})") from exc
        if dtype.hasobject:
            raise DataError(f"{path}: array has dtype object (Python objects), expected real numbers")
        if fortran:
            raise DataError(f"{path}: Fortran-ordered arrays are not supported; save with np.save(np.ascontiguousarray(a))")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.ndim = len(self.shape)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        expected = self.offset + self.shape[0] * self._row_bytes if self.shape else self.offset
        if path.stat().st_size < expected:
            raise DataError(f"{path}: truncated .npy file ({path.stat().st_size} bytes, header says {expected})")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        count = max(stop - start, 0)
        with self.path.open("rb") as handle:
            handle.seek(self.offset + start * self._row_bytes)
            flat = np.fromfile(handle, dtype=self.dtype, count=count * (self._row_bytes // max(self.dtype.itemsize, 1)))
        return flat.reshape((count, *self.shape[1:]))


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
            yield ModelInput((torch.randn((size, *self.shape), generator=generator),))


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
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def source_from_object(obj: Any, description: str, workers: int = 0) -> CalibrationSource:
    """Wrap what a user function returned, or what the API was given."""
    if hasattr(obj, "batches") and hasattr(obj, "total"):
        return obj
    if isinstance(obj, torch.Tensor):
        return ArraySource(description, [obj], {})
    if isinstance(obj, np.ndarray):
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
                image = image.convert("RGB")
                scale = self.size / min(image.size)
                resized = image.resize((max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))),
                                       Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable image ({_line(exc)})") from exc
        left, top = (resized.width - self.size) // 2, (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(cropped, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return (tensor - self.mean) / self.std


@dataclass(frozen=True)
class ImageOptions:
    size: int = 224
    mean: tuple[float, ...] = NORMALISATIONS["imagenet"][0]
    std: tuple[float, ...] = NORMALISATIONS["imagenet"][1]
    workers: int = 2


def parse_normalisation(mean: str | None, std: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`--mean`/`--std`: a preset name (imagenet, clip, half, none) or comma-separated numbers."""
    def parse(text: str, index: int, flag: str) -> tuple[float, ...]:
        if text in NORMALISATIONS:
            return NORMALISATIONS[text][index]
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise DataError(f"{flag} '{text}': expected a preset ({', '.join(NORMALISATIONS)}) or numbers like 0.5,0.5,0.5") from None

    mean_v = parse(mean or "imagenet", 0, "--mean")
    std_v = parse(std or (mean if mean in NORMALISATIONS else "imagenet"), 1, "--std")
    if any(s == 0 for s in std_v):
        raise DataError("--std: values must not be 0")
    return mean_v, std_v


# --- opening a spec ----------------------------------------------------------------------

@dataclass(frozen=True)
class DataOptions:
    """How to open `--data`."""

    input_shape: tuple[int, ...] | None = None
    random_samples: int = 64
    seed: int = 0
    workers: int = 2
    image: ImageOptions = field(default_factory=ImageOptions)


RANDOM = "random"  # the --data spec of seeded Gaussian inputs


def open_data(spec: str, options: DataOptions | None = None) -> CalibrationSource:
    """Open a `--data` spec (see the module docstring)."""
    options = options or DataOptions()
    if spec == RANDOM:
        if not options.input_shape:
            raise DataError("--data random needs --input-shape, e.g. --input-shape 3,224,224")
        return RandomSource(options.input_shape, options.random_samples, options.seed)
    path = Path(spec)
    if not path.exists():
        if _looks_like_callable(spec):
            return _open_callable(spec, options)
        raise DataError(f"{path}: no such data file or folder")
    if path.is_dir():
        return _open_folder(path, options)
    opener = {".npy": _open_npy, ".npz": _open_npz, ".pt": _open_pt, ".pth": _open_pt,
              ".safetensors": _open_safetensors}.get(path.suffix.lower())
    if opener is None:
        raise DataError(f"{path}: unknown data format '{path.suffix}', expected .npy, .npz, .pt, .safetensors, "
                        "a folder of images or .npy shards, or module:function")
    source = opener(path)
    if source.total() == 0:
        raise DataError(f"{path}: holds no samples")
    return source


def _looks_like_callable(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr and attr.replace("_", "").replace(".", "").isalnum())


def _open_callable(spec: str, options: DataOptions) -> CalibrationSource:
    from deadrelu.errors import ArchitectureError
    from deadrelu.load.arch import import_callable

    try:
        factory = import_callable(spec, "--data")
    except ArchitectureError as exc:
        raise DataError(str(exc)) from exc
    try:
        obj = factory() if callable(factory) else factory
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"--data '{spec}': calling it raised {type(exc).__name__}: {_line(exc)}") from exc
    return source_from_object(obj, spec, options.workers)


def _open_folder(path: Path, options: DataOptions) -> CalibrationSource:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    shards = [p for p in files if p.suffix.lower() == ".npy" and p.parent == path]
    if images:
        dataset = ImageFiles(images, options.image.size, options.image.mean, options.image.std)
        return IterableSource(dataset, f"{path}/ ({len(images)} images)", options.workers)
    if shards:
        rows = [NpyRows(p) for p in shards]
        _check_shards(path, rows)
        return ShardSource(f"{path}/ ({len(rows)} .npy shards)", rows)
    raise DataError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .npy shards")


def _check_shards(path: Path, shards: list[NpyRows]) -> None:
    first = shards[0]
    _check_array(first.path, "array", first)
    for shard in shards[1:]:
        if shard.shape[1:] != first.shape[1:] or shard.dtype != first.dtype:
            raise DataError(f"{shard.path}: shard shape {shard.shape} / {shard.dtype} differs from "
                            f"{first.path.name}'s {first.shape} / {first.dtype}")
    if sum(len(s) for s in shards) == 0:
        raise DataError(f"{path}: the .npy shards hold no samples")


def _open_npy(path: Path) -> ArraySource:
    rows = NpyRows(path)
    _check_array(path, "array", rows)
    return ArraySource(str(path), [rows], {})


def _open_npz(path: Path) -> ArraySource:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (np.savez writes a zip file of .npy arrays; this is no zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz archive ({_line(exc)})") from exc
    return _named_arrays(path, arrays)


def _open_safetensors(path: Path) -> ArraySource:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file ({_line(exc)})") from exc
    return _named_arrays(path, arrays)


def _named_arrays(path: Path, arrays: dict[str, Any]) -> ArraySource:
    if not arrays:
        raise DataError(f"{path}: holds no arrays")
    for key, array in arrays.items():
        _check_array(path, key, array)
    _check_same_length(path, arrays)
    if len(arrays) == 1 or all(k.startswith("arr_") for k in arrays):
        return ArraySource(str(path), list(arrays.values()), {})
    return ArraySource(str(path), [], arrays)


def _open_pt(path: Path) -> ArraySource:
    if not _written_by_torch_save(path):
        raise DataError(f"{path}: not a file written by torch.save (expected a tensor, a tuple of tensors or a "
                        "dict of tensors saved with torch.save)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notices about pickle protocols
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it holds a {found.group(1)})" if found else ""
        raise DataError(f"{path}: holds Python objects other than tensors{what}; calibration data is loaded with "
                        "weights_only=True, which refuses them: save the tensors themselves with torch.save (a model "
                        "goes in the MODEL argument)") from exc
    except Exception as exc:
        raise DataError(f"{path}: not a readable torch.save file ({_line(exc)})") from exc
    if isinstance(obj, torch.Tensor):
        _check_array(path, "tensor", obj)
        return ArraySource(str(path), [obj], {})
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        named = {f"tensor {i}": t for i, t in enumerate(obj)}
        for name, tensor in named.items():
            _check_array(path, name, tensor)
        _check_same_length(path, named)
        return ArraySource(str(path), list(obj), {})
    if isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        for name, tensor in obj.items():
            _check_array(path, f"tensor {name!r}", tensor)
        _check_same_length(path, obj)
        return ArraySource(str(path), [], dict(obj))
    raise DataError(f"{path}: holds a {type(obj).__name__}, expected a tensor, a tuple of tensors or a dict of tensors")


def _written_by_torch_save(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle of protocol 2 or later (legacy)."""
    with path.open("rb") as handle:
        head = handle.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and head[1] >= 2)


def _check_array(path: Path, name: str, array: Any) -> None:
    """A numpy array (or `NpyRows`) or a tensor: samples along axis 0, real numbers."""
    if array.ndim == 0:
        raise DataError(f"{path}: {name} is a scalar, expected samples along the first axis")
    if isinstance(array, torch.Tensor):
        real = not (array.is_complex() or array.is_quantized or array.dtype in _UNREADABLE_TORCH)
    else:
        real = np.dtype(array.dtype).kind in "fiub"
    if not real:
        raise DataError(f"{path}: {name} has dtype {str(array.dtype).replace('torch.', '')}, expected real numbers")


# float8 and 1-bit-like formats that no model input takes and numpy cannot hold
_UNREADABLE_TORCH = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                           "float8_e5m2fnuz", "uint1", "bits8") if hasattr(torch, n))


def _check_same_length(path: Path, arrays: dict[str, Any]) -> None:
    lengths = {k: int(a.shape[0]) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays differ in sample count: {lengths}")


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


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
