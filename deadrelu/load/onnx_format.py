"""Loading and validating ONNX model files.

The graph is parsed with ``load_external_data=False``: weights kept in external data files
(models over 2 GB must keep them there) stay on disk, and ONNX Runtime reads them itself
when the session is built. Only their presence and size are checked here, so a missing
or truncated data file is a one-line error at load time rather than a crash later.

Weights embedded in the model file are treated the same way: each large initializer's
``raw_data`` is replaced by an external-data reference to its own bytes inside the model
file (found by walking the protobuf wire format), so the loaded graph holds no weights and
ONNX Runtime reads them from the file once, instead of from a second in-memory copy.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from deadrelu.errors import ModelLoadError

MIN_OPSET = 9
DEFAULT_DOMAINS = ("", "ai.onnx")
MIN_OFFLOAD_BYTES = 1024  # smaller initializers (shapes, axes, Clip bounds) stay in the graph


@dataclass(frozen=True)
class OnnxModel:
    """An ONNX model as loaded: its graph, and where its weights live.

    ``proto`` holds the graph and its small initializers; every large initializer is a
    reference to bytes in ``external_files`` (relative to ``base_dir``), which include the
    model file itself when its weights are embedded.
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

    def input_names(self) -> list[str]:
        """The graph inputs data must be fed to (initializers listed as inputs excluded)."""
        initializers = {t.name for t in self.proto.graph.initializer}
        return [i.name for i in self.proto.graph.input if i.name not in initializers]

    def input_count(self) -> int:
        """How many inputs the model takes (see `deadrelu.scan.count_model_inputs`)."""
        return len(self.input_names())


def load_onnx(path: Path) -> OnnxModel:
    """Parse and check an ONNX file; raise `ModelLoadError` with a one-line reason."""
    proto = _parse(path)
    if not proto.HasField("graph") or not (proto.graph.node or proto.graph.output):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph); expected an ONNX ModelProto")
    opset = default_opset(proto)
    if opset == 0:
        raise ModelLoadError(f"{path}: the model imports no ai.onnx opset; expected a standard ONNX graph")
    if opset < MIN_OPSET:
        raise ModelLoadError(f"{path}: ONNX opset {opset} is not supported; expected opset {MIN_OPSET} or later "
                             "(upgrade it with onnx.version_converter)")
    offload_embedded_weights(proto, path)
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


def external_data_files(path: Path) -> tuple[Path, ...]:
    """The existing files an ONNX model's external-data references name (none when the
    model does not parse: loading it says why), so that no output of deadrelu replaces one."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  the loader reports a bad model, not this check
        return ()
    locations = {entry.value for tensor in _external_tensors(proto) for entry in tensor.external_data
                 if entry.key == "location" and entry.value}
    return tuple(path.parent / name for name in sorted(locations) if (path.parent / name).is_file())


def offload_embedded_weights(proto: onnx.ModelProto, path: Path) -> int:
    """Point large embedded main-graph initializers at their bytes in the model file.

    Returns how many were offloaded. Initializers stored other than as ``raw_data`` (typed
    fields such as ``float_data``) stay embedded.
    """
    big = [t for t in proto.graph.initializer
           if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= MIN_OFFLOAD_BYTES]
    if not big:
        return 0
    spans = initializer_spans(path)
    moved = 0
    for tensor in big:
        span = spans.get(tensor.name)
        if span is None or span[1] != len(tensor.raw_data):
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", path.name), ("offset", str(span[0])), ("length", str(span[1]))):
            tensor.external_data.add(key=key, value=value)
        moved += 1
    return moved


def initializer_spans(path: Path) -> dict[str, tuple[int, int]]:
    """(offset, length) in the file of each main-graph initializer's ``raw_data``."""
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    name_field = onnx.TensorProto.DESCRIPTOR.fields_by_name["name"].number
    raw_field = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    spans: dict[str, tuple[int, int]] = {}
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for field, start, end in _length_delimited_fields(data, 0, len(data)):
            if field != graph_field:
                continue
            for inner, tensor_start, tensor_end in _length_delimited_fields(data, start, end):
                if inner != init_field:
                    continue
                name, raw = None, None
                for leaf, leaf_start, leaf_end in _length_delimited_fields(data, tensor_start, tensor_end):
                    if leaf == name_field:
                        name = bytes(data[leaf_start:leaf_end]).decode("utf-8", "replace")
                    elif leaf == raw_field:
                        raw = (leaf_start, leaf_end - leaf_start)
                if name is not None and raw is not None:
                    spans[name] = raw
    return spans


def _length_delimited_fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, payload start, payload end) of each length-delimited field in a range."""
    position = start
    while position < end:
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == 2:
            size, position = _varint(data, position)
            yield field, position, position + size
            position += size
        else:  # groups are not used by ONNX: stop rather than guess
            return


def _varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


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
