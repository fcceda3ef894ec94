"""Command-line options shared by `scan`, `report` and `diff`: gates, formats, configuration.

Only parsing lives here: flags become a `config.Settings` (None where a flag was not given,
so that the configuration file's value applies) and a `ci.OutputOptions`.
"""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from deadrelu.ci import OutputOptions
from deadrelu.config import Settings
from deadrelu.data import RANDOM, DataOptions, ImageOptions, parse_normalisation
from deadrelu.errors import UsageError
from deadrelu.formats import FORMAT_NAMES, get_format
from deadrelu.gates import FailOn
from deadrelu.sites import AxisOverride


def file_path(value: str | Path) -> Path:
    """A path that may not be empty: click turns '' into Path('') ('.'), so `-o "$OUT"` with OUT
    unset would be reported as the directory '.'; it is refused as the empty path it is."""
    if not str(value).strip():
        raise typer.BadParameter("the path is empty; give a file path")
    return Path(value)


def number_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    """A parser of a number in [low, high]: typer's own range check reads ``nan`` as above
    the top ("should be less than or equal to 1"), which says nothing of what is wrong."""
    def parse(text: str | float) -> float:
        try:
            value = float(text)
        except ValueError:
            raise typer.BadParameter(f"expected a number, got {text!r}") from None
        if not low <= value <= high:
            wanted = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
            raise typer.BadParameter(f"expected a number {wanted}, got {text}")
        return value
    return parse


def unit_axis(text: str | AxisOverride) -> AxisOverride:
    """``--unit-axis GLOB=DIM`` (the last ``=`` splits: a glob may hold one)."""
    if isinstance(text, AxisOverride):
        return text
    pattern, equals, dim = str(text).rpartition("=")
    try:
        number = int(dim)
    except ValueError:
        number = None
    if not equals or not pattern or number is None:
        raise typer.BadParameter(f"expected GLOB=DIM, e.g. 'blocks.*.act=2' or 'head=-1', got {text!r}")
    if number == 0:
        raise typer.BadParameter(f"{text}: dim 0 holds the samples; the units are on another dim")
    return AxisOverride(pattern, number)


FRACTION = number_in(0.0, 1.0)
NON_NEGATIVE = number_in(0.0)

FormatName = enum.Enum("FormatName", {name.upper(): name for name in FORMAT_NAMES}, type=str)  # type: ignore[misc]
# The formats that render `deadrelu diff` (its --help lists only these).
DiffFormatName = enum.Enum("DiffFormatName", {name.upper(): name for name in FORMAT_NAMES  # type: ignore[misc]
                                              if get_format(name).supports_diff}, type=str)

FailOnOpt = Annotated[Optional[FailOn], typer.Option(
    "--fail-on", case_sensitive=False,
    help="Which findings the gates count: dead; near-dead (and dead); dormant (and both); collapsed sites. "
         "Alone, without a --max-* threshold: fail on any. Default: dead, once a threshold is set.")]
MaxDeadOpt = Annotated[Optional[int], typer.Option(
    "--max-dead", min=0, help="Fail when more than N units (of the --fail-on kind) are counted over all sites.")]
MaxDeadFractionOpt = Annotated[Optional[float], typer.Option(
    "--max-dead-fraction", parser=FRACTION, metavar="F", help="Fail when counted units / all units exceeds F.")]
MaxSiteDeadFractionOpt = Annotated[Optional[float], typer.Option(
    "--max-site-dead-fraction", parser=FRACTION, metavar="F", help="Fail when counted units / units of any one site exceeds F.")]
IgnoreOpt = Annotated[Optional[list[str]], typer.Option(
    "--ignore", metavar="GLOB", help="Leave sites matching GLOB out of the gates (repeatable; replaces the config's ignore).")]
BaselineOpt = Annotated[Optional[Path], typer.Option(
    "--baseline", metavar="REPORT.json", parser=file_path,
    help="Count only findings not in this earlier JSON report (sites matched by name): no new dead units.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE", parser=file_path,
    help="Read the tool.deadrelu table from FILE instead of the nearest pyproject.toml. Flags override it.")]
FormatOpt = Annotated[FormatName, typer.Option(
    "--format", "-f", case_sensitive=False, help="Report format on stdout (or -o FILE).")]
DiffFormatOpt = Annotated[DiffFormatName, typer.Option(
    "--format", "-f", case_sensitive=False, help="Diff format on stdout (or -o FILE).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", parser=file_path, help="Write the report to FILE (atomically) instead of stdout.")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Report failed gates, but exit 0.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Print only the summary line (stderr); the exit code tells the rest. -o files are still written.")]


# Reading the calibration data: `scan` and `fix` (which scans first) take the same flags.
InputShapeOpt = Annotated[Optional[str], typer.Option(
    "--input-shape", help="Per-sample shape for --data random, e.g. 3,224,224.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes for image folders and Datasets.")]
ImageSizeOpt = Annotated[int, typer.Option(
    "--image-size", min=1, help="Image folders: resize the shorter side and centre-crop to this.")]
MeanOpt = Annotated[Optional[str], typer.Option(
    "--mean", help="Image folders: normalisation mean, a preset (imagenet, clip, half, none) or numbers.")]
StdOpt = Annotated[Optional[str], typer.Option(
    "--std", help="Image folders: normalisation std, a preset or numbers (default: the --mean preset's).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --data random.")]
UnitAxisOpt = Annotated[Optional[list[AxisOverride]], typer.Option(
    "--unit-axis", metavar="GLOB=DIM", parser=unit_axis,
    help="The units of the sites matching GLOB are on DIM (negative: from the end), whatever their producer "
         "suggests; repeatable, the first match wins. E.g. 'blocks.*.act=2'.")]
WeightsKeyOpt = Annotated[Optional[str], typer.Option(
    "--weights-key", metavar="KEY", help="Checkpoint dict: the entry holding the weights to load, e.g. ema "
                                         "(default: the first of state_dict, model_state_dict, model, ...).")]
CompileOpt = Annotated[str, typer.Option(
    "--compile", help="PyTorch: torch.compile the model with its statistics (auto: when the data would take the eager "
                      "path over a minute). ONNX on CPU: build and use deadrelu's one-pass kernel (auto: when a C "
                      "compiler is found). auto, on, off.")]


def data_options_from_flags(data: str | None, *, input_shape: str | None, seed: int, workers: int, image_size: int,
                            mean: str | None, std: str | None) -> DataOptions:
    """The data flags as `DataOptions`; --input-shape is refused for data it cannot shape
    (anything but `--data random`), rather than ignored."""
    shape = parse_shape(input_shape)
    if shape is not None and data is not None and data != RANDOM:
        raise UsageError(f"--input-shape applies to --data random only (the shape of {data}'s samples is its own)")
    normalise = parse_normalisation(mean, std)
    return DataOptions(input_shape=shape, seed=seed, workers=workers,
                       image=ImageOptions(image_size, normalise[0], normalise[1], workers))


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """`3,224,224` or `3x224x224`: every part a positive integer."""
    if not text:
        return None
    parts = [part.strip() for part in re.split(r"[,x]", text.strip())]
    if not all(part.isdigit() for part in parts):
        raise UsageError(f"--input-shape '{text}': expected positive integers like 3,224,224")
    shape = tuple(int(part) for part in parts)
    if any(d < 1 for d in shape):
        raise UsageError(f"--input-shape '{text}': expected positive integers like 3,224,224")
    return shape


def settings_from_flags(*, fail_on: FailOn | None = None, max_dead: int | None = None,
                        max_dead_fraction: float | None = None, max_site_dead_fraction: float | None = None,
                        ignore: list[str] | None = None, baseline: Path | None = None,
                        near_dead: float | None = None, tau: float | None = None,
                        max_new_dead: int | None = None) -> Settings:
    if ignore and not all(glob.strip() for glob in ignore):
        raise UsageError("--ignore '': expected a site-name glob (e.g. 'head.*'); an empty one matches no site")
    if tau is not None and not math.isfinite(tau):
        raise UsageError(f"--tau {tau}: expected a finite number >= 0 (every unit would be dormant)")
    return Settings(fail_on=fail_on, max_dead=max_dead, max_dead_fraction=max_dead_fraction,
                    max_site_dead_fraction=max_site_dead_fraction, ignore=tuple(ignore) if ignore else None,
                    baseline=baseline, near_dead=near_dead, tau=tau, max_new_dead=max_new_dead)


def check_not_empty(path: str | None, flag: str) -> None:
    """`--json "$REPORT"` with REPORT unset: refused, not taken as no --json at all."""
    if path is not None and not path.strip():
        raise UsageError(f"{flag}: the path is empty; give a file path, or '-' for stdout")


def output_options(fmt: Any, output: Path | None, quiet: bool, exit_zero: bool,
                   json_out: str | None = None) -> OutputOptions:
    if output is not None and str(output) == "-":  # `-o -`: stdout, as `--json -` is
        output = None
    check_not_empty(json_out, "--json")
    return OutputOptions(format=getattr(fmt, "value", fmt), output=output, json_out=json_out, quiet=quiet,
                         exit_zero=exit_zero)
