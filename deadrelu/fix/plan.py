"""Planning fixes: which sites change, to what, and why.

Rules, in order (also in the README):

1. A site that is already leaky (LeakyReLU, PReLU) is left alone: it has no dead units in
   the gradient sense.
2. Candidates: the sites matched by ``--sites`` globs when given; otherwise the sites
   whose dead fraction is at or above ``--min-dead-fraction`` (default: any dead unit).
3. The change, unless ``--to`` forces one:
   * **collapsed** (every unit dead): insert BatchNorm (``revive``). A Leaky/PReLU swap
     alone would pass only a slope-scaled negative signal from a constant-sign input;
     re-centring brings units back, then fine-tune.
   * **no normalisation upstream**: insert BatchNorm. The units died because their
     pre-activations drifted negative; normalising re-centres them every step.
   * **normalisation already upstream** (BatchNorm/LayerNorm/GroupNorm feeds the ReLU,
     directly or through a residual add): LeakyReLU. The norm's shift (beta) went
     negative; a leaky slope keeps gradients flowing so fine-tuning can move it back.
     PReLU (``--to prelu``) does the same with a learnable slope per unit.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from deadrelu.errors import UsageError
from deadrelu.report import ScanReport, SiteReport

CHANGES = ("leaky", "prelu", "bn")


@dataclass(frozen=True)
class PlanOptions:
    to: str | None = None  # force: leaky | prelu | bn
    sites: tuple[str, ...] = ()  # name globs
    min_dead_fraction: float = 0.0  # 0: any dead unit


@dataclass(frozen=True)
class SiteFix:
    """The change planned for one site."""

    site: str
    index: int  # position in execution order
    op: str
    unit_axis: int
    units: int
    dead: tuple[int, ...]
    change: str  # leaky | prelu | bn
    reason: str

    def to_dict(self) -> dict:
        return {"site": self.site, "index": self.index, "op": self.op, "unit_axis": self.unit_axis,
                "units": self.units, "dead": len(self.dead), "dead_units": list(self.dead),
                "change": self.change, "reason": self.reason}


def plan_fixes(report: ScanReport, options: PlanOptions) -> tuple[SiteFix, ...]:
    """The fixes for a scanned model, in execution order."""
    if options.to is not None and options.to not in CHANGES:
        raise UsageError(f"--to '{options.to}': expected one of {', '.join(CHANGES)}")
    if options.sites:
        unmatched = [g for g in options.sites if not any(fnmatch.fnmatchcase(s.name, g) for s in report.sites)]
        if unmatched:
            names = ", ".join(s.name for s in report.sites[:6])
            raise UsageError(f"--sites {unmatched[0]!r} matches no site (sites: {names}{', ...' if len(report.sites) > 6 else ''})")
    fixes = []
    for index, site in enumerate(report.sites):
        if site.leaky or not _chosen(site, options):
            continue
        change, reason = _decide(site, options.to)
        fixes.append(SiteFix(site.name, index, site.op, site.unit_axis, site.units, site.verdict.dead, change, reason))
    return tuple(fixes)


def nothing_planned(report: ScanReport, options: PlanOptions) -> str:
    """Why the plan for `report` is empty (call it only when it is)."""
    leaky_note = "LeakyReLU and PReLU pass gradients, so deadrelu leaves them alone"
    if not report.sites:
        return "the model has no ReLU sites"
    if options.sites:
        matched = [s.name for s in report.sites if any(fnmatch.fnmatchcase(s.name, g) for g in options.sites)]
        return f"the sites --sites chose are leaky already ({_names(matched)}; {leaky_note})"
    dead = [s for s in report.sites if s.dead]
    if not dead:
        return f"no site has dead units on these {report.data.samples} samples"
    if all(s.leaky for s in dead):
        return f"the sites with dead units are leaky already ({_names([s.name for s in dead])}; {leaky_note})"
    most = max((s for s in dead if not s.leaky), key=lambda s: s.dead / s.units)
    return (f"no site has --min-dead-fraction {options.min_dead_fraction:g} of its units dead (the most: {most.name}, "
            f"{most.dead}/{most.units})")


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _chosen(site: SiteReport, options: PlanOptions) -> bool:
    if options.sites:
        return any(fnmatch.fnmatchcase(site.name, glob) for glob in options.sites)
    if not site.dead:
        return False
    return site.dead / site.units >= options.min_dead_fraction


def _decide(site: SiteReport, forced: str | None) -> tuple[str, str]:
    dead = f"{site.dead}/{site.units} units dead"
    normalised = bool(site.extra.get("normalised_input"))
    if forced:
        return forced, f"{dead}; --to {forced}"
    if site.verdict.collapsed:
        return "bn", (f"collapsed ({dead}): a Leaky/PReLU swap alone passes only a scaled constant-sign signal; "
                      "insert BatchNorm and pass --bn-init revive to re-centre it (the default, identity, keeps "
                      "the outputs and so the dead units), then fine-tune")
    if not normalised:
        return "bn", f"{dead}, no normalisation upstream: insert BatchNorm to re-centre the pre-activations"
    return "leaky", (f"{dead} behind a normalisation layer (its shift went negative): LeakyReLU keeps gradients "
                     "flowing so fine-tuning can revive them (--to prelu to learn the slope)")
