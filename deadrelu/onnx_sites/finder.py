"""Finding the sites of a model: every ReLU-family node of the main graph and its
subgraphs, in graph order, named as in the report."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from deadrelu.onnx_sites.axis import trace_axis
from deadrelu.onnx_sites.clip import classify_clip
from deadrelu.onnx_sites.graph import FUSED_ACTIVATION_OPS, SITE_OP_TYPES, GraphIndex, attribute, inferred_graph, node_label
from deadrelu.onnx_sites.records import OnnxSite, ScopeStep, Survey
from deadrelu.sites import SiteNamer


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
