"""What `scan`, `report` and `diff` do around a report: settings, gates, output, exit code.

The CLI parses flags into a `Settings` (flags) and an `OutputOptions`, and calls these
functions; everything that can fail on the user's input (configuration, baseline, format,
output folder) is checked by `prepare` before a scan starts, so a long scan never ends in
a usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from deadrelu.config import Settings, load_settings
from deadrelu.diff import ReportDiff, diff_reports
from deadrelu.errors import ExitCode, UsageError
from deadrelu.formats import Outcome, ReportFormat, deliver, deliver_diff, get_format
from deadrelu.formats.summary import diff_summary, scan_summary
from deadrelu.gates import GateReport, evaluate
from deadrelu.judge import Thresholds
from deadrelu.outputs import check_stdout_open, check_target, read_paths, silence_stdout, write_atomic
from deadrelu.report import ScanReport
from deadrelu.saved import load_report, rejudge


@dataclass(frozen=True)
class OutputOptions:
    format: str = "table"
    output: Path | None = None  # -o FILE; None: stdout
    json_out: str | None = None  # --json PATH ('-': stdout): the report without gates, as report.to_json()
    quiet: bool = False  # -q: only the summary line (stderr) and the exit code
    exit_zero: bool = False


@dataclass(frozen=True)
class Prepared:
    """Everything resolved before the scan."""

    settings: Settings
    thresholds: Thresholds
    fmt: ReportFormat
    out: OutputOptions
    baseline: ScanReport | None


def prepare(flags: Settings, config: Path | None, out: OutputOptions, *, load_baseline: bool = True,
            default_thresholds: Thresholds | None = None, inputs: tuple[Path, ...] = ()) -> Prepared:
    """Merge the flags over the configuration file, and check the format, the output paths
    (writable, none of the command's ``inputs``) and the baseline, before any work starts."""
    settings = load_settings(config).overridden_by(flags)
    inputs = (*inputs, *read_paths(config, settings.baseline))  # a baseline may come from the config
    out = _resolve_json_stdout(out)
    fmt = get_format(out.format)
    fmt.check_available()
    if out.json_out == "-" or (out.output is None and not out.quiet):
        check_stdout_open("write it with -o FILE (or --json FILE), or pass -q for the summary line alone")
    if out.output is not None:
        check_target(out.output, "-o", inputs)
    if out.json_out and out.json_out != "-":
        check_target(Path(out.json_out), "--json", inputs, written=(out.output,) if out.output else ())
    thresholds = settings.thresholds(default_thresholds)
    baseline = None
    if settings.baseline is not None and load_baseline:
        baseline = load_report(settings.baseline, thresholds)
    return Prepared(settings, thresholds, fmt, out, baseline)


def _resolve_json_stdout(out: OutputOptions) -> OutputOptions:
    """`--json -` (it predates --format) puts the report's JSON document on stdout, alone."""
    if out.json_out == "-" and (out.format != "table" or out.output is not None):
        raise UsageError("--json - writes the JSON report to stdout: use --json FILE together with --format/-o, "
                         "or --format json for the JSON with the gate results")
    return out


def judge_report(report: ScanReport, prepared: Prepared) -> GateReport:
    label = str(prepared.settings.baseline) if prepared.settings.baseline is not None else None
    return evaluate(report, prepared.settings.policy(), prepared.baseline, label)


def finish(report: ScanReport, prepared: Prepared, stdout: Console, stderr: Console,
           live: bool = True) -> ExitCode:
    """Gate, write the report where it was asked for, print the summary line; the exit code.

    A scan interrupted now (``live``) exits 130; a saved report that is partial exits by its
    gates, with a line saying it is partial (re-rendering it is no interruption)."""
    gates = judge_report(report, prepared)
    outcome = Outcome(report, gates)
    out = prepared.out
    if out.json_out and out.json_out != "-":  # files first: a closed stdout loses none of them
        write_atomic(Path(out.json_out), report.to_json())
    stdout_closed = not _delivered(outcome, prepared, stdout)
    for warning in _warnings_not_shown(outcome, out):
        stderr.print(f"deadrelu: warning: {warning}", style="yellow", highlight=False, markup=False)
    line, style = scan_summary(report, gates)
    stderr.print(line, style=style or None, highlight=False, markup=False)
    if report.partial and live:
        return ExitCode.INTERRUPTED
    if report.partial:
        stderr.print(f"deadrelu: note: this is a PARTIAL report: its scan was interrupted after "
                     f"{report.data.samples} samples", highlight=False, markup=False)
    code = gates.exit_code(out.exit_zero)
    if stdout_closed and code is ExitCode.CLEAN:
        return ExitCode.STDOUT_CLOSED  # the report asked for did not all arrive; a failed gate still says 1
    return code


def _delivered(outcome: Outcome, prepared: Prepared, stdout: Console) -> bool:
    """Write the report to stdout (or -o FILE); False when stdout's reader went away
    (`| head`), which then points at devnull so that later flushes raise nothing."""
    out = prepared.out
    try:
        if out.json_out == "-":  # exactly the Python API's report.to_dict(), as before --format existed
            stdout.file.write(outcome.report.to_json())
            stdout.file.flush()
        else:
            deliver(prepared.fmt, outcome, out.output, quiet=out.quiet, stdout=stdout)
    except BrokenPipeError:
        silence_stdout()
        return False
    return True


def _warnings_not_shown(outcome: Outcome, out: OutputOptions) -> tuple[str, ...]:
    """The warnings, for stderr, unless the table on stdout has just shown them (it shows a
    baseline's mismatches under the gates, when there are gates): a warning must reach the
    person at the terminal when stdout is JSON, a file or a pipe's. -q: the summary alone."""
    if out.quiet:
        return ()
    table_on_stdout = out.format == "table" and out.output is None and out.json_out != "-"
    if not table_on_stdout:
        return outcome.warnings
    return () if outcome.gates.active else outcome.gates.baseline_notes


def saved_report(path: Path, flags: Settings, config: Path | None, out: OutputOptions,
                 stdout: Console, stderr: Console) -> ExitCode:
    """`deadrelu report`: re-judge and re-render a saved report (thresholds: flags, then the
    configuration, then the report's own)."""
    prepared = prepare(flags, config, out, load_baseline=False, inputs=read_paths(path))
    report = load_report(path)
    if prepared.settings.sets_thresholds:
        report = rejudge(report, prepared.settings.thresholds(report.thresholds))
    baseline = None
    if prepared.settings.baseline is not None:
        baseline = load_report(prepared.settings.baseline, report.thresholds)
    return finish(report, replace(prepared, thresholds=report.thresholds, baseline=baseline), stdout, stderr,
                  live=False)


def compare(old: Path, new: Path, flags: Settings, config: Path | None, out: OutputOptions,
            stdout: Console, stderr: Console) -> ExitCode:
    """`deadrelu diff`: units that died and revived between two saved reports."""
    if not get_format(out.format).supports_diff:
        raise UsageError(f"deadrelu diff: --format {out.format} is not supported (use {ReportFormat.diff_formats})")
    prepared = prepare(flags, config, out, load_baseline=False, inputs=read_paths(old, new))
    new_report = load_report(new)
    old_report = rejudge(load_report(old), new_report.thresholds)
    for label, saved in ((old, old_report), (new, new_report)):
        if saved.partial:
            stderr.print(f"deadrelu: note: {label} is a PARTIAL report (its scan was interrupted after "
                         f"{saved.data.samples} samples)", highlight=False, markup=False)
    result: ReportDiff = diff_reports(old_report, new_report, old_label=str(old), new_label=str(new),
                                      ignore=prepared.settings.ignore or (),
                                      max_new_dead=prepared.settings.max_new_dead)
    deliver_diff(prepared.fmt, result, out.output, quiet=out.quiet, stdout=stdout)
    notes_on_stdout = out.format in ("table", "markdown") and out.output is None
    for note in () if out.quiet or notes_on_stdout else result.notes:
        stderr.print(f"deadrelu: note: {note}", highlight=False, markup=False, soft_wrap=True)
    line, style = diff_summary(result)
    stderr.print(line, style=style or None, highlight=False, markup=False)
    return ExitCode.FINDINGS if result.failures and not out.exit_zero else ExitCode.CLEAN
