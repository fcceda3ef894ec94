"""`deadrelu fix`: the command line over `deadrelu.fix.run_fix`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from deadrelu.cli import app, progress_stages, reported_errors, stderr_console, stdout_console
from deadrelu.cli_options import (FRACTION, file_path, check_not_empty, CompileOpt, ImageSizeOpt, InputShapeOpt, MeanOpt, SeedOpt, StdOpt, UnitAxisOpt, WeightsKeyOpt,
                                   WorkersOpt, data_options_from_flags)
from deadrelu.errors import UsageError
from deadrelu.fix import FixOptions, PlanOptions, RewriteOptions, fix_inputs, run_fix, written_paths
from deadrelu.outputs import check_stdout_open, check_target, write_atomic
from deadrelu.scan import ScanOptions


@app.command("fix")
def fix_command(
    model: Annotated[Path, typer.Argument(parser=file_path, help="The model to fix (never modified).")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Calibration data (as for scan): scanned first, and used to verify.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", parser=file_path, help="A saved scan (--json) of this same model, instead of scanning.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Force one change for every chosen site: leaky, prelu or bn.")] = None,
    sites: Annotated[Optional[list[str]], typer.Option("--sites", help="Change the sites whose names match this glob (repeatable).")] = None,
    min_dead_fraction: Annotated[float, typer.Option("--min-dead-fraction", parser=FRACTION, metavar="F", help="Choose sites with at least this fraction of dead units (default: any dead unit).")] = 0.0,
    slope: Annotated[Optional[float], typer.Option("--slope", parser=FRACTION, metavar="F", help="LeakyReLU negative slope (default 0.01) / PReLU initial slope (default 0.25), in [0, 1].")] = None,
    bn_init: Annotated[str, typer.Option("--bn-init", help="identity: outputs unchanged; revive: centre each unit so dead units fire.")] = "identity",
    apply: Annotated[bool, typer.Option("--apply", help="Write the fixed model to -o and verify it.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=file_path, help="Where --apply writes (.pt2 for PyTorch models, .onnx for ONNX).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write plan, changes and verification as JSON to PATH ('-' for stdout).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture factory for a state_dict (runs your code).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a full pickle (runs code from the file).")] = False,
    weights_key: WeightsKeyOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per forward pass.")] = 32,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many samples.")] = None,
    inputs: Annotated[Optional[str], typer.Option("--inputs", help="Which batch elements are model inputs (as for scan).")] = None,
    input_shape: InputShapeOpt = None,
    workers: WorkersOpt = 2,
    image_size: ImageSizeOpt = 224,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    compile_mode: CompileOpt = "auto",
    unit_axes: UnitAxisOpt = None,
) -> None:
    """Suggest, and with --apply write and verify, LeakyReLU/PReLU swaps or BatchNorm insertion for dead units."""
    with reported_errors():
        if bn_init not in ("identity", "revive"):
            raise UsageError(f"--bn-init {bn_init!r}: expected identity or revive")
        options = FixOptions(
            plan=PlanOptions(to=to, sites=tuple(sites or ()), min_dead_fraction=min_dead_fraction),
            rewrite=RewriteOptions(slope=slope, bn_init=bn_init),
            apply=apply, output=output, report=report,
        )
        data_options = data_options_from_flags(data, input_shape=input_shape, seed=seed, workers=workers,
                                               image_size=image_size, mean=mean, std=std)
        scan_options = ScanOptions(arch=arch, trust_pickle=trust_pickle, weights_key=weights_key, device=device,
                                   batch_size=batch_size, samples=samples, inputs=inputs, compile=compile_mode,
                                   data=data_options, unit_axes=tuple(unit_axes or ()))
        check_not_empty(json_out, "--json")
        if not json_out or json_out == "-":
            check_stdout_open("write it with --json FILE")
        if json_out and json_out != "-":
            check_target(Path(json_out), "--json", fix_inputs(model, data, arch, report), written_paths(options))
        console = stderr_console()
        with progress_stages(console) as stage:
            result = run_fix(model, data, options, scan_options, stage=stage,
                             notify=lambda m: console.print(f"deadrelu: {m}", style="yellow", highlight=False,
                                                            markup=False))
        for warning in result.scan.warnings:  # the scan's (random data, fewer samples than asked for...)
            console.print(f"deadrelu: warning: {warning}", style="yellow", highlight=False, markup=False)
        document = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
        if json_out == "-":
            typer.echo(document, nl=False)
            return
        from deadrelu.formats.fix_table import render_fix

        if json_out:  # before stdout: a reader gone from it (`| head`) must not lose the file
            write_atomic(Path(json_out), document)
        render_fix(result, stdout_console())
