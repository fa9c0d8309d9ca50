"""``p2v inspect``: what is on a source, read-only."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.convert.guest import find_root, mount_guest
from p2v.convert.linux.facts import linux_facts
from p2v.disks import qemuimg
from p2v.disks.guestfs import open_guestfs
from p2v.sources.resolve import SourceOptions, open_source


@dataclass
class InspectionReport:
    source: str
    source_kind: str
    metadata: dict[str, Any]
    guest: dict[str, Any]
    linux: dict[str, Any] | None = None
    windows: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_source(
    source: str,
    *,
    luks_keys: list[str] | None = None,
    root: str | None = None,
    identity: Path | None = None,
    known_hosts: Path | None = None,
) -> InspectionReport:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="p2v-inspect-") as tmp:
        work = Path(tmp)
        with open_source(source, SourceOptions(work, identity, known_hosts)) as src:
            overlays = []
            for i, disk in enumerate(src.disks):
                ov = work / f"ro-{i}.qcow2"
                qemuimg.create_overlay(ov, disk.qemu_filename, disk.format)
                overlays.append((ov, "qcow2"))
            meta = {
                "name": src.name, "cpus": src.cpus, "memory_mib": src.memory_mib, "firmware": src.firmware,
                "disks": [{"source": d.display, "format": d.format, "bus": d.bus, "controller": d.controller,
                           "capacity": d.capacity} for d in src.disks],
                "nics": [asdict(n) for n in src.nics],
            }  # fmt: skip
            with open_guestfs(overlays, readonly=True) as g:
                groot = find_root(g, what=src.description or source, luks_keys=luks_keys, root=root)
                mount_guest(g, groot, readonly=True)
                guest = {
                    "type": groot.type, "distro": groot.distro, "version": groot.version,
                    "product": groot.product, "arch": groot.arch, "hostname": groot.hostname,
                    "root": groot.root, "mountpoints": groot.mountpoints, "filesystems": groot.filesystems,
                    "package_format": groot.package_format,
                }  # fmt: skip
                report = InspectionReport(source, src.kind, meta, guest, notes=list(src.notes) + groot.notes)
                if groot.type == "linux":
                    report.linux = asdict(linux_facts(g, groot.package_format))
                    report.guest["firmware"] = report.linux["firmware"]
                elif groot.type == "windows":
                    from p2v.convert.windows import windows_facts

                    report.windows = windows_facts(g, groot.root, asdict(groot))
    report.seconds = time.monotonic() - t0
    return report
