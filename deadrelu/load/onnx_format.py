"""Loading and validating ONNX model files.

The graph is parsed with ``load_external_data=False``: weights kept in external data files
(models over 2 GB must keep them there) stay on disk, and ONNX Runtime reads them itself
when the session is built. Only their presence and size are checked here, so a missing
or truncated data file is a one-line error at load time rather than a crash later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from deadrelu.errors import ModelLoadError

MIN_OPSET = 9
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX model as loaded: its graph, and where its external weights live.

    ``proto`` holds the graph with embedded initializers; initializers stored in external
    data files are references only (their bytes stay in ``base_dir``).
    """

    proto: onnx.ModelProto
    path: Path
    opset: int  # version of the default (ai.onnx) domain
    external_files: tuple[str, ...] = ()  # data files referenced, relative to base_dir

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_files)


def load_onnx(path: Path) -> OnnxModel:
    """Parse and check an ONNX file; raise `ModelLoadError` with a one-line reason."""
    proto = _parse(path)
    if not proto.HasField("graph") or not (proto.graph.node or proto.graph.output):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph); expected an ONNX ModelProto")
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        raise ModelLoadError(f"{path}: ONNX opset {opset} is not supported; expected opset {MIN_OPSET} or later "
                             "(upgrade it with onnx.version_converter)")
    files = check_external_data(proto, path)
    return OnnxModel(proto=proto, path=path, opset=opset, external_files=files)


def _parse(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (the protobuf does not parse: {_line(exc)}); "
                             "the file may be truncated or not ONNX") from exc
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: cannot read the ONNX model ({_line(exc)})") from exc


def default_opset(proto: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports (0 if none)."""
    versions = [o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions, default=0)


def check_external_data(proto: onnx.ModelProto, path: Path) -> tuple[str, ...]:
    """Every external-data reference must point to a file beside the model that is large enough.

    Returns the referenced files (relative locations), in first-use order.
    """
    base = path.resolve().parent
    files: dict[str, int] = {}
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(f"{path}: initializer '{tensor.name}' is stored externally but names no data file")
        target = base / location
        if location not in files:
            if not target.is_file():
                raise ModelLoadError(f"{path}: external data file '{location}' for initializer '{tensor.name}' "
                                     f"is missing; expected it at {target}")
            files[location] = target.stat().st_size
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > files[location]:
            raise ModelLoadError(f"{path}: external data file '{location}' holds {files[location]} bytes, "
                                 f"initializer '{tensor.name}' expects {end}; the file is truncated or stale")
    return tuple(files)


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    found: list[onnx.TensorProto] = []

    def visit_graph(graph: onnx.GraphProto) -> None:
        found.extend(t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                    found.append(attr.t)
                if attr.HasField("g"):
                    visit_graph(attr.g)
                for sub in attr.graphs:
                    visit_graph(sub)

    visit_graph(proto.graph)
    return found


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def external_data_dir(model: OnnxModel) -> str:
    """The folder ONNX Runtime must resolve external data locations against."""
    return os.fspath(model.base_dir)
