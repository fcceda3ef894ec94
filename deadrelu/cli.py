"""The command line: parses arguments, calls the API, maps errors to exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from deadrelu import ci
from deadrelu.cli_options import (FRACTION, NON_NEGATIVE, file_path, BaselineOpt, CompileOpt, ConfigOpt, DiffFormatName, DiffFormatOpt, ExitZeroOpt,
                                   FailOnOpt, FormatName, FormatOpt, IgnoreOpt, ImageSizeOpt, InputShapeOpt,
                                   MaxDeadFractionOpt, MaxDeadOpt, MaxSiteDeadFractionOpt, MeanOpt, OutputOpt, QuietOpt,
                                   SeedOpt, StdOpt, UnitAxisOpt, WeightsKeyOpt, WorkersOpt, data_options_from_flags, output_options,
                                   settings_from_flags)
from deadrelu.distributed import ranks_from_env
from deadrelu.errors import DeadReluError, ExitCode, one_line
from deadrelu.formats.table import UNFOLDED_WIDTH
from deadrelu.outputs import read_paths, silence_stdout
from deadrelu.report import ScanReport
from deadrelu.scan import ProgressFn, ScanOptions, Stage, StartFn, scan

# The exceptions of the click that this typer parses with (its own copy from typer 0.2x on,
# the click package before), found through a public name.
_PARSER_ERRORS = sys.modules[typer.BadParameter.__module__]
_HELP_ON_NO_ARGS = tuple(getattr(_PARSER_ERRORS, n) for n in ("NoArgsIsHelpError", "NoArgsIsHelp")
                         if hasattr(_PARSER_ERRORS, n))


# Rich help's names for the types typer 0.29 shows as Python annotations.
_TYPE_NAMES = {"<Path>": "PATH", "<list[Path]>": "PATH...", "<str>": "TEXT", "<list[str]>": "TEXT",
               "<int>": "N", "<int range>": "N", "<float>": "X", "<float range>": "X"}


def _hide_flag_types() -> None:
    """typer 0.29's Rich help shows a type column for flags too (``--quiet <bool>``, even
    ``--help <bool>``), as if they took a value; its plain help and earlier typers show
    none. Flags get no type there again; options that take a value keep theirs, named as
    command-line help names them (``PATH``, ``TEXT``, ``N``), not as Python annotations
    (``<Path>``, ``<str>``, ``<int range>``)."""
    for kind in ("TyperOption", "TyperArgument"):
        param = getattr(typer.core, kind, None)
        shown = getattr(param, "display_type_rich", None)
        if shown is None or getattr(shown, "hides_flags", False):
            continue

        def display_type_rich(self: Any, ctx: Any, shown: Any = shown) -> str | None:
            if getattr(self, "is_flag", False):
                return None
            text = shown(self, ctx)
            return _TYPE_NAMES.get(text, text) if isinstance(text, str) else text

        display_type_rich.hides_flags = True  # type: ignore[attr-defined]
        param.display_type_rich = display_type_rich


_hide_flag_types()


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown option, a bad value, a missing argument) as one line on
    stderr, exit 2, like every other error, instead of Rich's multi-line box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _HELP_ON_NO_ARGS as exc:  # plain `deadrelu`: the help, as before
            print(exc.format_message())
            sys.exit(exc.exit_code)
        except _PARSER_ERRORS.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            print(f"deadrelu: error: {one_line(exc.format_message())}{hint}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except _PARSER_ERRORS.ClickException as exc:
            print(f"deadrelu: error: {one_line(exc.format_message())}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("deadrelu: error: interrupted", file=sys.stderr)
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, pretty_exceptions_enable=False,
                  no_args_is_help=True, help="Find dead ReLU units in trained neural networks.")


@app.callback()
def _root() -> None:
    """Find dead ReLU units in trained neural networks."""


def _width(stream: Any) -> int | None:
    """None (rich finds the terminal's width, or COLUMNS) at a terminal or with COLUMNS set;
    output to no terminal (a pipe, a redirect, a CI log) is as wide as it needs, as a file
    from -o is: site names and the summary line are never folded there."""
    at_terminal = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    return None if at_terminal or "COLUMNS" in os.environ else UNFOLDED_WIDTH


def stderr_console() -> Console:
    return Console(stderr=True, width=_width(sys.stderr))


class _StdoutConsole(Console):
    """Rich exits 1 on a closed stdout pipe, which a CI gate would read as findings: the
    closed pipe goes on to `reported_errors` instead."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def stdout_console() -> Console:
    return _StdoutConsole(width=_width(sys.stdout))


@contextmanager
def reported_errors() -> Iterator[None]:
    """Known errors become one line on stderr and exit 2; never a traceback (unless DEADRELU_DEBUG=1)."""
    try:
        yield
    except typer.Exit:
        raise
    except DeadReluError as exc:
        _fail(one_line(str(exc)), exc, exc.exit_code)
    except KeyboardInterrupt as exc:
        _fail("interrupted", exc, ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # stdout's reader went away (`deadrelu scan ... | head`): quietly, as `yes | head` ends
        silence_stdout()
        raise typer.Exit(int(ExitCode.STDOUT_CLOSED)) from None
    except OSError as exc:  # the machine's, not ours: a full disk or stdout, an I/O error
        where = exc.filename or "writing the output"
        _fail(f"{where}: {exc.strerror or one_line(str(exc))}", exc, ExitCode.ERROR)
    except Exception as exc:  # a bug of ours: still one line, exit 2
        _fail(f"internal error: {type(exc).__name__}: {one_line(str(exc))} (set DEADRELU_DEBUG=1 for the traceback)",
              exc, ExitCode.ERROR)


def _fail(message: str, exc: BaseException, code: int) -> None:
    if os.environ.get("DEADRELU_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    stderr_console().print(f"deadrelu: error: {message}", style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(int(code))


@app.command("scan")
def scan_command(
    model: Annotated[Path, typer.Argument(parser=file_path, help="Model file: TorchScript, torch.export (.pt2), state_dict (+ --arch), full pickle (--trust-pickle) or ONNX (.onnx).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Calibration data: .npy, .npz, .pt, .safetensors, a folder of images or .npy shards, pkg.module:function or file.py:function (runs your code), or 'random' (with --input-shape).")],
    arch: Annotated[Optional[str], typer.Option(help="Architecture factory for a state_dict: pkg.module:fn or path/file.py:fn (runs your code).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a full pickle (runs code from the file).")] = False,
    weights_key: WeightsKeyOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per forward pass.")] = 32,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many samples.")] = None,
    input_shape: InputShapeOpt = None,
    inputs: Annotated[Optional[str], typer.Option("--inputs", help="Which batch elements are model inputs: positions (0 or 0,1) or dict keys (image,mask). Default: the leading elements the model's forward takes.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Cast the model and its float inputs: float32, float16, bfloat16, float64.")] = None,
    workers: WorkersOpt = 2,
    image_size: ImageSizeOpt = 224,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    compile_mode: CompileOpt = "auto",
    unit_axes: UnitAxisOpt = None,
    near_dead: Annotated[Optional[float], typer.Option("--near-dead", parser=FRACTION, metavar="F", help="Near-dead: active rate below this (default 0.01, or near-dead in tool.deadrelu).")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", parser=NON_NEGATIVE, metavar="T", help="Dormant: tau-dormant score at or below this (default 0.1, or tau in tool.deadrelu).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to PATH ('-' for stdout).")] = None,
    fail_on: FailOnOpt = None,
    max_dead: MaxDeadOpt = None,
    max_dead_fraction: MaxDeadFractionOpt = None,
    max_site_dead_fraction: MaxSiteDeadFractionOpt = None,
    ignore: IgnoreOpt = None,
    baseline: BaselineOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = FormatName.TABLE,
    output: OutputOpt = None,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Scan a model's ReLU sites over calibration data and report dead units."""
    with reported_errors():
        flags = settings_from_flags(fail_on=fail_on, max_dead=max_dead, max_dead_fraction=max_dead_fraction,
                                    max_site_dead_fraction=max_site_dead_fraction, ignore=ignore, baseline=baseline,
                                    near_dead=near_dead, tau=tau)
        prepared = ci.prepare(flags, config, output_options(fmt, output, quiet, exit_zero, json_out),
                              inputs=read_paths(model, data, arch, baseline, config))
        data_options = data_options_from_flags(data, input_shape=input_shape, seed=seed, workers=workers,
                                               image_size=image_size, mean=mean, std=std)
        options = ScanOptions(
            arch=arch, trust_pickle=trust_pickle, weights_key=weights_key, device=device, dtype=dtype, batch_size=batch_size, samples=samples,
            inputs=inputs, compile=compile_mode, data=data_options, thresholds=prepared.thresholds,
            unit_axes=tuple(unit_axes or ()),
        )
        report = _scan_with_progress(model, data, options)
        if not ranks_from_env().is_main:
            raise typer.Exit(0)  # under torchrun, rank 0 alone reports (it holds every rank's statistics)
        raise typer.Exit(int(ci.finish(report, prepared, stdout_console(), stderr_console())))


def _scan_with_progress(model: Path, data: str, options: ScanOptions) -> ScanReport:
    console = stderr_console()
    with progress_stages(console) as stage:
        started, advanced = stage("scanning")

        def said(message: str) -> None:
            console.print(f"deadrelu: {message}", style="yellow", highlight=False, markup=False)

        return scan(model, data, options, progress=advanced, on_start=started, notify=said)


@contextmanager
def progress_stages(console: Console) -> Iterator[Stage]:
    """A progress bar on stderr for each stage of long work, the latest one shown: samples
    done of the total, rate and time left. Only on a terminal; it vanishes when done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as bar:

        def stage(label: str) -> tuple[StartFn, ProgressFn]:
            for earlier in bar.task_ids:
                bar.update(earlier, visible=False)
            task = bar.add_task(label, total=None, rate="")

            def started(total: int | None) -> None:
                bar.update(task, total=total)

            def advanced(count: int) -> None:
                bar.advance(task, count)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:,.0f}/s" if speed else "")

            return started, advanced

        yield stage


@app.command("report")
def report_command(
    report: Annotated[Path, typer.Argument(parser=file_path, help="A JSON report saved by 'deadrelu scan --json FILE' (or --format json).")],
    fail_on: FailOnOpt = None,
    max_dead: MaxDeadOpt = None,
    max_dead_fraction: MaxDeadFractionOpt = None,
    max_site_dead_fraction: MaxSiteDeadFractionOpt = None,
    ignore: IgnoreOpt = None,
    baseline: BaselineOpt = None,
    near_dead: Annotated[Optional[float], typer.Option("--near-dead", parser=FRACTION, metavar="F", help="Re-judge: near-dead below this active rate (default: the report's own).")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", parser=NON_NEGATIVE, metavar="T", help="Re-judge: dormant at or below this tau score (default: the report's own).")] = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = FormatName.TABLE,
    output: OutputOpt = None,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-judge and re-render a saved scan with new thresholds, without the model or the data."""
    with reported_errors():
        flags = settings_from_flags(fail_on=fail_on, max_dead=max_dead, max_dead_fraction=max_dead_fraction,
                                    max_site_dead_fraction=max_site_dead_fraction, ignore=ignore, baseline=baseline,
                                    near_dead=near_dead, tau=tau)
        code = ci.saved_report(report, flags, config, output_options(fmt, output, quiet, exit_zero),
                               stdout_console(), stderr_console())
        raise typer.Exit(int(code))


@app.command("diff")
def diff_command(
    old: Annotated[Path, typer.Argument(parser=file_path, help="The earlier JSON report (e.g. the previous checkpoint's).")],
    new: Annotated[Path, typer.Argument(parser=file_path, help="The later JSON report.")],
    max_new_dead: Annotated[Optional[int], typer.Option("--max-new-dead", min=0, help="Fail when more than N units died (dead in NEW, not in OLD).")] = None,
    ignore: IgnoreOpt = None,
    config: ConfigOpt = None,
    fmt: DiffFormatOpt = DiffFormatName.TABLE,
    output: OutputOpt = None,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per site: units that died, units that revived, and the change in active rate between two reports."""
    with reported_errors():
        flags = settings_from_flags(ignore=ignore, max_new_dead=max_new_dead)
        code = ci.compare(old, new, flags, config, output_options(fmt, output, quiet, exit_zero),
                          stdout_console(), stderr_console())
        raise typer.Exit(int(code))


def main() -> None:
    app()


from deadrelu import cli_fix  # noqa: E402,F401  registers `deadrelu fix` on the app
from deadrelu import cli_merge  # noqa: E402,F401  registers `deadrelu merge` on the app
