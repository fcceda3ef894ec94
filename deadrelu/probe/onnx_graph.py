"""Rewriting an ONNX graph so that every site's statistics come out of it (threaded out
of If/Loop/Scan bodies), pruned to what they need, serialized without copying weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from deadrelu.load.onnx_format import OnnxModel
from deadrelu.onnx_sites import ScopeStep, copy_field, node_label
from deadrelu.probe.onnx_emit import PREFIX, EmitFn, Emitter, SitePlan

@dataclass(frozen=True)
class Exposure:
    """A site's two statistic tensors as visible in one graph (its own, or an enclosing one)."""

    plan: SitePlan
    stats: str
    shape: str | None
    stats_type: int
    rows: str = "fast"


class Rewriter:
    """Adds the reductions of every plan to a copy of the graph and brings them out.

    With ``statistics_only`` the model's own outputs are dropped and, with them, every
    main-graph node that no site's statistics depend on (`prune_to`): a classifier's or
    a language model's head after its last ReLU is not computed, since ONNX Runtime runs
    every node of a graph whatever outputs a run asks for."""

    def __init__(self, model: OnnxModel, plans: list[SitePlan], emit: EmitFn,
                 statistics_only: bool = False) -> None:
        self.model = model
        self.plans = plans
        self.emit = emit
        self.statistics_only = statistics_only
        self._emitters = 0

    def head(self) -> tuple[onnx.ModelProto, dict[int, Exposure]]:
        """The augmented model without its main-graph initializers, and where each site's
        statistics come out (graph output names by plan id)."""
        source = self.model.proto
        head = onnx.ModelProto()
        for descriptor, value in source.ListFields():
            if descriptor.name not in ("graph",):
                copy_field(head, descriptor, value)
        graph, exposures = self._graph(source.graph, (), skip=("node", "initializer"))
        if self.statistics_only and exposures:
            del graph.output[:]
        for exposure in exposures:
            _add_outputs(graph, exposure)
        if self.statistics_only and exposures:
            prune_to(graph, [output.name for output in graph.output])
        head.graph.CopyFrom(graph)
        return head, {e.plan.id: e for e in exposures}

    def _emitter(self) -> Emitter:
        self._emitters += 1
        return Emitter(self.model.opset, f"{PREFIX}{self._emitters}::")

    def _graph(self, source: onnx.GraphProto, scope: tuple[ScopeStep, ...],
               skip: tuple[str, ...] = ("node",)) -> tuple[onnx.GraphProto, list[Exposure]]:
        graph = onnx.GraphProto()
        for descriptor, value in source.ListFields():
            if descriptor.name not in skip:
                copy_field(graph, descriptor, value)
        here: dict[int, list[SitePlan]] = {}
        nested: set[int] = set()
        for plan in self.plans:
            site_scope = plan.site.scope
            if site_scope == scope:
                here.setdefault(plan.site.node_index, []).append(plan)
            elif site_scope[: len(scope)] == scope:
                nested.add(site_scope[len(scope)].node_index)
        exposures: list[Exposure] = []
        blocks: list[list[onnx.NodeProto]] = []
        for position, node in enumerate(source.node):
            if position in nested:
                copy, found = self._container(node, position, scope)
                graph.node.append(copy)
                exposures.extend(found)
            else:
                graph.node.append(node)
            for plan in here.get(position, []):
                em = self._emitter()
                emitted = self.emit(em, plan)
                blocks.append(em.nodes)
                exposures.append(Exposure(plan, emitted.stats, emitted.shape, emitted.stats_type, emitted.rows))
        # Main graph: the blocks go last, the first site's last. ONNX Runtime orders nodes by
        # a depth-first walk from the graph's leaves, the last-listed leaf first, so each
        # site's reductions then run right after the site, while its tensor is in cache, and
        # the tensor is freed at once; listed after their sites they would all run at the end.
        graph.node.extend(node for block in (blocks if scope else reversed(blocks)) for node in block)
        return graph, exposures

    def _container(self, node: onnx.NodeProto, position: int,
                   scope: tuple[ScopeStep, ...]) -> tuple[onnx.NodeProto, list[Exposure]]:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        inner: dict[str, list[Exposure]] = {}
        for attr in copy.attribute:
            if not attr.HasField("g"):
                continue
            step = ScopeStep(position, node_label(node), node.op_type, attr.name, -1)
            graph, found = self._graph(attr.g, (*scope, step))
            attr.g.CopyFrom(graph)
            inner[attr.name] = found
        if node.op_type == "If":
            return copy, self._thread_if(copy, inner)
        return copy, self._thread_loop(copy, inner.get("body", []))

    def _thread_if(self, node: onnx.NodeProto, inner: dict[str, list[Exposure]]) -> list[Exposure]:
        """If outputs become [original, then-branch sites, else-branch sites]; each branch
        gives empty stand-ins for the other branch's sites."""
        then_found, else_found = inner.get("then_branch", []), inner.get("else_branch", [])
        branches = {attr.name: attr.g for attr in node.attribute}
        then_graph, else_graph = branches["then_branch"], branches["else_branch"]
        em = self._emitter()
        for exposure in then_found:
            _add_outputs(then_graph, exposure)
        for exposure in else_found:
            _add_outputs(then_graph, _placeholder(em, exposure, then_graph))
        for exposure in then_found:
            _add_outputs(else_graph, _placeholder(em, exposure, else_graph))
        for exposure in else_found:
            _add_outputs(else_graph, exposure)
        return [self._node_outputs(node, em, e) for e in then_found + else_found]

    def _thread_loop(self, node: onnx.NodeProto, found: list[Exposure]) -> list[Exposure]:
        body = next(attr.g for attr in node.attribute if attr.name == "body")
        em = self._emitter()
        for exposure in found:
            _add_outputs(body, exposure)
        if node.op_type == "Scan":  # new scan outputs: stacked along axis 0, forward
            for attr in node.attribute:
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.extend([0] * sum(len(exposed_names(e)) for e in found))
        return [self._node_outputs(node, em, e) for e in found]

    @staticmethod
    def _node_outputs(node: onnx.NodeProto, em: Emitter, exposure: Exposure) -> Exposure:
        """New outputs of a container node carrying one site's tensors out of its subgraph."""
        stats = em.fresh("stats_out")
        shape = em.fresh("shape_out") if exposure.shape else None
        node.output.extend([stats, shape] if shape else [stats])
        return Exposure(exposure.plan, stats, shape, exposure.stats_type, exposure.rows)


def prune_to(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Keep only the nodes that ``outputs`` depend on; they become the graph's outputs.

    Nodes are listed in topological order (ONNX requires it, and the reduction blocks
    are appended after every node they read), so one backward pass finds them. A node
    with subgraphs depends on every name its bodies read, which covers the values they
    take from the enclosing scope. Graph inputs stay, used or not: feeds are unchanged."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    known = {output.name: output for output in graph.output}
    del graph.output[:]
    graph.output.extend(known[name] for name in outputs)


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node reads: its inputs and, recursively, those of its subgraphs."""
    reads = {name for name in node.input if name}
    for attr in node.attribute:
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in body.node:
                reads |= node_reads(inner)
            reads.update(output.name for output in body.output)
    return reads


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of a graph (and their subgraphs) read, and its outputs."""
    reads = {output.name for output in graph.output}
    for node in graph.node:
        reads |= node_reads(node)
    return reads


def exposed_names(exposure: Exposure) -> list[str]:
    """The graph outputs of one site: its statistics, and its shape where it has one."""
    return [exposure.stats, exposure.shape] if exposure.shape else [exposure.stats]


def _add_outputs(graph: onnx.GraphProto, exposure: Exposure) -> None:
    graph.output.append(helper.make_tensor_value_info(exposure.stats, exposure.stats_type, None))
    if exposure.shape:
        graph.output.append(helper.make_tensor_value_info(exposure.shape, TensorProto.INT64, None))


def _placeholder(em: Emitter, exposure: Exposure, graph: onnx.GraphProto) -> Exposure:
    """Empty stand-ins, in one If branch, for a site that sits in the other branch."""
    em.nodes = []
    stats = em.const(np.zeros((0,), dtype=helper.tensor_dtype_to_np_dtype(exposure.stats_type)), "empty_stats")
    shape = em.const(np.zeros((0,), dtype=np.int64), "empty_shape") if exposure.shape else None
    graph.node.extend(em.nodes)
    return Exposure(exposure.plan, stats, shape, exposure.stats_type, exposure.rows)


def model_bytes(head: onnx.ModelProto, initializers: Any) -> bytes:
    """Serialized model: the head, then the original initializers as graph fragments.

    Protobuf merges a repeated embedded message field, so ``graph { initializer: ... }``
    fragments after the head add to its graph without copying the weights into it.
    """
    graph_field = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_field = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    parts = [head.SerializeToString()]
    inner = [_length_delimited(init_field, t.SerializeToString()) for t in initializers]
    size = sum(len(p) for p in inner)
    parts.append(_varint(graph_field << 3 | 2) + _varint(size))
    parts.extend(inner)
    return b"".join(parts)


def used_initializers(head: onnx.ModelProto, initializers: Any) -> list[Any]:
    """The initializers that the head's nodes read, or that are also graph inputs (an
    input with a default): weights of pruned nodes are neither loaded nor kept."""
    used = graph_reads(head.graph) | {value.name for value in head.graph.input}
    return [tensor for tensor in initializers if tensor.name in used]


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
