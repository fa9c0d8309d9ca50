"""A disk image file as a source (raw/dd, qcow2, VMDK, VHD, VHDX, VDI)."""

from __future__ import annotations

from pathlib import Path

from p2v.disks.formats import detect_format, inspect_image
from p2v.sources.model import SourceDisk, SourceMachine


def open_image(path: Path) -> SourceMachine:
    """Validate ``path`` (signature, backing files, integrity) and describe it as a source."""
    fmt = detect_format(path)
    if fmt == "vmdk":
        from p2v.sources.vmdk import validate_vmdk

        disk = validate_vmdk(path)
    else:
        info = inspect_image(path, fmt)
        disk = SourceDisk(
            qemu_filename=str(path.resolve()), format=info.format, display=str(path),
            capacity=info.virtual_size,
        )  # fmt: skip
    name = path.name.split(".")[0] or "converted"
    return SourceMachine(kind="disk", name=name, disks=[disk], description=f"{fmt} image {path}", origin=path)
