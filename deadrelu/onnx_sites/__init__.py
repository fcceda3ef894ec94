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

The package, in the order a survey runs: `graph` (op families, an index of one graph,
shape inference), `finder` (the sites of the main graph and its subgraphs), `clip`
(which Clip nodes are ReLUs), `axis` (each site's unit axis); `records` holds what it
returns.
"""

from deadrelu.onnx_sites.axis import trace_axis
from deadrelu.onnx_sites.finder import survey
from deadrelu.onnx_sites.graph import SUBGRAPH_CONTAINERS, GraphIndex, copy_field, node_label
from deadrelu.onnx_sites.records import AxisTrace, OnnxSite, ScopeStep, Survey

__all__ = ["SUBGRAPH_CONTAINERS", "AxisTrace", "GraphIndex", "OnnxSite", "ScopeStep", "Survey", "copy_field",
           "node_label", "survey", "trace_axis"]
