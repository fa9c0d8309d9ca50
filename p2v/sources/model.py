"""What a source looks like once opened: disks to read plus the machine's metadata.

Every source kind (image file, OVA/OVF, VMX, physical server over SSH) resolves to a
:class:`SourceMachine`. Fields a source does not know stay ``None``; the converter
fills them from guest inspection or defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SourceDisk:
    """One disk to read.

    ``qemu_filename`` is what qemu-img opens: a plain path, or a ``json:{...}``
    filename (a disk stored inside an OVA tar at an offset, say). ``format`` is the
    qemu format name (raw, qcow2, vmdk, vpc, vhdx), always explicit, never probed
    by qemu at copy time.
    """

    qemu_filename: str
    format: str
    display: str  # what to show the user / name in errors
    bus: str | None = None  # source controller kind: ide, sata, scsi, nvme, virtio
    controller: str | None = None  # e.g. "lsilogic", "pvscsi", "ahci"
    capacity: int | None = None  # virtual size in bytes, if the source says
    label: str | None = None


@dataclass
class SourceNic:
    mac: str | None = None
    model: str | None = None  # e1000, vmxnet3, ...
    network: str | None = None  # network name at the source ("VM Network")
    name: str | None = None  # interface name in the guest, if known (eth0)


@dataclass
class SourceMachine:
    kind: str  # disk | ova | ovf | vmx | ssh
    name: str | None
    disks: list[SourceDisk]
    cpus: int | None = None
    memory_mib: int | None = None
    firmware: str | None = None  # bios | uefi
    nics: list[SourceNic] = field(default_factory=list)
    description: str = ""
    notes: list[str] = field(default_factory=list)
    # temp files this source created (extracted OVA members, copied SSH disk); removed by close()
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    origin: Path | None = None
    # read from a running system: the copy is fuzzy, its filesystems must be checked
    live: bool = False

    def close(self) -> None:
        while self.cleanup:
            fn = self.cleanup.pop()
            fn()

    def __enter__(self) -> SourceMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
