"""ReLU call sites: which ops are ReLUs, what a site is called, and its unit axis.

A *site* is one application of a ReLU-family op during a forward pass. A module called
three times is three sites. Names follow torchvision's feature-extraction node names:

* applied by an activation module (``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``,
  ``nn.PReLU``, ``nn.Hardtanh``) registered at path ``P``: the base name is ``P``;
* a functional call (``F.relu``, ``torch.relu``, ``Tensor.relu_``, ``F.relu6``,
  ``F.hardtanh``, ...) inside the forward of the module at path ``P``: ``P.<op>``
  (just ``<op>`` at the root), with ``<op>`` the functional's name;
* a base name that repeats within one forward pass gets ``_1``, ``_2``, ... from its
  second call on, in call order;
* a call from other code than the calls before it (the other arm of a data-dependent
  ``if``: other Python lines, or in TorchScript a layer fed by other parameters) is
  another site, and takes the next suffix free.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from deadrelu.errors import UsageError

aten = torch.ops.aten

# Activation module classes whose calls are named after the module itself.
ACTIVATION_MODULE_TYPES = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "Hardtanh"})

# aten overload packet name -> the functional name used in site names.
CANDIDATE_OPS: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "relu6": "relu6",
    "relu6_": "relu6",
    "hardtanh": "hardtanh",
    "hardtanh_": "hardtanh",
    "leaky_relu": "leaky_relu",
    "leaky_relu_": "leaky_relu",
    "prelu": "prelu",
    "_prelu_kernel": "prelu",
}

LEAKY_OPS = frozenset({"leaky_relu", "prelu"})


def packet_name(func: Any) -> str:
    """'relu_' for aten.relu_.default, torch.ops.aten.relu_ or the string 'aten::relu_'."""
    if isinstance(func, str):
        return func.split("::")[-1].split(".")[0]
    packet = getattr(func, "overloadpacket", func)
    return getattr(packet, "__name__", str(packet)).split(".")[-1]


def site_op(functional: str, args: tuple[Any, ...]) -> str | None:
    """The report's op for a candidate call, or None when the call is not a ReLU.

    hardtanh is a ReLU only as hardtanh(x, 0, 6), which is relu6.
    """
    if functional == "hardtanh":
        low = args[1] if len(args) > 1 else -1.0
        high = args[2] if len(args) > 2 else 1.0
        return "relu6" if (float(low), float(high)) == (0.0, 6.0) else None
    return functional


@dataclass(frozen=True)
class CallContext:
    """Where a candidate op ran: the innermost module's path and class name."""

    module_path: str
    module_type: str


def base_name(ctx: CallContext, functional: str) -> str:
    """Name of a site before its repeat suffix."""
    if ctx.module_type in ACTIVATION_MODULE_TYPES and ctx.module_path:
        return ctx.module_path
    return f"{ctx.module_path}.{functional}" if ctx.module_path else functional


class SiteNamer:
    """Hands out repeat-suffixed names within one forward pass; `reset()` between passes.

    A base name that repeats within a pass gets ``_1``, ``_2``, ... in call order. A call
    may also say `where` it comes from (the Python lines that made it): the k-th call from
    one place keeps the name it first took, and a call from a place no earlier pass reached
    (the other arm of a data-dependent ``if``) takes the next name no other place holds,
    rather than the name of the call it stands in for.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}  # this pass: base name -> calls so far
        self._repeats: dict[tuple[str, Any], int] = {}  # this pass: (base, where) -> calls so far
        self._names: dict[tuple[str, Any, int], str] = {}  # every pass: (base, where, k) -> name
        self._taken: set[str] = set()

    def reset(self) -> None:
        self._seen.clear()
        self._repeats.clear()

    def name(self, base: str, where: Any = None) -> str:
        base = printable(base)
        index = self._seen.get(base, 0)
        self._seen[base] = index + 1
        nth = self._repeats.get((base, where), 0)
        self._repeats[(base, where)] = nth + 1
        known = self._names.get((base, where, nth))
        if known is not None:
            return known
        name = base if index == 0 else f"{base}_{index}"
        while name in self._taken:
            index += 1
            name = f"{base}_{index}"
        self._names[(base, where, nth)] = name
        self._taken.add(name)
        return name


def printable(text: str) -> str:
    """``text`` with control characters (newline, ESC, ...) written as Python escapes
    (``\\n``, ``\\x1b``): a site name comes from the model file (an ONNX node name, a
    module name) and must stay one line, with no terminal escape or CI workflow command
    (a line ``::error ...``) in any report."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# --- static call contexts from TorchScript and FX graphs -------------------------------

_HIERARCHY_PART = re.compile(r"^(?P<name>.*?)\((?P<type>[^()]*)\)$")


def context_from_torchscript(hierarchy: str) -> CallContext:
    """Parse Node.getModuleHierarchy(), e.g. 'layer1(Sequential).0(B).relu(ReLU)'."""
    parts = hierarchy_parts(hierarchy)
    return CallContext(".".join(name for name, _ in parts), parts[-1][1] if parts else "")


def hierarchy_parts(hierarchy: str) -> list[tuple[str, str]]:
    """(name, type) of each module in a Node.getModuleHierarchy() string, outermost first."""
    parts: list[tuple[str, str]] = []
    for part in hierarchy.split(".") if hierarchy else []:
        match = _HIERARCHY_PART.match(part)
        name, kind = (match.group("name"), match.group("type")) if match else (part, "")
        if name != "UNKNOWN_INSTANCE":
            parts.append((name, kind))
    return parts


def module_paths_for(root: Any, parts: list[tuple[str, str]]) -> list[str]:
    """Every module path a hierarchy may stand for, in registration order.

    A trace records a call by the called module's own name relative to the innermost
    module whose forward it recorded, so calling layers held in an ``nn.ModuleList`` from
    the parent's forward (``for lin, act in zip(self.linears, self.acts)``) records the
    ReLU at ``acts.1`` as ``1(ReLU)`` alone, like ``blocks.0.1`` in ``block[1](x)``. Each
    recorded module is a direct child of the previous one when there is one of that name;
    otherwise any descendant of that name and type (its ``original_name``), all of them
    kept. A hierarchy that the module tree does not hold keeps its recorded names.
    """
    found: list[tuple[list[str], Any]] = [([], root)]
    for index, (name, kind) in enumerate(parts):
        step = [([*path, *sub], child) for path, module in found for sub, child in _modules_called(module, name, kind)]
        if not step:
            recorded = [name for name, _ in parts[index:]]
            return [".".join([*found[0][0], *recorded])]
        found = step
    return [".".join(path) for path, _ in found]


def _modules_called(module: Any, name: str, kind: str) -> list[tuple[list[str], Any]]:
    """(path below `module`, module) of what a recorded `name(kind)` inside `module` may
    be: its direct child `name`; else its descendants called `name` of type `kind`
    (whatever their type when none has that one, a type spelt otherwise)."""
    children = dict(module.named_children())
    if name in children:
        return [([name], children[name])]
    named = [(path.split("."), child) for path, child in module.named_modules() if path.rsplit(".", 1)[-1] == name]
    typed = [(path, child) for path, child in named if _type_name(child) == kind]
    return typed or named


def _type_name(module: Any) -> str:
    return str(getattr(module, "original_name", "") or type(module).__name__)


def torchscript_candidate_contexts(module: torch.jit.ScriptModule) -> list[tuple[str, CallContext]]:
    """(functional, context) for every candidate op of a TorchScript module, graph order.

    A hierarchy that stands for several modules (``1(ReLU)`` for ``acts.1``,
    ``blocks.0.1`` and ``blocks.1.1``) gives them to its calls in registration order when
    it is called as many times as there are; otherwise (a module called more than once,
    or some never) every call takes the shallowest of them, the first registered.
    """
    graph = module.inlined_graph
    calls: list[tuple[str, str, str]] = []  # (functional, hierarchy, module type)

    def walk(block: Any) -> None:
        for node in block.nodes():
            functional = CANDIDATE_OPS.get(packet_name(node.kind()))
            if node.kind().startswith("aten::") and functional:
                hierarchy = node.getModuleHierarchy()
                calls.append((functional, hierarchy, context_from_torchscript(hierarchy).module_type))
            for sub in node.blocks():
                walk(sub)

    walk(graph)
    paths = {hierarchy: module_paths_for(module, hierarchy_parts(hierarchy)) for _, hierarchy, _ in calls}
    times = {hierarchy: sum(1 for _, h, _ in calls if h == hierarchy) for hierarchy in paths}
    seen: dict[str, int] = {}
    found: list[tuple[str, CallContext]] = []
    for functional, hierarchy, module_type in calls:
        candidates = paths[hierarchy]
        nth = seen.get(hierarchy, 0)
        seen[hierarchy] = nth + 1
        path = candidates[nth] if len(candidates) == times[hierarchy] else _shallowest(candidates)
        found.append((functional, CallContext(path, module_type)))
    return found


def _shallowest(paths: list[str]) -> str:
    return min(paths, key=lambda path: path.count("."))  # min keeps the first of equals


def fx_candidate_contexts(graph_module: torch.fx.GraphModule) -> list[tuple[str, CallContext]]:
    """(functional, context) for every candidate op of an FX graph (exported program), in
    graph order; the ops inside a ``torch.cond``'s arms come where the cond is, its true
    arm's first (`fx_candidate_arms` says which arm each is in)."""
    return [(functional, _fx_context(node, outer)) for node, functional, _, outer in _fx_candidates(graph_module)]


def fx_candidate_arms(graph_module: torch.fx.GraphModule) -> list[str] | None:
    """The ``torch.cond`` arm of each candidate op of `fx_candidate_contexts` ("" outside
    any; an arm is named by its path of subgraph attributes, as `fx_cond_arms` names it);
    None when the graph has no cond (graph order alone is then exact)."""
    arms = [arm for _, _, arm, _ in _fx_candidates(graph_module)]
    return arms if any(arms) else None


def fx_cond_arms(graph_module: torch.fx.GraphModule, prefix: str = "") -> dict[int, str]:
    """id(arm subgraph module) -> its arm name, for every ``torch.cond`` arm, nested ones too."""
    found: dict[int, str] = {}
    for node in graph_module.graph.nodes:
        for arm, module in _cond_arms(graph_module, node, prefix):
            found[id(module)] = arm
            found.update(fx_cond_arms(module, arm))
    return found


def is_cond(target: Any) -> bool:
    return target is getattr(torch.ops.higher_order, "cond", None)


def _cond_arms(graph_module: torch.fx.GraphModule, node: torch.fx.Node, prefix: str) -> list[tuple[str, Any]]:
    if node.op != "call_function" or not is_cond(node.target):
        return []
    arms = []
    for branch in node.args[1:3]:
        if isinstance(branch, torch.fx.Node) and branch.op == "get_attr":
            arms.append((f"{prefix}/{branch.target}", getattr(graph_module, str(branch.target))))
    return arms


def _fx_candidates(graph_module: torch.fx.GraphModule, arm: str = "",
                   outer: CallContext | None = None) -> list[tuple[torch.fx.Node, str, str, CallContext | None]]:
    """(node, functional, arm, context of the cond it sits in) per candidate op, arms inlined."""
    found: list[tuple[torch.fx.Node, str, str, CallContext | None]] = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        for sub_arm, module in _cond_arms(graph_module, node, arm):
            found += _fx_candidates(module, sub_arm, _fx_context(node, outer))
        functional = CANDIDATE_OPS.get(packet_name(node.target))
        if functional:
            found.append((node, functional, arm, outer))
    return found


def _fx_context(node: torch.fx.Node, outer: CallContext | None) -> CallContext:
    """The module an FX node ran in; inside a cond's arm (whose nodes carry no module stack),
    the module that called the cond."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if stack:
        path, kind = stack[-1]
        return CallContext(_clean_fx_path(path), str(getattr(kind, "__name__", kind)).split(".")[-1])
    return outer or CallContext("", "")


def _clean_fx_path(path: str) -> str:
    """nn_module_stack paths look like 'L__self__.layer1.0' or 'layer1.0'."""
    path = re.sub(r"^L__self__\.?", "", path)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path


# --- unit axis ----------------------------------------------------------------------------

CONV_PRODUCERS = frozenset(
    {
        "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "cudnn_convolution", "mkldnn_convolution",
        "_convolution_mode", "conv_tbc",
    }
)
LINEAR_PRODUCERS = frozenset(
    {"linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "embedding", "_unsafe_view_mm", "einsum", "bilinear",
     "tensordot", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only",
     # attention: the features of its values (`nn.MultiheadAttention` in eval: of out_proj)
     "_native_multi_head_attention", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
     "_scaled_dot_product_cudnn_attention"}
)
# Recurrent layers: their output's last dim holds the hidden units, batch-first or not.
RECURRENT_PRODUCERS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
# Ops whose output keeps the layout of their first tensor input.
LAYOUT_PRESERVING = frozenset(
    {
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "batch_norm",
        "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
        "cudnn_batch_norm", "miopen_batch_norm", "instance_norm", "group_norm", "native_group_norm",
        "layer_norm", "native_layer_norm", "clone", "contiguous", "dropout", "alias", "detach",
        "_to_copy", "to", "neg", "relu", "relu_", "hardtanh", "hardtanh_", "relu6", "leaky_relu",
        "leaky_relu_", "prelu", "_prelu_kernel", "clamp", "clamp_min", "addcmul", "where",
        # elementwise, as ONNX's ELEMENTWISE_OPS (`deadrelu.onnx_sites.graph`)
        "masked_fill", "masked_fill_", "pow", "abs", "sqrt", "rsqrt", "exp", "log", "reciprocal", "sigmoid",
        "hardsigmoid", "hardswish", "tanh", "softplus", "gelu", "silu", "mish", "elu", "selu", "celu", "erf",
        "maximum", "minimum", "clamp_max",
        # rank-preserving, as ONNX's RANK_PRESERVING_OPS: the unit axis stays where it was
        # (a slice or pad along it keeps it the unit axis, with fewer or more units)
        "slice", "narrow", "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
        "replication_pad1d", "replication_pad2d", "replication_pad3d", "_pad_circular", "repeat", "tile",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
        "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
        "upsample_nearest3d", "upsample_bilinear2d", "upsample_linear1d", "upsample_bicubic2d",
        "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
        "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "cat", "concat", "index_select", "flip", "roll",
    }
)
# Ops that split a tensor into several of its rank: every piece keeps the unit axis.
SPLITS = frozenset({"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk", "tensor_split"})
# Ops that remove or insert dims (`removed_dims`, `inserted_dims`): the units follow, or
# are lost when their own dim goes.
DIM_REMOVING = frozenset({"squeeze", "squeeze_", "select", "unbind"})
DIM_INSERTING = frozenset({"unsqueeze", "unsqueeze_", "stack"})
# Normalisation ops: a ReLU fed by one (directly or through elementwise ops such as a
# residual add) has "normalisation upstream", which the fix planner uses.
NORM_OPS = frozenset(
    {
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
        "cudnn_batch_norm", "miopen_batch_norm", "instance_norm", "group_norm", "native_group_norm",
        "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
    }
)
ELEMENTWISE = frozenset(
    {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "clone", "contiguous", "dropout", "alias",
     "detach", "_to_copy", "to", "neg"}
)
# Reshapes keep the last dim as features when the input came from a linear op.
RESHAPES = frozenset({"view", "_unsafe_view", "reshape", "flatten", "unflatten", "expand"})
# Ops that reorder dims; the units follow (see `permutation`).
PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "t", "numpy_T", "mT", "movedim", "moveaxis"})
# Reductions over some dims (`reduced_dims`): the units follow when their dim is not reduced.
REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "nansum", "nanmean"})
# Ops whose output's dims map to the input's in their own way (`UnitOrigin.after_indexing`,
# `UnitOrigin.after_unfold`): advanced indexing by one vector (``h[:, idx]``), sliding windows.
REINDEXING = frozenset({"index", "unfold"})
# Every op whose output's unit axis follows its input's (see `UnitOrigin`).
AXIS_FOLLOWING = (LAYOUT_PRESERVING | SPLITS | DIM_REMOVING | DIM_INSERTING | REDUCTIONS | RESHAPES | PERMUTES
                  | REINDEXING)


@dataclass(frozen=True)
class AxisChoice:
    """The unit axis of a site and why it was chosen."""

    axis: int  # non-negative
    source: str  # "conv", "linear", "recurrent", "default", "scalar", or "user" (--unit-axis)


@dataclass(frozen=True)
class UnitOrigin:
    """Where a tensor's units are, from the op that made them: the producer's kind and the
    unit axis counted from the end (broadcasting aligns dims from the right, so a bias add
    or a residual keeps it)."""

    kind: str  # "conv", "linear" or "recurrent"
    axis_from_end: int  # negative: -1 is the last dim
    permuted: bool = False  # a permute/transpose moved the units (not a dropped batch dim)

    @staticmethod
    def of(kind: str, ndim: int, weight_ndim: int | None = None) -> UnitOrigin:
        """The units of a producer's output: dim 1 of a convolution, the last dim of a linear
        op. A convolution whose output has one dim fewer than its weight ran on an
        unbatched sample (``conv2d`` of a ``(C, H, W)`` image): its units are dim 0."""
        if kind == "conv" and weight_ndim == ndim + 1:
            return UnitOrigin(kind, -ndim)
        return UnitOrigin(kind, 1 - ndim if kind == "conv" and ndim >= 2 else -1)

    def after_permute(self, ndim: int, order: list[int]) -> UnitOrigin | None:
        """After a permute whose output dim i is input dim ``order[i]``."""
        axis = self.axis_from_end + ndim
        if sorted(order) != list(range(ndim)) or not 0 <= axis < ndim:
            return None
        return UnitOrigin(self.kind, order.index(axis) - ndim, permuted=True)


    def reshaped(self, before: tuple[int, ...], after: tuple[int, ...]) -> UnitOrigin | None:
        """After a reshape, when the dims up to the unit axis (``flatten(2)`` of a
        convolution's output) or from it on (a linear op's ``(N, T, F)`` flattened to
        ``(N*T, F)``) are unchanged. Last-dim features split into heads (``view(N, T, h, d)``,
        ``unflatten(-1, (h, d))``) keep the last dim, as ONNX does: a unit there is feature j
        of every head. None when the unit axis is merged, or split otherwise."""
        axis = self.axis_from_end + len(before)
        if not 0 <= axis < len(before):
            return None
        if before[:axis + 1] == after[:axis + 1]:
            return replace(self, axis_from_end=axis - len(after))
        tail = len(before) - axis
        if len(after) >= tail and before[axis:] == after[len(after) - tail:]:
            return self
        if axis == len(before) - 1 and len(after) > len(before) and before[:axis] == after[:axis] \
                and math.prod(after[axis:]) == before[axis]:
            return self
        return None


    def after_indexing(self, ndim: int, indices: Any, ndim_out: int) -> UnitOrigin | None:
        """After ``x[..., idx, ...]`` with one 1-D index tensor and full slices elsewhere
        (``aten.index``): the rank is kept, and so are the units (a subset of them when
        ``idx`` indexes their own dim); None for any other advanced indexing."""
        given = [i for i, index in enumerate(indices or ()) if index is not None]
        if len(given) != 1 or ndim_out != ndim or getattr(indices[given[0]], "ndim", None) != 1:
            return None
        return self if -ndim <= self.axis_from_end < 0 else None

    def after_unfold(self, ndim: int, dim: Any) -> UnitOrigin | None:
        """After ``x.unfold(dim, size, step)``: windows along ``dim``, a window dim appended.
        The units keep their place (counted from the front); lost when they are ``dim``."""
        axis = self.axis_from_end + ndim
        try:
            unfolded = int(dim) % ndim
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        if not 0 <= axis < ndim or axis == unfolded:
            return None
        return replace(self, axis_from_end=self.axis_from_end - 1)

    def without(self, ndim: int, removed: frozenset[int]) -> UnitOrigin | None:
        """After dims ``removed`` (input dims) of an ``ndim`` tensor are dropped; None when
        the unit axis is one of them."""
        axis = self.axis_from_end + ndim
        if not 0 <= axis < ndim or axis in removed:
            return None
        return replace(self, axis_from_end=self.axis_from_end + sum(1 for d in removed if d > axis))

    def with_inserted(self, ndim_out: int, inserted: frozenset[int]) -> UnitOrigin | None:
        """After new dims ``inserted`` (output dims) make a tensor of ``ndim_out`` dims."""
        kept = [d for d in range(ndim_out) if d not in inserted]
        axis = self.axis_from_end + len(kept)
        if not 0 <= axis < len(kept):
            return None
        return replace(self, axis_from_end=kept[axis] - ndim_out)

    def lost_samples(self, ndim: int) -> bool:
        """Whether a tensor of ``ndim`` dims with these units has no sample axis left: a
        linear op's output of rank 1, or a convolution's with its units at dim 0 and no
        permute that put them there. PyTorch runs a `Linear` on a vector, or a `Conv2d` on
        a ``(C, H, W)`` image, as one unbatched sample, adding and then dropping a batch
        dim of 1 around the op; statistics of such a site would count one sample where
        the batch held many."""
        if self.kind == "linear":
            return ndim == 1
        return ndim >= 2 and self.axis_from_end + ndim == 0 and not self.permuted


def removed_dims(op: str, args: tuple, shape: tuple[int, ...]) -> frozenset[int] | None:
    """The input dims a squeeze/select/unbind call drops (None when the call cannot be read)."""
    ndim = len(shape)
    try:
        if op in ("squeeze", "squeeze_"):
            if len(args) < 2:
                return frozenset(d for d, size in enumerate(shape) if size == 1)
            dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            return frozenset(int(d) % ndim for d in dims if shape[int(d) % ndim] == 1)
        if op == "select":
            return frozenset({int(args[1]) % ndim})
        if op == "unbind":
            return frozenset({int(args[1]) % ndim if len(args) > 1 else 0})
    except (IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def reduced_dims(args: tuple, kwargs: dict, shape: tuple[int, ...]) -> tuple[frozenset[int], bool] | None:
    """The dims a mean/sum/amax/amin call reduces, and whether it keeps them (None when it
    reduces them all, or the call cannot be read)."""
    ndim = len(shape)
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    if dims is None or ndim == 0:
        return None
    try:
        listed = dims if isinstance(dims, (list, tuple)) else [dims]
        reduced = frozenset(int(d) % ndim for d in listed)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return (reduced, keep) if reduced else None


def inserted_dims(op: str, args: tuple, ndim_out: int) -> frozenset[int] | None:
    """The output dims an unsqueeze/stack call adds."""
    try:
        if op in ("unsqueeze", "unsqueeze_", "stack"):
            return frozenset({int(args[1]) % ndim_out if len(args) > 1 else 0})
    except (IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def choose_axis(ndim: int, origin: UnitOrigin | None) -> AxisChoice:
    """Unit axis from the producing op: dim 1 behind convolutions, last dim behind linear,
    followed through elementwise and rank-preserving ops (slices, splits, pads, pools,
    concatenation), permutes, transposes, reshapes that keep it, and squeezes/unsqueezes.

    A pre-activation of rank 0 or 1 (one value per sample, say ``fc(x).squeeze(-1)``) is
    one unit: it is reduced as its ``(values, 1)`` view (`scalar_view`), whose axis 1
    holds that unit. Taking dim 0 as the units would make the batch the units: counts
    that change with the batch size and a scan that fails on a shorter last batch."""
    if ndim <= 1:
        return AxisChoice(1, "scalar")
    if origin is not None and -ndim <= origin.axis_from_end < 0:
        return AxisChoice(origin.axis_from_end + ndim, origin.kind)
    return AxisChoice(1, "default")


@dataclass(frozen=True)
class AxisOverride:
    """``--unit-axis GLOB=DIM``: the sites whose names match GLOB have their units on DIM
    (negative: from the end), whatever their producer says."""

    pattern: str
    dim: int

    def __str__(self) -> str:
        return f"{self.pattern}={self.dim}"


def literal_glob(name: str) -> str:
    """A glob matching ``name`` alone (its ``*``, ``?`` and ``[`` as themselves)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def overridden_axis(overrides: Sequence[AxisOverride], name: str, ndim: int, guess: AxisChoice) -> AxisChoice:
    """The unit axis the first ``--unit-axis`` matching site ``name`` gives it (source
    ``user``), or ``guess``. A dim the pre-activation does not have, or dim 0 (the samples),
    is a usage error naming the site."""
    for override in overrides:
        if not fnmatch.fnmatchcase(name, override.pattern):
            continue
        if ndim <= 1:
            raise UsageError(f"--unit-axis {override}: site '{name}' has one value per sample (rank {ndim}): "
                             "it is one unit, with no axis to choose")
        axis = override.dim + ndim if override.dim < 0 else override.dim
        if not 1 <= axis < ndim:
            raise UsageError(f"--unit-axis {override}: site '{name}' has a rank-{ndim} pre-activation: expected "
                             f"a dim from 1 to {ndim - 1} (or -1 to -{ndim - 1}); dim 0 holds the samples")
        return AxisChoice(axis, "user")
    return guess


def permutation(op: str, args: tuple, ndim: int) -> list[int] | None:
    """The dim order of a permute/transpose call's output (output dim i = input dim order[i])."""
    try:
        if op == "permute":
            return [int(d) % ndim for d in args[1]]
        if op in ("transpose", "swapaxes", "swapdims"):
            order = list(range(ndim))
            a, b = int(args[1]) % ndim, int(args[2]) % ndim
            order[a], order[b] = order[b], order[a]
            return order
        if op in ("t", "numpy_T", "mT") and ndim == 2:
            return [1, 0]
        if op in ("movedim", "moveaxis"):
            return _moved_order(args[1], args[2], ndim)
    except (IndexError, TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def _moved_order(source: Any, destination: Any, ndim: int) -> list[int] | None:
    """The dim order of ``movedim(x, source, destination)`` (ints or sequences of them):
    the moved dims land where they are sent, the others keep their order."""
    sources = [int(d) % ndim for d in (source if isinstance(source, (list, tuple)) else [source])]
    targets = [int(d) % ndim for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    if len(sources) != len(targets) or len(set(sources)) != len(sources) or len(set(targets)) != len(targets):
        return None
    order: list[int | None] = [None] * ndim
    for src, dst in zip(sources, targets):
        order[dst] = src
    rest = iter(d for d in range(ndim) if d not in sources)
    return [d if d is not None else next(rest) for d in order]


def scalar_view(x: torch.Tensor) -> torch.Tensor:
    """A rank-0/1 pre-activation as a ``(values, 1)`` matrix (one unit); others unchanged."""
    return x.reshape(-1, 1) if x.ndim <= 1 else x


def producer_kind(op: str) -> str | None:
    if op in CONV_PRODUCERS:
        return "conv"
    if op in LINEAR_PRODUCERS:
        return "linear"
    if op in RECURRENT_PRODUCERS:
        return "recurrent"
    return None


_ELLIPSIS = "..."


def einsum_unit_axis(equation: str, weights: Sequence[bool], ndim_out: int) -> int:
    """The unit axis of an einsum's output, counted from the end (-1 is the last dim): the
    output subscript that only the weights carry (``'btg,gk->bkt'``: ``k``, dim 1 of 3), as
    a linear layer's features are its weight's output dim. ``weights`` flags the operands
    that are parameters or constants; with none (or all) flagged, the last operand plays the
    weight. Several such subscripts: the last of them. None, or an equation this cannot
    read: the last dim, as for ``matmul``. PyTorch and ONNX (``Einsum``) use this rule."""
    try:
        operands, output = _einsum_terms(equation)
    except ValueError:
        return -1
    flagged = [i for i, w in enumerate(weights) if w]
    groups = [flagged] if 0 < len(flagged) < len(operands) else []
    for group in [*groups, [len(operands) - 1]]:
        own = set().union(*(set(operands[i]) for i in group if i < len(operands)))
        others = set().union(*(set(t) for i, t in enumerate(operands) if i not in group))
        units = [k for k, token in enumerate(output) if token in own and token not in others]
        if units:
            return _from_end(output, units[-1], ndim_out)
    return -1


def _einsum_terms(equation: str) -> tuple[list[list[str]], list[str]]:
    """An equation's operand and output subscripts as tokens (a letter or ``...``), the
    implicit output (``'ij,jk'``: the letters seen once, sorted, after any ellipsis) filled in."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    operands = [_einsum_tokens(term) for term in lhs.split(",")]
    if arrow:
        return operands, _einsum_tokens(rhs)
    letters = [t for term in operands for t in term if t != _ELLIPSIS]
    once = sorted(t for t in set(letters) if letters.count(t) == 1)
    return operands, ([_ELLIPSIS] if any(_ELLIPSIS in t for t in operands) else []) + once


def _einsum_tokens(term: str) -> list[str]:
    head, dots, tail = term.partition(_ELLIPSIS)
    tokens = [*head, *([_ELLIPSIS] if dots else []), *tail]
    if any(not (t == _ELLIPSIS or t.isalpha()) for t in tokens):
        raise ValueError(f"not an einsum term: {term!r}")
    return tokens


def _from_end(output: list[str], position: int, ndim_out: int) -> int:
    """Output token ``position`` as a dim counted from the end (an ellipsis before it spans
    however many dims the output has beyond its letters)."""
    if _ELLIPSIS in output[position + 1:]:
        return position - ndim_out
    return position - len(output)
