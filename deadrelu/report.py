"""The scan report: typed records and their JSON document (schema_version 1)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from deadrelu.judge import Thresholds, Verdict, judge, never_fired_bound
from deadrelu.stats import UnitSummary

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Moments:
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class SiteReport:
    """One ReLU call site: statistics and verdicts."""

    name: str
    op: str  # relu | relu6 | leaky_relu | prelu
    unit_axis: int
    axis_source: str  # conv | linear | default
    verdict: Verdict
    stats: UnitSummary
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts (e.g. onnx tensor)

    @property
    def leaky(self) -> bool:
        return self.op in ("leaky_relu", "prelu")

    @property
    def units(self) -> int:
        return self.stats.units

    @property
    def dead(self) -> int:
        return len(self.verdict.dead)

    @property
    def active_rate(self) -> float:
        observed = float(self.stats.observed.sum())
        return float(self.stats.positive.sum()) / observed if observed else 0.0

    @property
    def preact(self) -> Moments:
        return Moments(*self.stats.site_moments())

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        moments = self.preact
        return {
            "name": self.name,
            "op": self.op,
            "leaky": self.leaky,
            "unit_axis": self.unit_axis,
            "axis_source": self.axis_source,
            "units": self.units,
            "dead": self.dead,
            "dead_units": list(self.verdict.dead),
            "near_dead": len(self.verdict.near_dead),
            "near_dead_units": list(self.verdict.near_dead),
            "dormant": len(self.verdict.dormant),
            "dormant_units": list(self.verdict.dormant),
            "collapsed": self.verdict.collapsed,
            "active_rate": self.active_rate,
            "nonfinite": {"nan": int(s.nan.sum()), "inf": int(s.inf.sum())},
            "preact": {k: _num(v) for k, v in vars(moments).items()},
            "per_unit": {
                "max": _nums(s.maximum),
                "min": _nums(s.minimum),
                "mean": _nums(s.mean),
                "std": _nums(s.std),
                "active_rate": _nums(s.active_rate),
                "relu_mean": _nums(s.relu_mean),
                "count": [int(v) for v in s.count],
                "positive": [int(v) for v in s.positive],
                "m2": _nums(s.m2),
                "nan": [int(v) for v in s.nan],
                "inf": [int(v) for v in s.inf],
            },
            **self.extra,
        }


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str
    sha256: str


@dataclass(frozen=True)
class PartSummary:
    """What a merge keeps of one scan it combines, to know that scan again when it was
    redone at another batch size (bits differ then, so its fingerprint does): the sample
    count, a hash of the per-unit counts and positive counts (integers: the same at any
    batch size), and per site the smallest minimum, largest maximum and mean of the
    per-unit means (None where no value was finite)."""

    samples: int
    counts: str
    sites: tuple[tuple[float | None, float | None, float | None], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "counts": self.counts, "sites": [list(s) for s in self.sites]}


@dataclass(frozen=True)
class DataInfo:
    source: str
    samples: int
    random: bool = False
    # A merge's: the fingerprints of the scans it combines (`deadrelu.merge.fingerprint`),
    # so a later merge can refuse one of them given again. Empty for a scan.
    parts: tuple[str, ...] = ()
    # A merge's, one per part when every part had one (merges written before they existed do not)
    part_summaries: tuple[PartSummary, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"source": self.source, "samples": self.samples, "random": self.random}
        if self.parts:
            doc["parts"] = list(self.parts)
        if self.part_summaries:
            doc["part_summaries"] = [p.to_dict() for p in self.part_summaries]
        return doc


@dataclass(frozen=True)
class ScanReport:
    """Everything a scan found. `to_dict()` is the JSON document of the CLI."""

    model: ModelInfo
    data: DataInfo
    sites: tuple[SiteReport, ...]
    thresholds: Thresholds
    device: str
    partial: bool = False
    warnings: tuple[str, ...] = ()
    engine: str = ""  # how the statistics were computed (see README: "How a scan runs")

    @property
    def units(self) -> int:
        return sum(s.units for s in self.sites)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.sites)

    @property
    def dead_fraction(self) -> float:
        return self.dead / self.units if self.units else 0.0

    @property
    def collapsed_sites(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites if s.verdict.collapsed)

    def summary(self) -> dict[str, Any]:
        return {
            "sites": len(self.sites),
            "units": self.units,
            "dead": self.dead,
            "dead_fraction": self.dead_fraction,
            "near_dead": sum(len(s.verdict.near_dead) for s in self.sites),
            "dormant": sum(len(s.verdict.dormant) for s in self.sites),
            "collapsed_sites": list(self.collapsed_sites),
            "never_fired_bound": never_fired_bound(self.data.samples),
        }

    def to_dict(self) -> dict[str, Any]:
        from deadrelu import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "deadrelu_version": __version__,
            "partial": self.partial,
            "model": vars(self.model).copy(),
            "data": self.data.to_dict(),
            "device": self.device,
            "engine": self.engine,
            "thresholds": vars(self.thresholds).copy(),
            "sites": [s.to_dict() for s in self.sites],
            "summary": self.summary(),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def site_report(name: str, op: str, axis: int, axis_source: str, stats: UnitSummary,
                thresholds: Thresholds, extra: dict[str, Any] | None = None) -> SiteReport:
    return SiteReport(name, op, axis, axis_source, judge(stats, thresholds), stats, extra or {})


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the report document, shipped in the package."""
    text = resources.files("deadrelu").joinpath("report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _num(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _nums(values: np.ndarray) -> list[float | None]:
    return [_num(v) for v in np.asarray(values, dtype=np.float64)]
