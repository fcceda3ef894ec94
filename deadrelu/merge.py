"""Combining scans of disjoint shards of the data into the scan of all of it, exactly.

A report's per-unit block holds sufficient statistics (count, positive, NaN/Inf counts,
min, max, mean, M2, ReLU-output mean), so counts and extremes add up exactly and moments
combine with Chan's formula. Reports of different models (sha256) or with different site
lists are refused: their units are not the same units.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deadrelu.errors import UsageError
from deadrelu.judge import Thresholds
from deadrelu.report import DataInfo, PartSummary, ScanReport, site_report
from deadrelu.stats import UnitStats


def merge_reports(reports: Sequence[ScanReport], names: Sequence[str], thresholds: Thresholds | None = None) -> ScanReport:
    """One report over the union of the reports' data."""
    if len(reports) < 1:
        raise UsageError("merge needs at least one report")
    first = reports[0]
    for report, name in zip(reports[1:], names[1:]):
        _check_same_model(first, report, names[0], name)
    _check_no_repeats(reports, names)
    judged_with = thresholds or first.thresholds
    sites = []
    for index, site in enumerate(first.sites):
        stats = UnitStats.from_summary(site.stats)
        for other in reports[1:]:
            stats.merge(UnitStats.from_summary(other.sites[index].stats))
        sites.append(site_report(site.name, site.op, site.unit_axis, site.axis_source, stats.result(), judged_with,
                                 dict(site.extra)))
    samples = sum(r.data.samples for r in reports)
    warnings = [w for r in reports for w in r.warnings if "interrupted" not in w]
    differing = sorted({(r.thresholds.near_dead, r.thresholds.tau) for r in reports} - {
        (judged_with.near_dead, judged_with.tau)})
    if differing and thresholds is None:
        warnings.append(f"the reports were judged with different thresholds ({', '.join(f'near-dead {a:g}, tau {b:g}' for a, b in differing)}); "
                        f"the merge is judged with {names[0]}'s (near-dead {judged_with.near_dead:g}, "
                        f"tau {judged_with.tau:g}): re-judge with deadrelu report --near-dead/--tau")
    if any(r.partial for r in reports):
        warnings.append("a merged report was partial (interrupted): the merge covers only what it saw")
    return ScanReport(
        model=first.model,
        data=DataInfo("merged: " + ", ".join(f"{n} ({r.data.source})" for n, r in zip(names, reports)), samples,
                      any(r.data.random for r in reports), tuple(p for r in reports for p in constituents(r)),
                      _kept_summaries(reports)),
        sites=tuple(sites),
        thresholds=judged_with,
        device=first.device,
        engine=first.engine,
        partial=any(r.partial for r in reports),
        warnings=tuple(dict.fromkeys(warnings)),
    )


def fingerprint(report: ScanReport) -> str:
    """What identifies a scan's data, whatever its file was called: its sample count and
    its bit-identical per-unit positive counts and means at every site."""
    digest = hashlib.sha256(str(report.data.samples).encode())
    for site in report.sites:
        digest.update(bytes(memoryview(np.ascontiguousarray(site.stats.positive))))
        digest.update(bytes(memoryview(np.ascontiguousarray(site.stats.mean))))
    return digest.hexdigest()[:32]


def constituents(report: ScanReport) -> tuple[str, ...]:
    """The scans a report holds: a merge's parts, or the scan itself."""
    return report.data.parts or (fingerprint(report),)


def part_summary(report: ScanReport) -> PartSummary:
    """What a merge keeps of a scan to know it again at another batch size."""
    digest = hashlib.sha256(str(report.data.samples).encode())
    sites = []
    for site in report.sites:
        digest.update(bytes(memoryview(np.ascontiguousarray(site.stats.count, dtype=np.int64))))
        digest.update(bytes(memoryview(np.ascontiguousarray(site.stats.positive, dtype=np.int64))))
        sites.append((_finite(site.stats.minimum, np.min), _finite(site.stats.maximum, np.max),
                      _finite(site.stats.mean, np.mean)))
    return PartSummary(report.data.samples, digest.hexdigest()[:32], tuple(sites))


def _finite(values: np.ndarray, reduce: Callable[[np.ndarray], Any]) -> float | None:
    finite = values[np.isfinite(values)]
    return float(reduce(finite)) if finite.size else None


def summaries(report: ScanReport) -> tuple[PartSummary, ...]:
    """The summaries of the scans a report holds (none for a merge written without them)."""
    return report.data.part_summaries if report.data.parts else (part_summary(report),)


def _kept_summaries(reports: Sequence[ScanReport]) -> tuple[PartSummary, ...]:
    held = [summaries(r) for r in reports]
    return () if any(len(h) != len(constituents(r)) for h, r in zip(held, reports)) else tuple(
        p for h in held for p in h)


def _same_part(a: PartSummary, b: PartSummary) -> bool:
    """Whether two summaries are of one data, whatever the batch size (see `_rescanned`)."""
    if (a.samples, a.counts, len(a.sites)) != (b.samples, b.counts, len(b.sites)):
        return False
    for x, y in zip(a.sites, b.sites):
        if any((u is None) != (v is None) for u, v in zip(x, y)):
            return False
        scale = max([abs(v) for v in x[:2] if v is not None] + [1e-30])
        if not all(u is None or abs(u - v) <= RESCAN_RTOL * max(abs(u), abs(v)) + RESCAN_RTOL * scale
                   for u, v in zip(x, y)):
            return False
    return True


def _check_no_repeats(reports: Sequence[ScanReport], names: Sequence[str]) -> None:
    """The same scan given twice (one file twice, a copy, a scan of the same data under
    another file name, or a merged report beside one of its own parts) would count its
    samples twice."""
    seen: dict[str, tuple[str, bool]] = {}  # part -> the report holding it, whether a merge
    for report, name in zip(reports, names):
        merged = bool(report.data.parts)
        for part in constituents(report):
            if part not in seen:
                continue
            other, other_merged = seen[part]
            if other == name:
                what = "given twice"
            elif merged or other_merged:
                what = f"it and {other} hold the same scan (one is a merge that includes it)"
            else:
                what = f"the same scan as {other} (same samples, same statistics)"
            raise UsageError(f"{name}: {what}; merging it again would count its samples twice")
        seen.update(dict.fromkeys(constituents(report), (name, merged)))
    for i, (report, name) in enumerate(zip(reports, names)):  # a merge's part, rescanned, beside it
        for other, other_name in zip(reports[:i], names[:i]):
            if (report.data.parts or other.data.parts) and any(
                    _same_part(a, b) for a in summaries(report) for b in summaries(other)):
                raise UsageError(f"{name}: it and {other_name} hold the same data, scanned again (one is a merge "
                                 "that includes it: same samples, same counts, statistics equal to float rounding); "
                                 "merging it would count its samples twice")
    plain = [(r, n) for r, n in zip(reports, names) if not r.data.parts]
    for i, (report, name) in enumerate(plain):
        for other, other_name in plain[:i]:
            if _rescanned(report, other):
                raise UsageError(f"{name}: the same data as {other_name}, scanned again (same samples, same "
                                 "counts, statistics equal to float rounding); merging it would count its samples twice")


# how far the statistics of one data scanned at two batch sizes differ: the model's own
# kernels round differently (the convnet fixture at -b 16 and -b 7: min/max in the 7th digit)
RESCAN_RTOL = 1e-4


def _rescanned(a: ScanReport, b: ScanReport) -> bool:
    """Whether two scans saw the same data, whatever the batch size: the same sample
    count and per-unit counts and positive counts at every site, and minima, maxima and
    means equal to float rounding. Different data of the same size matching all of these
    at every unit of every site does not happen short of the same data."""
    if a.data.samples != b.data.samples or [s.name for s in a.sites] != [s.name for s in b.sites]:
        return False
    for x, y in zip(a.sites, b.sites):
        if x.stats.count.shape != y.stats.count.shape or not (
                np.array_equal(x.stats.count, y.stats.count) and np.array_equal(x.stats.positive, y.stats.positive)):
            return False
        scale = max(float(np.max(np.abs(x.stats.maximum[np.isfinite(x.stats.maximum)]), initial=0.0)),
                    float(np.max(np.abs(x.stats.minimum[np.isfinite(x.stats.minimum)]), initial=0.0)), 1e-30)
        for u, v in ((x.stats.minimum, y.stats.minimum), (x.stats.maximum, y.stats.maximum),
                     (x.stats.mean, y.stats.mean)):
            if not np.allclose(u, v, rtol=RESCAN_RTOL, atol=RESCAN_RTOL * scale, equal_nan=True):
                return False
    return True


def _check_same_model(first: ScanReport, other: ScanReport, first_name: str, name: str) -> None:
    if first.model.sha256 != other.model.sha256:
        raise UsageError(f"{name}: a scan of another model (sha256 {other.model.sha256[:12]}… vs "
                         f"{first.model.sha256[:12]}… in {first_name}); merge combines scans of one model")
    mine = [(s.name, s.op, s.units, s.unit_axis) for s in first.sites]
    theirs = [(s.name, s.op, s.units, s.unit_axis) for s in other.sites]
    if mine != theirs:
        difference = next((f"{a} vs {b}" for a, b in zip(mine, theirs) if a != b),
                          f"{len(mine)} sites vs {len(theirs)}")
        raise UsageError(f"{name}: its sites differ from {first_name}'s ({difference}); merge needs the same site list")
