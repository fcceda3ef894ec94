"""Graphs saved in training mode, run as in inference.

`torch.export` and `torch.jit.trace` record the mode the model was in. A program
exported, or a trace made, before `model.eval()` runs BatchNorm on each batch's own
statistics and Dropout live, and its `.eval()` cannot change that: an exported module
refuses the call, a trace ignores it. A scan of such a graph would judge units by
statistics that change with the batch size and from run to run (a planted dead unit
behind a BatchNorm goes unseen). So the loader turns the recorded training flags of
`torch.nn` BatchNorm and Dropout layers off, as `model.eval()` before the export would
have, and says so in the report's warnings.

Only the flags of those layers change: a `F.dropout(x, training=True)` the model's own
code calls (Monte Carlo dropout) is the model's behaviour and stays. A trace records a
layer's flag as a constant; it is taken for the layer's mode only when the saved layer
was itself in training mode.
"""

from __future__ import annotations

from typing import Any

import torch

# op (packet name) -> position of its training flag
TRAINING_FLAG = {
    "batch_norm": 5, "native_batch_norm": 5, "_native_batch_norm_legit": 5,
    "_native_batch_norm_legit_functional": 5, "dropout": 2, "native_dropout": 2, "feature_dropout": 2,
    "alpha_dropout": 2, "feature_alpha_dropout": 2,
}
_LAYER_WORDS = ("BatchNorm", "Dropout")


def _is_mode_layer(type_name: str) -> bool:
    """A torch.nn BatchNorm or Dropout layer class (its name, qualified or not)."""
    short = type_name.rsplit(".", 1)[-1]
    return type_name.startswith(("torch.nn.", short)) and any(word in short for word in _LAYER_WORDS)


def _layer_kind(op: str) -> str:
    return "Dropout" if "dropout" in op else "BatchNorm"


def exported_to_inference(graph_module: torch.fx.GraphModule) -> tuple[str, ...]:
    """Turn the training flags of BatchNorm/Dropout layers in an exported module's graph
    off, in place; the kinds of layer changed (empty when the graph was in eval mode)."""
    changed: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        position = TRAINING_FLAG.get(op)
        if position is None or len(node.args) <= position or node.args[position] is not True:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        innermost = list(stack.values())[-1][1] if stack else ""
        if not _is_mode_layer(innermost if isinstance(innermost, str) else
                              f"{innermost.__module__}.{innermost.__qualname__}"):
            continue
        node.args = (*node.args[:position], False, *node.args[position + 1:])
        changed.add(_layer_kind(op))
    if "BatchNorm" in changed:
        for node in [n for n in graph_module.graph.nodes if _counts_batches(n)]:
            graph_module.graph.erase_node(node)
    if changed:
        graph_module.recompile()
    return tuple(sorted(changed))


def traced_to_inference(module: torch.jit.ScriptModule) -> tuple[str, ...]:
    """The same for a TorchScript archive: constant training flags in the forward graphs of
    BatchNorm/Dropout layers saved in training mode (a trace's; a scripted layer reads its
    `training` attribute, which `.eval()` sets)."""
    changed: set[str] = set()
    for layer in module.modules():
        name = str(getattr(layer, "original_name", ""))
        if not (getattr(layer, "training", False) and any(word in name for word in _LAYER_WORDS) and _has_graph(layer)):
            continue
        graph = layer.graph
        for node in list(graph.nodes()):
            op = node.kind().removeprefix("aten::")
            position = TRAINING_FLAG.get(op)
            inputs = list(node.inputs())
            if position is None or len(inputs) <= position or not _is_true_constant(inputs[position]):
                continue
            with graph.insert_point_guard(node):
                off = graph.insertConstant(False)
            node.replaceInput(position, off)
            changed.add(_layer_kind(op))
        for node in list(graph.nodes()):  # a training BatchNorm's unused num_batches_tracked.add_(1)
            inputs = list(node.inputs())
            if (node.kind() == "aten::add_" and inputs and not node.output().uses()
                    and inputs[0].node().kind() == "prim::GetAttr" and inputs[0].node().s("name") == "num_batches_tracked"):
                node.destroy()
    return tuple(sorted(changed))


def _counts_batches(node: torch.fx.Node) -> bool:
    """A training BatchNorm's unused ``num_batches_tracked.add_(1)`` (eval mode has none)."""
    source = node.args[0] if node.op == "call_function" and node.args else None
    return (getattr(getattr(node.target, "overloadpacket", None), "__name__", "") == "add_" and not node.users
            and isinstance(source, torch.fx.Node) and str(source.target).endswith("num_batches_tracked"))


def _has_graph(layer: Any) -> bool:
    try:
        return layer.graph is not None
    except (AttributeError, RuntimeError):  # a module with no forward method
        return False


def _is_true_constant(value: Any) -> bool:
    return value.node().kind() == "prim::Constant" and value.type().kind() == "BoolType" and value.toIValue() is True


def inference_note(path: str, how: str, layers: tuple[str, ...]) -> str:
    """The warning for a graph whose training flags were turned off."""
    return (f"{path} was {how} in training mode ({' and '.join(layers)} layers ran as in training); "
            "scanned as in eval mode, as if model.eval() had been called before saving it")
