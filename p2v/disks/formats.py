"""Recognise disk image formats by their own signatures and check they are safe to open.

We never let qemu guess a format (a raw image that starts with a qcow2 header is
the classic way to make qemu open a file of the attacker's choosing). The format
comes from the file's magic, is checked against the file name's extension, and is
then passed explicitly to every qemu tool.

Safety checks: a backing file (qcow2, vmdk parent) must exist and stay inside the
image's directory; ``json:`` and protocol backing names are refused; external
data files likewise; the image must pass ``qemu-img check`` where the format has
one and must not be shorter than its metadata says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.disks import qemuimg
from p2v.errors import InvalidInput, SourceNotFound, UnsafeInput

# extension -> qemu format
EXT_FORMATS = {
    ".qcow2": "qcow2", ".qcow": "qcow2", ".vmdk": "vmdk", ".vhd": "vpc", ".vpc": "vpc",
    ".vhdx": "vhdx", ".vdi": "vdi", ".raw": "raw", ".img": "raw", ".dd": "raw", ".bin": "raw",
}  # fmt: skip
FORMAT_NAMES = {"qcow2": "qcow2", "vmdk": "VMDK", "vpc": "VHD", "vhdx": "VHDX", "vdi": "VDI", "raw": "raw"}
SIGNATURE_HINT = {
    "qcow2": "'QFI\\xfb' header", "vmdk": "'KDMV' header or '# Disk DescriptorFile'",
    "vpc": "'conectix' footer", "vhdx": "'vhdxfile' signature", "vdi": "VirtualBox header",
}  # fmt: skip


@dataclass
class ImageInfo:
    path: Path
    format: str  # qemu format name
    virtual_size: int
    actual_size: int
    backing_chain: list[Path] = field(default_factory=list)
    encrypted: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def format_name(self) -> str:
        return FORMAT_NAMES.get(self.format, self.format)


def sniff_format(path: Path) -> str | None:
    """The format named by the file's own signature, or None (raw or unknown)."""
    with path.open("rb") as f:
        head = f.read(1024)
        if head[:4] == b"QFI\xfb":
            return "qcow2"
        if head[:4] == b"KDMV" or head[:4] == b"COWD":
            return "vmdk"
        if b"# Disk DescriptorFile" in head[:512]:
            return "vmdk"
        if head[:8] == b"vhdxfile":
            return "vhdx"
        if head[:8] == b"conectix":
            return "vpc"
        if head[64:68] == b"\x7f\x10\xda\xbe":
            return "vdi"
        if head[:6] == b"LUKS\xba\xbe":
            return "luks"
        size = f.seek(0, os.SEEK_END)
        if size >= 512:
            f.seek(size - 512)
            if f.read(8) == b"conectix":  # fixed VHD: footer only at the end
                return "vpc"
    return None


def detect_format(path: Path) -> str:
    """Decide the qemu format of ``path`` from its signature and extension."""
    if not path.exists():
        raise SourceNotFound(f"{path}: no such file")
    if path.is_dir():
        raise InvalidInput(f"{path}: is a directory, expected a disk image")
    try:
        sniffed = sniff_format(path)
    except OSError as exc:
        raise SourceNotFound(f"{path}: cannot read: {exc.strerror}") from exc
    ext_fmt = EXT_FORMATS.get(path.suffix.lower())
    if sniffed == "luks":
        return "luks"
    if ext_fmt and ext_fmt != "raw" and sniffed != ext_fmt:
        found = f"looks like {FORMAT_NAMES.get(sniffed, sniffed)}" if sniffed else "has no known signature"
        raise InvalidInput(
            f"{path}: not a valid {FORMAT_NAMES[ext_fmt]} image (missing {SIGNATURE_HINT[ext_fmt]}; "
            f"the file {found})"
        )
    return sniffed or "raw"


def _inside(base: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(base.resolve())
        return True
    except ValueError:
        return False


def check_backing(path: Path, data: dict[str, Any]) -> list[Path]:
    """Refuse backing files / data files that escape the image's folder or are missing."""
    chain: list[Path] = []
    base = path.parent
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    spec = data.get("format-specific", {}).get("data", {})
    data_file = spec.get("data-file")
    for label, ref in (("backing file", backing), ("external data file", data_file)):
        if not ref:
            continue
        if ref.startswith("json:") or "://" in ref or ref.startswith(("nbd:", "/dev/")):
            raise UnsafeInput(f"{path}: {label} {ref!r} is not a plain file; refusing to follow it")
        target = Path(ref) if Path(ref).is_absolute() else base / ref
        if not _inside(base, target):
            raise UnsafeInput(
                f"{path}: {label} {ref!r} points outside the image's directory {base}; refusing to follow it"
            )
        if not target.exists():
            raise SourceNotFound(f"{path}: {label} {ref!r} does not exist")
        chain.append(target)
    return chain


def inspect_image(path: Path, fmt: str | None = None) -> ImageInfo:
    """Validate an image file and describe it. Raises a P2VError naming ``path`` on any problem."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "luks":
        from p2v.errors import UnsupportedGuest

        raise UnsupportedGuest(f"{path}: the whole disk is LUKS-encrypted; decrypt it before converting")
    what = str(path)
    data = qemuimg.info(str(path), fmt, what=what)
    chain = check_backing(path, data)
    # follow the chain one level at a time, each checked against its own folder
    seen = {path.resolve()}
    todo = list(chain)
    while todo:
        b = todo.pop()
        if b.resolve() in seen:
            raise UnsafeInput(f"{path}: backing chain loops at {b}")
        seen.add(b.resolve())
        bfmt = detect_format(b)
        bdata = qemuimg.info(str(b), bfmt, what=f"{path} (backing file {b})")
        more = check_backing(b, bdata)
        if not all(_inside(path.parent, m) for m in more):
            raise UnsafeInput(f"{path}: backing chain leaves the image's directory at {b}")
        chain += more
        todo += more
    vsize = int(data.get("virtual-size", 0))
    if vsize <= 0:
        raise InvalidInput(f"{path}: image reports no virtual size")
    if fmt in ("qcow2", "vmdk", "vhdx", "vdi"):
        _check_integrity(path, fmt, vsize)
    encrypted = bool(data.get("encrypted"))
    if encrypted:
        from p2v.errors import UnsupportedGuest

        raise UnsupportedGuest(f"{path}: the {FORMAT_NAMES.get(fmt, fmt)} image is encrypted; decrypt it first")
    return ImageInfo(
        path=path, format=fmt, virtual_size=vsize, actual_size=int(data.get("actual-size", 0)),
        backing_chain=chain, details=data,
    )  # fmt: skip


def _check_integrity(path: Path, fmt: str, vsize: int) -> None:
    qemuimg.verify_integrity(str(path), fmt, what=str(path), label=FORMAT_NAMES.get(fmt, fmt))
