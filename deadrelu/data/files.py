"""Opening a `--data` spec: `open_data` picks the source for a file, a folder, a function
or `random`, and refuses what it cannot read with a line naming the file."""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deadrelu.data.sources import (IMAGE_SUFFIXES, ArraySource, BFloat16Rows, CalibrationSource, ImageFiles,
                                   ImageOptions, IterableSource, NpyRows, RandomSource, ShardSource, error_line,
                                   source_from_object)
from deadrelu.errors import DataError


# --- opening a spec ----------------------------------------------------------------------

@dataclass(frozen=True)
class WantedEntries:
    """The named entries of a data file that the model takes (by --inputs, or its input
    names): the others (class names, a temperature) are left unread and unchecked."""

    names: tuple[str, ...]
    by_user: bool  # named by --inputs: a file without one of them is an error


@dataclass(frozen=True)
class DataOptions:
    """How to open `--data`."""

    input_shape: tuple[int, ...] | None = None
    random_samples: int = 64
    seed: int = 0
    workers: int = 2
    image: ImageOptions = field(default_factory=ImageOptions)
    wanted: WantedEntries | None = None  # None: every entry


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
    source = opener(path, options.wanted if options.wanted and options.wanted.names else None)
    if source.total() == 0:
        raise DataError(f"{path}: holds no samples")
    return source


def _looks_like_callable(spec: str) -> bool:
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr and attr.replace("_", "").replace(".", "").isalnum())


def _open_callable(spec: str, options: DataOptions) -> CalibrationSource:
    from deadrelu.errors import ArchitectureError
    from deadrelu.load.arch import import_callable, user_error

    try:
        factory = import_callable(spec, "--data")
    except ArchitectureError as exc:
        raise DataError(str(exc)) from exc
    try:
        obj = factory() if callable(factory) else factory
    except DataError:
        raise
    except SystemExit as exc:
        raise DataError(f"--data '{spec}': calling it raised {user_error(exc)}") from exc
    except Exception as exc:
        raise DataError(f"--data '{spec}': calling it raised {type(exc).__name__}: {error_line(exc)}") from exc
    return source_from_object(obj, spec, options.workers)


def _open_folder(path: Path, options: DataOptions) -> CalibrationSource:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    shards = [p for p in files if p.suffix.lower() == ".npy" and p.parent == path]
    if images and shards:
        raise DataError(f"{path}: folder holds both images ({len(images)}) and .npy shards ({len(shards)}); "
                        "point --data at a folder of one kind")
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


def _open_npy(path: Path, wanted: WantedEntries | None = None) -> ArraySource:
    rows = NpyRows(path)
    _check_array(path, "array", rows)
    return ArraySource(str(path), [rows], {})


def _open_npz(path: Path, wanted: WantedEntries | None = None) -> ArraySource:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (np.savez writes a zip file of .npy arrays; this is no zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            stored = {info.filename[:-4]: info for info in archive.infolist() if _streamable(info)}
            starts = {key: _member_start(path, info) for key, info in stored.items()}
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: NpyRows(path, starts[key], stored[key].file_size, label=f"{path} ({key})") if key in stored
                      else archive[key] for key in _taken(path, archive.files, wanted)}
            names = list(archive.files)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz archive ({error_line(exc)})") from exc
    return _named_arrays(path, arrays, names)


def _taken(path: Path, keys: Iterable[str], wanted: WantedEntries | None) -> list[str]:
    """The entries to read: those wanted that the file holds (--inputs names must all be
    there); every one when it holds none of the model's input names (the batch then picks
    its entries itself: one array for a one-input model, whatever its name)."""
    keys = list(keys)
    if wanted is None:
        return keys
    missing = [name for name in wanted.names if name not in keys]
    if missing and wanted.by_user:
        raise DataError(f"{path}: --inputs {','.join(wanted.names)}: the file has no entry {missing[0]!r} "
                        f"(it has {', '.join(keys)})")
    return [k for k in keys if k in wanted.names] or keys


def _streamable(info: zipfile.ZipInfo) -> bool:
    """An `.npy` member stored as it is (`np.savez`, not `savez_compressed`), unencrypted:
    it can be read by rows in place, memory flat; other members are read whole."""
    return (info.filename.endswith(".npy") and info.compress_type == zipfile.ZIP_STORED
            and not info.flag_bits & 0x1)


def _member_start(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes begin: after its local header (30 bytes, then the
    name and an extra field whose lengths that header gives, not the central directory)."""
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise DataError(f"{path}: not a readable .npz archive (bad local header for {info.filename})")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


# safetensors dtypes numpy holds (BF16 is read as 16-bit words and viewed as bfloat16);
# the float8s no model input takes
_SAFETENSORS_DTYPES = {"BF16": "<u2", "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                       "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _open_safetensors(path: Path, wanted: WantedEntries | None = None) -> ArraySource:
    """Each tensor read by rows in place, memory flat. The format is an 8-byte header
    length, a JSON header (dtype, shape, byte range of every tensor) and the raw bytes;
    the safetensors library reads rows lazily only through a memory map, whose touched
    pages stay resident, so the header is read here and the rows with `NpyRows`."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file ({error_line(exc)})") from exc
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a readable .safetensors file (its header is no JSON object)")
    stored = [name for name in header if name != "__metadata__"]
    arrays = {name: _safetensors_rows(path, name, header[name], 8 + length, size)
              for name in _taken(path, stored, wanted)}
    return _named_arrays(path, arrays, stored)


def _safetensors_rows(path: Path, name: str, entry: Any, base: int, size: int) -> NpyRows | BFloat16Rows:
    try:
        kind, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file (bad header entry for {name!r})") from exc
    if kind not in _SAFETENSORS_DTYPES:
        raise DataError(f"{path}: tensor {name!r} has dtype {kind}; calibration data is read as "
                        "F64, F32, F16, BF16, integers or BOOL")
    rows = NpyRows.raw(path, base + int(begin), shape, np.dtype(_SAFETENSORS_DTYPES[kind]))
    if rows.end != base + int(end) or rows.end > size:
        raise DataError(f"{path}: tensor {name!r}: its byte range does not match its shape {list(shape)}, "
                        "or lies past the end of the file (truncated?)")
    return BFloat16Rows(rows) if kind == "BF16" else rows


def _named_arrays(path: Path, arrays: dict[str, Any], stored: list[str]) -> ArraySource:
    """The arrays read (`_taken` of the `stored` names): positional when the file holds one
    array, or only the unnamed ``arr_0, arr_1, ...`` of `np.savez(f, a, b)`; else by name."""
    if not arrays:
        raise DataError(f"{path}: holds no arrays")
    for key, array in arrays.items():
        _check_array(path, key, array)
    _check_same_length(path, arrays)
    if len(stored) == 1 or all(k.startswith("arr_") for k in stored):
        return ArraySource(str(path), list(arrays.values()), {})
    return ArraySource(str(path), [], arrays)


def _open_pt(path: Path, wanted: WantedEntries | None = None) -> ArraySource:
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
        obj = {k: obj[k] for k in _taken(path, obj, wanted)}
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
    if isinstance(array, torch.Tensor) and (array.layout is not torch.strided or array.is_meta):
        what = "on the meta device (a shape, no data)" if array.is_meta else \
            f"a {str(array.layout).removeprefix('torch.')} tensor, expected a dense one (save tensor.to_dense())"
        raise DataError(f"{path}: {name} is {what}")
    if array.ndim == 0:
        raise DataError(f"{path}: {name} is a scalar, expected samples along the first axis"
                        f"{'' if _UNNAMED.fullmatch(name) else _NAME_THE_INPUTS}")
    if isinstance(array, (torch.Tensor, BFloat16Rows)):
        real = not (array.dtype.is_complex or getattr(array, "is_quantized", False) or array.dtype in _UNREADABLE_TORCH)
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
        raise DataError(f"{path}: arrays differ in sample count: {lengths}"
                        f"{_NAME_THE_INPUTS if not all(k.startswith('tensor ') for k in lengths) else ''}")


_UNNAMED = re.compile(r"array|tensor( \d+)?")  # what an .npy, a lone tensor, a tuple's elements are called
# how to leave out entries of a file that are no model inputs (metadata, class names)
_NAME_THE_INPUTS = "; name the model's inputs with --inputs (e.g. --inputs x) and the other entries are left unread"
