"""Loading a model file into something that runs, whatever format it is in.

`load_model` detects the format from the file's content (never its extension) and hands
back a `LoadedModel`. Nothing from the file is executed unless the user said
``trust_pickle``: state_dicts and checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deadrelu.errors import ModelLoadError, UsageError
from deadrelu.load.detect import ModelFormat, detect_format


@dataclass(frozen=True)
class LoadedModel:
    """A runnable model and where it came from."""

    module: Any  # nn.Module, ScriptModule, fx.GraphModule (exported program), or onnx_format.OnnxModel
    format: ModelFormat
    path: str
    sha256: str
    exported_program: Any = None  # torch.export.ExportedProgram when format is exported_program
    owned: bool = True  # False for the caller's in-memory module: it must come back unchanged
    notes: tuple[str, ...] = ()  # for the report's warnings (which weights of a checkpoint were used)
    training_flags_off: tuple[str, ...] = ()  # layers the graph ran as in training, now in eval (`train_mode`)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False,
               weights_key: str | None = None) -> LoadedModel:
    """Load a model file (TorchScript, exported program, state_dict + arch, pickle, ONNX);
    `weights_key` picks the entry of a checkpoint dict that holds the weights."""
    from deadrelu.load import torch_formats

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a model file")
    fmt = detect_format(path)
    if weights_key is not None and fmt is not ModelFormat.TORCH_SAVE:
        raise UsageError(f"--weights-key {weights_key}: {path} is not a torch.save file ({fmt.value}); the option "
                         "picks the weights of a checkpoint dict")
    if arch is not None and fmt in (ModelFormat.TORCHSCRIPT, ModelFormat.EXPORTED_PROGRAM, ModelFormat.ONNX):
        raise UsageError(f"--arch {arch}: {path} is a {fmt.value} model, which holds its own architecture; "
                         "the option builds the model for a state_dict")
    digest = file_sha256(path)
    if fmt is ModelFormat.TORCH_SAVE:
        module, notes = torch_formats.load_torch_save(path, arch, trust_pickle, weights_key)
        return LoadedModel(module, torch_formats.saved_kind(module, fmt), str(path), digest, notes=notes)
    loaders = {
        ModelFormat.TORCHSCRIPT: lambda: (torch_formats.load_torchscript(path), None),
        ModelFormat.EXPORTED_PROGRAM: lambda: torch_formats.load_exported(path),
        ModelFormat.SAFETENSORS: lambda: (torch_formats.load_safetensors(path, arch), None),
        ModelFormat.ONNX: lambda: (_load_onnx(path), None),
    }
    if fmt not in loaders:
        raise ModelLoadError(f"{path}: {fmt.value} models are not supported yet")
    module, program = loaders[fmt]()
    actual = torch_formats.saved_kind(module, fmt)
    layers, notes = _in_inference_mode(module, fmt, path)
    return LoadedModel(module=module, format=actual, path=str(path), sha256=digest, exported_program=program,
                       notes=notes, training_flags_off=layers)


def _in_inference_mode(module: Any, fmt: ModelFormat, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Turn off the training flags a graph saved in training mode recorded (`train_mode`):
    the kinds of layer changed, and the warning that says so."""
    from deadrelu.load import train_mode

    if fmt is ModelFormat.EXPORTED_PROGRAM:
        layers, how = train_mode.exported_to_inference(module), "exported"
    elif fmt is ModelFormat.TORCHSCRIPT:
        layers, how = train_mode.traced_to_inference(module), "traced"
    else:
        return (), ()
    return layers, (train_mode.inference_note(str(path), how, layers),) if layers else ()


def _load_onnx(path: Path) -> Any:
    from deadrelu.load.onnx_format import load_onnx  # imports onnx (~0.25 s) only when needed

    return load_onnx(path)
