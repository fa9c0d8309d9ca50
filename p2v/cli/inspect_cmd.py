"""``p2v inspect``: what is on a disk or VM (read-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, handle_errors, out_console, status_line
from p2v.convert.inspect import inspect_source

HELP = """Show what is on SOURCE without changing it: OS, distro and version, kernels and which
one boots, initramfs tool, bootloader, firmware (BIOS/UEFI), root and mountpoints, NICs and
MACs in the guest's config, virtio drivers in the kernel and in the initramfs, hypervisor
guest tools; for Windows, version, control set, drivers and RTC mode. SOURCE is any
source `p2v convert` accepts (an ssh:// source is copied to a temporary file first).
"""


def _yn(v: bool) -> str:
    return "yes" if v else "no"


def _linux_rows(lx: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for k in lx["kernels"]:
        mark = " (boots)" if k["boots"] else ""
        virt_k = ", ".join(sorted(set(k["virtio_available"]) | set(k["virtio_builtin"]))) or "none"
        virt_i = ", ".join(k["virtio_builtin"] + k["virtio_in_initrd"]) or "none"
        rows.append((f"kernel {k['version']}{mark}", f"virtio in kernel: {virt_k}; in initramfs: {virt_i}"))
    rows += [
        ("initramfs tool", f"{lx['initramfs_tool'] or 'none'}"
         + (f" (MODULES={lx['initramfs_modules_setting']})" if lx["initramfs_modules_setting"] else "")),
        ("bootloader", lx["bootloader"]),
        ("firmware", lx["firmware"] + (f" (ESP {lx['esp']})" if lx["esp"] else "")),
    ]  # fmt: skip
    for n in lx["nics"]:
        rows.append((f"nic {n['name']}", f"mac {n['mac'] or '-'} {n['method'] or ''} ({n['source']})"))
    if lx["devrefs"]:
        devs = sorted({f"{r['device']} in {r['file']}" for r in lx["devrefs"]})
        rows.append(("device names", "; ".join(devs)))
    rows.append(("guest tools", ", ".join(f"{k}: {len(v)} files" for k, v in lx["guest_tools"].items()) or "none"))
    rows.append(("selinux", lx["selinux"]))
    return rows


def register(app: typer.Typer) -> None:
    @app.command("inspect", help=HELP)
    @handle_errors
    def inspect_cmd(
        source: str = typer.Argument(..., help="Disk image, OVA, OVF, VMX or ssh://user@host[:port]/dev/sdX."),
        luks_key: list[Path] = typer.Option([], "--luks-key", help="File holding a LUKS passphrase (repeatable)."),
        root: str = typer.Option(None, "--root", help="OS root device when a disk holds several."),
        identity: Path = typer.Option(None, "--identity", "-i", help="SSH private key for ssh:// sources."),
        known_hosts: Path = typer.Option(None, "--known-hosts", help="known_hosts file for ssh:// sources."),
        json_output: bool = JSON_OPTION,
    ) -> None:
        if not json_output:
            status_line(f"inspecting {source} ...")
        keys = [p.read_text().rstrip("\n") for p in luks_key]
        rep = inspect_source(source, luks_keys=keys, root=root, identity=identity, known_hosts=known_hosts)
        if json_output:
            emit_json(rep.to_dict())
            return
        g = rep.guest
        t = Table("property", "value", show_header=True, header_style="bold", title=f"{source}")
        t.add_row("source", f"{rep.source_kind}")
        t.add_row("os", f"{g['type']} {g['distro']} {g['version']} ({g['product']})")
        t.add_row("arch", g["arch"])
        t.add_row("hostname", g["hostname"])
        t.add_row("root", g["root"])
        t.add_row("mountpoints", ", ".join(f"{m} on {d}" for m, d in sorted(g["mountpoints"].items())))
        md = rep.metadata
        if md.get("cpus") or md.get("memory_mib"):
            t.add_row("source vm", f"{md.get('cpus') or '?'} vCPU, {md.get('memory_mib') or '?'} MiB, "
                                   f"firmware {md.get('firmware') or '?'}")  # fmt: skip
        for n in md.get("nics", []):
            t.add_row("source nic", f"{n.get('mac')} {n.get('model') or ''} {n.get('network') or ''}")
        if rep.linux:
            for k, v in _linux_rows(rep.linux):
                t.add_row(k, v)
        if rep.windows:
            for k, v in rep.windows.items():
                t.add_row(str(k), v if isinstance(v, str) else str(v))
        for n in rep.notes:
            t.add_row("note", n)
        out_console.print(t)
