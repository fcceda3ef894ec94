"""Which `Clip` nodes are ReLUs (a constant lower bound of 0) and which are the clamp
of a HardSigmoid or HardSwish (a finding, never a site)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from deadrelu.onnx_sites.graph import GraphIndex, attribute, node_label

_LOWEST = float(np.finfo(np.float32).min)


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip (None for an absent bound); None when a bound is not constant."""
    if any(a.name in ("min", "max") for a in node.attribute):  # opset < 11
        return _bound(attribute(node, "min")), _bound(attribute(node, "max"))
    bounds: list[float | None] = []
    for position in (1, 2):
        name = node.input[position] if len(node.input) > position else ""
        if not name:
            bounds.append(None)
            continue
        value = index.constant(name)
        if value is None or value.size != 1:
            return None
        bounds.append(_bound(float(value.reshape(-1)[0])))
    return bounds[0], bounds[1]


def _bound(value: float | None) -> float | None:
    if value is None or not np.isfinite(value) or abs(value) >= abs(_LOWEST):
        return None
    return float(value)


def classify_clip(node: onnx.NodeProto, index: GraphIndex) -> tuple[float, float | None] | str:
    """(0, max) for a ReLU-like Clip; otherwise a finding for the report ('' for nothing to say)."""
    bounds = clip_bounds(node, index)
    label = node_label(node)
    if bounds is None:
        return f"Clip '{label}' has bounds computed at run time: not treated as a ReLU"
    low, high = bounds
    if low != 0.0:
        return ""
    pattern = hard_activation_pattern(node, high, index)
    if pattern:
        return (f"Clip '{label}' is part of a {pattern} pattern ({_PATTERN_FORMULA[pattern]}), not a ReLU: "
                "not scanned")
    return (0.0, high)


_PATTERN_FORMULA = {
    "HardSwish": "x * clip(x + 3, 0, 6) / 6",
    "HardSigmoid": "clip(x + 3, 0, 6) / 6",
}


def hard_activation_pattern(clip: onnx.NodeProto, high: float | None, index: GraphIndex) -> str | None:
    """'HardSwish' or 'HardSigmoid' when the Clip is the middle of one; else None.

    Recognised: ``Clip(x + 3, 0, 6)`` followed by ``/ 6`` (or ``* 1/6``), and
    ``Clip(x / 6 + 0.5, 0, 1)``; HardSwish when ``x`` multiplies the result.
    """
    shifted = _added_constant(index, clip.input[0])
    if shifted is None:
        return None
    x, offset = shifted
    if high == 6.0 and np.isclose(offset, 3.0):
        if not _scaled_by_sixth(index, clip.output[0]):
            return None
    elif high == 1.0 and np.isclose(offset, 0.5):
        scaled = _scaled_input(index, x)
        if scaled is None:
            return None
        x = scaled
    else:
        return None
    return "HardSwish" if _multiplied_by(index, clip.output[0], x) else "HardSigmoid"


def _added_constant(index: GraphIndex, name: str) -> tuple[str, float] | None:
    """(x, c) when ``name`` is ``x + c`` with a scalar constant c."""
    found = index.producer(name)
    if found is None or found[0].op_type != "Add":
        return None
    a, b = found[0].input[0], found[0].input[1]
    for data, const in ((a, b), (b, a)):
        value = index.constant(const)
        if value is not None and value.size == 1 and not index.is_constant(data):
            return data, float(value.reshape(-1)[0])
    return None


def _scaled_input(index: GraphIndex, name: str) -> str | None:
    """x when ``name`` is ``x / 6`` or ``x * (1/6)``."""
    found = index.producer(name)
    if found is None or found[0].op_type not in ("Mul", "Div"):
        return None
    node = found[0]
    for data, const in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        value = index.constant(const)
        if value is None or value.size != 1 or index.is_constant(data):
            continue
        scale = float(value.reshape(-1)[0])
        if (node.op_type == "Div" and const == node.input[1] and np.isclose(scale, 6.0)) or (
                node.op_type == "Mul" and np.isclose(scale, 1 / 6)):
            return data
    return None


def _downstream(index: GraphIndex, name: str, hops: int) -> Iterator[tuple[onnx.NodeProto, str]]:
    """(consumer, the input it reads) within ``hops`` steps through Mul/Div nodes."""
    frontier = [name]
    for _ in range(hops):
        following = []
        for tensor in frontier:
            for consumer in index.consumers.get(tensor, []):
                yield consumer, tensor
                if consumer.op_type in ("Mul", "Div"):
                    following.extend(consumer.output)
        frontier = following


def _scaled_by_sixth(index: GraphIndex, name: str) -> bool:
    for consumer, tensor in _downstream(index, name, 2):
        other = [i for i in consumer.input if i != tensor]
        value = index.constant(other[0]) if len(other) == 1 else None
        if value is None or value.size != 1:
            continue
        scale = float(value.reshape(-1)[0])
        if (consumer.op_type == "Div" and np.isclose(scale, 6.0)) or (
                consumer.op_type == "Mul" and np.isclose(scale, 1 / 6)):
            return True
    return False


def _multiplied_by(index: GraphIndex, name: str, x: str) -> bool:
    return any(c.op_type == "Mul" and x in c.input and t != x for c, t in _downstream(index, name, 2))
