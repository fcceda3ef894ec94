"""ReLU sites of an ONNX graph: which nodes are ReLUs, their names, and their unit axis.

A *site* is one ReLU-family node, in the main graph or in a subgraph (``If`` branches,
``Loop`` and ``Scan`` bodies), in graph order (subgraphs right after the node holding
them). Sites and their report ops:

* ``Relu`` -> ``relu``; ``LeakyRelu`` -> ``leaky_relu``; ``PRelu`` -> ``prelu``;
* ``Clip`` with a constant lower bound of 0 -> ``relu6`` when the upper bound is 6,
  otherwise ``relu`` (the upper bound, if any, is reported with the site). A ``Clip(x + 3,
  0, 6)`` (or ``Clip(x / 6 + 0.5, 0, 1)``) followed by the ``/ 6`` of a HardSigmoid or the
  ``* x`` of a HardSwish is not a ReLU: it is reported as a finding, never as a site.

A site is named after its node, or after the node's first output tensor when the node has
no name; a repeated name gets ``_1``, ``_2``, ... as in `deadrelu.sites.SiteNamer`.

The unit axis follows the producer of the pre-activation, walking up through layout-
preserving nodes (BatchNormalization, elementwise ops with a constant, casts, pooling,
...) and mapping the axis through Transpose/Squeeze/Unsqueeze: dim 1 behind a
convolution, the last dim behind Gemm/MatMul and recurrent layers, dim 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from deadrelu.sites import SiteNamer

SITE_OP_TYPES = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip"})
CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv"})
LINEAR_OPS = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits"})
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
# Ops whose output has the layout of one of their data inputs (with numpy broadcasting).
ELEMENTWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow",
        "BatchNormalization", "InstanceNormalization", "LayerNormalization",
        "Identity", "Cast", "CastLike", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal",
        "Relu", "LeakyRelu", "PRelu", "Clip", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Erf", "Gelu", "Mish", "ThresholdedRelu",
        "QuantizeLinear", "DequantizeLinear",
    }
)
# Ops that keep every dimension where it was (sizes may change).
RANK_PRESERVING_OPS = frozenset(
    {
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
        "Pad", "Resize", "Upsample", "Concat", "Slice", "Split", "Tile", "Expand", "LRN",
    }
)
RESHAPE_OPS = frozenset({"Reshape", "Flatten"})
# Ops that fuse an activation into their producer, hiding its pre-activation.
FUSED_ACTIVATION_OPS = frozenset({"FusedConv", "FusedGemm", "NhwcFusedConv", "FusedMatMulActivation"})
SUBGRAPH_CONTAINERS = frozenset({"If", "Loop", "Scan"})
# Normalisation nodes: a site behind one has "normalisation upstream" (the fix planner's rule).
NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})
MAX_TRACE_DEPTH = 64


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopeStep:
    """One step down into a subgraph: the node holding it and the attribute it sits in."""

    node_index: int  # position of the holding node in its graph
    node: str  # its name (or first output)
    op_type: str  # If | Loop | Scan | other
    attribute: str  # then_branch | else_branch | body | ...
    graph_index: int = -1  # position in a GRAPHS attribute; -1 for a GRAPH attribute

    def describe(self) -> str:
        return f"{self.op_type} '{self.node}' {self.attribute}"


@dataclass(frozen=True)
class AxisTrace:
    """A unit axis and how it was chosen.

    ``anchor`` counts from the start when non-negative and from the end when negative
    (so it survives broadcasting that adds leading dims); None means "the default".
    """

    anchor: int | None
    source: str  # conv | linear | recurrent | default
    reason: str
    normalised: bool = False  # a normalisation node lies between the producer and the site

    def resolve(self, rank: int) -> int:
        """The non-negative unit axis of a pre-activation of the given rank; 1 for rank 0/1:
        one unit, axis 1 of its ``(values, 1)`` view (see `deadrelu.sites.choose_axis`)."""
        if rank <= 1:
            return 1
        if self.anchor is None:
            return 1
        axis = self.anchor + rank if self.anchor < 0 else self.anchor
        return axis if 0 <= axis < rank else 1


@dataclass(frozen=True)
class OnnxSite:
    """One ReLU-family node."""

    name: str  # report name (unique)
    op: str  # relu | relu6 | leaky_relu | prelu
    node: str  # the node's name, '' when it has none
    op_type: str
    node_index: int  # position in its graph
    preact: str  # pre-activation tensor
    output: str  # the node's output tensor
    scope: tuple[ScopeStep, ...]  # () for the main graph
    rank: int | None  # of the pre-activation, None when shape inference could not tell
    elem_type: int | None  # onnx.TensorProto data type of the pre-activation
    axis: AxisTrace
    clip: tuple[float, float | None] | None = None  # (min, max) of a Clip site
    dims: tuple[int | None, ...] | None = None  # of the pre-activation as inferred; None for an unknown dim

    @property
    def where(self) -> str:
        """'main graph' or the chain of subgraphs holding the site."""
        return " > ".join(s.describe() for s in self.scope) if self.scope else "main graph"

    def obstacle(self) -> str | None:
        """Why this site's statistics cannot be brought out of its subgraph, or None."""
        stacked = False
        for step in self.scope:
            if step.op_type not in SUBGRAPH_CONTAINERS:
                return f"it sits in a {step.op_type} node's '{step.attribute}' graph, which deadrelu cannot rewrite"
            if step.op_type == "If" and stacked:
                return "it sits in an If branch inside a Loop/Scan body, whose per-iteration outputs must all have one shape"
            if step.op_type in ("Loop", "Scan"):
                if stacked:
                    return "it sits in nested Loop/Scan bodies, whose per-iteration statistics cannot be stacked reliably"
                stacked = True
        if self.scope and self.rank is None:
            return "shape inference could not tell the rank of its pre-activation"
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for the report's ``onnx`` entry of this site."""
        facts: dict[str, Any] = {
            "node": self.node,
            "op_type": self.op_type,
            "preact_tensor": self.preact,
            "output_tensor": self.output,
            "axis_reason": self.axis.reason,
        }
        if self.scope:
            facts["subgraph"] = self.where
        if self.clip is not None:
            facts["clip"] = {"min": self.clip[0], "max": self.clip[1]}
        return facts


@dataclass(frozen=True)
class Survey:
    """Every site of a model, plus what the reader should know about nodes that are not."""

    sites: tuple[OnnxSite, ...]
    findings: tuple[str, ...] = ()


# --- graph index ---------------------------------------------------------------------------


@dataclass
class GraphIndex:
    """Producers, consumers, constants and types of one graph, with its enclosing graphs."""

    graph: onnx.GraphProto
    parent: GraphIndex | None = None
    producers: dict[str, tuple[onnx.NodeProto, int]] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)

    @classmethod
    def build(cls, graph: onnx.GraphProto, parent: GraphIndex | None = None,
              inferred: onnx.GraphProto | None = None) -> GraphIndex:
        index = cls(graph, parent)
        for node in graph.node:
            for position, name in enumerate(node.output):
                if name:
                    index.producers[name] = (node, position)
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(node)
        index.initializers = {t.name: t for t in graph.initializer}
        for source in (graph, inferred) if inferred is not None else (graph,):
            for info in [*source.input, *source.output, *source.value_info]:
                if info.type.HasField("tensor_type"):
                    index.types.setdefault(info.name, info.type)
        return index

    def producer(self, name: str) -> tuple[onnx.NodeProto, int] | None:
        if name in self.producers:
            return self.producers[name]
        if self._defines(name):
            return None
        return self.parent.producer(name) if self.parent else None

    def _defines(self, name: str) -> bool:
        return name in self.initializers or any(i.name == name for i in self.graph.input)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), if small and known."""
        if not name:
            return None
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(tensor)
        found = self.producers.get(name)
        if found is not None:
            return _constant_node_value(found[0])
        if self._defines(name):
            return None
        return self.parent.constant(name) if self.parent else None

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is an initializer or a Constant node's output (value not read)."""
        if not name:
            return False
        if name in self.initializers:
            return True
        found = self.producers.get(name)
        if found is not None:
            return found[0].op_type == "Constant" and found[0].domain in ("", "ai.onnx")
        if self._defines(name):
            return False
        return self.parent.is_constant(name) if self.parent else False

    def tensor_type(self, name: str) -> onnx.TypeProto | None:
        if name in self.types:
            return self.types[name]
        return self.parent.tensor_type(name) if self.parent else None

    def rank(self, name: str) -> int | None:
        if name in self.initializers:
            return len(self.initializers[name].dims)
        value = self.constant(name) if name in self.producers else None  # a Constant node
        if value is not None:
            return value.ndim
        found = self.tensor_type(name)
        if found is None or not found.tensor_type.HasField("shape"):
            return None
        return len(found.tensor_type.shape.dim)

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        found = self.tensor_type(name)
        if found is None or not found.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in found.tensor_type.shape.dim)

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        found = self.tensor_type(name)
        if found is None or not found.tensor_type.elem_type:
            return None
        return found.tensor_type.elem_type


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when it has none."""
    return node.name or (node.output[0] if node.output else node.op_type)


# --- shape inference -----------------------------------------------------------------------

_STUB_ELEMENTS = 4096


def inferred_graph(model: onnx.ModelProto) -> onnx.GraphProto | None:
    """The main graph with shapes inferred (subgraphs included), or None if inference fails.

    Inference runs on a skeleton whose large initializers are stubs, so the weights are
    neither copied nor read.
    """
    try:
        return onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False,
                                                 data_prop=True).graph
    except Exception:  # a custom op or an invalid model: the ranks stay unknown
        return None


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large main-graph initializers are data-less stubs."""
    copy = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            copy_field(copy, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            copy_field(copy.graph, descriptor, value)
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) > _STUB_ELEMENTS or tensor.data_location == onnx.TensorProto.EXTERNAL:
            stub = copy.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="deadrelu-stub")
        else:
            copy.graph.initializer.add().CopyFrom(tensor)
    return copy


def copy_field(target: Any, descriptor: Any, value: Any) -> None:
    """Copy one field (as listed by ``ListFields``) of a protobuf message into another."""
    repeated = getattr(descriptor, "is_repeated", None)  # protobuf >= 5.28; `label` before
    if repeated is None:
        repeated = descriptor.label == descriptor.LABEL_REPEATED
    if repeated:
        getattr(target, descriptor.name).extend(value)
    elif descriptor.message_type is not None:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


# --- finding sites -------------------------------------------------------------------------


def survey(model: onnx.ModelProto) -> Survey:
    """Every ReLU-family node of the model, in graph order, with names and unit axes."""
    inferred = inferred_graph(model)
    finder = _Finder()
    finder.visit(model.graph, GraphIndex.build(model.graph, None, inferred), (), inferred)
    finder.findings.extend(_function_findings(model))
    return Survey(tuple(finder.sites), tuple(finder.findings))


class _Finder:
    def __init__(self) -> None:
        self.sites: list[OnnxSite] = []
        self.findings: list[str] = []
        self.namer = SiteNamer()

    def visit(self, graph: onnx.GraphProto, index: GraphIndex, scope: tuple[ScopeStep, ...],
              inferred: onnx.GraphProto | None) -> None:
        for position, node in enumerate(graph.node):
            if node.domain in ("", "ai.onnx") and node.op_type in SITE_OP_TYPES and node.input and node.input[0]:
                self._consider(node, position, index, scope)
            elif node.op_type in FUSED_ACTIVATION_OPS:
                self._fused(node)
            for attr_position, attr in _graph_attributes(node):
                subgraphs = [(attr.g, -1)] if attr.HasField("g") else [(g, i) for i, g in enumerate(attr.graphs)]
                for sub, graph_index in subgraphs:
                    step = ScopeStep(position, node_label(node), node.op_type, attr.name, graph_index)
                    sub_inferred = _matching_subgraph(inferred, position, attr_position, graph_index)
                    self.visit(sub, GraphIndex.build(sub, index, sub_inferred), (*scope, step), sub_inferred)

    def _consider(self, node: onnx.NodeProto, position: int, index: GraphIndex, scope: tuple[ScopeStep, ...]) -> None:
        clip = None
        if node.op_type == "Clip":
            verdict = classify_clip(node, index)
            if isinstance(verdict, str):
                if verdict:
                    self.findings.append(verdict)
                return
            clip = verdict
            op = "relu6" if clip[1] == 6.0 else "relu"
        else:
            op = {"Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu"}[node.op_type]
        preact = node.input[0]
        site = OnnxSite(
            name=self.namer.name(node_label(node)),
            op=op,
            node=node.name,
            op_type=node.op_type,
            node_index=position,
            preact=preact,
            output=node.output[0] if node.output else "",
            scope=scope,
            rank=index.rank(preact),
            elem_type=index.elem_type(preact),
            axis=trace_axis(index, preact),
            clip=clip,
            dims=index.dims(preact),
        )
        self.sites.append(site)
        if clip is not None and clip[1] not in (None, 6.0):
            self.findings.append(f"site '{site.name}' is Clip(0, {clip[1]:g}): a ReLU capped at {clip[1]:g}, "
                                 "reported as op 'relu'")

    def _fused(self, node: onnx.NodeProto) -> None:
        activation = attribute(node, "activation", b"")
        activation = activation.decode() if isinstance(activation, bytes) else str(activation)
        if activation in ("Relu", "LeakyRelu", "Clip"):
            self.findings.append(
                f"node '{node_label(node)}' ({node.domain or 'ai.onnx'} {node.op_type} with a fused {activation}) "
                "hides its pre-activation and was not scanned; scan the model as exported, before ONNX Runtime's "
                "offline optimisation")


_BRANCH_ORDER = {"then_branch": 0, "else_branch": 1}


def _graph_attributes(node: onnx.NodeProto) -> list[tuple[int, onnx.AttributeProto]]:
    """(position, attribute) of the node's graph attributes, an If's then-branch first."""
    found = [(i, a) for i, a in enumerate(node.attribute) if a.HasField("g") or len(a.graphs)]
    return sorted(found, key=lambda item: _BRANCH_ORDER.get(item[1].name, 2))


def _matching_subgraph(inferred: onnx.GraphProto | None, position: int, attr_position: int,
                       graph_index: int) -> onnx.GraphProto | None:
    """The inferred copy of a subgraph (inference keeps node order and attributes)."""
    if inferred is None or position >= len(inferred.node):
        return None
    node = inferred.node[position]
    if attr_position >= len(node.attribute):
        return None
    attr = node.attribute[attr_position]
    if graph_index < 0:
        return attr.g if attr.HasField("g") else None
    return attr.graphs[graph_index] if graph_index < len(attr.graphs) else None


def _function_findings(model: onnx.ModelProto) -> Iterator[str]:
    for function in model.functions:
        count = sum(1 for n in function.node if n.op_type in SITE_OP_TYPES and n.domain in ("", "ai.onnx"))
        if count:
            yield (f"model-local function '{function.name}' holds {count} ReLU-family node(s), which were not "
                   "scanned; inline the functions (onnx.inliner.inline_local_functions) and scan again")


# --- Clip --------------------------------------------------------------------------------------

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


# --- unit axis ---------------------------------------------------------------------------------

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
              "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Dropout", "CastLike", "Pow"):
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
    return None


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
