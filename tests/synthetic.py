"""Hand-made reports with exactly known verdicts, for gate, format and diff tests.

`make_report([Site("a", 8, dead=(1,), near=(2,))])` builds a `ScanReport` whose statistics
judge (with the default thresholds) to exactly those dead and near-dead units; every other
unit fires on half of its positions, so it is neither near-dead nor dormant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deadrelu.judge import Thresholds
from deadrelu.report import DataInfo, ModelInfo, ScanReport, site_report
from deadrelu.stats import UnitSummary

COUNT = 1000  # finite pre-activations per unit


@dataclass(frozen=True)
class Site:
    name: str
    units: int
    dead: tuple[int, ...] = ()
    near: tuple[int, ...] = ()
    dormant: tuple[int, ...] = ()  # alive and not near-dead, but with a tiny mean output
    op: str = "relu"


def summary(site: Site) -> UnitSummary:
    n = site.units
    count = np.full(n, float(COUNT))
    positive = np.full(n, COUNT // 2, dtype=np.int64)
    relu_mean = np.ones(n)
    maximum = np.linspace(1.0, 3.0, n) if n else np.zeros(0)
    minimum = -maximum
    mean = np.zeros(n)
    for u in site.dormant:
        relu_mean[u] = 0.01  # tau score ~0.01 <= 0.1
    for u in site.near:
        positive[u], relu_mean[u], maximum[u] = 3, 0.5, 0.7  # active rate 0.003 < 0.01; not dormant
    for u in site.dead:
        positive[u], relu_mean[u], maximum[u], minimum[u], mean[u] = 0, 0.0, -1.0, -3.0, -2.0
    return UnitSummary(count=count, positive=positive, nan=np.zeros(n, dtype=np.int64),
                       inf=np.zeros(n, dtype=np.int64), minimum=minimum, maximum=maximum, mean=mean,
                       m2=np.full(n, 0.25 * COUNT), relu_sum=relu_mean * count)


def make_report(sites: list[Site], path: str = "models/net.pt", samples: int = 100,
                warnings: tuple[str, ...] = ()) -> ScanReport:
    thresholds = Thresholds()
    reports = tuple(site_report(s.name, s.op, 1, "conv", summary(s), thresholds) for s in sites)
    return ScanReport(
        model=ModelInfo(path, "torchscript", "0" * 64),
        data=DataInfo("calib.npy", samples),
        sites=reports,
        thresholds=thresholds,
        device="cpu",
        warnings=warnings,
    )


# A small model with something of everything: a clean site, dead and near-dead units, a
# collapsed site, and names that need escaping in Markdown, GitHub commands and XML.
SAMPLE = [
    Site("stem.relu", 8, dead=(3,)),
    Site("layer1.0.relu", 16, dead=(1, 5, 9), near=(2,)),
    Site("layer1.0.relu_1", 16, dormant=(6,)),
    Site("head.fc|act:1,x%y", 4, dead=(0, 1, 2, 3)),
    Site("a_very_long_site_name.blocks.11.attention.output.projection.activation_function", 32, near=(4, 7)),
]


def sample_report() -> ScanReport:
    return make_report(SAMPLE, warnings=("random data: says little about a trained model",))
