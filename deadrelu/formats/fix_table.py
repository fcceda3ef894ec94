"""The terminal face of `deadrelu fix`: the plan, then (after --apply) the verification."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from deadrelu.fix import FixReport


def render_fix(report: FixReport, console: Console) -> None:
    if not report.plan:
        console.print(f"Nothing to fix in {report.model}: {report.nothing_planned}; nothing written.",
                      highlight=False, markup=False, soft_wrap=True)
        return
    console.print(plan_table(report))
    if not report.applied:
        console.print("Plan only: add --apply -o OUT to write a fixed model.", highlight=False, markup=False)
        return
    console.print(f"Wrote {report.output}", highlight=False, markup=False)
    console.print(verification_table(report))
    deviation = report.deviation
    if deviation is not None:
        top1 = f", top-1 agreement {deviation.top1_agreement:.1%}" if deviation.top1_agreement is not None else ""
        console.print(f"Outputs on {deviation.samples} samples: max |diff| {deviation.max_abs:.3g}, mean |diff| "
                      f"{deviation.mean_abs:.3g}, relative {deviation.relative:.3g}{top1}", highlight=False, markup=False)
    for note in report.notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    if report.instructions:
        console.print("Change your model class accordingly:", highlight=False, markup=False)
        for line in report.instructions:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    if report.state_dict:
        console.print(f"Its weights, new parameters included: {report.state_dict}", highlight=False, markup=False)


def plan_table(report: FixReport) -> Table:
    table = Table(title=f"Fix plan for {report.model}", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    table.add_column("site", overflow="fold", min_width=12)
    table.add_column("dead", justify="right", no_wrap=True)
    table.add_column("change", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1)
    for fix in report.plan:
        table.add_row(fix.site, f"{len(fix.dead)}/{fix.units}", fix.change, fix.reason)
    return table


def verification_table(report: FixReport) -> Table:
    table = Table(title="Verification (the written file, reloaded)", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0))
    table.add_column("site", overflow="fold", min_width=12)
    table.add_column("change", no_wrap=True)
    table.add_column("dead before", justify="right", no_wrap=True)
    table.add_column("dead after", justify="right", no_wrap=True)
    for change in report.changes:
        table.add_row(change.site, change.change, str(change.dead_before), str(change.dead_after))
    return table
