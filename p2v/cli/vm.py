"""``p2v vm start|stop|console|list|xml``: run converted machines under QEMU."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import typer
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console
from p2v.errors import OutputError, UsageError
from p2v.vm import detached
from p2v.vm.cmdline import RunOverrides
from p2v.vm.libvirt import domain_xml
from p2v.vm.spec import VmSpec

vm_app = typer.Typer(
    help=(
        "Run converted VMs under QEMU in the background: start, stop, list, attach to the "
        "serial console, export libvirt XML."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

SPEC_ARG = typer.Argument(
    ..., help="The VM spec written by `p2v convert` (NAME.vm.json).", show_default=False
)
OUTPUT_OPTION = typer.Option(None, "--output", "-o", help="Write the XML to this file instead of stdout.")
NAME_ARG = typer.Argument(..., help="The VM name shown by `p2v vm list`.", show_default=False)


@vm_app.command("start")
@handle_errors
def start(
    spec: Path = SPEC_ARG,
    name: str | None = typer.Option(
        None, "--name", help="Run under this name instead of the spec's (to run two copies at once)."
    ),
    disk_bus: Literal["virtio", "virtio-scsi", "sata", "ide", "scsi"] | None = typer.Option(
        None,
        "--disk-bus",
        help="Attach every disk on this bus instead of the spec's (ide implies machine pc).",
    ),
    nic_model: Literal["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"] | None = typer.Option(
        None, "--nic-model", help="Emulate this NIC model instead of the spec's (MACs are kept)."
    ),
    machine: Literal["pc", "q35"] | None = typer.Option(
        None, "--machine", help="QEMU machine type instead of the spec's (pc = i440fx+PIIX, q35 = ICH9)."
    ),
    snapshot: bool = typer.Option(
        False,
        "--snapshot",
        help="Boot on throw-away qcow2 overlays: the disks are not written, changes vanish at stop.",
    ),
    ssh_port: int | None = typer.Option(
        None,
        "--ssh-port",
        min=1,
        max=65535,
        help="Host port on 127.0.0.1 forwarded to the guest's port 22 (default: a free port).",
    ),
    memory: int | None = typer.Option(None, "--memory", min=64, help="Memory in MiB instead of the spec's."),
    cpus: int | None = typer.Option(None, "--cpus", min=1, help="Number of vCPUs instead of the spec's."),
    wait_login: float | None = typer.Option(
        None,
        "--wait-login",
        min=1,
        metavar="SECONDS",
        help="Wait up to SECONDS for a login prompt on the serial console before returning.",
    ),
    json_output: bool = JSON_OPTION,
) -> None:
    """Start the VM of SPEC in the background and print how to reach it."""
    overrides = RunOverrides(
        disk_bus=disk_bus,
        nic_model=nic_model,
        machine=machine,
        snapshot=snapshot,
        ssh_port=ssh_port,
        memory_mib=memory,
        cpus=cpus,
    )
    info = detached.start_vm(
        spec,
        name=name,
        overrides=overrides,
        wait_for=detached.LOGIN_PROMPT if wait_login else None,
        wait_timeout=wait_login or 0.0,
    )
    if not info.accel.get("kvm_usable", False):
        err_console.print(
            f"[bold yellow]warning:[/] {info.accel_summary}: the guest runs 10-50x slower than under KVM",
            highlight=False,
            soft_wrap=True,
        )
    if json_output:
        emit_json(info.to_dict())
        return
    out_console.print(f"VM {info.name} started (pid {info.pid}, accel {info.accel_summary})", highlight=False)
    if info.ssh_command:
        out_console.print(f"  ssh:      {info.ssh_command}", highlight=False)
    out_console.print(f"  console:  p2v vm console {info.name}   (log: {info.console_log})", highlight=False)
    if info.snapshot:
        out_console.print(
            "  disks:    throw-away overlays (--snapshot): changes vanish at stop", highlight=False
        )
    out_console.print(f"  stop:     p2v vm stop {info.name}", highlight=False)


@vm_app.command("stop")
@handle_errors
def stop(
    name: str = NAME_ARG,
    timeout: float = typer.Option(
        60.0,
        "--timeout",
        min=0,
        help="Seconds to wait for the guest to power off after the ACPI power button.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Skip the power button: quit QEMU at once (the guest does not shut down)."
    ),
    json_output: bool = JSON_OPTION,
) -> None:
    """Stop VM NAME: ACPI power button, then QEMU quit, then kill; its console log is kept."""
    result = detached.stop_vm(name, timeout=timeout, force=force)
    if json_output:
        emit_json(result.to_dict())
        return
    how = {
        "powerdown": "the guest powered off",
        "quit": "QEMU quit (the guest did not shut down)",
        "kill": "QEMU was killed",
        "not-running": "it was not running; leftovers removed",
    }[result.method]
    out_console.print(f"VM {name} stopped in {result.seconds:.1f}s: {how}", highlight=False)
    if result.console_log:
        out_console.print(f"  console log kept: {result.console_log}", highlight=False)


@vm_app.command("console")
@handle_errors
def console(
    name: str = NAME_ARG,
    log: bool = typer.Option(
        False, "--log", help="Print the console log instead of attaching to the console."
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="With --log: keep printing new output until the VM stops (Ctrl-C ends)."
    ),
) -> None:
    """Attach to VM NAME's serial console (Ctrl-] detaches), or print its log with --log."""
    if follow and not log:
        raise UsageError("--follow needs --log")
    if log:
        if follow:
            for chunk in detached.follow_console(name):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(detached.console_log_path(name).read_text(errors="replace"))
        return
    info = detached.get_vm(name)
    err_console.print(f"Connected to the serial console of {info.name}; Ctrl-] detaches.", highlight=False)
    why = detached.attach_console(name)
    err_console.print(
        {"detached": "\r\ndetached", "closed": "\r\nthe VM closed its console", "eof": "\r\ninput ended"}[
            why
        ],
        highlight=False,
    )


@vm_app.command("list")
@handle_errors
def list_(json_output: bool = JSON_OPTION) -> None:
    """List the VMs started with `p2v vm start` on this host (running or dead)."""
    vms = detached.list_vms()
    if json_output:
        emit_json({"vms": [v.to_dict() for v in vms]})
        return
    if not vms:
        out_console.print("no VMs (start one with `p2v vm start SPEC`)", highlight=False)
        return
    table = Table("name", "state", "pid", "ssh", "accel", "started", "spec")
    for v in vms:
        state = v.state if v.status in (None, "running") else f"{v.state} ({v.status})"
        table.add_row(
            v.name,
            state,
            str(v.pid) if v.state == "running" else "-",
            v.ssh_command or "-",
            str(v.accel.get("accel", "?")).upper(),
            v.started_at,
            v.spec_path,
        )
    out_console.print(table)


@vm_app.command("xml")
@handle_errors
def xml(
    spec: Path = SPEC_ARG,
    output: Path | None = OUTPUT_OPTION,
) -> None:
    """Print the libvirt domain XML of SPEC (for `virsh define`)."""
    loaded = VmSpec.load(spec)
    text = domain_xml(loaded, spec.absolute().parent)
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as exc:
            raise OutputError(f"{output}: cannot write the domain XML: {exc.strerror}") from exc
        err_console.print(f"wrote {output}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(vm_app, name="vm")
