"""Telling apart the arms of a data-dependent branch in a TorchScript model, or of a
``torch.cond`` in an exported program.

TorchScript runs without Python frames or module hooks, so the probe matches each ReLU
call to the next entry of the model's graph of the same op (`StaticContexts`). Under an
``if``/``else`` that order is ambiguous: a call from the second arm would take the first
arm's entry, and two layers' statistics would be filed under one site. Each call is
therefore also keyed by its *source*, the module owning the parameters of the nearest op
upstream that reads any: ``a`` for ``relu(self.a(x))``, ``bn`` for ``relu(self.bn(y))``.
One rule gives it, applied once to the graph and again to the ops as they run:

* a tensor is *parameter-derived* when it is a parameter or buffer, or comes from an op
  whose tensor inputs are all parameter-derived (``t(weight)``);
* an op with a parameter-derived input takes the owner of the first one;
* any other op takes the source of its first input that has one.

The rule reads each op's inputs in schema order, so it gives the same answer for a graph's
``aten::linear(x, weight, bias)`` as for the ``t(weight)`` and ``addmm(bias, x, .)`` that
run: the module ``a`` in both.

An exported program holds a data-dependent branch as a ``torch.cond`` whose arms are
subgraphs; there the arm itself is the source (`ArmSources`): the probe runs the arm the
predicate picks and says so, and each graph entry knows its arm (`sites.fx_candidate_arms`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from deadrelu import sites

Source = tuple[str | None, bool]  # (owning module path or None, parameter-derived)


# --- the graph side -----------------------------------------------------------------------

def branch_candidate_sources(module: torch.jit.ScriptModule) -> list[str | None] | None:
    """The source of each candidate op's input, in the order of
    `sites.torchscript_candidate_contexts`; None when no candidate sits inside a control
    flow block (the graph order alone is then exact)."""
    graph = module.inlined_graph
    self_value = next(iter(graph.inputs()), None)
    known: dict[int, Source] = {}
    found: list[str | None] = []
    nested = False

    def walk(block: Any, depth: int) -> None:
        nonlocal nested
        for node in block.nodes():
            kind = node.kind()
            if kind.startswith("aten::") and sites.CANDIDATE_OPS.get(sites.packet_name(kind)):
                first = next(iter(node.inputs()), None)
                found.append(known.get(first.unique(), (None, False))[0] if first is not None else None)
                nested = nested or depth > 0
            for sub in node.blocks():
                walk(sub, depth + 1)
            _record_outputs(node, self_value, known)

    walk(graph, 0)
    return found if nested else None


def _record_outputs(node: Any, self_value: Any, known: dict[int, Source]) -> None:
    outputs = list(node.outputs())
    if node.kind() == "prim::GetAttr":
        path = _attribute_path(outputs[0], self_value)
        if path is not None and _carries_tensors(outputs[0].type()):
            known[outputs[0].unique()] = (".".join(path[:-1]), True)
        return
    if list(node.blocks()):  # prim::If / prim::Loop results: which arm made them is not known here
        return
    inputs = [v for v in node.inputs() if _carries_tensors(v.type())]
    source = _combine([known.get(v.unique(), (None, False)) for v in inputs])
    if source[0] is not None:
        for value in outputs:
            known[value.unique()] = source


def _attribute_path(value: Any, self_value: Any) -> list[str] | None:
    """['layer1', '0', 'conv1', 'weight'] for a chain of prim::GetAttr from the model."""
    path: list[str] = []
    while value.node().kind() == "prim::GetAttr":
        path.append(value.node().s("name"))
        value = value.node().input()
    return path[::-1] if self_value is not None and value.unique() == self_value.unique() else None


def _carries_tensors(kind: Any) -> bool:
    if isinstance(kind, torch._C.TensorType):
        return True
    if isinstance(kind, (torch._C.ListType, torch._C.OptionalType)):
        return _carries_tensors(kind.getElementType())
    if isinstance(kind, torch._C.TupleType):
        return any(_carries_tensors(element) for element in kind.elements())
    return False


def _combine(inputs: list[Source]) -> Source:
    """The rule above, for an op whose tensor inputs have these sources, in order."""
    owner = next((path for path, derived in inputs if derived), None)
    if owner is not None:
        return owner, all(derived for _, derived in inputs)
    return next((path for path, _ in inputs if path is not None), None), False


# --- the runtime side ---------------------------------------------------------------------

class RuntimeSources:
    """The same rule applied to the ops a `TorchDispatchMode` sees run."""

    def __init__(self, module: torch.nn.Module | torch.jit.ScriptModule) -> None:
        named = [*module.named_parameters(), *module.named_buffers()]
        self._alive = [tensor for _, tensor in named]  # ids stay theirs while the probe runs
        self._owners = {id(tensor): name.rpartition(".")[0] for name, tensor in named}
        self._seen: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # tensor -> Source

    def of(self, tensor: torch.Tensor) -> str | None:
        return self._source(tensor)[0]

    def track(self, args: tuple, kwargs: dict, out: Any) -> None:
        source = _combine([self._source(t) for t in _tensors(args)] + [self._source(t) for t in _tensors(kwargs.values())])
        if source[0] is None:
            return
        for tensor in _tensors((out,)):
            self._seen[tensor] = source

    def _source(self, tensor: torch.Tensor) -> Source:
        owner = self._owners.get(id(tensor))
        if owner is not None:
            return owner, True
        return self._seen.get(tensor, (None, False))


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


class ArmSources:
    """The ``torch.cond`` arm running, as the source of every call made in it ("" outside)."""

    def __init__(self, graph_module: torch.fx.GraphModule) -> None:
        self._arms = sites.fx_cond_arms(graph_module)
        self._running: list[str] = []

    def of(self, tensor: torch.Tensor) -> str:
        return self._running[-1] if self._running else ""

    def track(self, args: tuple, kwargs: dict, out: Any) -> None:
        pass  # the arm, not the data, tells the calls apart

    @contextmanager
    def entering(self, arm: Any) -> Iterator[None]:
        self._running.append(self._arms.get(id(arm), f"?{id(arm)}"))
        try:
            yield
        finally:
            self._running.pop()
