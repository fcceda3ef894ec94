"""What to change in the user's own model class, and the state_dict that class can load.

Written for models the tool cannot rewrite in the user's source (state_dict + --arch,
pickles, TorchScript): the rewritten exported program runs without their code, and these
instructions plus the state_dict carry the change back into it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deadrelu.fix.plan import SiteFix
from deadrelu.fix.torch_rewrite import NewTensor, RewriteOptions
from deadrelu.sites import ACTIVATION_MODULE_TYPES

_REPEAT = re.compile(r"^(?P<base>.*?)_(?P<index>\d+)$")
_BN_CLASS = {2: "nn.BatchNorm1d", 3: "nn.BatchNorm1d", 4: "nn.BatchNorm2d", 5: "nn.BatchNorm3d"}


@dataclass(frozen=True)
class Placement:
    """Where a site lives in the user's module tree."""

    module_path: str  # the activation module, or the module whose forward makes the call
    call: int  # 0 for the first call of that module / functional, 1 for the second, ...
    functional: str | None  # None: an activation module; else relu, relu6, hardtanh, ...
    shared: bool = False  # an activation module the forward calls more than once

    def replaces_module(self) -> bool:
        """Whether the change replaces the activation module itself: only when it has
        this one call, since a replaced module changes every call of it."""
        return self.functional is None and self.call == 0 and not self.shared

    def new_module_path(self) -> str:
        """Where the new module goes (its parameters' key prefix)."""
        if self.replaces_module():
            return self.module_path
        leaf = (self.module_path.rsplit(".", 1)[-1] if self.functional is None else self.functional)
        attr = f"{leaf}_{self.call}_fix" if self.call else f"{leaf}_fix"
        parent = self.module_path.rsplit(".", 1)[0] if self.functional is None and "." in self.module_path else (
            "" if self.functional is None else self.module_path)
        return f"{parent}.{attr}" if parent else attr


def place(site: str, module_types: dict[str, str], shared: frozenset[str] = frozenset()) -> Placement:
    """Module path / call index / functional of a site name (see deadrelu.sites naming).

    Args:
        shared: the activation modules called more than once (`shared_modules`)."""
    for base, call in _candidates(site):
        if module_types.get(base) in ACTIVATION_MODULE_TYPES:
            return Placement(base, call, None, shared=base in shared)
    base, call = _candidates(site)[-1]  # a functional call: the _N reading when there is one
    parent, _, functional = base.rpartition(".")
    return Placement(parent, call, functional)


def shared_modules(site_names: Sequence[str], module_types: dict[str, str]) -> frozenset[str]:
    """The activation modules with more than one call among the scanned sites."""
    placed = (place(name, module_types) for name in site_names)
    return frozenset(p.module_path for p in placed if p.functional is None and p.call > 0)


def _candidates(site: str) -> list[tuple[str, int]]:
    """(module path, call index) readings of a site name, the most likely first: exactly
    that name (`act_1` can be a module of its own), then call N+1 of `base` for a name
    ending in _N."""
    found = [(site, 0)]
    match = _REPEAT.match(site)
    if match:
        found.append((match.group("base"), int(match.group("index"))))
    return found



def instructions(fixes: Sequence[SiteFix], module_types: dict[str, str], options: RewriteOptions,
                 ndims: dict[int, int], shared: frozenset[str] = frozenset()) -> list[str]:
    """One line per change, naming the module or call to swap and what to put there."""
    lines = []
    for fix in fixes:
        where = place(fix.site, module_types, shared)
        new = _new_module(fix, options, ndims.get(fix.index, 4))
        target = where.new_module_path()
        if where.replaces_module():
            lines.append(f"{fix.site}: replace the module `{where.module_path}` ({module_types.get(where.module_path)}) "
                         f"with `{new}`")
        elif where.functional is None:
            lines.append(f"{fix.site}: `{where.module_path}` is called more than once; give call #{where.call + 1} its "
                         f"own module `self.{target.rsplit('.', 1)[-1]} = {new}` (in `{target.rpartition('.')[0] or 'the root'}`) "
                         "and leave the other calls alone")
        else:
            owner = where.module_path or "the root module"
            lines.append(f"{fix.site}: in the forward of `{owner}`, call #{where.call + 1} of `{where.functional}`: "
                         f"add `self.{target.rsplit('.', 1)[-1]} = {new}` to `{owner}` and call it instead")
        ndim = ndims.get(fix.index, 4)
        if ndim <= 1 and fix.change == "bn":
            lines.append("    one value per sample (a vector pre-activation): apply it as "
                         "`m(x.reshape(-1, 1)).reshape(x.shape)`")
        elif fix.unit_axis != 1 and fix.change in ("prelu", "bn"):
            lines.append(f"    units are on dim {fix.unit_axis}: apply it as `m(x.movedim({fix.unit_axis}, 1)).movedim(1, {fix.unit_axis})`")
    return lines


def _new_module(fix: SiteFix, options: RewriteOptions, ndim: int) -> str:
    cap = " (then clamp at 6, as ReLU6 did)" if fix.op == "relu6" else ""
    if fix.change == "leaky":
        return f"nn.LeakyReLU({options.leaky_slope()})" + cap
    if fix.change == "prelu":
        return f"nn.PReLU({fix.units}, init={options.prelu_slope()})" + cap
    bn = _BN_CLASS.get(ndim, "nn.BatchNorm1d")
    act = "nn.ReLU6()" if fix.op == "relu6" else "nn.ReLU()"
    return f"nn.Sequential({bn}({fix.units}, eps={options.eps}), {act})"


def fixed_state_dict(original: dict[str, torch.Tensor], fixes: Sequence[SiteFix], added: Sequence[NewTensor],
                     module_types: dict[str, str], shared: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The original weights plus the new parameters under the names the instructions give."""
    state = dict(original)
    by_site = {fix.site: fix for fix in fixes}
    for tensor in added:
        fix = by_site[tensor.site]
        prefix = place(fix.site, module_types, shared).new_module_path()
        kind, _, role = tensor.role.partition(".")
        # BatchNorm comes as nn.Sequential(BN, ReLU) wherever it goes (see `_new_module`): keys under '.0.'
        state[f"{prefix}.0.{role}" if kind == "bn" else f"{prefix}.{role}"] = tensor.value.detach().clone()
    for fix in fixes:
        if fix.change == "bn":
            state[f"{place(fix.site, module_types, shared).new_module_path()}.0.num_batches_tracked"] = torch.tensor(0)
    return state


def module_types(module: Any) -> dict[str, str]:
    """Module path -> class name, for eager and TorchScript modules."""
    types = {}
    for path, sub in module.named_modules():
        name = getattr(sub, "original_name", None) or type(sub).__name__
        types[path] = str(name)
    return types
