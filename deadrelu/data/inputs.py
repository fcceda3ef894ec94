"""A batch as model inputs: which elements of it the model takes (`InputSelector`), as a
`ModelInput` of positional and keyword tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from deadrelu.errors import DataError, UsageError


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

    def check_usable(self) -> None:
        """Each input a dense tensor of real numbers, with data, with samples along dim 0."""
        if not self.args and not self.kwargs:
            raise DataError("a batch holds no model inputs")
        for name, tensor in self.named():
            if tensor.layout is not torch.strided:
                raise DataError(f"{name} is a {str(tensor.layout).removeprefix('torch.')} tensor, expected a dense one "
                                "(save tensor.to_dense())")
            if tensor.is_meta:
                raise DataError(f"{name} is on the meta device: it has a shape but no data")
            if tensor.ndim == 0:
                raise DataError(f"{name} is a 0-d tensor (a scalar), expected samples along the first axis")
            if tensor.is_complex() or tensor.is_quantized:
                raise DataError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected real numbers")

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

    def rows(self, start: int, stop: int) -> ModelInput:
        """Samples `start` to `stop` (views, no copy)."""
        return self.map(lambda t: t[start:stop])

    @staticmethod
    def concat(parts: Sequence[ModelInput]) -> ModelInput:
        """The parts' samples, one after another, as one batch."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return ModelInput(tuple(torch.cat([p.args[i] for p in parts]) for i in range(len(first.args))),
                          {k: torch.cat([p.kwargs[k] for p in parts]) for k in first.kwargs})

    def split(self, parts: int) -> list[ModelInput]:
        """The batch cut into `parts` nearly equal batches along the sample axis."""
        size = math.ceil(self.size / parts)
        chunks = [ModelInput(tuple(a[i:i + size] for a in self.args), {k: v[i:i + size] for k, v in self.kwargs.items()})
                  for i in range(0, self.size, size)]
        return chunks


class ExactBatches:
    """The stream cut into batches of exactly `size` samples, across the ends of its own
    batches: a model exported with a fixed batch size takes no other. The samples at the
    end that make no whole batch are left out; `left_out` counts them once the stream is
    exhausted. With `size` None, the stream as it comes, except that a program exported
    with a bounded dynamic batch (`torch.export.Dim("b", min=4, max=64)`) gets batches of
    `low` to `high` samples (`_at_least`: the caller reads at most `high` at a time)."""

    def __init__(self, batches: Iterator[ModelInput], size: int | None, low: int = 1, high: int | None = None) -> None:
        self.size = size
        self.low, self.high = low, high
        self.left_out = 0
        if size is not None:
            self._batches = self._cut(batches, size)
        else:
            self._batches = self._at_least(batches, low, high) if low > 1 else batches

    @property
    def takes(self) -> str:
        """The batch sizes the model takes, for messages ("of exactly 8", "of 4 to 64")."""
        if self.size is not None:
            return f"of exactly {self.size}"
        return f"of {self.low} to {self.high}" if self.high is not None else f"of at least {self.low}"

    def __iter__(self) -> ExactBatches:
        return self

    def __next__(self) -> ModelInput:
        return next(self._batches)

    def _cut(self, batches: Iterator[ModelInput], size: int) -> Iterator[ModelInput]:
        pending: list[ModelInput] = []
        held = 0
        for batch in batches:
            start = 0
            if held:
                start = min(size - held, batch.size)
                pending.append(batch.rows(0, start))
                held += start
                if held == size:
                    yield ModelInput.concat(pending)
                    pending, held = [], 0
            while batch.size - start >= size:
                yield batch.rows(start, start + size)
                start += size
            if start < batch.size:
                pending.append(batch.rows(start, batch.size))
                held += batch.size - start
        self.left_out = held

    def _at_least(self, batches: Iterator[ModelInput], low: int, high: int | None) -> Iterator[ModelInput]:
        """Batches of `low` to `high` samples (inputs of at most `high`): a batch shorter
        than `low` (the last, or one a user's loader made) joins its neighbour, and a join
        longer than `high` is cut so that both parts fit. Only an end that no cut can make
        long enough is left out."""
        held: ModelInput | None = None
        for batch in batches:
            if held is None:
                held = batch
                continue
            if held.size >= low and batch.size >= low:
                yield held
                held = batch
                continue
            joined = ModelInput.concat([held, batch])
            if high is None or joined.size <= high:
                held = joined
                continue
            cut = joined.size - low if joined.size - low >= low else high
            yield joined.rows(0, cut)
            held = joined.rows(cut, joined.size)
        if held is not None and held.size >= low:
            yield held
        elif held is not None:
            self.left_out = held.size


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
        if not parts:
            raise UsageError(f"--inputs '{spec}': names no input; expected positions (0 or 0,1) or names (image,mask)")
        if all(p.isdigit() for p in parts):
            return InputSelector(positions=tuple(int(p) for p in parts), count=count, names=names)
        return InputSelector(keys=parts, count=count, names=names)

    def select(self, batch: Any) -> ModelInput:
        if isinstance(batch, ModelInput):  # arrays from a file (.npz, tuple .pt): the same choice applies
            if batch.args and not batch.kwargs:
                return self._from_sequence(batch.args)
            if batch.kwargs and not batch.args and (self.keys is not None or self.names is not None
                                                    or self.positions is not None):
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
        if len(chosen) == 1 and isinstance(chosen[0], dict):  # (a position picked the dict itself)
            return replace(self, positions=None)._from_dict(chosen[0])
        return ModelInput(tuple(_as_tensor(x, f"batch element {i}") for i, x in enumerate(chosen)))

    def _from_dict(self, batch: dict[str, Any]) -> ModelInput:
        """Named inputs go to the forward's parameters of those names, as positional
        arguments (a program exported with keyword inputs takes them by position too, see
        `load.torch_formats.keyword_inputs`); without --inputs, entries the
        forward does not take (labels) are left out. Positions do not pick named entries:
        which entry is "0" would hang on the order a file happened to store them in."""
        if self.positions is not None:
            names = ", ".join(map(str, batch))
            raise DataError(f"--inputs {','.join(map(str, self.positions))}: the data's inputs are named ({names}), "
                            f"not positional; choose them by name (--inputs {next(iter(batch), 'NAME')})")
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
        go by position, so they must be its
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
