"""`deadrelu merge`: the command line over `deadrelu.merge.merge_reports`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from deadrelu.cli import app, reported_errors
from deadrelu.cli_options import file_path
from deadrelu.merge import merge_reports
from deadrelu.outputs import check_stdout_open, check_target, write_atomic


@app.command("merge")
def merge_command(
    reports: Annotated[list[Path], typer.Argument(parser=file_path, help="JSON reports (--json) of scans of disjoint data shards of one model.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=file_path, help="Write the merged JSON report here (default: stdout).")] = None,
) -> None:
    """Combine scans of different data shards (made anywhere, any time) into one report, exactly."""
    with reported_errors():
        from deadrelu.saved import load_report

        if output is not None and str(output) == "-":  # `-o -`: stdout, as the default
            output = None
        if output is not None:
            check_target(output, "-o", tuple(reports))
        else:
            check_stdout_open("write it with -o FILE")
        merged = merge_reports([load_report(path) for path in reports], [str(p) for p in reports])
        if output is None:
            typer.echo(merged.to_json(), nl=False)
        else:
            write_atomic(output, merged.to_json())
