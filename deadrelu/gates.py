"""CI gates: thresholds over a report's findings -> pass/fail results. Pure functions, no I/O.

A gate policy is off until it is asked for: with no threshold and no `fail_on`, nothing
fails (exit 0 whatever was found). Once on:

* `fail_on` picks which findings count, by severity: `dead` counts dead units,
  `near-dead` dead or near-dead units, `dormant` dead, near-dead or dormant units, and
  `collapsed` only the units of collapsed sites. `fail_on` alone, with no count or fraction
  threshold, means zero tolerance (as if `max_dead = 0`).
* `max_dead` / `max_dead_fraction` bound the counted units over all (not ignored) sites;
  `max_site_dead_fraction` bounds them in any one site; per-site rules (name globs)
  override the site fraction and add a per-site count.
* A collapsed site (every unit dead: everything after it sees a constant) fails every
  active policy; ignore the site to accept it.
* With a baseline report, only findings that the baseline does not have (matched by site
  name and unit index) count: the "no new dead units" gate of a training run.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from deadrelu.errors import ExitCode
from deadrelu.report import ScanReport, SiteReport


class FailOn(str, enum.Enum):
    """Which findings count, from the widest to the narrowest."""

    DORMANT = "dormant"
    NEAR_DEAD = "near-dead"
    DEAD = "dead"
    COLLAPSED = "collapsed"


KIND_WORDS = {
    FailOn.DEAD: "dead",
    FailOn.NEAR_DEAD: "dead or near-dead",
    FailOn.DORMANT: "dead, near-dead or dormant",
    FailOn.COLLAPSED: "dead in collapsed sites",
}


@dataclass(frozen=True)
class SiteRule:
    """Per-site limits for the sites whose names match `pattern` (fnmatch glob; `*` also
    matches dots). `max_dead_fraction` replaces the policy's `max_site_dead_fraction`."""

    pattern: str
    max_dead: int | None = None
    max_dead_fraction: float | None = None

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
class GatePolicy:
    fail_on: FailOn | None = None
    max_dead: int | None = None
    max_dead_fraction: float | None = None
    max_site_dead_fraction: float | None = None
    ignore: tuple[str, ...] = ()
    site_rules: tuple[SiteRule, ...] = ()
    # the count limit of a site no rule matches: 0 when `fail_on` comes with site rules alone
    unruled_site_max_dead: int | None = None

    @property
    def kind(self) -> FailOn:
        return self.fail_on or FailOn.DEAD

    @property
    def has_limits(self) -> bool:
        return (self.max_dead is not None or self.max_dead_fraction is not None
                or self.max_site_dead_fraction is not None
                or any(r.max_dead is not None or r.max_dead_fraction is not None for r in self.site_rules))

    @property
    def active(self) -> bool:
        return self.fail_on is not None or self.has_limits

    def effective(self) -> GatePolicy:
        """`fail_on` alone means zero tolerance for the counted kind. With per-site rules and
        no limit over the whole model, the rules relax (or tighten) the sites they match and
        every other site keeps zero tolerance: a leniency for `layer4.*` un-gates nothing else."""
        if self.fail_on is None or self.fail_on is FailOn.COLLAPSED:
            return self
        if not self.has_limits:
            return replace(self, max_dead=0)
        global_limits = (self.max_dead, self.max_dead_fraction, self.max_site_dead_fraction)
        if self.site_rules and all(limit is None for limit in global_limits):
            return replace(self, unruled_site_max_dead=0)
        return self

    def ignores(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore)

    def site_limits(self, name: str) -> tuple[int | None, float | None, str | None]:
        """(max dead units, max dead fraction, the rule pattern that set them) for one site;
        matching rules apply in order, a later one overriding an earlier one key by key."""
        count, fraction, source = None, self.max_site_dead_fraction, None
        matched = False
        for rule in self.site_rules:
            if rule.matches(name):
                matched = True
                if rule.max_dead is not None:
                    count, source = rule.max_dead, rule.pattern
                if rule.max_dead_fraction is not None:
                    fraction, source = rule.max_dead_fraction, rule.pattern
        if not matched and self.unruled_site_max_dead is not None:
            count = self.unruled_site_max_dead
        return count, fraction, source

    def to_dict(self) -> dict[str, Any]:
        return {
            "fail_on": self.kind.value,
            "max_dead": self.max_dead,
            "max_dead_fraction": self.max_dead_fraction,
            "max_site_dead_fraction": self.max_site_dead_fraction,
            "ignore": list(self.ignore),
            "sites": {r.pattern: {"max_dead": r.max_dead, "max_dead_fraction": r.max_dead_fraction}
                      for r in self.site_rules},
        }


@dataclass(frozen=True)
class GateResult:
    """One check: a global gate (`site` None) or a gate applied to one site."""

    gate: str  # max-dead | max-dead-fraction | max-site-dead-fraction | site-max-dead | collapsed | max-new-dead
    site: str | None
    limit: float
    actual: float
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "site": self.site, "limit": self.limit, "actual": self.actual,
                "passed": self.passed, "message": self.message}


@dataclass(frozen=True)
class SiteFindings:
    """What counts at one site: `findings` of the policy's kind, and of those the ones that
    count (all of them, or with a baseline only those the baseline does not have)."""

    name: str
    units: int
    ignored: bool
    findings: tuple[int, ...]
    counted: tuple[int, ...]
    collapsed: bool  # collapsed, and (with a baseline) not collapsed there

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "units": self.units, "ignored": self.ignored,
                "findings": len(self.findings), "counted": len(self.counted),
                "counted_units": list(self.counted), "collapsed": self.collapsed}


@dataclass(frozen=True)
class GateReport:
    policy: GatePolicy  # as given (before `effective`)
    sites: tuple[SiteFindings, ...]
    results: tuple[GateResult, ...]
    baseline: str | None = None
    extra_results: tuple[GateResult, ...] = field(default=())
    baseline_notes: tuple[str, ...] = ()  # where the baseline does not match the report's sites

    @property
    def active(self) -> bool:
        return self.policy.active

    @property
    def all_results(self) -> tuple[GateResult, ...]:
        return self.results + self.extra_results

    @property
    def failures(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.all_results if not r.passed)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def units(self) -> int:
        return sum(s.units for s in self.sites if not s.ignored)

    @property
    def counted(self) -> int:
        return sum(len(s.counted) for s in self.sites if not s.ignored)

    @property
    def counted_fraction(self) -> float:
        return self.counted / self.units if self.units else 0.0

    @property
    def kind_words(self) -> str:
        return ("new " if self.baseline else "") + KIND_WORDS[self.policy.kind]

    def site_results(self, name: str) -> tuple[GateResult, ...]:
        return tuple(r for r in self.all_results if r.site == name)

    def global_results(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.all_results if r.site is None)

    def exit_code(self, exit_zero: bool = False) -> ExitCode:
        return ExitCode.FINDINGS if self.failures and not exit_zero else ExitCode.CLEAN

    def to_dict(self) -> dict[str, Any]:
        effective = self.policy.effective()
        return {
            "active": self.active,
            "passed": self.passed,
            "fail_on": self.policy.kind.value,
            "baseline": self.baseline,
            "baseline_notes": list(self.baseline_notes),
            "policy": effective.to_dict(),
            "counted": {"kind": self.kind_words, "units": self.units, "findings": self.counted,
                        "fraction": self.counted_fraction},
            "results": [r.to_dict() for r in self.all_results],
            "sites": [s.to_dict() for s in self.sites],
        }

    def with_results(self, extra: tuple[GateResult, ...]) -> GateReport:
        return replace(self, extra_results=self.extra_results + extra)


def findings(site: SiteReport, kind: FailOn) -> tuple[int, ...]:
    """Unit indices of `site` that are findings of `kind` (or of a more severe kind)."""
    v = site.verdict
    if kind is FailOn.COLLAPSED:
        return tuple(range(site.units)) if v.collapsed else ()
    chosen = set(v.dead)
    if kind in (FailOn.NEAR_DEAD, FailOn.DORMANT):
        chosen |= set(v.near_dead)
    if kind is FailOn.DORMANT:
        chosen |= set(v.dormant)
    return tuple(sorted(chosen))


def evaluate(report: ScanReport, policy: GatePolicy, baseline: ScanReport | None = None,
             baseline_label: str | None = None) -> GateReport:
    """Judge `report` against `policy`; with `baseline`, count only what it does not have.

    The baseline should be judged with the same verdict thresholds as `report` (see
    `deadrelu.saved.load_report(path, report.thresholds)`).
    """
    kind = policy.kind
    known = {s.name: s for s in baseline.sites} if baseline is not None else {}
    sites = []
    for site in report.sites:
        found = findings(site, kind)
        counted, collapsed = found, site.verdict.collapsed
        if baseline is not None:
            before = known.get(site.name)
            if before is not None and before.units != site.units:
                before = None  # another layer under the same name: unit i there is not unit i here
            old = set(findings(before, kind)) if before is not None else set()
            counted = tuple(u for u in found if u not in old)
            collapsed = collapsed and not (before is not None and before.verdict.collapsed)
        sites.append(SiteFindings(site.name, site.units, policy.ignores(site.name), found, counted, collapsed))
    label = baseline_label or (baseline.model.path if baseline is not None else None)
    notes = baseline_mismatches(report, baseline, label or "the baseline") if baseline is not None else ()
    gate_report = GateReport(policy, tuple(sites), (), label, baseline_notes=notes)
    if not policy.active:
        return gate_report
    return replace(gate_report, results=tuple(_results(gate_report, policy.effective())))


def baseline_mismatches(report: ScanReport, baseline: ScanReport, label: str) -> tuple[str, ...]:
    """Where `baseline` cannot excuse findings: the report's sites it lacks, or has with
    another unit count (their findings all count as new). None shared at all usually means
    the baseline is of another model, and gating against it is gating without one."""
    known = {s.name: s.units for s in baseline.sites}
    missing = [s.name for s in report.sites if s.name not in known]
    resized = [f"{s.name} ({s.units} units, {known[s.name]} there)" for s in report.sites
               if s.name in known and known[s.name] != s.units]
    if report.sites and len(missing) == len(report.sites):
        return (f"baseline {label} shares no site name with this report (another model?): "
                f"every finding counts as new",)
    notes = []
    if missing:
        notes.append(f"baseline {label} lacks {len(missing)} of this report's {len(report.sites)} sites, whose "
                     f"findings all count as new: {_listed(missing)}")
    if resized:
        notes.append(f"baseline {label} has other unit counts at {len(resized)} sites, whose findings all count "
                     f"as new: {_listed(resized)}")
    return tuple(notes)


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _results(g: GateReport, policy: GatePolicy) -> list[GateResult]:
    words = g.kind_words
    results = []
    if policy.max_dead is not None:
        ok = g.counted <= policy.max_dead
        results.append(GateResult("max-dead", None, policy.max_dead, g.counted, ok,
                                  f"{g.counted} {words} {plural(g.counted, 'unit')} {_cmp(ok)} max-dead {policy.max_dead}"))
    if policy.max_dead_fraction is not None:
        ok = g.counted_fraction <= policy.max_dead_fraction
        shown = pct_pair(g.counted_fraction, policy.max_dead_fraction)
        results.append(GateResult(
            "max-dead-fraction", None, policy.max_dead_fraction, g.counted_fraction, ok,
            f"{g.counted} of {g.units} units {words} ({shown[0]}) {_cmp(ok)} max-dead-fraction {shown[1]}"))
    for site in g.sites:
        if site.ignored:
            continue
        count_limit, fraction_limit, rule = policy.site_limits(site.name)
        n = len(site.counted)
        from_rule = f' (sites."{rule}")' if rule else ""
        results.append(GateResult(
            "collapsed", site.name, 0, int(site.collapsed), not site.collapsed,
            f"{site.name}: collapsed: all {site.units} units dead, everything after it sees a constant"
            if site.collapsed else f"{site.name}: not collapsed"))
        if fraction_limit is not None:
            fraction = n / site.units if site.units else 0.0
            ok = fraction <= fraction_limit
            shown = pct_pair(fraction, fraction_limit)
            results.append(GateResult(
                "max-site-dead-fraction", site.name, fraction_limit, fraction, ok,
                f"{site.name}: {n} of {site.units} units {words} ({shown[0]}) {_cmp(ok)} "
                f"max-site-dead-fraction {shown[1]}{from_rule}"))
        if count_limit is not None:
            ok = n <= count_limit
            results.append(GateResult("site-max-dead", site.name, count_limit, n, ok,
                                      f"{site.name}: {n} {words} {plural(n, 'unit')} {_cmp(ok)} max-dead {count_limit}{from_rule}"))
    return results


def pct(fraction: float, digits: int = 3) -> str:
    """A fraction as a short percentage: 0.065 -> '6.5%', 0.0004 -> '0.04%'."""
    return f"{fraction * 100:.{digits}g}%"


def pct_pair(actual: float, limit: float) -> tuple[str, str]:
    """Both as percentages with the digits it takes to tell them apart: a gate that failed
    must not read '6.48% > 6.48%' (0.0648148 against 0.0648)."""
    for digits in range(3, 18):
        shown = pct(actual, digits), pct(limit, digits)
        if actual == limit or shown[0] != shown[1]:
            return shown
    return shown


def plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _cmp(ok: bool) -> str:
    return "<=" if ok else ">"
