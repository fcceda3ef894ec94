"""Verdicts from statistics: which units are dead, near-dead, dormant; collapsed sites.

* dead: no pre-activation > 0 on any sample at any position (+Inf counts as > 0; an exact
  0 or a negative denormal does not).
* near-dead: alive, but the fraction of positive pre-activations is below `near_dead`.
* dormant: the tau-dormant score of Sokar et al. 2023 -- the unit's mean ReLU output over
  the mean of that over the site's units -- is <= `tau`. Dead units are dormant too. When
  every unit's mean output is 0 the score is undefined and every unit counts as dormant.
* collapsed: every unit of the site is dead, so everything downstream sees a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deadrelu.stats import UnitSummary


@dataclass(frozen=True)
class Thresholds:
    near_dead: float = 0.01
    tau: float = 0.1


@dataclass(frozen=True)
class Verdict:
    """Per-site verdict: unit indices, sorted."""

    dead: tuple[int, ...]
    near_dead: tuple[int, ...]
    dormant: tuple[int, ...]
    collapsed: bool


def dormant_scores(summary: UnitSummary) -> np.ndarray:
    relu_mean = summary.relu_mean
    layer_mean = float(relu_mean.mean()) if relu_mean.size else 0.0
    if layer_mean <= 0.0:
        return np.zeros_like(relu_mean)
    return relu_mean / layer_mean


def judge(summary: UnitSummary, thresholds: Thresholds) -> Verdict:
    seen = summary.observed > 0
    dead = seen & (summary.positive == 0)
    near = seen & ~dead & (summary.active_rate < thresholds.near_dead)
    dormant = seen & (dormant_scores(summary) <= thresholds.tau)
    return Verdict(
        dead=_indices(dead),
        near_dead=_indices(near),
        dormant=_indices(dormant),
        collapsed=bool(summary.units > 0 and dead.all()),
    )


def never_fired_bound(samples: int) -> float:
    """Rule of three: a unit that never fired on N samples fires on a sample with
    probability below about 3/N (95% confidence)."""
    return min(1.0, 3.0 / samples) if samples > 0 else 1.0


def _indices(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(mask))
