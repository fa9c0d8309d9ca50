"""The ``p2v`` command: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from p2v import __version__
from p2v.cli import convert, doctor, inspect_cmd, plan, protect, recovery, run, trust, vm
from p2v.cli._common import setup_logging

app = typer.Typer(
    name="p2v",
    help=(
        "Convert physical servers and foreign-hypervisor VMs into bootable KVM/QEMU VMs "
        "and keep them protected at a DR site.\n\n"
        "Exit codes: 0 ok, 2 usage, 3 source not found, 4 invalid/unsafe input, "
        "5 unsupported guest, 6 SSH host key not trusted, 7 remote failure, "
        "8 missing host component, 9 conversion failed, 10 QEMU runtime failure, "
        "11 output not writable, 12 DR site problem, 13 machine busy, 14 verification failed, "
        "15 source changed, 16 run failed, 17 split-brain, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"p2v {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output on stderr (-vv: debug)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    setup_logging(verbose)


for _module in (doctor, inspect_cmd, convert, trust, vm, protect, plan, recovery, run):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
