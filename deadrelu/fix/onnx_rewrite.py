"""Rewriting ONNX models: the planned swaps and BatchNorm insertions, written as a new
ONNX file; and an ONNX model as a function from a batch to all its outputs.

Sites are found by the survey the probe uses (`deadrelu.onnx_sites.survey`); a planned
site is the surveyed site of the same (unique) report name, and its op must match. What
each change becomes in the graph (the README's fix section says the same):

* ``leaky``: the ``Relu`` (or ``Clip(0, c)``) node becomes ``LeakyRelu(alpha=slope)``
  under the site node's name, followed by ``Min(., c)`` when the site was a Clip with an
  upper bound c (a ReLU6 keeps its cap at 6).
* ``prelu``: ``PRelu`` with a slope initializer of one value per unit, shaped ``(units,
  1, ..., 1)`` so that it broadcasts (unidirectionally, numpy-style) along the site's unit
  axis: ``(C, 1, 1)`` for a convolution's ``(N, C, H, W)``, ``(F,)`` for ``(N, T, F)``.
* ``bn``: a ``BatchNormalization`` node (inference mode: scale, B, input_mean, input_var
  initializers) on the pre-activation, before the ReLU. ONNX normalises dim 1, so for
  another unit axis the node sits between two ``Transpose`` nodes (a vector pre-activation
  between ``Unsqueeze``/``Squeeze``); a re-scan traces the unit axis through them.

Sites inside ``If`` branches and ``Loop``/``Scan`` bodies are rewritten in their body,
with their initializers in that body. New nodes and tensors get names derived from the
site's label (``<label>/deadrelu_bn``...), unique in the whole model; the opset, every
other node and the graph inputs and outputs are kept.

Writing (`save_onnx`): weights that were embedded in the input file are embedded in the
output; weights the input kept in external data files are copied, tensor by tensor, into
one new file ``<output name>.data`` beside the output (the input's data files are only
read). Both files are written to temporary names in the output's folder and renamed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deadrelu.data import ModelInput
from deadrelu.errors import UsageError
from deadrelu.fix.plan import SiteFix
from deadrelu.fix.torch_rewrite import RewriteError, RewriteOptions, UnitMoments
from deadrelu.load import LoadedModel
from deadrelu.load.detect import ModelFormat
from deadrelu.load.onnx_format import OnnxModel
from deadrelu.onnx_sites import SUBGRAPH_CONTAINERS, OnnxSite, ScopeStep, node_label, survey
from deadrelu.outputs import atomic_file, write_atomic
from deadrelu.probe.onnx_emit import emit_fast
from deadrelu.probe.onnx_feed import Feeder, input_specs
from deadrelu.probe.onnx_graph import Rewriter
from deadrelu.probe.onnx_session import SessionFactory

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
COPY_CHUNK = 16 << 20


# --- public entry --------------------------------------------------------------------------


def rewrite_onnx(loaded: LoadedModel, plan: Sequence[SiteFix], moments: dict[int, UnitMoments],
                 options: RewriteOptions, output: Path) -> None:
    """Write ``loaded`` with every planned change applied to ``output`` (see the module doc)."""
    save_onnx(rewritten_model(loaded.module, plan, moments, options), output)


def rewritten_loaded(loaded: LoadedModel, plan: Sequence[SiteFix], moments: dict[int, UnitMoments],
                     options: RewriteOptions) -> LoadedModel:
    """The rewritten model in memory, ready to scan: its weights are still read from the
    input's files, so nothing is copied (for measuring statistics downstream of changes)."""
    model = rewritten_model(loaded.module, plan, moments, options)
    return LoadedModel(module=model, format=ModelFormat.ONNX, path=loaded.path, sha256="")


def rewritten_model(model: OnnxModel, plan: Sequence[SiteFix], moments: dict[int, UnitMoments],
                    options: RewriteOptions) -> OnnxModel:
    """A copy of ``model`` with the changes; external-data references are left as they are."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    found = survey(model.proto).sites
    names = _Names(proto)
    by_scope: dict[tuple[ScopeStep, ...], list[tuple[OnnxSite, SiteFix]]] = {}
    released: set[str] = set()  # bounds of the Clip nodes that were replaced
    for fix in plan:
        site = _site_of(found, fix)
        by_scope.setdefault(site.scope, []).append((site, fix))
    # Deepest graphs first: a graph's node positions stay valid until it is spliced itself.
    for scope in sorted(by_scope, key=len, reverse=True):
        graph = _subgraph(proto.graph, scope, by_scope[scope][0][1])
        builder = _Builder(graph, names, model.opset, main=not scope, old_ir=proto.ir_version < 4)
        edits: dict[int, list[onnx.NodeProto]] = {}
        for site, fix in by_scope[scope]:
            node = graph.node[site.node_index]
            if node.op_type != site.op_type or node_label(node) != _label_of(site):
                raise RewriteError(f"site {fix.site} (#{fix.index}): the graph changed under it ({node.op_type} "
                                   f"'{node_label(node)}' there)")
            edits[site.node_index] = builder.build(node, site, fix, moments.get(fix.index), options)
        _splice(graph, edits)
        released |= builder.released
    _drop_unused(proto, released)
    return OnnxModel(proto=proto, path=model.path, opset=model.opset, external_files=model.external_files)


def _label_of(site: OnnxSite) -> str:
    """The label (name, or first output) of a site's node as it was surveyed."""
    return site.node or site.output


def onnx_output_function(loaded: LoadedModel) -> Callable[[ModelInput], list[np.ndarray]]:
    """Run the model in ONNX Runtime (CPU) on a batch; all its outputs as numpy arrays.

    Feeds are built as the probe builds them (inputs by graph input name, dtypes converted,
    batches split for a model with a fixed batch size). Sessions use ONNX Runtime's basic
    graph optimisations only: at the highest level its layout transformations round a
    convolution followed by PRelu differently from one followed by Relu, so a no-op swap
    (slope 0) would not compare exactly equal to the original.
    """
    model: OnnxModel = loaded.module
    factory = _BasicSessions(model, ["CPUExecutionProvider"], optimise=True)
    head, _ = Rewriter(model, [], emit_fast).head()
    session = factory.session(head)
    feeder = Feeder(input_specs(model.proto), model.path)
    names = [o.name for o in session.get_outputs()]

    def run(batch: ModelInput) -> list[np.ndarray]:
        runs = [session.run(names, feed) for feed, _ in feeder.feeds(batch)]
        if len(runs) == 1:
            return [np.asarray(a) for a in runs[0]]
        return [np.concatenate([np.atleast_1d(np.asarray(r[i])) for r in runs]) for i in range(len(names))]

    weakref.finalize(run, factory.close)
    return run


class _BasicSessions(SessionFactory):
    def options(self) -> Any:
        import onnxruntime as ort

        options = super().options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return options


# --- finding the nodes -----------------------------------------------------------------------


def _site_of(found: Sequence[OnnxSite], fix: SiteFix) -> OnnxSite:
    matches = [s for s in found if s.name == fix.site]
    if len(matches) != 1 or matches[0].op != fix.op:
        got = "nothing" if not matches else ("several sites" if len(matches) > 1 else matches[0].op)
        raise RewriteError(f"site {fix.site} (#{fix.index}, {fix.op}) does not match the graph ({got} there)")
    return matches[0]


def _subgraph(graph: onnx.GraphProto, scope: tuple[ScopeStep, ...], fix: SiteFix) -> onnx.GraphProto:
    for step in scope:
        if step.op_type not in SUBGRAPH_CONTAINERS:
            raise RewriteError(f"site {fix.site} sits in a {step.op_type} node's '{step.attribute}' graph; "
                               "only If branches and Loop/Scan bodies can be rewritten")
        holder = graph.node[step.node_index]
        attr = next((a for a in holder.attribute if a.name == step.attribute), None)
        if holder.op_type != step.op_type or attr is None:
            raise RewriteError(f"site {fix.site}: {step.describe()} is not where the survey found it")
        graph = attr.g if step.graph_index < 0 else attr.graphs[step.graph_index]
    return graph


def _splice(graph: onnx.GraphProto, edits: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace the node at each edited position by its list of nodes (graph order is kept)."""
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        if position in edits:
            nodes.extend(edits[position])
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            nodes.append(copy)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _drop_unused(proto: onnx.ModelProto, names: set[str]) -> None:
    """Remove the constants among ``names`` (Constant nodes, initializers) nothing reads any more."""
    if not names:
        return
    used: set[str] = set()

    def collect(graph: onnx.GraphProto) -> None:
        used.update(o.name for o in graph.output)
        for node in graph.node:
            used.update(node.input)
            for sub in _subgraphs(node):
                collect(sub)

    collect(proto.graph)
    unused = names - used

    def prune(graph: onnx.GraphProto) -> None:
        inputs = {i.name for i in graph.input}
        # A graph input is part of the model's interface: it stays, and so does an initializer
        # giving it a default (IR >= 4); before IR 4 every initializer is listed as an input.
        dropped = {t.name for t in graph.initializer if t.name in unused and (proto.ir_version < 4 or t.name not in inputs)}
        for field, name_of in ((graph.node, lambda n: n.output[0] if n.op_type == "Constant" and n.output else ""),
                               (graph.initializer, lambda t: t.name if t.name in dropped else ""),
                               (graph.input, lambda i: i.name if i.name in dropped else "")):
            for position in reversed(range(len(field))):
                if name_of(field[position]) in unused:
                    del field[position]
        for node in graph.node:
            for sub in _subgraphs(node):
                prune(sub)

    prune(proto.graph)


class _Names:
    """Every node, tensor and graph name of the model, to hand out unused ones."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        self._collect(proto.graph)

    def _collect(self, graph: onnx.GraphProto) -> None:
        self.used.add(graph.name)
        for infos in (graph.input, graph.output, graph.value_info, graph.initializer):
            self.used.update(i.name for i in infos)
        for node in graph.node:
            self.used.add(node.name)
            self.used.update(node.input)
            self.used.update(node.output)
            for sub in _subgraphs(node):
                self._collect(sub)

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.used:
            name, index = f"{base}_{index}", index + 1
        self.used.add(name)
        return name


# --- building the new nodes -----------------------------------------------------------------


class _Builder:
    """Nodes and initializers for one site's change, in the graph that holds it."""

    def __init__(self, graph: onnx.GraphProto, names: _Names, opset: int, main: bool, old_ir: bool) -> None:
        self.graph = graph
        self.names = names
        self.opset = opset
        self.list_initializers_as_inputs = main and old_ir  # IR < 4: initializers must be graph inputs
        self.released: set[str] = set()

    def build(self, node: onnx.NodeProto, site: OnnxSite, fix: SiteFix, moments: UnitMoments | None,
              options: RewriteOptions) -> list[onnx.NodeProto]:
        """The nodes that replace the site's node."""
        self.site, self.fix = site, fix
        self.label = node.name or node_label(node)
        self.dtype = _np_dtype(site, fix)
        if fix.change == "bn":
            return self._batch_norm(node, moments, options)
        x, y = node.input[0], node.output[0]
        cap = site.clip[1] if site.clip is not None else None
        self.released.update(name for name in node.input[1:] if name)
        out = y if cap is None else self.names.fresh(f"{self.label}/deadrelu_act")
        if fix.change == "leaky":
            act = helper.make_node("LeakyRelu", [x], [out], name=self.label, alpha=float(options.leaky_slope()))
        elif fix.change == "prelu":
            slope = np.full(self._unit_shape(), options.prelu_slope(), dtype=self.dtype)
            act = helper.make_node("PRelu", [x, self._initializer(slope, "prelu_slope")], [out], name=self.label)
        else:
            raise RewriteError(f"site {fix.site}: unknown change '{fix.change}'")
        if cap is None:
            return [act]
        limit = self._initializer(np.array(cap, dtype=self.dtype), "cap_value")
        return [act, helper.make_node("Min", [out, limit], [y], name=self.names.fresh(f"{self.label}/deadrelu_cap"))]

    def _batch_norm(self, node: onnx.NodeProto, moments: UnitMoments | None,
                    options: RewriteOptions) -> list[onnx.NodeProto]:
        if moments is None:
            raise RewriteError(f"site {self.fix.site}: BatchNorm needs the calibration mean/variance of its pre-activation")
        mean = np.asarray(moments.mean, dtype=np.float64).reshape(-1)
        var = np.maximum(np.asarray(moments.var, dtype=np.float64).reshape(-1), 0.0)
        if mean.size != self.fix.units or var.size != self.fix.units:
            raise RewriteError(f"site {self.fix.site}: {mean.size} calibration means for {self.fix.units} units")
        if options.bn_init == "identity":  # (x - mean) / sqrt(var + eps) * sqrt(var + eps) + mean = x
            scale, bias = np.sqrt(var + options.eps), mean
        else:  # revive: each unit centred and scaled to unit variance, so it fires again
            scale, bias = np.ones_like(mean), np.zeros_like(mean)
        params = [self._initializer(value.astype(self.dtype), role)
                  for value, role in ((scale, "bn_scale"), (bias, "bn_bias"), (mean, "bn_mean"), (var, "bn_var"))]
        nodes: list[onnx.NodeProto] = []
        x = self._to_axis1(node.input[0], nodes)
        normed = self._node("BatchNormalization", [x, *params], "bn", nodes, epsilon=float(options.eps))
        replaced = onnx.NodeProto()
        replaced.CopyFrom(node)
        replaced.input[0] = self._from_axis1(normed, nodes)
        return [*nodes, replaced]

    # layout ------------------------------------------------------------------------------

    def _unit_shape(self) -> tuple[int, ...]:
        """(units, 1, ..., 1): broadcasts along the unit axis from the right."""
        rank, axis = self.site.rank, self.fix.unit_axis
        if rank == 0:  # one unit, a scalar: the slope must not add a dimension
            return ()
        if rank is not None:
            return (self.fix.units,) + (1,) * max(rank - 1 - axis, 0)
        anchor = self.site.axis.anchor
        if anchor is not None and anchor < 0:
            return (self.fix.units,) + (1,) * (-anchor - 1)
        raise RewriteError(f"site {self.fix.site}: shape inference could not tell the rank of its pre-activation, "
                           "so the per-unit slope cannot be shaped for its unit axis")

    def _to_axis1(self, x: str, nodes: list[onnx.NodeProto]) -> str:
        rank, axis = self.site.rank, self.fix.unit_axis
        if rank is None:
            if axis == 1:  # the probe resolved axis 1: the rank is at least 2
                return x
            raise RewriteError(f"site {self.fix.site}: shape inference could not tell the rank of its "
                               f"pre-activation, so BatchNorm cannot be placed on unit axis {axis}")
        if rank < 2:
            return self._axes_node("Unsqueeze", x, "unsqueeze", nodes)
        if axis == 1:
            return x
        return self._node("Transpose", [x], "to_axis1", nodes, perm=_movedim(rank, axis, 1))

    def _from_axis1(self, x: str, nodes: list[onnx.NodeProto]) -> str:
        rank, axis = self.site.rank, self.fix.unit_axis
        if rank is None or (rank >= 2 and axis == 1):
            return x
        if rank < 2:
            return self._axes_node("Squeeze", x, "squeeze", nodes)
        return self._node("Transpose", [x], "from_axis1", nodes, perm=_movedim(rank, 1, axis))

    def _axes_node(self, op: str, x: str, role: str, nodes: list[onnx.NodeProto]) -> str:
        """(Un)squeeze between a rank-0/1 pre-activation (one unit) and its (values, 1) view."""
        axes = [1] if self.site.rank == 1 else [0, 1]
        if self.opset >= 13:
            return self._node(op, [x, self._initializer(np.array(axes, dtype=np.int64), f"{role}_axes")], role, nodes)
        return self._node(op, [x], role, nodes, axes=axes)

    # primitives --------------------------------------------------------------------------

    def _node(self, op: str, inputs: list[str], role: str, nodes: list[onnx.NodeProto], **attrs: Any) -> str:
        out = self.names.fresh(f"{self.label}/deadrelu_{role}")
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _initializer(self, value: np.ndarray, role: str) -> str:
        name = self.names.fresh(f"{self.label}/deadrelu_{role}")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        if self.list_initializers_as_inputs:
            self.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), list(np.shape(value))))
        return name


def _np_dtype(site: OnnxSite, fix: SiteFix) -> np.dtype:
    """The pre-activation's dtype (float32 when shape inference could not tell)."""
    elem = site.elem_type or TensorProto.FLOAT
    if elem not in FLOAT_TYPES:
        raise RewriteError(f"site {fix.site}: its pre-activation is {TensorProto.DataType.Name(elem)}; "
                           "only float16/float32/float64 sites can be rewritten")
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def _movedim(rank: int, source: int, destination: int) -> list[int]:
    """The Transpose perm of ``torch.movedim(x, source, destination)``."""
    order = [d for d in range(rank) if d != source]
    order.insert(destination, source)
    return order


# --- writing ---------------------------------------------------------------------------------


def save_onnx(model: OnnxModel, output: Path) -> None:
    """Write the model to ``output``: weights embedded in the input stay embedded, external
    ones go to ``<output name>.data`` beside it. Atomic per file; inputs are only read."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    own = model.path.name  # where `load_onnx` points the weights embedded in the model file
    external = [t for t in _tensors(proto) if t.data_location == TensorProto.EXTERNAL]
    inputs = {(model.base_dir / f).resolve() for f in model.external_files} | {model.path.resolve()}
    if output.resolve() in inputs:
        raise UsageError(f"-o {output}: that is one of the input model's files; choose another path")
    embedded = [t for t in external if _info(t).get("location") == own]
    moved = [t for t in external if _info(t).get("location") != own]
    for tensor in embedded:
        tensor.raw_data = _read(model.base_dir, tensor)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    if moved:
        target = output.with_name(output.name + ".data")
        if target.resolve() in inputs:
            raise UsageError(f"-o {output}: its external data would go to {target.name}, which is a file of the input "
                             "model; choose another name")
        _write_data(model.base_dir, moved, target)
    write_atomic(output, proto.SerializeToString())


def _tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""

    def visit(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            for sub in _subgraphs(node):
                yield from visit(sub)

    yield from visit(proto.graph)


def _info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _span(tensor: TensorProto) -> tuple[str, int, int | None]:
    info = _info(tensor)
    length = info.get("length")
    return info.get("location", ""), int(info.get("offset", 0) or 0), int(length) if length else None


def _read(base: Path, tensor: TensorProto) -> bytes:
    location, offset, length = _span(tensor)
    with (base / location).open("rb") as handle:
        handle.seek(offset)
        return handle.read() if length is None else handle.read(length)


def _write_data(base: Path, tensors: list[TensorProto], target: Path) -> None:
    """Copy each tensor's bytes into one new data file and point the tensor at them."""
    with atomic_file(target) as out:
        for tensor in tensors:
            location, offset, length = _span(tensor)
            start = out.tell()
            with (base / location).open("rb") as source:
                source.seek(offset)
                left = length
                while left is None or left > 0:
                    chunk = source.read(COPY_CHUNK if left is None else min(COPY_CHUNK, left))
                    if not chunk:
                        break
                    out.write(chunk)
                    left = None if left is None else left - len(chunk)
            del tensor.external_data[:]
            for key, value in (("location", target.name), ("offset", str(start)), ("length", str(out.tell() - start))):
                tensor.external_data.add(key=key, value=value)
