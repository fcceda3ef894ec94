"""Feeding batches to an ONNX graph: its input specs, dtype conversions, fixed batch sizes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from deadrelu.data import ModelInput
from deadrelu.errors import DataError

@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and declared dims (int, symbol or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        if not self.dims or not isinstance(self.dims[0], int):
            return None
        return self.dims[0]

    def describe(self) -> str:
        if self.dims is None:
            return "any shape"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.dims) + ")"

    def fits(self, shape: tuple[int, ...], batch_free: bool) -> bool:
        if self.dims is None:
            return True
        if len(shape) != len(self.dims):
            return False
        return all(not isinstance(d, int) or d == s or (i == 0 and batch_free)
                   for i, (d, s) in enumerate(zip(self.dims, shape)))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor = info.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else np.dtype(np.float32)
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(_dim(d) for d in tensor.shape.dim)
        specs.append(InputSpec(info.name, np.dtype(dtype), dims))
    return specs


def _dim(dim: Any) -> int | str | None:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


@dataclass
class Feeder:
    """Turns `ModelInput` batches into ONNX Runtime feeds, checked against the graph inputs."""

    specs: list[InputSpec]
    model_path: Path
    left_out: int = 0  # samples dropped because the model takes batches of a fixed size

    @property
    def fixed_batch(self) -> int | None:
        sizes = {s.fixed_batch for s in self.specs}
        return sizes.pop() if len(sizes) == 1 else None

    def feeds(self, batch: ModelInput) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """(feed, samples) pairs: one, or several when the model's batch size is fixed."""
        arrays = self._by_name(batch)
        size = batch.size
        fixed = self.fixed_batch
        if fixed is None or fixed == size:
            yield self._checked(arrays, batch_free=fixed is None), size
            return
        whole = size - size % fixed
        self.left_out += size - whole
        for start in range(0, whole, fixed):
            yield self._checked({k: v[start:start + fixed] for k, v in arrays.items()}, batch_free=False), fixed

    def _by_name(self, batch: ModelInput) -> dict[str, np.ndarray]:
        names = [s.name for s in self.specs]
        if len(batch.args) > len(names):
            raise DataError(f"{self.model_path}: the data holds {len(batch.args) + len(batch.kwargs)} arrays, the "
                            f"model takes {len(names)} input(s) {names}; use an .npz with one array per input name")
        arrays = {name: _numpy(t) for name, t in zip(names, batch.args)}
        for key, tensor in batch.kwargs.items():
            if key not in names:
                raise DataError(f"{self.model_path}: the data has an array '{key}' but the model's inputs are {names}")
            arrays[key] = _numpy(tensor)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{self.model_path}: no data for input(s) {missing}; the model takes {names} "
                            "(use an .npz with one array per input name)")
        return arrays

    def _checked(self, arrays: dict[str, np.ndarray], batch_free: bool) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.specs:
            array = arrays[spec.name]
            if not spec.fits(array.shape, batch_free):
                raise DataError(f"{self.model_path}: input '{spec.name}' got data of shape {tuple(array.shape)}, "
                                f"the model expects {spec.describe()}")
            feed[spec.name] = _convert(array, spec, self.model_path)
        return feed


def _numpy(tensor: Any) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bfloat16
    return np.asarray(tensor)


def _convert(array: np.ndarray, spec: InputSpec, model_path: Path) -> np.ndarray:
    """The batch in the input's dtype, as the PyTorch path takes it: float data of another
    width is cast; integer or bool data for a float input is refused (uint8 pixels fed
    as 0..255 to a model trained on normalised floats would give statistics of nothing it
    sees), as are non-integral values for an integer input. (That float data is finite,
    `scan.model_batches` has checked.)"""
    if array.dtype == spec.dtype:
        return np.ascontiguousarray(array)
    if spec.dtype.kind == "f" and array.dtype.kind in "biu":
        raise DataError(f"{model_path}: input '{spec.name}' takes {spec.dtype} values, the data holds {array.dtype}; "
                        f"convert it first (e.g. scaled and normalised as in training)")
    if spec.dtype.kind in "iu" and array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise DataError(f"{model_path}: input '{spec.name}' takes {spec.dtype} values, the data holds "
                        f"non-integral {array.dtype} values")
    return np.ascontiguousarray(array.astype(spec.dtype))
