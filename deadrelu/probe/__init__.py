"""Tapping ReLU pre-activations while data streams through a model.

Each backend (PyTorch, ONNX) turns a stream of batches into a `StreamResult`: per-site
statistics in execution order. Everything after that (verdicts, reports) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deadrelu.stats import UnitSummary


@dataclass(frozen=True)
class SiteObservation:
    """What the probe saw at one site: its identity and host copy of its statistics."""

    name: str
    op: str  # relu | relu6 | leaky_relu | prelu
    axis: int
    axis_source: str
    stats: UnitSummary
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts for the JSON


@dataclass(frozen=True)
class StreamResult:
    sites: tuple[SiteObservation, ...]
    samples: int
    partial: bool  # interrupted (Ctrl-C) before the data ended
    notes: tuple[str, ...] = ()  # e.g. sites found but not scanned, and why
    engine: str = ""  # how the statistics were computed, e.g. "torch-compiled-graph", "onnxruntime"
