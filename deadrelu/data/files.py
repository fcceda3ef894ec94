"""Opening a `--data` spec: `open_data` picks the source for a file, a folder, a function
or `random`, and refuses what it cannot read with a line naming the file."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deadrelu.data.sources import (IMAGE_SUFFIXES, ArraySource, CalibrationSource, ImageFiles, ImageOptions,
                                   IterableSource, NpyRows, RandomSource, ShardSource, error_line, source_from_object)
from deadrelu.errors import DataError


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
        raise DataError(f"--data '{spec}': calling it raised {type(exc).__name__}: {error_line(exc)}") from exc
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
        raise DataError(f"{path}: not a readable .npz archive ({error_line(exc)})") from exc
    return _named_arrays(path, arrays)


def _open_safetensors(path: Path) -> ArraySource:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file ({error_line(exc)})") from exc
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
        raise DataError(f"{path}: not a readable torch.save file ({error_line(exc)})") from exc
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
