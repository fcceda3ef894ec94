"""`deadrelu fix`: plan per-site changes for dead units, apply them to a copy of the
model, and verify what they did.

The flow: load -> scan (or a saved report of the same model) -> plan -> rewrite -> write
into a staging folder beside OUT -> reload it from there -> re-scan and compare outputs ->
move it to OUT (nothing is left behind when any step fails).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deadrelu.data import ModelInput
from deadrelu.errors import UsageError
from deadrelu.gates import plural
from deadrelu.fix.plan import PlanOptions, SiteFix, nothing_planned, plan_fixes
from deadrelu.fix.torch_rewrite import RewriteOptions, UnitMoments
from deadrelu.fix.verify import OutputDeviation, SiteChange, more_dead_elsewhere, output_deviation, site_changes
from deadrelu.load import LoadedModel, load_model
from deadrelu.load.detect import ModelFormat
from deadrelu.outputs import check_target, is_stream, read_paths
from deadrelu.report import ScanReport
from deadrelu.scan import ProgressFn, ScanOptions, Stage, StartFn, fixed_batch_size, model_batches, open_source, scan
from deadrelu.sites import AxisOverride, literal_glob

__all__ = ["FixOptions", "FixReport", "PlanOptions", "RewriteOptions", "run_fix"]

REWRITTEN_BY_EXPORT = (ModelFormat.STATE_DICT, ModelFormat.PICKLE, ModelFormat.TORCHSCRIPT)


@dataclass(frozen=True)
class FixOptions:
    plan: PlanOptions = field(default_factory=PlanOptions)
    rewrite: RewriteOptions = field(default_factory=RewriteOptions)
    apply: bool = False
    output: Path | None = None
    report: Path | None = None  # a saved scan of the same model instead of scanning


@dataclass(frozen=True)
class FixReport:
    """The plan, and after --apply what was written and what it did."""

    model: str
    model_format: str
    sha256: str
    plan: tuple[SiteFix, ...]
    scan: ScanReport
    applied: bool = False
    output: str | None = None
    changes: tuple[SiteChange, ...] = ()
    deviation: OutputDeviation | None = None
    instructions: tuple[str, ...] = ()
    state_dict: str | None = None
    nothing_planned: str | None = None  # why the plan is empty, when it is
    bn_init: str = "identity"  # how inserted BatchNorms were initialised (RewriteOptions.bn_init)
    leaky_slope: float = 0.01  # the negative slope of the LeakyReLU swaps (RewriteOptions.leaky_slope())
    more_dead_elsewhere: tuple[tuple[str, int, int], ...] = ()  # unchanged sites: (site, dead before, after)
    fixed_batch: int | None = None  # the one batch size the written program takes, where the original took any

    @property
    def notes(self) -> tuple[str, ...]:
        """What the verification means where its counts alone would mislead: printed under
        it and carried in the JSON."""
        notes = []
        unchanged = [c.site for c in self.changes if c.change == "leaky"]
        if unchanged and self.leaky_slope == 0.0:
            notes.append(f"{', '.join(unchanged)}: LeakyReLU with --slope 0 computes exactly what ReLU does, outputs "
                         "and gradients alike, so fine-tuning cannot revive the dead units there; give a slope > 0")
        still_dead = [c.site for c in self.changes if c.change == "bn" and c.dead_after and c.dead_after >= c.dead_before]
        if still_dead and self.bn_init == "identity":
            notes.append(f"{', '.join(still_dead)}: the inserted BatchNorm keeps the outputs as they were "
                         "(--bn-init identity), so the dead units there stay dead until you fine-tune; "
                         "--bn-init revive centres them now (and changes the outputs)")
        more_dead = [(c.site, c.dead_before, c.dead_after) for c in self.changes if c.dead_after > c.dead_before]
        more_dead += [(f"{site} (not changed)", before, after) for site, before, after in self.more_dead_elsewhere]
        for site, before, after in more_dead:
            notes.append(f"{site}: {before} dead {plural(before, 'unit')} before the fix, {after} after: "
                         "a changed site before it now passes on other values (a swap's slope lets negative "
                         "pre-activations through); fine-tune the fixed model, or try a smaller --slope or "
                         "another --to")
        if self.fixed_batch is not None:
            notes.append(f"{self.output}: takes batches of exactly {self.fixed_batch} samples, where the original "
                         "took any: torch.export could not keep its batch dimension dynamic (the model branches on "
                         "or specialises to the batch size); pad the last batch, or export the fixed model's code "
                         "yourself")
        for change in self.changes:
            if change.zero_variance_units:
                notes.append(f"{change.site}: zero-variance units {list(change.zero_variance_units)} stay constant "
                             "(BatchNorm cannot centre a constant; one counted alive fires on rounding noise)")
        return tuple(notes)

    def to_dict(self) -> dict[str, Any]:
        from deadrelu import __version__

        return {
            "deadrelu_version": __version__,
            "model": {"path": self.model, "format": self.model_format, "sha256": self.sha256},
            "plan": [f.to_dict() for f in self.plan],
            "applied": self.applied,
            "output": self.output,
            "verification": None if not self.applied else {
                "sites": [c.to_dict() for c in self.changes],
                "outputs": self.deviation.to_dict() if self.deviation else None,
                "notes": list(self.notes),
            },
            "class_changes": list(self.instructions),
            "state_dict": self.state_dict,
            "nothing_planned": self.nothing_planned,
            "warnings": list(self.scan.warnings),  # the scan's the plan rests on
        }


def run_fix(model: str | Path, data: str | None, options: FixOptions, scan_options: ScanOptions,
            notify: Callable[[str], None] | None = None, stage: Stage | None = None) -> FixReport:
    """Plan (and with `options.apply`, apply and verify) fixes for a model's dead units.

    `stage` (see `deadrelu.scan.Stage`) is told of each pass over the data: the scan, the
    re-scans that measure what an inserted BatchNorm will see, the scan of the fixed model
    and the comparison of outputs."""
    model = Path(model)
    output = _check_output(model, data, options, scan_options.arch)
    loaded = load_model(model, arch=scan_options.arch, trust_pickle=scan_options.trust_pickle,
                        weights_key=scan_options.weights_key)
    report = _baseline_scan(loaded, data, options, scan_options, notify, stage)
    plan = plan_fixes(report, options.plan)
    base = FixReport(loaded.path, loaded.format.value, loaded.sha256, plan, report,
                     nothing_planned=None if plan else nothing_planned(report, options.plan))
    if not plan or not options.apply or output is None:
        return base
    from_report = data is None
    if from_report:
        data, scan_options = _verification_data(report, options.report, scan_options)
    moments = {f.index: UnitMoments(report.sites[f.index].stats.mean, report.sites[f.index].stats.std ** 2) for f in plan}
    writer = _write_onnx if loaded.format is ModelFormat.ONNX else _write_torch
    staging = _staging_folder(output)  # OUT and its side files are written and verified here, then moved
    try:
        staged = staging / output.name
        written = writer(loaded, report, plan, moments, options, scan_options, data, staged, stage)
        after = whole_scan(staged, data, _of_written(scan_options), stage=stage, label="verifying: scanning the fixed model")
        if from_report:
            _check_same_samples(report, options.report, after)
        zero_variance = {f.index: _constant_units(written.moments[f.index])
                         for f in plan if f.change == "bn" and options.rewrite.bn_init == "revive"}
        changes = site_changes(plan, report, after, zero_variance)
        elsewhere = more_dead_elsewhere(plan, report, after)
        deviation = _deviation(loaded, staged, data, scan_options, stage, after.data.samples)
        narrowed = fixed_batch_size(load_model(staged)) if fixed_batch_size(loaded) is None else None
        for path in sorted(staging.iterdir(), key=lambda p: p == staged):  # the model file last
            os.replace(path, output.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weights = str(state_dict_path(output)) if written.weights is not None else None
    return FixReport(loaded.path, loaded.format.value, loaded.sha256, plan, report, True, str(output), changes,
                     deviation, written.lines, weights, bn_init=options.rewrite.bn_init,
                     leaky_slope=options.rewrite.leaky_slope(), more_dead_elsewhere=elsewhere, fixed_batch=narrowed)


def whole_scan(model: LoadedModel | Path, data: str, options: ScanOptions,
               notify: Callable[[str], None] | None = None, stage: Stage | None = None,
               label: str = "scanning") -> ScanReport:
    """A scan of all the data, or KeyboardInterrupt: a scan stopped by Ctrl-C returns what it
    saw so far, which is a report for `scan` but no ground for a fix or its verification."""
    on_start, progress = stage(label) if stage else (None, None)
    report = scan(model, data, options, notify=notify, on_start=on_start, progress=progress)
    if report.partial:
        raise KeyboardInterrupt
    return report


def _constant_units(seen: UnitMoments) -> tuple[int, ...]:
    """The units constant in what an inserted BatchNorm normalises (its input, measured with
    every change upstream applied: a unit an upstream fix made vary is not among them).
    BatchNorm revive cannot centre them: it maps their rounding noise, amplified by
    1/sqrt(eps), to either sign."""
    return tuple(int(u) for u in np.flatnonzero(_constant(seen)))


def _constant(moments: UnitMoments) -> np.ndarray:
    """Units whose pre-activation is constant but for float32 rounding (std under two
    float32 steps of the mean: the statistics cannot tell it from 0). BatchNorm revive
    cannot move them; whatever it outputs there is rounding noise."""
    from deadrelu.reductions import CONSTANT_SPREAD

    return moments.var <= (CONSTANT_SPREAD * np.abs(moments.mean)) ** 2 + 1e-30


def _staging_folder(output: Path) -> Path:
    """A hidden folder beside ``output`` (same file system, so the final moves are renames;
    files there refer to each other by name, as ONNX external data does)."""
    import tempfile

    try:
        return Path(tempfile.mkdtemp(prefix=".deadrelu-fix-", dir=output.parent))
    except OSError as exc:
        raise UsageError(f"-o {output}: cannot write in {output.parent} ({exc.strerror or exc})") from None


def _is_onnx(model: Path) -> bool:
    from deadrelu.errors import DeadReluError
    from deadrelu.load.detect import detect_format

    try:
        return detect_format(model) is ModelFormat.ONNX
    except (DeadReluError, OSError):
        return False


def state_dict_path(output: Path) -> Path:
    """Where `fix --apply` writes the fixed weights of a state_dict model beside OUT.pt2."""
    return output.with_name(output.name.removesuffix(".pt2") + ".state_dict.pt")


def onnx_data_path(output: Path) -> Path:
    """Where `fix --apply` writes the external weights of an ONNX model beside OUT.onnx."""
    return output.with_name(output.name + ".data")


def written_paths(options: FixOptions) -> tuple[Path, ...]:
    """Every file `run_fix` may write: OUT, the state_dict beside it (a PyTorch model's)
    and the external data beside it (an ONNX model's)."""
    if not options.apply or options.output is None:
        return ()
    return options.output, state_dict_path(options.output), onnx_data_path(options.output)


def fix_inputs(model: Path, data: str | None, arch: str | None, report: Path | None) -> tuple[Path, ...]:
    """Every file `fix` reads, which none of its outputs may replace: the model (and its
    external data), the data, the arch file, the saved report and, when --data is not
    given, the data that report names (verification reads it)."""
    return read_paths(model, data, arch, report, _report_data(report) if data is None else None)


def _report_data(report: Path | None) -> str | None:
    """The data source a saved report names, or None where it cannot be read (loading the
    report later says why)."""
    import json

    if report is None or not report.is_file():
        return None
    try:
        source = json.loads(report.read_text(encoding="utf-8")).get("data", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def _check_output(model: Path, data: str | None, options: FixOptions, arch: str | None = None) -> Path | None:
    """The options that need no model, checked before any work: --to, -o and --apply."""
    from deadrelu.fix.plan import CHANGES

    if options.plan.to is not None and options.plan.to not in CHANGES:
        raise UsageError(f"--to '{options.plan.to}': expected one of {', '.join(CHANGES)}")
    if not options.apply:
        if options.output is not None:
            raise UsageError(f"-o {options.output}: the fixed model is written only with --apply "
                             "(add --apply, or drop -o to see the plan)")
        return None
    if options.output is None:
        raise UsageError("--apply needs -o OUT: the file to write (the input model is never overwritten)")
    inputs = fix_inputs(model, data, arch, options.report)
    written_as_onnx = model.suffix.lower() == ".onnx" or (model.is_file() and _is_onnx(model))
    if options.output.suffix.lower() == ".onnx" and not written_as_onnx:
        raise UsageError(f"-o {options.output}: a PyTorch model is written as a torch.export program; "
                         "name it .pt2 (export that to ONNX yourself if you need one)")
    if written_as_onnx and options.output.suffix.lower() in (".pt2", ".pt", ".pth"):
        raise UsageError(f"-o {options.output}: an ONNX model is written as ONNX; name it .onnx")
    side = onnx_data_path(options.output) if written_as_onnx else state_dict_path(options.output)
    for path, flag in ((options.output, "-o"), (side, f"the fixed weights beside -o {options.output},")):
        if is_stream(path):  # the files are written beside it and moved into place, replacing the device
            raise UsageError(f"{flag} {path}: that is a device, FIFO or socket, not a file; --apply writes a "
                             "model file and its weights beside it, so give a file path")
        check_target(path, flag, inputs)
    return options.output


def _baseline_scan(loaded: LoadedModel, data: str | None, options: FixOptions, scan_options: ScanOptions,
                   notify: Callable[[str], None] | None, stage: Stage | None) -> ScanReport:
    if options.report is not None:
        from deadrelu.saved import load_report

        report = load_report(options.report, scan_options.thresholds)
        if not report.model.sha256:
            raise UsageError(f"--report {options.report}: it names no model sha256, so it cannot be checked to be a "
                             f"scan of {loaded.path}; re-scan with --data")
        if report.model.sha256 != loaded.sha256:
            raise UsageError(f"--report {options.report}: it is a scan of another model (sha256 {report.model.sha256[:12]}…, "
                             f"{loaded.path} is {loaded.sha256[:12]}…); re-scan with --data")
        return report
    if data is None:
        raise UsageError("fix needs --data (to scan the model) or --report (a saved scan of it)")
    return whole_scan(loaded, data, scan_options, notify=notify, stage=stage)


def _verification_data(report: ScanReport, report_path: Path | None, scan_options: ScanOptions) -> tuple[str, ScanOptions]:
    """The data a saved report was scanned on, to verify a fix of it without --data: the file
    it names (from here), or its random inputs again (``random[3, 16, 16]``, seeded with
    --seed as the scan was, 0 unless given), and no more samples than it scanned."""
    from dataclasses import replace

    from deadrelu.data.files import RANDOM

    source = report.data.source
    options = replace(scan_options, samples=scan_options.samples or report.data.samples)
    if source.startswith(f"{RANDOM}[") and source.endswith("]"):
        try:
            shape = tuple(int(d) for d in source[len(RANDOM) + 1:-1].split(","))
        except ValueError:
            shape = ()
        if shape and all(d > 0 for d in shape):
            return RANDOM, replace(options, data=replace(options.data, input_shape=shape,
                                                          random_samples=report.data.samples))
    if not Path(source).exists():
        raise UsageError(f"--report {report_path}: --apply verifies on the data it was scanned on, and its data "
                         f"'{source}' is not here: pass --data")
    return source, options


def _check_same_samples(report: ScanReport, report_path: Path | None, after: ScanReport) -> None:
    """Data taken from a report must still hold what the report scanned: a shorter file of
    the same name (another folder's, or changed since) would verify on other data."""
    if after.data.samples < report.data.samples:
        raise UsageError(f"--report {report_path}: it scanned {report.data.samples} samples of '{report.data.source}', "
                         f"which holds {after.data.samples} here (another file of that name, or changed since): "
                         "pass --data")


def _example(loaded: LoadedModel, data: str, scan_options: ScanOptions) -> ModelInput:
    """A small batch to export with; of the program's own batch size when that is fixed
    (`model_batches` cuts batches to it)."""
    size = min(scan_options.batch_size, 8)
    options = ScanOptions(**{**vars(scan_options), "batch_size": size, "samples": None})
    for batch in model_batches(loaded, open_source(data, options, loaded), options):
        return batch
    raise UsageError(f"--data {data}: no samples")


@dataclass(frozen=True)
class Written:
    """What a writer put in the staging folder, and from what."""

    lines: tuple[str, ...]  # class changes for the user's own code (state_dict/pickle models)
    weights: str | None  # the state_dict written beside the program, if any
    moments: dict[int, UnitMoments]  # per BatchNorm inserted (site index): the input it normalises


def _write_torch(loaded: LoadedModel, report: ScanReport, plan: tuple[SiteFix, ...], moments: dict[int, UnitMoments],
                 options: FixOptions, scan_options: ScanOptions, data: str, output: Path,
                 stage: Stage | None = None) -> Written:
    from deadrelu import sites
    from deadrelu.fix import instructions as how
    from deadrelu.fix.torch_rewrite import rewrite_graph, rewrite_program, save_program, to_program
    from deadrelu.outputs import write_atomic

    example = _example(loaded, data, scan_options)
    contexts = ()
    if loaded.format is ModelFormat.TORCHSCRIPT:
        contexts = tuple((c.module_path, c.module_type) for _, c in sites.torchscript_candidate_contexts(loaded.module))
    program = to_program(loaded, example, contexts)
    scanned = len(report.sites)
    def partial(fixes: tuple[SiteFix, ...], known: dict[int, UnitMoments]) -> LoadedModel:
        # scanned as the program it came from: a fixed or bounded batch size still holds
        return LoadedModel(rewrite_graph(program, fixes, known, options.rewrite, scanned)[0],
                           ModelFormat.EXPORTED_PROGRAM, loaded.path, "", exported_program=program)

    moments = _downstream_moments(partial, plan, moments, options.rewrite, data, scan_options, stage)
    rewritten, added = rewrite_program(program, plan, moments, options.rewrite, example, scanned)
    save_program(rewritten, output)
    if loaded.format not in REWRITTEN_BY_EXPORT:
        return Written((), None, moments)
    types = how.module_types(loaded.module)
    ndims = {f.index: int(report.sites[f.index].extra.get("preact_ndim", 4)) for f in plan}
    shared = how.shared_modules([site.name for site in report.sites], types)
    lines = tuple(how.instructions(plan, types, options.rewrite, ndims, shared))
    state = how.fixed_state_dict(dict(loaded.module.state_dict()), plan, added, types, shared)
    target = state_dict_path(output)
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(target, buffer.getvalue())
    return Written(lines, str(target), moments)


def _downstream_moments(partial: Callable[[tuple[SiteFix, ...], dict[int, UnitMoments]], Any], plan: tuple[SiteFix, ...],
                        moments: dict[int, UnitMoments], options: RewriteOptions, data: str,
                        scan_options: ScanOptions, stage: Stage | None = None) -> dict[int, UnitMoments]:
    """BatchNorm statistics measured where the inserted BatchNorm will see them.

    Once an earlier change alters what flows downstream (a non-zero slope, a revived
    BatchNorm), a later site's pre-activations are no longer those of the original scan:
    they are re-measured on the model with the earlier changes applied (``partial(fixes,
    moments)``: a scannable model with those fixes applied).
    """
    from deadrelu.fix.torch_rewrite import changes_outputs

    moments = dict(moments)
    altered = False
    for position, fix in enumerate(plan):
        if fix.change == "bn" and altered:
            label = f"measuring what the BatchNorm at {fix.site} will see"
            model = partial(plan[:position], moments)
            site = whole_scan(model, data, scan_options, stage=stage, label=label).sites[fix.index]
            if (site.unit_axis, site.units) != (fix.unit_axis, fix.units):
                # the earlier changes hid this site's units from the axis rules: measure them
                # where the plan has them, as the BatchNorm will normalise them
                pin = AxisOverride(literal_glob(site.name), fix.unit_axis)
                pinned = replace(scan_options, unit_axes=(pin, *scan_options.unit_axes))
                site = whole_scan(model, data, pinned, stage=stage, label=label).sites[fix.index]
            moments[fix.index] = UnitMoments(site.stats.mean, site.stats.std ** 2)
        altered = altered or changes_outputs(fix, options)
    return moments


def _write_onnx(loaded: LoadedModel, report: ScanReport, plan: tuple[SiteFix, ...], moments: dict[int, UnitMoments],
                options: FixOptions, scan_options: ScanOptions, data: str, output: Path,
                stage: Stage | None = None) -> Written:
    from deadrelu.fix.onnx_rewrite import rewrite_onnx, rewritten_loaded

    moments = _downstream_moments(lambda fixes, known: rewritten_loaded(loaded, fixes, known, options.rewrite),
                                  plan, moments, options.rewrite, data, scan_options, stage)
    rewrite_onnx(loaded, plan, moments, options.rewrite, output)
    return Written((), None, moments)


def _deviation(loaded: LoadedModel, output: Path, data: str, scan_options: ScanOptions, stage: Stage | None,
               samples: int) -> OutputDeviation:
    """The fixed model's outputs against the original's, over the `samples` the scans saw."""
    from deadrelu.fix.outputs import output_function

    written = load_model(output)
    original, rewritten = output_function(loaded), output_function(written)
    options = _of_written(scan_options)
    # batched as the written model takes them (it may take one batch size where the original took any)
    batches = model_batches(written, open_source(data, options, written), options)
    if stage is not None:
        batches = _counted(batches, *stage("verifying: comparing outputs"), samples)
    return output_deviation(batches, original, rewritten)


def _of_written(scan_options: ScanOptions) -> ScanOptions:
    """The scan options for the written model, which needs no --arch, pickle or weights key."""
    return ScanOptions(**{**vars(scan_options), "arch": None, "trust_pickle": False, "weights_key": None})


def _counted(batches: Iterable[ModelInput], on_start: StartFn, progress: ProgressFn, samples: int) -> Iterator[ModelInput]:
    """The batches, each told to `progress` once it has been used."""
    on_start(samples)
    for batch in batches:
        yield batch
        progress(batch.size)
