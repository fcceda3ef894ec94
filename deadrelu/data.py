"""Calibration data sources behind one protocol: an iterator of model inputs.

Every source streams: a `.npy` file is memory-mapped and read one batch at a time, so
memory does not grow with the dataset. (`.npz` and `.pt` files are read whole by numpy
and torch; use `.npy` for calibration sets larger than memory.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from deadrelu.errors import DataError


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

    def shapes(self) -> str:
        parts = [str(tuple(a.shape)) for a in self.args] + [f"{k}={tuple(v.shape)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


class CalibrationSource(Protocol):
    """Anything that yields batches of model inputs."""

    description: str
    is_random: bool

    def total(self) -> int | None: ...

    def batches(self, batch_size: int) -> Iterator[ModelInput]: ...


@dataclass
class ArraySource:
    """Arrays sharing a first (sample) axis; positional or keyword inputs."""

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


def _tensor(array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    return torch.from_numpy(np.array(array, copy=True, order="C"))  # writable copy of one batch


def open_data(spec: str, *, input_shape: tuple[int, ...] | None = None, random_samples: int = 64,
              seed: int = 0) -> CalibrationSource:
    """Open `--data`: a .npy/.npz/.pt file, or 'random' with an input shape."""
    if spec == "random":
        if not input_shape:
            raise DataError("--data random needs --input-shape, e.g. --input-shape 3,224,224")
        return RandomSource(input_shape, random_samples, seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .npy, .npz or .pt file")
    opener = {".npy": _open_npy, ".npz": _open_npz, ".pt": _open_pt, ".pth": _open_pt}.get(path.suffix.lower())
    if opener is None:
        raise DataError(f"{path}: unknown data format '{path.suffix}', expected .npy, .npz or .pt")
    source = opener(path)
    if source.total() == 0:
        raise DataError(f"{path}: holds no samples")
    return source


def _open_npy(path: Path) -> ArraySource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npy array ({_line(exc)})") from exc
    _check_array(path, "array", array)
    return ArraySource(str(path), [array], {})


def _open_npz(path: Path) -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz archive ({_line(exc)})") from exc
    if not arrays:
        raise DataError(f"{path}: the .npz archive holds no arrays")
    for key, array in arrays.items():
        _check_array(path, key, array)
    _check_same_length(path, arrays)
    if len(arrays) == 1 or all(k.startswith("arr_") for k in arrays):
        return ArraySource(str(path), list(arrays.values()), {})
    return ArraySource(str(path), [], arrays)


def _open_pt(path: Path) -> ArraySource:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: not a tensor file readable with weights_only=True ({_line(exc)})") from exc
    if isinstance(obj, torch.Tensor):
        return ArraySource(str(path), [obj], {})
    if isinstance(obj, (tuple, list)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        _check_same_length(path, {str(i): t for i, t in enumerate(obj)})
        return ArraySource(str(path), list(obj), {})
    if isinstance(obj, dict) and obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
        _check_same_length(path, obj)
        return ArraySource(str(path), [], dict(obj))
    raise DataError(f"{path}: holds a {type(obj).__name__}, expected a tensor, a tuple of tensors or a dict of tensors")


def _check_array(path: Path, name: str, array: Any) -> None:
    if array.ndim == 0:
        raise DataError(f"{path}: {name} is a scalar, expected samples along the first axis")
    if array.dtype.kind not in "fiub":
        raise DataError(f"{path}: {name} has dtype {array.dtype}, expected numbers")


def _check_same_length(path: Path, arrays: dict[str, Any]) -> None:
    lengths = {k: int(a.shape[0]) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{path}: arrays differ in sample count: {lengths}")


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
