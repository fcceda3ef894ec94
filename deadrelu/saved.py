"""Saved JSON reports back into `ScanReport`s, so they can be re-judged and re-rendered.

A report's `per_unit` block holds sufficient statistics (count, positive, mean, M2, min,
max, ReLU-output mean, and NaN/Inf counts), so `deadrelu report scan.json` and
`deadrelu diff old.json new.json` need neither the model nor the data: verdicts are
recomputed from the statistics with the thresholds asked for now, exactly as a scan would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from deadrelu.errors import SavedReportError
from deadrelu.judge import Thresholds
from deadrelu.report import SCHEMA_VERSION, DataInfo, ModelInfo, PartSummary, ScanReport, SiteReport, site_report
from deadrelu.stats import UnitSummary

# Keys of a site object that the report itself writes; anything else is backend-specific
# (e.g. the ONNX tensor name) and is carried through unchanged.
_SITE_KEYS = frozenset({
    "name", "op", "leaky", "unit_axis", "axis_source", "units", "dead", "dead_units", "near_dead",
    "near_dead_units", "dormant", "dormant_units", "collapsed", "active_rate", "nonfinite", "preact",
    "per_unit",
})
_REQUIRED_PER_UNIT = ("count", "positive", "mean", "m2", "min", "max", "relu_mean")


def load_report(path: str | Path, thresholds: Thresholds | None = None) -> ScanReport:
    """Read a JSON report written by `deadrelu scan --json/--format json`.

    Args:
        path: the JSON file.
        thresholds: verdict thresholds to judge with; None keeps the report's own.

    Raises:
        SavedReportError: the file is missing, not JSON, or not a deadrelu report (the
            message names the file and the offending key).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SavedReportError(f"{path}: no such report file") from None
    except OSError as exc:
        raise SavedReportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SavedReportError(f"{path}: not a text file (expected a deadrelu JSON report, as `scan --json` writes "
                               "it; a model is scanned with `deadrelu scan`)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SavedReportError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise SavedReportError(f"{path}: not a deadrelu report (JSON nested too deeply)") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise SavedReportError(f"{path}: not a deadrelu report (an integer with thousands of digits; "
                               "edited or corrupted?)") from None
    return report_from_dict(doc, str(path), thresholds)


def report_from_dict(doc: Any, source: str = "<report>", thresholds: Thresholds | None = None) -> ScanReport:
    """Rebuild a `ScanReport` from a report document (see `load_report`)."""
    where = _Where(source)
    if not isinstance(doc, dict):
        raise where.error("", "expected a JSON object (a deadrelu report)")
    _check_integer_sizes(doc, where)
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise where.error("schema_version", f"expected {SCHEMA_VERSION}, got {version!r}"
                          + ("" if version is not None else " (is this a deadrelu report?)"))
    model = where.obj(doc, "model")
    data = where.obj(doc, "data")
    saved = where.obj(doc, "thresholds", required=False)
    judged_with = thresholds or Thresholds(
        near_dead=where.number(saved, "near_dead", Thresholds.near_dead, 0.0, 1.0, "thresholds."),
        tau=where.number(saved, "tau", Thresholds.tau, 0.0, float("inf"), "thresholds."))
    sites = where.items(doc, "sites")
    _check_site_names_unique(sites, where)
    warnings = where.texts(doc, "warnings")
    reports = []
    for index, site in enumerate(sites):
        at = where.at(f"sites[{index}]")
        if not isinstance(site, dict):
            raise at.error("", "expected an object")
        name, op = at.text(site, "name"), at.text(site, "op")
        unit_axis = at.integer(site, "unit_axis", minimum=0)
        summary, lacks_nonfinite = _summary(site, at)
        if lacks_nonfinite:
            warnings.append(f"{name}: the saved report has no per-unit NaN/Inf counts; "
                            "active rates of units that saw non-finite values may differ slightly")
        extra = {k: v for k, v in site.items() if k not in _SITE_KEYS}
        rebuilt = site_report(name, op, unit_axis, str(site.get("axis_source", "default")), summary, judged_with, extra)
        _check_derived(site, rebuilt, at)
        if not lacks_nonfinite and isinstance(site.get("per_unit", {}).get("nan"), list):
            _check_verdicts(site, rebuilt, summary, at, own_thresholds=thresholds is None)
        reports.append(rebuilt)
    report = ScanReport(
        model=ModelInfo(where.text(model, "path", "model."), where.text(model, "format", "model."),
                        str(model.get("sha256", ""))),
        data=DataInfo(where.text(data, "source", "data."), where.integer(data, "samples", "data.", minimum=0),
                      where.flag(data, "random", "data."), tuple(where.texts(data, "parts", "data.")),
                      _part_summaries(data, where)),
        sites=tuple(reports),
        thresholds=judged_with,
        device=str(doc.get("device", "")),
        engine=str(doc.get("engine", "")),
        partial=where.flag(doc, "partial"),
        warnings=tuple(warnings),
    )
    _check_summary(doc.get("summary"), report, where, own_thresholds=thresholds is None)
    return report


_INT64_MAX = 2**63 - 1


def _check_integer_sizes(doc: dict, where: _Where) -> None:
    """No integer beyond int64 anywhere (counts are int64 in a scan; a larger one is an
    edit or a corruption, and would overflow a float or a numpy array further on)."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        key, value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(v, (dict, list)):
                stack.append((_key(key, k), v))
            elif type(v) is int and not -_INT64_MAX <= v <= _INT64_MAX:
                digits = str(abs(v))
                raise where.error(_key(key, k), f"an integer of {len(digits)} digits ({'-' if v < 0 else ''}"
                                                f"{digits[:6]}...), beyond what a scan writes (edited or corrupted?)")


def _key(parent: str, key: str | int) -> str:
    """A JSON path as the error messages write it: `sites[0].per_unit.count[3]`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _check_site_names_unique(sites: list, where: _Where) -> None:
    """Each site is named once: diff, baselines and merge pair sites by name, so a repeated
    name would pair the wrong ones."""
    seen: dict[str, int] = {}
    for index, site in enumerate(sites):
        name = site.get("name") if isinstance(site, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            raise where.error(f"sites[{index}].name", f"{name!r} is also the name of sites[{seen[name]}]; a report "
                                                      "names each site once (edited or corrupted?)")
        seen[name] = index


def _check_summary(stored: Any, report: ScanReport, where: _Where, own_thresholds: bool) -> None:
    """The summary block's whole counts are those of the sites (a CI job may read it
    rather than the sites): a difference means the file was edited or corrupted."""
    if not isinstance(stored, dict):
        return
    computed = report.summary()
    keys = ("sites", "units", "dead") + (("near_dead",) if own_thresholds else ())
    for key in keys:
        value = stored.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value != computed[key]:
            raise where.error(f"summary.{key}", f"says {value}, but the report's sites give {computed[key]}: "
                                                "the report contradicts itself (edited or corrupted?)")


_COUNT_COLUMNS = ("count", "positive", "nan", "inf")  # non-negative integers, never null


def _summary(site: dict, at: _Where) -> tuple[UnitSummary, bool]:
    per_unit = at.obj(site, "per_unit")
    units = at.integer(site, "units", minimum=0)
    columns = {}
    for key in (*_REQUIRED_PER_UNIT, "nan", "inf"):
        values = per_unit.get(key)
        if values is None:
            if key in _REQUIRED_PER_UNIT:
                raise at.error(f"per_unit.{key}", "missing (a report from an older deadrelu cannot be re-judged)")
            continue
        if not isinstance(values, list) or len(values) != units:
            raise at.error(f"per_unit.{key}", f"expected a list of {units} values (one per unit)")
        if any(isinstance(v, bool) or not (v is None or isinstance(v, (int, float))) for v in values):
            raise at.error(f"per_unit.{key}", "expected numbers")
        column = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        if key in _COUNT_COLUMNS and not (np.isfinite(column) & (column >= 0) & (column == np.rint(column))).all():
            raise at.error(f"per_unit.{key}", "expected counts (whole numbers >= 0)")
        columns[key] = column
    if (columns["positive"] > columns["count"] + columns.get("inf", np.inf)).any():
        raise at.error("per_unit.positive", "more positive values than values seen (count + inf)")
    if (columns["m2"] < 0).any():
        raise at.error("per_unit.m2", "a sum of squared deviations cannot be negative")
    _check_bounds(columns, at)
    _check_moments(columns, at)
    count = columns["count"]
    zeros = np.zeros(units, dtype=np.int64)
    nonfinite = site.get("nonfinite")
    nonfinite = nonfinite if isinstance(nonfinite, dict) else {}
    lacks_nonfinite = "nan" not in columns and bool(nonfinite.get("nan", 0) or nonfinite.get("inf", 0))
    summary = UnitSummary(
        count=count,
        positive=columns["positive"].astype(np.int64),
        nan=columns["nan"].astype(np.int64) if "nan" in columns else zeros,
        inf=columns["inf"].astype(np.int64) if "inf" in columns else zeros,
        minimum=np.nan_to_num(columns["min"], nan=np.inf, posinf=np.inf, neginf=-np.inf),
        maximum=np.nan_to_num(columns["max"], nan=-np.inf, posinf=np.inf, neginf=-np.inf),
        mean=np.nan_to_num(columns["mean"], nan=0.0),
        m2=np.nan_to_num(columns["m2"], nan=0.0),
        relu_sum=np.nan_to_num(columns["relu_mean"], nan=0.0) * count,
    )
    return summary, lacks_nonfinite


def _check_bounds(columns: dict[str, np.ndarray], at: _Where) -> None:
    """min <= max, and a unit with more positive values than infinities has a positive max
    (+Inf counts as positive but is kept out of min/max, so a unit whose only positives
    are +Inf has a max <= 0, or none): a report edited or corrupted into contradicting
    itself would give verdicts of nothing that was measured."""
    low, high = columns["min"], columns["max"]
    infinities = columns["inf"] if "inf" in columns else np.zeros_like(columns["positive"])
    with np.errstate(invalid="ignore"):
        crossed = np.flatnonzero(low > high)
        unmet = np.flatnonzero((columns["positive"] > infinities) & ~(high > 0))
    if crossed.size:
        u = int(crossed[0])
        raise at.error("per_unit.min", f"unit {u} has min {low[u]:g} > max {high[u]:g}")
    if unmet.size:
        u = int(unmet[0])
        raise at.error("per_unit.positive", f"unit {u} has {int(columns['positive'][u])} positive values but "
                       f"max {high[u]:g}")


# A scan's per-unit sums are float32 (bfloat16/float16 for such a scan's batch sums)
# before they are float64, so a mean can stray past its unit's min or max by rounding:
# by at most this fraction of the unit's largest magnitude, far more than rounding gives.
_ROUNDING = 1e-2
# What the report derives in float64 from the other per-unit figures (std from m2 and
# count, rates from counts, the site's moments) it writes to full precision.
_DERIVED = 1e-9


def _check_moments(columns: dict[str, np.ndarray], at: _Where) -> None:
    """The moments of a unit that saw finite values agree with each other: finite, a mean
    within [min, max], a ReLU-output mean within [max(mean, 0), max(max, 0)], and a std no
    larger than half the range (Popoviciu). A report edited or corrupted past these would
    give std, dormant verdicts and fix suggestions of nothing that was measured."""
    seen = columns["count"] > 0
    for key in ("min", "max", "mean", "m2", "relu_mean"):
        odd = np.flatnonzero(seen & ~np.isfinite(columns[key]))
        if odd.size:
            u = int(odd[0])
            raise at.error(f"per_unit.{key}", f"unit {u} saw {int(columns['count'][u])} finite values, but its "
                                              f"{key} is {_shown(columns[key][u])}{_CONTRADICTS}")
    low, high, mean, relu_mean = columns["min"], columns["max"], columns["mean"], columns["relu_mean"]
    with np.errstate(invalid="ignore", divide="ignore"):
        slack = _ROUNDING * np.maximum(np.abs(low), np.abs(high))
        std = np.sqrt(columns["m2"] / columns["count"])
        checks = (  # (column, its value, where wrong, why)
            ("mean", mean, seen & ((mean < low - slack) | (mean > high + slack)), "outside its min {lo:g} .. max {hi:g}"),
            ("relu_mean", relu_mean, relu_mean < 0, "below 0 (a mean of max(x, 0))"),
            ("relu_mean", relu_mean, seen & ((relu_mean < mean - slack) | (relu_mean > np.maximum(high, 0) + slack)),
             "outside max(mean, 0) .. max(max, 0) ({a:g} .. {b:g})"),
            ("m2", columns["m2"], seen & (std > (high - low) / 2 + slack),
             "a std of {s:g}, more than half its range {lo:g} .. {hi:g} (which no values can have)"),
        )
    for key, value, wrong, why in checks:
        odd = np.flatnonzero(wrong)
        if odd.size:
            u = int(odd[0])
            text = why.format(lo=low[u], hi=high[u], a=max(mean[u], 0.0), b=max(high[u], 0.0), s=std[u])
            raise at.error(f"per_unit.{key}", f"unit {u} has {key} {value[u]:g}, {text}{_CONTRADICTS}")


_CONTRADICTS = ": the report contradicts itself (edited or corrupted?)"


def _shown(value: float) -> str:
    return "null" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _check_derived(site: dict, rebuilt: SiteReport, at: _Where) -> None:
    """What the report writes as derived figures (per unit: std and active rate; per site:
    the active rate and the pre-activation moments) is what its sufficient statistics
    give: a CI job may read those rather than the per-unit counts and sums."""
    stats, per_unit = rebuilt.stats, site.get("per_unit", {})
    seen = stats.count > 0
    for key, computed, where_defined in (("std", stats.std, seen), ("active_rate", stats.active_rate,
                                                                        stats.observed > 0)):
        stored = per_unit.get(key)
        if not isinstance(stored, list) or len(stored) != rebuilt.units:
            continue
        values = np.array([np.nan if not isinstance(v, (int, float)) or isinstance(v, bool) else float(v)
                           for v in stored], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            wrong = where_defined & ~(np.abs(values - computed) <= _DERIVED * np.abs(computed) + 1e-300)
        odd = np.flatnonzero(wrong)
        if odd.size:
            u = int(odd[0])
            raise at.error(f"per_unit.{key}", f"unit {u} says {values[u]:g}, but its counts and sums give "
                                              f"{computed[u]:g}{_CONTRADICTS}")
    preact = site.get("preact")
    figures = {**(vars(rebuilt.preact) if isinstance(preact, dict) else {}), "active_rate": rebuilt.active_rate}
    stored_figures = {**(preact if isinstance(preact, dict) else {}), "active_rate": site.get("active_rate")}
    scale = max(abs(rebuilt.preact.min), abs(rebuilt.preact.max), 1.0) if np.isfinite(rebuilt.preact.min) else 1.0
    for key, computed in figures.items():
        value = stored_figures.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(computed):
            continue
        if abs(value - computed) > _DERIVED * (scale if key != "active_rate" else 1.0):
            name = f"preact.{key}" if key != "active_rate" else key
            raise at.error(name, f"says {value:g}, but the per-unit statistics give {computed:g}{_CONTRADICTS}")


def _check_verdicts(site: dict, rebuilt: SiteReport, summary: UnitSummary, at: _Where, own_thresholds: bool) -> None:
    """The units the file lists as dead (and, judged with its own thresholds, near-dead)
    are those its per-unit counts give: both are exact functions of whole counts, so a
    difference means the file was edited or corrupted, and which one to believe is
    unknown. (Dormant units rest on rounded means and are not compared.)"""
    listed = [("dead_units", rebuilt.verdict.dead)]
    if own_thresholds:
        listed.append(("near_dead_units", rebuilt.verdict.near_dead))
    for key, computed in listed:
        count = site.get(key.removesuffix("_units"))
        if isinstance(count, int) and not isinstance(count, bool) and count != len(computed):
            raise at.error(key.removesuffix("_units"), f"says {count}, but the report's per-unit counts give "
                                                      f"{len(computed)}: the report contradicts itself (edited or corrupted?)")
        stored = site.get(key)
        if not isinstance(stored, list) or stored == list(computed):
            continue
        odd = sorted(set(map(str, stored)) ^ set(map(str, computed)), key=lambda u: (len(u), u))[0]
        why = ""
        if odd.isdigit() and int(odd) < rebuilt.units:
            u = int(odd)
            why = f" (unit {u} has {int(summary.positive[u])} positive of {int(summary.count[u])} values)"
        raise at.error(key, f"lists units {_short(stored)}, but the report's per-unit counts give {_short(list(computed))}"
                            f"{why}: the report contradicts itself (edited or corrupted?)")


def _short(units: list, shown: int = 8) -> str:
    return "[" + ", ".join(map(str, units[:shown])) + (", ..." if len(units) > shown else "") + "]"


def _part_summaries(data: dict, where: _Where) -> tuple[PartSummary, ...]:
    """A merge's `data.part_summaries` (absent: none), one per part."""
    value = data.get("part_summaries", [])
    parts = data.get("parts", [])
    if not isinstance(value, list) or (value and (not isinstance(parts, list) or len(value) != len(parts))):
        raise where.error("data.part_summaries", "expected a list with one summary per part")
    summaries = []
    for index, item in enumerate(value):
        at = where.at(f"data.part_summaries[{index}]")
        if not isinstance(item, dict):
            raise at.error("", "not an object")
        sites = at.items(item, "sites")
        if not all(isinstance(s, list) and len(s) == 3 and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in s) for s in sites):
            raise at.error("sites", "expected [min, max, mean] (numbers or null) per site")
        summaries.append(PartSummary(at.integer(item, "samples", minimum=0), at.text(item, "counts"),
                                     tuple(tuple(None if v is None else float(v) for v in s) for s in sites)))
    return tuple(summaries)


class _Where:
    """Error messages that name the file and the key."""

    def __init__(self, source: str, prefix: str = "") -> None:
        self.source, self.prefix = source, prefix

    def at(self, prefix: str) -> _Where:
        return _Where(self.source, prefix)

    def error(self, key: str, message: str) -> SavedReportError:
        name = ".".join(p for p in (self.prefix, key) if p)
        return SavedReportError(f"{self.source}: {name + ': ' if name else ''}{message}")

    def obj(self, doc: dict, key: str, required: bool = True) -> dict:
        value = doc.get(key)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, "missing or not an object")
        return value

    def items(self, doc: dict, key: str) -> list:
        value = doc.get(key)
        if not isinstance(value, list):
            raise self.error(key, "missing or not a list")
        return value

    def text(self, doc: dict, key: str, prefix: str = "") -> str:
        value = doc.get(key)
        if not isinstance(value, str):
            raise self.error(prefix + key, "missing or not a string")
        return value

    def flag(self, doc: dict, key: str, prefix: str = "") -> bool:
        """An optional true/false (absent: false); "no" or 0 is an error, not a truth value."""
        value = doc.get(key, False)
        if not isinstance(value, bool):
            raise self.error(prefix + key, "not true or false")
        return value

    def integer(self, doc: dict, key: str, prefix: str = "", minimum: int | None = None) -> int:
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(prefix + key, "missing or not an integer")
        if minimum is not None and value < minimum:
            raise self.error(prefix + key, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, doc: dict, key: str, default: float, low: float, high: float, prefix: str = "") -> float:
        """An optional number in [low, high] (absent or null: the default)."""
        value = doc.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.error(prefix + key, f"expected a number from {low:g} to {high:g}, got {value!r}")
        return float(value)

    def texts(self, doc: dict, key: str, prefix: str = "") -> list[str]:
        """An optional list of strings (absent: empty)."""
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(prefix + key, "expected a list of strings")
        return list(value)


def rejudge(report: ScanReport, thresholds: Thresholds) -> ScanReport:
    """The same statistics judged with other verdict thresholds."""
    from dataclasses import replace

    from deadrelu.judge import judge

    sites = tuple(replace(s, verdict=judge(s.stats, thresholds)) for s in report.sites)
    return replace(report, sites=sites, thresholds=thresholds)
