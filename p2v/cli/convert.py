"""``p2v convert``: make a source bootable on KVM."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console, progress_bar, status_line
from p2v.convert.nics import parse_net_map
from p2v.convert.pipeline import ConvertOptions, convert

HELP = """Convert SOURCE into a VM that boots on KVM/QEMU, keeping it bootable on its original hardware.

SOURCE is one of: a disk image (raw/dd, qcow2, VMDK sparse/stream-optimized/flat with its
descriptor, VHD, VHDX), an OVA, an unpacked OVF, a VMware .vmx, or a physical Linux
server as ssh://user@host[:port]/dev/sdX (copied once over SSH; trust the host first
with `p2v trust`).

Writes DIR/NAME-disk0.qcow2 ..., DIR/NAME.vm.json (the VM spec for `p2v vm start`) and
DIR/NAME.xml (libvirt domain XML). The source is never written. On failure nothing is
left in DIR.
"""


def register(app: typer.Typer) -> None:
    @app.command("convert", help=HELP)
    @handle_errors
    def convert_cmd(
        source: str = typer.Argument(..., help="Disk image, OVA, OVF, VMX or ssh://user@host[:port]/dev/sdX."),
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing)."),
        name: str = typer.Option(None, "--name", "-n", help="VM name (default: from the source)."),
        fmt: str = typer.Option("qcow2", "--format", "-f", help="Output disk format: qcow2 or raw."),
        net: list[str] = typer.Option(
            [], "--net", help="Map a source network to a DR network: SRC=DST (repeatable; SRC '*' = any)."
        ),
        virtio_win: Path = typer.Option(
            None, "--virtio-win", help="virtio-win ISO or directory (required for Windows guests)."
        ),
        luks_key: list[Path] = typer.Option(
            [], "--luks-key", help="File holding a LUKS passphrase for encrypted guest volumes (repeatable)."
        ),
        root: str = typer.Option(None, "--root", help="OS root device to convert when a disk holds several."),
        cpus: int = typer.Option(None, "--cpus", min=1, help="vCPUs for the VM spec (default: from source)."),
        memory: int = typer.Option(None, "--memory", min=64, help="Memory in MiB (default: from source)."),
        identity: Path = typer.Option(None, "--identity", "-i", help="SSH private key for ssh:// sources."),
        known_hosts: Path = typer.Option(
            None, "--known-hosts", help="known_hosts file for ssh:// sources (default: p2v's own)."
        ),
        rebuild: str = typer.Option(
            "auto", "--rebuild",
            help="How boot files are rebuilt: 'guest' runs the guest's own initramfs tool and "
            "grub-mkconfig in the appliance; 'host' adds virtio to the existing initramfs on the host "
            "(original files kept byte for byte) and edits grub.cfg in place; 'auto' = guest when KVM "
            "works, host under TCG (where the guest's tools take minutes).",
        ),  # fmt: skip
        fsck: bool = typer.Option(
            None, "--fsck/--no-fsck",
            help="Check and repair the copy's filesystems before converting (default: only for ssh:// "
            "sources, which are copied while running).",
        ),  # fmt: skip
        force: bool = typer.Option(False, "--force", help="Overwrite existing output files of the same name."),
        json_output: bool = JSON_OPTION,
    ) -> None:
        keys = [p.read_text().rstrip("\n") for p in luks_key]
        opts = ConvertOptions(
            out_dir=out, name=name, out_format=fmt, net_map=parse_net_map(net), virtio_win=virtio_win,
            luks_keys=keys, root=root, force=force, identity=identity, known_hosts=known_hosts,
            cpus=cpus, memory_mib=memory, rebuild=rebuild, fsck=fsck,
        )  # fmt: skip
        with progress_bar(enabled=not json_output) as prog:
            report = convert(source, opts, progress=prog, on_step=None if json_output else status_line)
        if json_output:
            emit_json(report.to_dict())
            return
        g = report.guest
        out_console.print(
            f"[bold green]Converted[/] {report.source} -> {report.name}: {g['product'] or g['distro']} "
            f"({g['type']} {g['version']}, {g['arch']}, {g['firmware']}) in {report.timings['total']:.1f}s",
            highlight=False,
        )
        table = Table("step", "changed", "what", show_header=True, header_style="bold")
        for s in report.steps:
            table.add_row(s.name, "yes" if s.changed else "-", s.detail)
        out_console.print(table)
        for w in report.warnings:
            err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
        for d in report.files["disks"]:
            out_console.print(f"disk: {d}", highlight=False)
        out_console.print(f"spec: {report.files['spec']}", highlight=False)
        out_console.print(f"libvirt: {report.files['libvirt_xml']}", highlight=False)
        out_console.print(f"boot it: p2v vm start {report.files['spec']}", highlight=False)
