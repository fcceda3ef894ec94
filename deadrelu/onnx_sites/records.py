"""The records of a survey: sites, their scopes and unit axes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deadrelu.onnx_sites.graph import SUBGRAPH_CONTAINERS


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
