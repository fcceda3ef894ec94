"""Telling model formats apart by their bytes."""

from __future__ import annotations

import enum
import zipfile
from pathlib import Path

from deadrelu.errors import ModelLoadError


class ModelFormat(str, enum.Enum):
    """Formats as named in the report's `model.format`."""

    TORCHSCRIPT = "torchscript"
    EXPORTED_PROGRAM = "exported_program"
    STATE_DICT = "state_dict"
    PICKLE = "pickle"
    ONNX = "onnx"
    TORCH_SAVE = "torch_save"  # torch.save archive: state_dict or pickle, decided on load
    SAFETENSORS = "safetensors"


_PICKLE_PROTOCOL_MARK = 0x80
_ZIP_LOCAL_HEADER = b"PK\x03\x04"  # every PyTorch archive (TorchScript, torch.export, torch.save) is a zip


def detect_format(path: Path) -> ModelFormat:
    """The format of a model file, from its content."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head:
        raise ModelLoadError(f"{path}: file is empty, expected a model")
    if zipfile.is_zipfile(path):
        return _zip_format(path)
    if head[0] == _PICKLE_PROTOCOL_MARK:
        return ModelFormat.TORCH_SAVE  # legacy (non-zip) torch.save
    if _looks_like_safetensors(head):
        return ModelFormat.SAFETENSORS
    if _looks_like_onnx(path):
        return ModelFormat.ONNX
    if _looks_like_report(path):
        raise ModelLoadError(f"{path}: a deadrelu JSON report, not a model (`deadrelu report {path}` re-judges "
                             f"it; `deadrelu fix MODEL --report {path}` fixes the model it came from)")
    if head.startswith(_ZIP_LOCAL_HEADER):  # a zip whose end (the central directory) is missing
        raise ModelLoadError(f"{path}: truncated or damaged zip archive (it starts as one, but its end is missing: "
                             "an interrupted copy or download?)")
    raise ModelLoadError(
        f"{path}: not a recognised model file (expected a TorchScript archive, a torch.export "
        "program, a torch.save checkpoint or an ONNX model)"
    )


def _zip_format(path: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: corrupt zip archive ({exc})") from exc
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return ModelFormat.TORCHSCRIPT
    if any("/data/aotinductor/" in n for n in names) and not any(n.endswith(".json") and "/models/" in n
                                                                  for n in names):
        raise ModelLoadError(f"{path}: an AOTInductor package (compiled kernels, no graph to probe); scan the "
                             "torch.export program it was compiled from (torch.export.save the program before "
                             "aoti_compile_and_package)")
    if any(n.endswith(("archive_format", "/models/model.json", "serialized_exported_program.json")) for n in names):
        return ModelFormat.EXPORTED_PROGRAM
    if any(n.endswith("data.pkl") for n in names):
        return ModelFormat.TORCH_SAVE
    raise ModelLoadError(f"{path}: a zip archive, but not a PyTorch archive (no data.pkl, code/ or model.json)")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size < (1 << 32) and head[8:9] == b"{"


def _looks_like_report(path: Path) -> bool:
    """A deadrelu JSON report: it opens with `{"schema_version": ...`, as `--json` writes it."""
    with path.open("rb") as handle:
        head = handle.read(256)
    return head.lstrip().startswith(b"{") and b'"schema_version"' in head


def _looks_like_onnx(path: Path) -> bool:
    """ONNX files are protobuf ModelProto; field 1 (ir_version) comes first in practice."""
    with path.open("rb") as handle:
        first = handle.read(1)
    return first == b"\x08"
