"""The unit axis of a pre-activation: follow its producer up through layout-preserving
nodes and map the axis through transposes, squeezes and reshapes."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from deadrelu.onnx_sites.graph import (CONV_OPS, ELEMENTWISE_OPS, LINEAR_OPS, MAX_TRACE_DEPTH, NORM_OPS,
                                      RANK_PRESERVING_OPS, RECURRENT_OPS, REDUCE_OPS, RESHAPE_OPS, GraphIndex, attribute, node_label)
from deadrelu.onnx_sites.records import AxisTrace
from deadrelu.sites import einsum_unit_axis

_DIM_TEXT = {"conv": "dim 1 (channels)", "linear": "last dim (features)", "recurrent": "last dim (hidden units)"}


def trace_axis(index: GraphIndex, tensor: str) -> AxisTrace:
    """The unit axis of ``tensor`` from the node that produced it."""
    origin = _origin(index, tensor, 0)
    if isinstance(origin, _Origin):
        reason = f"{_DIM_TEXT[origin.source]} of {origin.producer}"
        if origin.through:
            reason += f", through {', '.join(origin.through)}"
        return AxisTrace(origin.anchor, origin.source, reason, any(op in NORM_OPS for op in origin.through))
    return AxisTrace(None, "default", f"default (dim 1; a vector is one unit): {origin or _no_layout(index, tensor)}")


@dataclass(frozen=True)
class _Origin:
    anchor: int
    source: str
    producer: str  # "Conv '/stem/conv/Conv'"
    through: tuple[str, ...]  # op types walked through, producer side first


def _origin(index: GraphIndex, tensor: str, depth: int) -> _Origin | str | None:
    """Where the units of ``tensor`` come from; a reason when their axis was lost on the way;
    None when no producer tells."""
    found = index.producer(tensor)
    if found is None or depth > MAX_TRACE_DEPTH:
        return None
    node, _ = found
    op = node.op_type
    described = f"{op} '{node_label(node)}'"
    if op in CONV_OPS:
        return _Origin(1, "conv", described, ())
    if op in LINEAR_OPS:
        return _Origin(-1, "linear", described, ())
    if op in RECURRENT_OPS:
        return _Origin(-1, "recurrent", described, ())
    if op == "Einsum":
        return _Origin(_einsum_anchor(index, node), "linear", described, ())
    if op == "Gather" and _is_embedding(index, node):
        return _Origin(-1, "linear", described, ())
    lost: str | None = None
    for data in _data_inputs(index, node):
        upstream = _origin(index, data, depth + 1)
        if not isinstance(upstream, _Origin):
            lost = lost or upstream
            continue
        anchor = _map_axis(index, node, data, upstream.anchor)
        if anchor is not None:
            return _Origin(anchor, upstream.source, upstream.producer, (*upstream.through, op))
        lost = lost or f"the {_DIM_TEXT[upstream.source]} of {upstream.producer} is lost through {described}"
    return lost


def _einsum_anchor(index: GraphIndex, node: onnx.NodeProto) -> int:
    """The unit axis of an Einsum's output (`deadrelu.sites.einsum_unit_axis`; the graph's
    constants are its weights)."""
    equation = attribute(node, "equation", b"")
    text = equation.decode() if isinstance(equation, bytes) else str(equation)
    rank = index.rank(node.output[0])
    weights = [bool(name) and index.is_constant(name) for name in node.input]
    if rank is None and "..." in text:
        return -1
    return einsum_unit_axis(text, weights, rank or 0)


def _is_embedding(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Gather of rows of a constant table by computed indices: an embedding lookup,
    whose output's last dim holds the table's features."""
    return (len(node.input) > 1 and index.is_constant(node.input[0]) and not index.is_constant(node.input[1])
            and index.rank(node.input[0]) == 2 and attribute(node, "axis", 0) == 0)


def _no_layout(index: GraphIndex, tensor: str) -> str:
    found = index.producer(tensor)
    if found is None:
        return f"'{tensor}' is a graph input"
    return f"its producer {found[0].op_type} '{node_label(found[0])}' does not say where the units are"


def _data_inputs(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """The inputs whose layout the output follows, in the order to try them."""
    op = node.op_type
    if op in ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "Clip", "PRelu",
              "QuantizeLinear", "DequantizeLinear", "Pad", "Resize", "Upsample", "Slice", "Tile", "Expand",
              "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Dropout", "CastLike", "Pow", "Gather",
              *REDUCE_OPS):
        return [node.input[0]] if node.input and node.input[0] else []
    if op in ELEMENTWISE_OPS or op in RANK_PRESERVING_OPS:
        return [name for name in node.input if name and not index.is_constant(name)]
    return []


def _map_axis(index: GraphIndex, node: onnx.NodeProto, data: str, anchor: int) -> int | None:
    """The anchor of the same unit axis in the node's output; None when the axis is lost."""
    op = node.op_type
    if op in ELEMENTWISE_OPS or op in RANK_PRESERVING_OPS:
        return _broadcast(index, node, data, anchor)
    if op in RESHAPE_OPS:
        return _reshaped_axis(index.dims(data), index.dims(node.output[0]), anchor)
    rank = index.rank(data)
    if rank is None:
        return None
    axis = anchor + rank if anchor < 0 else anchor
    if op == "Transpose":
        perm = list(attribute(node, "perm", list(reversed(range(rank)))))
        moved = perm.index(axis) if axis in perm else None
        return None if moved is None else (moved - rank if anchor < 0 else moved)
    if op in ("Squeeze", "Unsqueeze"):
        return _squeeze_axis(index, node, rank, axis, anchor < 0)
    if op in REDUCE_OPS:
        return _reduced_axis(index, node, rank, axis, anchor < 0)
    if op == "Gather":
        return _gathered_axis(index, node, rank, axis, anchor < 0)
    return None


def _gathered_axis(index: GraphIndex, node: onnx.NodeProto, rank: int, axis: int, from_end: bool) -> int | None:
    """The unit axis after a Gather along another axis (``h[:, 0]``, ``index_select``):
    the indices' dims replace the gathered one. Gathering some of the units by a vector of
    indices keeps them on their axis, as a slice does; any other gather of them loses it."""
    gathered = int(attribute(node, "axis", 0)) % rank
    indices_rank = index.rank(node.input[1]) if len(node.input) > 1 else None
    if indices_rank is None or (axis == gathered and indices_rank != 1):
        return None
    moved = axis if axis < gathered else axis + indices_rank - 1
    return moved - (rank + indices_rank - 1) if from_end else moved


def _reduced_axis(index: GraphIndex, node: onnx.NodeProto, rank: int, axis: int, from_end: bool) -> int | None:
    """The unit axis after a ReduceMean/Sum/Max/Min over other axes (lost when it reduces
    that axis, or all of them)."""
    axes = _axes_of(index, node)
    if not axes:
        return None
    reduced = sorted({a % rank for a in axes})
    if axis in reduced:
        return None
    if attribute(node, "keepdims", 1):
        return axis - rank if from_end else axis
    moved = axis - sum(1 for a in reduced if a < axis)
    return moved - (rank - len(reduced)) if from_end else moved


def _reshaped_axis(before: tuple[int | None, ...] | None, after: tuple[int | None, ...] | None,
                   anchor: int) -> int | None:
    """The unit axis after a Reshape/Flatten (the rule of `deadrelu.sites.UnitOrigin.reshaped`):
    kept when the dims up to it, or from it on, are unchanged (known, except a symbolic batch
    dim 0); otherwise only a last-dim (features) axis, as before."""
    if before is not None and after is not None:
        axis = anchor + len(before) if anchor < 0 else anchor
        if 0 <= axis < len(before):
            if before[:axis + 1] == after[:axis + 1] and None not in before[1:axis + 1]:
                return axis - len(after) if anchor < 0 else axis
            tail = len(before) - axis
            if len(after) >= tail and before[axis:] == after[len(after) - tail:] and None not in before[axis:]:
                return axis - len(before)
    return -1 if anchor == -1 else None


def _broadcast(index: GraphIndex, node: onnx.NodeProto, data: str, anchor: int) -> int | None:
    if anchor < 0:
        return anchor
    rank_in, rank_out = index.rank(data), index.rank(node.output[0])
    if rank_in is not None and rank_out is not None and rank_out > rank_in:
        return anchor + rank_out - rank_in
    return anchor


def _squeeze_axis(index: GraphIndex, node: onnx.NodeProto, rank: int, axis: int, from_end: bool) -> int | None:
    axes = _axes_of(index, node)
    if node.op_type == "Squeeze":
        if axes is None:
            dims = index.dims(node.input[0])
            if dims is None or None in dims:
                return None
            axes = [d for d, size in enumerate(dims) if size == 1]
        axes = sorted(a % rank for a in axes)
        if axis in axes:
            return None
        moved = axis - sum(1 for a in axes if a < axis)
        out_rank = rank - len(axes)
    else:
        if axes is None:
            return None
        out_rank = rank + len(axes)
        inserted = sorted(a % out_rank for a in axes)
        kept = [d for d in range(out_rank) if d not in inserted]
        moved = kept[axis]
    return moved - out_rank if from_end else moved


def _axes_of(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    axes = attribute(node, "axes")
    if axes is not None:
        return list(axes)
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    return None
