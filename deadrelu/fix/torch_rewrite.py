"""Rewriting PyTorch models: every input format becomes a functional `torch.export`
program, whose FX graph gets the planned swaps or BatchNorm insertions, and is saved.

Site k of the scan is the k-th ReLU-family call in the program's graph (exported graphs
are straight-line, so graph order is execution order); the mapping is checked op by op.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deadrelu import sites
from deadrelu.data import ModelInput
from deadrelu.errors import DeadReluError, ModelLoadError
from deadrelu.fix.plan import SiteFix
from deadrelu.load import LoadedModel
from deadrelu.load.detect import ModelFormat
from deadrelu.load.torch_formats import keyword_inputs, quiet_torch_logs

aten = torch.ops.aten


class RewriteError(DeadReluError):
    """A model cannot be rewritten as planned."""


@dataclass(frozen=True)
class RewriteOptions:
    slope: float | None = None  # LeakyReLU negative slope (0.01) / PReLU initial slope (0.25)
    bn_init: str = "identity"  # identity | revive
    eps: float = 1e-5

    def leaky_slope(self) -> float:
        return 0.01 if self.slope is None else self.slope

    def prelu_slope(self) -> float:
        return 0.25 if self.slope is None else self.slope


@dataclass(frozen=True)
class UnitMoments:
    """Per-unit calibration mean and (population) variance of one site's pre-activation."""

    mean: np.ndarray
    var: np.ndarray


@dataclass(frozen=True)
class NewTensor:
    """A parameter or buffer the rewrite added, for the user's modified class."""

    site: str
    role: str  # prelu.weight | bn.weight | bn.bias | bn.running_mean | bn.running_var
    value: torch.Tensor


# --- any PyTorch model -> functional exported program ---------------------------------------

def to_program(loaded: LoadedModel, example: ModelInput, site_contexts: Sequence[tuple[str, str]] = ()) -> Any:
    """A functional (no inplace ops) exported program of the loaded model.

    Args:
        site_contexts: (module_path, module_type) per candidate op in graph order, to give
            nodes converted from TorchScript their module names back.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if loaded.format is ModelFormat.EXPORTED_PROGRAM and loaded.exported_program is not None:
                # a program saved in training mode: its module, flags turned off by the loader, exported again
                program = (_export(loaded.module, example, dynamic=True) if loaded.training_flags_off
                           else loaded.exported_program)
            elif loaded.format is ModelFormat.TORCHSCRIPT:
                program = _from_torchscript(loaded, example, site_contexts)
            else:
                program = _export(loaded.module.eval(), example, dynamic=True)
        except RewriteError as exc:
            raise exc if str(exc).startswith(str(loaded.path)) else RewriteError(f"{loaded.path}: {exc}") from exc
        _refuse_branch_sites(program, loaded.path)
        return program.run_decompositions({})


def _refuse_branch_sites(program: Any, path: Path) -> None:
    """Sites are matched to graph nodes by position, and a ``torch.cond`` arm that did not
    run in the scan has no site; so ReLUs inside an arm are not rewritten."""
    if sites.fx_candidate_arms(program.graph_module) is not None:
        raise RewriteError(f"{path}: a ReLU sits inside a data-dependent branch (an if/else on tensor values, "
                           "a torch.cond in the exported program), which deadrelu cannot rewrite in a PyTorch "
                           "model; change the activation in the model's code, or export it to ONNX, where "
                           "ReLUs inside If branches are rewritten")


def _from_torchscript(loaded: LoadedModel, example: ModelInput, site_contexts: Sequence[tuple[str, str]]) -> Any:
    from torch._export.converter import TS2EPConverter

    try:
        with quiet_torch_logs():  # the converter exports with Dim.AUTO: notices of dims it specialised
            program = TS2EPConverter(loaded.module, example.args).convert()
    except Exception as exc:
        raise RewriteError(f"{loaded.path}: cannot convert this TorchScript archive to a torch.export program "
                           f"({_line(exc)}); save the eager model's state_dict and use --arch instead") from exc
    graph_module = program.module()
    _name_nodes(graph_module, site_contexts)
    _restore_input_names(graph_module, loaded.module)
    try:
        return _export(graph_module, example, dynamic=True)
    except RewriteError:
        return program


def _name_nodes(graph_module: torch.fx.GraphModule, contexts: Sequence[tuple[str, str]]) -> None:
    """Give converted candidate nodes the module path they had in the TorchScript archive."""
    nodes = [n for n in graph_module.graph.nodes if _candidate(n)]
    if len(nodes) != len(contexts):
        return
    for node, (path, kind) in zip(nodes, contexts):
        node.meta["nn_module_stack"] = {"deadrelu": (path, kind)} if path else {}


def _restore_input_names(graph_module: torch.fx.GraphModule, script_module: Any) -> None:
    """Name the converted graph's inputs after the TorchScript forward's parameters.

    The converter names them after TorchScript's value names (`x.1` becomes `x_1`), so the
    written program would take `x_1, mask_1` and refuse the data its original took by name.
    """
    try:
        names = [argument.name for argument in script_module.forward.schema.arguments[1:]]
    except (AttributeError, RuntimeError):
        return
    inputs = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    taken = {node.name for node in graph_module.graph.nodes} - {node.name for node in inputs}
    if len(inputs) != len(names) or len(set(names)) != len(names) or taken & set(names):
        return
    for node, name in zip(inputs, names):
        node.target = node.name = name
    codegen = graph_module.graph._codegen
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):
        codegen.pytree_info = codegen.pytree_info._replace(orig_args=list(names))
    graph_module.recompile()


def _export(module: Any, example: ModelInput, dynamic: bool) -> Any:
    _drop_custom_meta(module)
    example = _as_called(module, example)
    shapes = tuple({0: torch.export.Dim.AUTO} for _ in example.args) if dynamic else None
    kw_shapes = {k: {0: torch.export.Dim.AUTO} for k in example.kwargs} if dynamic else None
    try:
        with quiet_torch_logs():  # its notices (a dim specialised to the example's size) are not the user's concern
            if shapes is not None and example.kwargs:
                return torch.export.export(module, example.args, example.kwargs, dynamic_shapes={**dict(
                    zip(_arg_names(module, len(example.args)), shapes)), **(kw_shapes or {})})
            return torch.export.export(module, example.args, example.kwargs or None, dynamic_shapes=shapes)
    except Exception as exc:
        if dynamic:
            return _export(module, example, dynamic=False)
        hint = ("; a Python if/else or loop on tensor values cannot be exported (torch.cond can hold a branch)"
                if "data-dependent" in str(exc) else "")
        raise RewriteError(f"cannot export the model with torch.export: {_line(exc)}{hint}") from exc


def _drop_custom_meta(module: Any) -> None:
    """Re-exporting a graph module that came from an exported program (one converted from
    TorchScript, or with a site rewritten) trips torch.export over the ``custom`` metadata
    torch left on its nodes (torch 2.13: "Mismatch in custom metadata for key
    _torchdynamo_disable_method"); nothing of deadrelu's lives there, so it goes."""
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            node.meta.pop("custom", None)


def _as_called(module: Any, example: ModelInput) -> ModelInput:
    """The example as the module takes it: keyword inputs by name for a program exported
    with them, so the written program takes them by name as the original did."""
    keywords = keyword_inputs(module)
    if keywords is None or example.kwargs or len(example.args) != keywords[0] + len(keywords[1]):
        return example
    leading, names = keywords
    return ModelInput(example.args[:leading], dict(zip(names, example.args[leading:])))


def _arg_names(module: Any, count: int) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)[:count]


# --- rewriting ------------------------------------------------------------------------------

def _candidate(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and sites.packet_name(node.target) in sites.CANDIDATE_OPS


def site_nodes(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
    """(node, op) for every ReLU site of a functional graph, in graph order."""
    found = []
    for node in graph_module.graph.nodes:
        if not _candidate(node):
            continue
        functional = sites.CANDIDATE_OPS[sites.packet_name(node.target)]
        args = tuple(node.args)
        if functional == "hardtanh":
            args = (args[0], node.kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                    node.kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
        op = sites.site_op(functional, args)
        if op is not None:
            found.append((node, op))
    return found


def rewrite_program(program: Any, fixes: Sequence[SiteFix], moments: dict[int, UnitMoments],
                    options: RewriteOptions, example: ModelInput, scanned_sites: int) -> tuple[Any, list[NewTensor]]:
    """The program with every planned change applied, re-exported; and the tensors added."""
    graph_module, added = rewrite_graph(program, fixes, moments, options, scanned_sites)
    dynamic = _has_dynamic_inputs(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = _export(graph_module, example, dynamic=dynamic).run_decompositions({})
    return rewritten, added


def rewrite_graph(program: Any, fixes: Sequence[SiteFix], moments: dict[int, UnitMoments],
                  options: RewriteOptions, scanned_sites: int) -> tuple[torch.fx.GraphModule, list[NewTensor]]:
    """A runnable graph module of the program with the changes applied (not re-exported).

    Sites are matched by position, so the graph must hold exactly the ``scanned_sites``
    the scan saw: torch.export drops a ReLU whose output nothing uses (an unused auxiliary
    head), which would shift every later site onto its neighbour."""
    graph_module = program.module()
    nodes = site_nodes(graph_module)
    if len(nodes) != scanned_sites:
        raise RewriteError(f"the exported program has {len(nodes)} ReLU sites where the scan saw {scanned_sites}: "
                           "torch.export drops a ReLU whose output is unused (e.g. an auxiliary head the forward "
                           "computes but does not return), so the sites cannot be matched; remove it from the "
                           "forward, or return its output")
    added: list[NewTensor] = []
    for fix in fixes:
        if fix.index >= len(nodes) or nodes[fix.index][1] != fix.op:
            got = nodes[fix.index][1] if fix.index < len(nodes) else "nothing"
            raise RewriteError(f"site {fix.site} (#{fix.index}, {fix.op}) does not match the graph ({got} there)")
        node = nodes[fix.index][0]
        rewrite = {"leaky": _to_leaky, "prelu": _to_prelu, "bn": _insert_bn}[fix.change]
        added += rewrite(graph_module, node, fix, moments.get(fix.index), options)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, added


def changes_outputs(fix: SiteFix, options: RewriteOptions) -> bool:
    """Whether a change alters what flows downstream (so later sites' statistics move)."""
    if fix.change == "bn":
        return options.bn_init != "identity"
    slope = options.leaky_slope() if fix.change == "leaky" else options.prelu_slope()
    return slope != 0.0


def _has_dynamic_inputs(program: Any) -> bool:
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


def _relu6_cap(fix: SiteFix) -> float | None:
    return 6.0 if fix.op == "relu6" else None


def _to_leaky(gm: torch.fx.GraphModule, node: torch.fx.Node, fix: SiteFix, moments: UnitMoments | None,
              options: RewriteOptions) -> list[NewTensor]:
    x = node.args[0]
    with gm.graph.inserting_before(node):
        out = _call(gm, node, aten.leaky_relu.default, (x, options.leaky_slope()))
        out = _cap(gm, node, out, _relu6_cap(fix))
    _replace(node, out)
    return []


def _to_prelu(gm: torch.fx.GraphModule, node: torch.fx.Node, fix: SiteFix, moments: UnitMoments | None,
              options: RewriteOptions) -> list[NewTensor]:
    weight = torch.full((fix.units,), options.prelu_slope(), dtype=_dtype(node))
    name = _attr_name(gm, fix, "prelu_weight")
    gm.register_parameter(name, torch.nn.Parameter(weight))
    x = node.args[0]
    with gm.graph.inserting_before(node):
        w = gm.graph.get_attr(name)
        moved = _to_axis1(gm, node, x, fix.unit_axis)
        out = _call(gm, node, aten.prelu.default, (moved, w))
        out = _from_axis1(gm, node, out, fix.unit_axis)
        out = _cap(gm, node, out, _relu6_cap(fix))
    _replace(node, out)
    return [NewTensor(fix.site, "prelu.weight", weight)]


def _insert_bn(gm: torch.fx.GraphModule, node: torch.fx.Node, fix: SiteFix, moments: UnitMoments | None,
               options: RewriteOptions) -> list[NewTensor]:
    if moments is None:
        raise RewriteError(f"site {fix.site}: BatchNorm needs the calibration mean/variance of its pre-activation")
    dtype = _dtype(node)
    mean = torch.as_tensor(moments.mean, dtype=dtype)
    var = torch.as_tensor(np.maximum(moments.var, 0.0), dtype=dtype)
    if options.bn_init == "identity":  # eval output = (x - mean) / sqrt(var + eps) * sqrt(var + eps) + mean = x
        weight, bias = torch.sqrt(var + options.eps), mean.clone()
    else:  # revive: each unit centred and scaled to unit variance, so it fires again
        weight, bias = torch.ones_like(mean), torch.zeros_like(mean)
    tensors = {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}
    names = {}
    for role, value in tensors.items():
        names[role] = _attr_name(gm, fix, f"bn_{role}")
        if role in ("weight", "bias"):
            gm.register_parameter(names[role], torch.nn.Parameter(value))
        else:
            gm.register_buffer(names[role], value)
    x = node.args[0]
    with gm.graph.inserting_before(node):
        attrs = {role: gm.graph.get_attr(name) for role, name in names.items()}
        moved = _to_axis1(gm, node, x, fix.unit_axis)
        normed = _call(gm, node, aten.batch_norm.default, (moved, attrs["weight"], attrs["bias"], attrs["running_mean"],
                                                           attrs["running_var"], False, 0.1, options.eps, False))
        normed = _from_axis1(gm, node, normed, fix.unit_axis)
    node.args = (normed, *node.args[1:])
    return [NewTensor(fix.site, f"bn.{role}", value) for role, value in tensors.items()]


def _call(gm: torch.fx.GraphModule, template: torch.fx.Node, target: Any, args: tuple) -> torch.fx.Node:
    new = gm.graph.call_function(target, args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in template.meta:
            new.meta[key] = template.meta[key]
    return new


def _cap(gm: torch.fx.GraphModule, template: torch.fx.Node, value: torch.fx.Node, cap: float | None) -> torch.fx.Node:
    return value if cap is None else _call(gm, template, aten.clamp_max.default, (value, cap))


def _to_axis1(gm: torch.fx.GraphModule, template: torch.fx.Node, value: Any, axis: int) -> Any:
    """The pre-activation with its units on dim 1; a rank-0/1 one (one unit) as its (values, 1) view."""
    if _rank(template.args[0]) in (0, 1):
        return _call(gm, template, aten.reshape.default, (value, [-1, 1]))
    return value if axis == 1 else _call(gm, template, aten.movedim.int, (value, axis, 1))


def _from_axis1(gm: torch.fx.GraphModule, template: torch.fx.Node, value: Any, axis: int) -> Any:
    rank = _rank(template.args[0])
    if rank in (0, 1):
        return _call(gm, template, aten.reshape.default, (value, [-1] if rank else []))
    return value if axis == 1 else _call(gm, template, aten.movedim.int, (value, 1, axis))


def _rank(value: Any) -> int | None:
    """The rank of a graph value, from its recorded example (None when unknown)."""
    example = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return example.ndim if isinstance(example, torch.Tensor) else None


def _replace(node: torch.fx.Node, new: torch.fx.Node) -> None:
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _dtype(node: torch.fx.Node) -> torch.dtype:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32


def _attr_name(gm: torch.fx.GraphModule, fix: SiteFix, role: str) -> str:
    base = "deadrelu_" + "".join(c if c.isalnum() else "_" for c in fix.site) + f"_{role}"
    name, index = base, 1
    while hasattr(gm, name):
        name, index = f"{base}_{index}", index + 1
    return name


def save_program(program: Any, path: Path) -> None:
    """torch.export.save to a temporary file beside `path`, then an atomic rename."""
    from deadrelu.outputs import atomic_file

    try:
        with atomic_file(path) as handle, quiet_torch_logs():
            torch.export.save(program, handle)
    except DeadReluError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot write the exported program ({_line(exc)})") from exc


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
