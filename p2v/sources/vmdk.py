"""VMDK files: descriptor parsing, extent and snapshot-chain checks, truncation detection.

A VMDK is either a small text *descriptor* naming extent files (monolithicFlat,
twoGbMaxExtentSparse, vmfs, snapshot deltas), or a binary *hosted sparse* file
("KDMV" header: monolithicSparse, streamOptimized) whose descriptor is embedded
at the sector the header names. Everything here only reads.

Safety rules: every extent and parent named by a descriptor must stay inside the
descriptor's folder (a VMDK could otherwise make qemu read ``/etc/shadow`` into a
converted disk); sparse extents must hold every grain their tables point at.
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from p2v.disks import qemuimg
from p2v.errors import InvalidInput, SourceNotFound, UnsafeInput
from p2v.sources.model import SourceDisk

SECTOR = 512
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
MAX_DESCRIPTOR_BYTES = 1 << 20
MAX_CHAIN_DEPTH = 64

# hosted sparse header, little endian (VMware "Virtual Disk Format 1.1", SparseExtentHeader)
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_FLAG_COMPRESSED = 1 << 16
_GRAIN_MARKER = struct.Struct("<QI")

_EXTENT_RE = re.compile(
    r"^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+\"([^\"]*)\"(?:\s+(\d+))?)?\s*$",
    re.IGNORECASE,
)
_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)$")
_EXTENT_TYPES = {"FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE"}
_FILE_BACKED_FLAT = {"FLAT", "VMFS"}
_SPARSE_CREATE_TYPES = {
    "monolithicsparse", "streamoptimized", "twogbmaxextentsparse", "vmfssparse", "sesparse",
}


@dataclass
class VmdkExtent:
    access: str  # RW | RDONLY | NOACCESS
    sectors: int
    type: str  # FLAT | SPARSE | ZERO | VMFS | VMFSSPARSE | VMFSRDM | VMFSRAW | SESPARSE
    filename: str | None = None  # as written in the descriptor (relative to its folder)
    offset: int = 0  # start sector inside the extent file (FLAT/VMFS)


@dataclass
class VmdkDescriptor:
    create_type: str
    extents: list[VmdkExtent]
    version: int | None = None
    cid: int | None = None
    parent_cid: int | None = None
    parent_hint: str | None = None  # parentFileNameHint: the snapshot's parent
    ddb: dict[str, str] = field(default_factory=dict)  # the "disk database" (ddb.*) keys
    embedded: bool = False  # read from inside a binary sparse file

    @property
    def adapter_type(self) -> str | None:
        return self.ddb.get("ddb.adaptertype")

    @property
    def capacity(self) -> int:
        """Virtual size in bytes: the sum of the extents."""
        return sum(e.sectors for e in self.extents) * SECTOR


@dataclass
class SparseHeader:
    version: int
    flags: int
    capacity_sectors: int
    grain_sectors: int
    descriptor_sector: int
    descriptor_sectors: int
    gtes_per_gt: int
    gd_sector: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & _FLAG_COMPRESSED)


@dataclass
class ImageFacts:
    """What ``qemu-img info`` says about an image qemu could open."""

    virtual_size: int
    backing: str | None = None
    check_errors: int = 0


# --- descriptor text -----------------------------------------------------------------------------


def parse_descriptor(text: str, *, origin: str, embedded: bool = False) -> VmdkDescriptor:
    """Parse VMDK descriptor text. Raises InvalidInput naming ``origin`` when it is not one."""
    create_type: str | None = None
    version = cid = parent_cid = None
    parent_hint: str | None = None
    extents: list[VmdkExtent] = []
    ddb: dict[str, str] = {}
    for lineno, raw in enumerate(text.replace("\0", "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            kind = m.group(3).upper()
            if kind not in _EXTENT_TYPES:
                raise InvalidInput(f"{origin}: line {lineno}: unknown VMDK extent type {kind!r}")
            extents.append(
                VmdkExtent(
                    access=m.group(1).upper(),
                    sectors=int(m.group(2)),
                    type=kind,
                    filename=m.group(4),
                    offset=int(m.group(5) or 0),
                )
            )
            continue
        kv = _KEY_RE.match(line)
        if not kv:
            continue  # tolerate lines VMware may add; extents and keys are what matter
        key, value = kv.group(1), _unquote(kv.group(2))
        lkey = key.lower()
        if lkey.startswith("ddb."):
            ddb[lkey] = value
        elif lkey == "createtype":
            create_type = value
        elif lkey == "version":
            version = _int_or_none(value, 10)
        elif lkey == "cid":
            cid = _int_or_none(value, 16)
        elif lkey == "parentcid":
            parent_cid = _int_or_none(value, 16)
        elif lkey == "parentfilenamehint":
            parent_hint = value or None
    if create_type is None:
        raise InvalidInput(f"{origin}: not a VMDK descriptor (no createType line)")
    if not extents:
        raise InvalidInput(f"{origin}: VMDK descriptor lists no extents")
    return VmdkDescriptor(
        create_type=create_type,
        extents=extents,
        version=version,
        cid=cid,
        parent_cid=parent_cid,
        parent_hint=parent_hint,
        ddb=ddb,
        embedded=embedded,
    )


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _int_or_none(value: str, base: int) -> int | None:
    try:
        return int(value, base)
    except ValueError:
        return None


def looks_like_descriptor(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) is VMDK descriptor text."""
    if head.startswith(DESCRIPTOR_MAGIC):
        return True
    window = head[:4096]
    return b"\0" not in window and b"createType" in window and b"RW " in window


# --- binary sparse header -----------------------------------------------------------------------


class _Window:
    """A byte range of a file (a whole file, or a member inside an OVA tar)."""

    def __init__(self, f: BinaryIO, offset: int, size: int, label: str) -> None:
        self.f, self.offset, self.size, self.label = f, offset, size, label

    def pread(self, pos: int, n: int) -> bytes:
        if pos < 0 or n < 0 or pos + n > self.size:
            return b""
        self.f.seek(self.offset + pos)
        return self.f.read(n)


@contextmanager
def _open_window(path: Path, offset: int, size: int | None, label: str) -> Iterator[_Window]:
    try:
        f = open(path, "rb")
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{label}: file not found") from exc
    except OSError as exc:
        raise SourceNotFound(f"{label}: cannot open: {exc.strerror}") from exc
    with f:
        if size is None:
            size = path.stat().st_size - offset
        yield _Window(f, offset, size, label)


def _parse_header(raw: bytes, label: str) -> SparseHeader:
    if len(raw) < _HEADER.size:
        raise InvalidInput(f"{label}: VMDK is truncated: shorter than its {SECTOR}-byte header")
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, _rgd, gd, _overhead, _unclean,
     _eol, _compress) = _HEADER.unpack_from(raw)
    if magic != SPARSE_MAGIC:
        raise InvalidInput(f"{label}: not a hosted sparse VMDK (no KDMV header)")
    if grain == 0 or grain & (grain - 1) or grain > 1 << 16:
        raise InvalidInput(f"{label}: corrupt VMDK header: grain size {grain} sectors is invalid")
    if not 1 <= gtes <= 4096:
        raise InvalidInput(f"{label}: corrupt VMDK header: {gtes} entries per grain table")
    if capacity == 0 or capacity > 1 << 42:
        raise InvalidInput(f"{label}: corrupt VMDK header: capacity of {capacity} sectors")
    return SparseHeader(version, flags, capacity, grain, desc_off, desc_size, gtes, gd)


def _read_embedded_descriptor(win: _Window, header: SparseHeader) -> VmdkDescriptor | None:
    if header.descriptor_sector == 0 or header.descriptor_sectors == 0:
        return None
    nbytes = header.descriptor_sectors * SECTOR
    if nbytes > MAX_DESCRIPTOR_BYTES:
        raise InvalidInput(f"{win.label}: embedded VMDK descriptor claims {nbytes} bytes; refusing")
    raw = win.pread(header.descriptor_sector * SECTOR, nbytes)
    if len(raw) != nbytes:
        raise InvalidInput(f"{win.label}: VMDK is truncated: its embedded descriptor lies past the end")
    text = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    if not text.strip():
        return None  # room reserved but left empty (extents of a split sparse disk)
    return parse_descriptor(text, origin=win.label, embedded=True)


def _check_grains(win: _Window, header: SparseHeader) -> None:
    """Raise InvalidInput when the grain tables point past the end of the data (a cut-off file)."""
    gd_sector = header.gd_sector
    if gd_sector == _GD_AT_END:
        # streamOptimized: the real grain directory offset is in the footer, 1024 bytes from the end
        footer_raw = win.pread(win.size - 2 * SECTOR, SECTOR)
        try:
            footer = _parse_header(footer_raw, win.label)
        except InvalidInput as exc:
            raise InvalidInput(
                f"{win.label}: VMDK stream is truncated or corrupt: no footer at its end"
            ) from exc
        gd_sector = footer.gd_sector
    span = header.grain_sectors * header.gtes_per_gt
    gd_entries = -(-header.capacity_sectors // span)
    if gd_entries > 1 << 24:
        raise InvalidInput(f"{win.label}: corrupt VMDK header: {gd_entries} grain directory entries")
    gd = _u32_array(win.pread(gd_sector * SECTOR, gd_entries * 4))
    if len(gd) != gd_entries:
        raise InvalidInput(f"{win.label}: VMDK is truncated: its grain directory lies past the end")
    gt_bytes = header.gtes_per_gt * 4
    last = 0
    for gt_sector in gd:
        if gt_sector == 0:
            continue
        gt = _u32_array(win.pread(gt_sector * SECTOR, gt_bytes))
        if len(gt) != header.gtes_per_gt:
            raise InvalidInput(
                f"{win.label}: VMDK is truncated: grain table at sector {gt_sector} lies past the end "
                f"({win.size} bytes)"
            )
        top = max(gt)
        if top > last:
            last = top
    if last <= 1:  # 0 = unallocated, 1 = zeroed grain: no data needed
        return
    start = last * SECTOR
    if header.compressed:
        marker = win.pread(start, _GRAIN_MARKER.size)
        if len(marker) != _GRAIN_MARKER.size:
            end = start + _GRAIN_MARKER.size
        else:
            _lba, data_size = _GRAIN_MARKER.unpack(marker)
            end = start + _GRAIN_MARKER.size + data_size
    else:
        end = start + header.grain_sectors * SECTOR
    if end > win.size:
        raise InvalidInput(
            f"{win.label}: VMDK is truncated: its last grain ends at byte {end} "
            f"but the file holds only {win.size} bytes"
        )


def _u32_array(raw: bytes) -> array[int]:
    arr = array("I")
    arr.frombytes(raw[: len(raw) - len(raw) % 4])
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def inspect_sparse(
    path: Path, *, offset: int = 0, size: int | None = None, label: str | None = None
) -> tuple[SparseHeader, VmdkDescriptor | None]:
    """Check a hosted sparse VMDK (optionally a byte range of a bigger file, e.g. an OVA member).

    Returns the header and the embedded descriptor (None if it has none). Raises
    InvalidInput when the header is bad or the file is cut short.
    """
    label = label or str(path)
    with _open_window(path, offset, size, label) as win:
        header = _parse_header(win.pread(0, SECTOR), label)
        desc = _read_embedded_descriptor(win, header)
        _check_grains(win, header)
    return header, desc


# --- whole-file API -----------------------------------------------------------------------------


def read_descriptor(path: Path) -> VmdkDescriptor | None:
    """Read the descriptor of a VMDK file.

    Text descriptors are parsed; for a binary sparse file (monolithicSparse,
    streamOptimized) the descriptor embedded at the sector its header names is
    returned with ``embedded=True``. Returns None for a binary VMDK that has no
    embedded descriptor (an ESX "COWD" delta, or a sparse header without one).
    Raises SourceNotFound when the file is missing, InvalidInput when it is not a VMDK.
    """
    path = Path(path)
    label = str(path)
    with _open_window(path, 0, None, label) as win:
        head = win.pread(0, min(win.size, 4096))
        if head[:4] == SPARSE_MAGIC:
            return _read_embedded_descriptor(win, _parse_header(head, label))
        if head[:4] == COWD_MAGIC:
            return None
        if not looks_like_descriptor(head):
            raise InvalidInput(f"{label}: not a VMDK (neither a descriptor nor a sparse header)")
        if win.size > MAX_DESCRIPTOR_BYTES:
            raise InvalidInput(f"{label}: VMDK descriptor is {win.size} bytes; refusing (limit 1 MiB)")
        text = win.pread(0, win.size).decode("utf-8", errors="replace")
    return parse_descriptor(text, origin=label)


def _inside(folder: Path, name: str, *, what: str, owner: Path) -> Path:
    """Resolve ``name`` relative to ``folder``; refuse anything that lands outside it."""
    candidate = Path(name)
    target = candidate if candidate.is_absolute() else folder / candidate
    root = folder.resolve()
    resolved = target.resolve()
    if not resolved.is_relative_to(root):
        raise UnsafeInput(
            f"{owner}: {what} {name!r} lies outside the VMDK's folder {folder}; refusing to follow it",
            hint="copy the whole chain into one folder with relative names",
        )
    return target


def _bus_for_adapter(adapter: str | None) -> tuple[str | None, str | None]:
    if not adapter:
        return None, None
    adapter = adapter.lower()
    if adapter == "ide":
        return "ide", None
    if adapter in {"lsilogic", "buslogic", "legacyesx", "pvscsi", "lsisas1068"}:
        return "scsi", adapter
    return None, adapter


def validate_vmdk(path: Path) -> SourceDisk:
    """Check a VMDK file and everything it points at; return it as a SourceDisk.

    Raises SourceNotFound (the VMDK, an extent or a parent is missing), UnsafeInput
    (an extent or parent outside the VMDK's folder), InvalidInput (not a VMDK,
    truncated, corrupt, unsupported raw-device extent).
    """
    path = Path(path)
    capacity, desc = _validate_chain(path, seen=set(), depth=0)
    bus, controller = _bus_for_adapter(desc.adapter_type if desc else None)
    return SourceDisk(
        qemu_filename=str(path.absolute()),
        format="vmdk",
        display=str(path),
        bus=bus,
        controller=controller,
        capacity=capacity,
    )


def _validate_chain(path: Path, *, seen: set[Path], depth: int) -> tuple[int, VmdkDescriptor | None]:
    if not path.is_file():
        raise SourceNotFound(f"{path}: VMDK file not found")
    key = path.resolve()
    if key in seen:
        raise InvalidInput(f"{path}: VMDK snapshot chain loops back to this file")
    if depth > MAX_CHAIN_DEPTH:
        raise InvalidInput(f"{path}: VMDK snapshot chain is deeper than {MAX_CHAIN_DEPTH}")
    seen.add(key)
    folder = path.absolute().parent
    with open(path, "rb") as f:
        head = f.read(4096)
    sparse_file = False
    if head[:4] == SPARSE_MAGIC:
        header, desc = inspect_sparse(path)
        capacity = header.capacity_sectors * SECTOR
        sparse_file = True
    elif head[:4] == COWD_MAGIC:
        raise InvalidInput(
            f"{path}: this is an ESX sparse extent (COWD), not a disk; open its descriptor .vmdk instead"
        )
    else:
        desc = read_descriptor(path)
        assert desc is not None  # text descriptors always parse to one or raise
        capacity = desc.capacity
        for extent in desc.extents:
            sparse_file |= _validate_extent(path, folder, extent)
    if desc and desc.create_type.lower() in _SPARSE_CREATE_TYPES:
        sparse_file = True
    if desc and desc.parent_hint:
        parent = _inside(folder, desc.parent_hint, what="parent (parentFileNameHint)", owner=path)
        if not parent.is_file():
            raise SourceNotFound(f"{path}: parent VMDK {desc.parent_hint!r} not found in {folder}")
        _validate_chain(parent, seen=seen, depth=depth + 1)
    if sparse_file:
        check_image(str(path.absolute()), "vmdk", display=str(path), allow_backing=True)
    return capacity, desc


def _validate_extent(owner: Path, folder: Path, extent: VmdkExtent) -> bool:
    """Check one extent of a text descriptor; return True when it is a sparse extent."""
    if extent.type == "ZERO":
        return False
    if extent.type in {"VMFSRDM", "VMFSRAW"}:
        raise InvalidInput(
            f"{owner}: extent {extent.filename!r} is a raw device mapping ({extent.type}); "
            "copy the mapped LUN to a raw image and convert that instead"
        )
    if not extent.filename:
        raise InvalidInput(f"{owner}: {extent.type} extent without a file name")
    target = _inside(folder, extent.filename, what="extent", owner=owner)
    if not target.is_file():
        raise SourceNotFound(f"{owner}: extent file {extent.filename!r} not found in {folder}")
    if extent.type in _FILE_BACKED_FLAT:
        need = (extent.offset + extent.sectors) * SECTOR
        have = target.stat().st_size
        if have < need:
            raise InvalidInput(
                f"{owner}: extent {extent.filename!r} is truncated: "
                f"{have} bytes, the descriptor needs {need}"
            )
        return False
    if extent.type == "SPARSE":
        inspect_sparse(target, label=f"{owner} (extent {extent.filename})")
    return True


# --- qemu-img -----------------------------------------------------------------------------------


def check_image(qemu_filename: str, fmt: str, *, display: str, allow_backing: bool) -> ImageFacts:
    """Open an image with qemu-img (explicit format) and run its consistency check.

    Raises InvalidInput with one line naming ``display`` when qemu cannot open it or
    finds it truncated/corrupt, and UnsafeInput when it refers to another file
    (backing file, external data file) and ``allow_backing`` is False.
    """
    data = qemuimg.info(qemu_filename, fmt, what=display)
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    specific = (data.get("format-specific") or {}).get("data") or {}
    if not allow_backing and backing:
        raise UnsafeInput(f"{display}: image refers to another file {backing!r}; refusing to follow it")
    if specific.get("data-file"):
        raise UnsafeInput(
            f"{display}: image stores its data in another file {specific['data-file']!r}; refusing"
        )
    errors = qemuimg.verify_integrity(qemu_filename, fmt, what=display)
    return ImageFacts(virtual_size=int(data.get("virtual-size", 0)), backing=backing, check_errors=errors)
