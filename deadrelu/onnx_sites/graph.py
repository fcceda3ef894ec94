"""One ONNX graph as deadrelu reads it: the op families that matter, an index of
producers, consumers, constants and types, and shape inference on a weightless copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

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
        "QuantizeLinear", "DequantizeLinear", "Where",
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
# Reductions over some axes: the units follow when their axis is not reduced.
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"})
# Ops that fuse an activation into their producer, hiding its pre-activation.
FUSED_ACTIVATION_OPS = frozenset({"FusedConv", "FusedGemm", "NhwcFusedConv", "FusedMatMulActivation"})
SUBGRAPH_CONTAINERS = frozenset({"If", "Loop", "Scan"})
# Normalisation nodes: a site behind one has "normalisation upstream" (the fix planner's rule).
NORM_OPS = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"})
MAX_TRACE_DEPTH = 64


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
