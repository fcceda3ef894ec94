"""Command-line options shared by `scan`, `report` and `diff`: gates, formats, configuration.

Only parsing lives here: flags become a `config.Settings` (None where a flag was not given,
so that the configuration file's value applies) and a `ci.OutputOptions`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from deadrelu.ci import OutputOptions
from deadrelu.config import Settings
from deadrelu.formats import FORMAT_NAMES, get_format
from deadrelu.gates import FailOn

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
    "--max-dead-fraction", min=0.0, max=1.0, help="Fail when counted units / all units exceeds F.")]
MaxSiteDeadFractionOpt = Annotated[Optional[float], typer.Option(
    "--max-site-dead-fraction", min=0.0, max=1.0, help="Fail when counted units / units of any one site exceeds F.")]
IgnoreOpt = Annotated[Optional[list[str]], typer.Option(
    "--ignore", metavar="GLOB", help="Leave sites matching GLOB out of the gates (repeatable; replaces the config's ignore).")]
BaselineOpt = Annotated[Optional[Path], typer.Option(
    "--baseline", metavar="REPORT.json",
    help="Count only findings not in this earlier JSON report (sites matched by name): no new dead units.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE",
    help="Read the tool.deadrelu table from FILE instead of the nearest pyproject.toml. Flags override it.")]
FormatOpt = Annotated[FormatName, typer.Option(
    "--format", "-f", case_sensitive=False, help="Report format on stdout (or -o FILE).")]
DiffFormatOpt = Annotated[DiffFormatName, typer.Option(
    "--format", "-f", case_sensitive=False, help="Diff format on stdout (or -o FILE).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="FILE", help="Write the report to FILE (atomically) instead of stdout.")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Report failed gates, but exit 0.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="Print only the summary line (stderr); the exit code tells the rest. -o files are still written.")]


def settings_from_flags(*, fail_on: FailOn | None = None, max_dead: int | None = None,
                        max_dead_fraction: float | None = None, max_site_dead_fraction: float | None = None,
                        ignore: list[str] | None = None, baseline: Path | None = None,
                        near_dead: float | None = None, tau: float | None = None,
                        max_new_dead: int | None = None) -> Settings:
    return Settings(fail_on=fail_on, max_dead=max_dead, max_dead_fraction=max_dead_fraction,
                    max_site_dead_fraction=max_site_dead_fraction, ignore=tuple(ignore) if ignore else None,
                    baseline=baseline, near_dead=near_dead, tau=tau, max_new_dead=max_new_dead)


def output_options(fmt: Any, output: Path | None, quiet: bool, exit_zero: bool,
                   json_out: str | None = None) -> OutputOptions:
    return OutputOptions(format=getattr(fmt, "value", fmt), output=output, json_out=json_out, quiet=quiet,
                         exit_zero=exit_zero)
