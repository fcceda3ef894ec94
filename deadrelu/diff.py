"""Comparing two reports of a model (two checkpoints of one training run), site by site.

Sites are matched by name, units by index. Per site: the units that died (dead now, not
dead before, or new), the units that revived (dead before, alive now), and the change in
active rate. One gate, `max_new_dead`, bounds the units that died over all sites that are
not ignored.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Any

from deadrelu.gates import GateResult, plural
from deadrelu.report import ScanReport, SiteReport

DIFF_VERSION = 1


@dataclass(frozen=True)
class SiteDiff:
    name: str
    status: str  # both | added | removed
    old_units: int | None
    new_units: int | None
    old_dead: int
    new_dead: int
    died: tuple[int, ...]
    revived: tuple[int, ...]
    old_active_rate: float | None
    new_active_rate: float | None
    ignored: bool = False

    @property
    def active_rate_change(self) -> float | None:
        if self.old_active_rate is None or self.new_active_rate is None:
            return None
        return self.new_active_rate - self.old_active_rate

    @property
    def changed(self) -> bool:
        return bool(self.died or self.revived) or self.status != "both" or self.old_units != self.new_units

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "ignored": self.ignored,
            "old_units": self.old_units, "new_units": self.new_units,
            "old_dead": self.old_dead, "new_dead": self.new_dead,
            "died": len(self.died), "died_units": list(self.died),
            "revived": len(self.revived), "revived_units": list(self.revived),
            "old_active_rate": self.old_active_rate, "new_active_rate": self.new_active_rate,
            "active_rate_change": self.active_rate_change,
        }


@dataclass(frozen=True)
class ReportDiff:
    old: ScanReport
    new: ScanReport
    old_label: str
    new_label: str
    sites: tuple[SiteDiff, ...]
    max_new_dead: int | None = None

    @property
    def died(self) -> int:
        return sum(len(s.died) for s in self.sites if not s.ignored)

    @property
    def revived(self) -> int:
        return sum(len(s.revived) for s in self.sites if not s.ignored)

    @property
    def results(self) -> tuple[GateResult, ...]:
        if self.max_new_dead is None:
            return ()
        ok = self.died <= self.max_new_dead
        return (GateResult("max-new-dead", None, self.max_new_dead, self.died, ok,
                           f"{self.died} {plural(self.died, 'unit')} died {'<=' if ok else '>'} max-new-dead {self.max_new_dead}"),)

    @property
    def failures(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.old.sites and self.new.sites and not any(s.status == "both" for s in self.sites):
            notes.append(f"{self.old_label} and {self.new_label} share no site name (scans of different "
                         "architectures?): every dead unit counts as died, none as revived")
        for s in self.sites:
            if s.status == "added":
                notes.append(f"{s.name}: only in {self.new_label}")
            elif s.status == "removed":
                notes.append(f"{s.name}: only in {self.old_label}")
            elif s.old_units != s.new_units:
                notes.append(f"{s.name}: units changed from {s.old_units} to {s.new_units}; units matched by index")
        if self.old.model.sha256 and self.old.model.sha256 == self.new.model.sha256:
            notes.append("both reports are of the same model file (same sha256)")
        return notes

    def to_dict(self) -> dict[str, Any]:
        from deadrelu import __version__

        def side(report: ScanReport, label: str) -> dict[str, Any]:
            return {"report": label, "model": vars(report.model).copy(), "data": vars(report.data).copy(),
                    "units": report.units, "dead": report.dead}

        return {
            "diff_version": DIFF_VERSION,
            "deadrelu_version": __version__,
            "old": side(self.old, self.old_label),
            "new": side(self.new, self.new_label),
            "sites": [s.to_dict() for s in self.sites],
            "summary": {"died": self.died, "revived": self.revived,
                        "sites_changed": sum(1 for s in self.sites if s.changed)},
            "gates": {"active": self.max_new_dead is not None, "passed": self.passed,
                      "results": [r.to_dict() for r in self.results]},
            "notes": self.notes,
        }


def diff_reports(old: ScanReport, new: ScanReport, *, old_label: str = "old", new_label: str = "new",
                 ignore: tuple[str, ...] = (), max_new_dead: int | None = None) -> ReportDiff:
    """Per site of `new` (then the sites only `old` has): units that died and revived."""
    before = {s.name: s for s in old.sites}
    after = {s.name: s for s in new.sites}
    sites = [_site_diff(before.get(s.name), s) for s in new.sites]
    sites += [_site_diff(s, None) for s in old.sites if s.name not in after]
    sites = [_with_ignored(s, any(fnmatch.fnmatchcase(s.name, p) for p in ignore)) for s in sites]
    return ReportDiff(old, new, old_label, new_label, tuple(sites), max_new_dead)


def _site_diff(old: SiteReport | None, new: SiteReport | None) -> SiteDiff:
    site = new or old
    assert site is not None
    old_dead = set(old.verdict.dead) if old else set()
    new_dead = set(new.verdict.dead) if new else set()
    died = tuple(sorted(new_dead - old_dead)) if new else ()
    revived = tuple(sorted(u for u in old_dead - new_dead if new and u < new.units)) if old else ()
    return SiteDiff(
        name=site.name,
        status="both" if old and new else ("added" if new else "removed"),
        old_units=old.units if old else None,
        new_units=new.units if new else None,
        old_dead=len(old_dead), new_dead=len(new_dead),
        died=died, revived=revived,
        old_active_rate=old.active_rate if old else None,
        new_active_rate=new.active_rate if new else None,
    )


def _with_ignored(site: SiteDiff, ignored: bool) -> SiteDiff:
    return replace(site, ignored=ignored) if ignored else site
