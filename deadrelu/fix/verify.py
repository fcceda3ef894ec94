"""Verifying a rewrite: re-scan the written model, and compare its outputs to the original's."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from deadrelu.data import ModelInput
from deadrelu.fix.plan import SiteFix
from deadrelu.report import ScanReport

OutputFn = Callable[[ModelInput], list[np.ndarray]]  # a model's outputs for a batch, on the host


@dataclass(frozen=True)
class SiteChange:
    """Dead units of one changed site, before and after."""

    site: str
    site_after: str
    change: str
    units: int
    dead_before: int
    dead_after: int
    zero_variance_units: tuple[int, ...] = ()  # constant before and after: BatchNorm revive cannot move these

    def to_dict(self) -> dict:
        return {"site": self.site, "site_after": self.site_after, "change": self.change, "units": self.units,
                "dead_before": self.dead_before, "dead_after": self.dead_after,
                "zero_variance_units": list(self.zero_variance_units)}


@dataclass(frozen=True)
class OutputDeviation:
    """New model's outputs against the original's on the calibration data."""

    samples: int
    max_abs: float
    mean_abs: float
    relative: float  # mean |new - old| / mean |old|
    top1_agreement: float | None  # when outputs are (N, classes)

    def to_dict(self) -> dict:
        return vars(self).copy()


def site_changes(fixes: Sequence[SiteFix], before: ScanReport, after: ScanReport,
                 zero_variance: dict[int, tuple[int, ...]]) -> tuple[SiteChange, ...]:
    """Per changed site, dead units before -> after. Sites keep their position: a rewrite
    replaces one ReLU call by one ReLU-family call, so site k stays site k."""
    if len(after.sites) != len(before.sites):
        raise ValueError(f"the rewritten model has {len(after.sites)} sites, the original {len(before.sites)}")
    return tuple(
        SiteChange(fix.site, after.sites[fix.index].name, fix.change, fix.units, before.sites[fix.index].dead,
                   after.sites[fix.index].dead, zero_variance.get(fix.index, ()))
        for fix in fixes
    )


def more_dead_elsewhere(fixes: Sequence[SiteFix], before: ScanReport,
                        after: ScanReport) -> tuple[tuple[str, int, int], ...]:
    """Sites the fix left as they were that have more dead units after it (a change upstream
    passes on other values): (site, dead before, dead after)."""
    changed = {fix.index for fix in fixes}
    return tuple((b.name, b.dead, a.dead) for index, (b, a) in enumerate(zip(before.sites, after.sites))
                 if index not in changed and a.dead > b.dead)


def output_deviation(batches: Iterable[ModelInput], original: OutputFn, rewritten: OutputFn) -> OutputDeviation:
    samples, max_abs, abs_sum, ref_sum, elements, agree = 0, 0.0, 0.0, 0.0, 0, 0
    classes = True
    for batch in batches:
        olds, news = original(batch), rewritten(batch)
        if len(olds) != len(news) or any(np.shape(a) != np.shape(b) for a, b in zip(olds, news)):
            raise ValueError(f"the rewritten model gives {len(news)} outputs of shapes {[np.shape(b) for b in news]}, "
                             f"the original {len(olds)} of {[np.shape(a) for a in olds]}")
        for old, new in zip(olds, news):  # every output counts in the differences
            old, new = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
            diff = np.abs(new - old)
            max_abs = max(max_abs, float(np.nanmax(diff)) if diff.size else 0.0)
            abs_sum += float(np.nansum(diff))
            ref_sum += float(np.nansum(np.abs(old)))
            elements += diff.size
        samples += batch.size
        first_old = np.asarray(olds[0]) if olds else np.zeros(0)
        classes = classes and first_old.ndim == 2 and first_old.shape[1] > 1  # top-1 of the first output
        if classes:
            agree += int((first_old.argmax(1) == np.asarray(news[0]).argmax(1)).sum())
    mean_abs = abs_sum / elements if elements else 0.0
    reference = ref_sum / elements if elements else 0.0
    return OutputDeviation(samples, max_abs, mean_abs, mean_abs / reference if reference else 0.0,
                           agree / samples if classes and samples else None)
