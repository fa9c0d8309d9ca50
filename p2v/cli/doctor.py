"""``p2v doctor``: check the host components p2v drives."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, handle_errors, out_console
from p2v.doctor import run_checks
from p2v.errors import MissingComponent


@handle_errors
def doctor(
    reprobe: bool = typer.Option(
        False, "--reprobe", help="Probe KVM again by booting a kernel, ignoring the cached verdict."
    ),
    no_launch: bool = typer.Option(
        False,
        "--no-launch",
        help="Skip the libguestfs appliance launch (10-15 s under TCG); only check its bindings load.",
    ),
    json_output: bool = JSON_OPTION,
) -> None:
    """Check qemu, libguestfs, libnbd, hivex, OVMF, ssh and KVM; exit 8 when an essential one is missing."""
    report = run_checks(reprobe=reprobe, launch_appliance=not no_launch)
    if json_output:
        emit_json(report.to_dict())
    else:
        table = Table("component", "status", "version / detail", "fix")
        for c in report.checks:
            if c.ok:
                status = "[green]ok[/]"
            elif c.essential:
                status = "[bold red]MISSING[/]"
            else:
                status = "[yellow]missing (optional)[/]"
            table.add_row(escape(c.name), status, escape(c.detail), escape(c.fix))
        out_console.print(table)
        style = "green" if report.accel.get("kvm_usable") else "yellow"
        out_console.print(f"acceleration: [{style}]{escape(report.accel_summary)}[/]", highlight=False)
        verdict = "all essential components work" if report.ok else "essential components are missing"
        out_console.print(f"p2v doctor: {verdict}", highlight=False)
    if not report.ok:
        raise typer.Exit(MissingComponent.exit_code)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
