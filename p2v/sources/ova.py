"""OVF packages: OVA tars, compressed OVAs and unpacked OVF folders, read safely.

Safety first: every tar member is checked before anything is read (no absolute
paths, no ``..``, no links, devices or fifos, no duplicate names), the single
``.ovf`` is parsed with DTDs refused, and the ``.mf`` manifest is verified by
streaming each file through hashlib in 1 MiB chunks.

Disks are read in place when possible: an uncompressed member of an
uncompressed tar is a contiguous byte range, which qemu opens through a
``json:`` filename (a ``raw`` driver with ``offset``/``size`` under the image
driver), so nothing is copied. Gzip-compressed members, and every member of a
compressed OVA (an ``.ova`` that is itself a gzip/xz/bzip2 tarball), are
extracted into a private folder under ``workdir``, size-limited, and removed by
``SourceMachine.close()``. On any error that folder is removed before raising.

Disks inside an OVA must stand alone: a VMDK naming a parent, or a qcow2 with a
backing or data file, is refused (it could make qemu read any host file).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from p2v.errors import ChecksumMismatch, InvalidInput, OutputError, P2VError, SourceNotFound, UnsafeInput
from p2v.sources import vmdk
from p2v.sources.model import SourceDisk, SourceMachine, SourceNic
from p2v.sources.ovf import (
    MAX_OVF_BYTES,
    ManifestEntry,
    OvfDescriptor,
    OvfDisk,
    choose_format,
    detect_format,
    is_gzip,
    normalize_href,
    parse_manifest,
    parse_ovf,
)

CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 10_000
FREE_SPACE_RESERVE = 64 << 20
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")


# --- streams, hashing and size-limited extraction -------------------------------------------------


def hash_stream(stream: BinaryIO, algorithm: str) -> str:
    """Hex digest of a whole stream, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    while chunk := stream.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def check_digest(entry: ManifestEntry, actual: str, *, label: str) -> None:
    if actual != entry.digest:
        raise ChecksumMismatch(
            f"{label}: {entry.algorithm.upper()} mismatch: manifest says {entry.digest}, file has {actual}",
            hint="the download or copy is damaged; fetch the package again",
        )


class _Passthrough(io.RawIOBase):
    """Reads from ``raw`` (at most ``limit`` bytes), hashing what passes when asked to."""

    def __init__(self, raw: BinaryIO, *, algorithm: str | None = None, limit: int | None = None,
                 owner: io.IOBase | tarfile.TarFile | None = None) -> None:
        self.raw, self.left, self.owner = raw, limit, owner
        self.hasher = hashlib.new(algorithm) if algorithm else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(buffer) if self.left is None else min(len(buffer), self.left)
        data = self.raw.read(want) if want > 0 else b""
        n = len(data)
        buffer[:n] = data
        if self.left is not None:
            self.left -= n
        if self.hasher is not None:
            self.hasher.update(data)
        return n

    def hexdigest(self) -> str:
        return self.hasher.hexdigest() if self.hasher is not None else ""

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()
        super().close()


def _range(path: Path, offset: int, size: int) -> io.BufferedReader:
    f = open(path, "rb")  # closed through the reader's owner
    f.seek(offset)
    return io.BufferedReader(_Passthrough(f, limit=size, owner=f), CHUNK)


def extraction_budget(workdir: Path, capacity: int | None) -> tuple[int, str]:
    """Most bytes one disk may expand to, and why (its capacity, or the free space)."""
    free = shutil.disk_usage(workdir).free - FREE_SPACE_RESERVE
    if capacity:
        bound = capacity + capacity // 32 + (64 << 20)  # image metadata never needs more
        if bound < free:
            return bound, f"the disk's capacity of {capacity} bytes"
    return max(free, 0), f"the free space in {workdir}"


def gunzip_to(stream: BinaryIO, dest: Path, *, limit: int, why: str, label: str) -> int:
    """Decompress a gzip stream into ``dest``, refusing to write more than ``limit`` bytes."""
    written = 0
    try:
        out = open(dest, "wb")
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create the decompressed disk: {exc.strerror}") from exc
    with out, gzip.GzipFile(fileobj=stream, mode="rb") as gz:
        while True:
            try:
                chunk = gz.read(CHUNK)
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise InvalidInput(f"{label}: corrupt or truncated gzip data: {exc}") from exc
            if not chunk:
                return written
            written += len(chunk)
            if written > limit:
                raise UnsafeInput(
                    f"{label}: gzip data expands beyond {limit} bytes ({why}); refusing (decompression bomb?)"
                )
            try:
                out.write(chunk)
            except OSError as exc:
                raise OutputError(f"{dest}: cannot write the decompressed disk: {exc.strerror}") from exc


def new_extract_dir(workdir: Path | None) -> Path:
    """A fresh private folder for extracted files (inside ``workdir`` or the system temp dir)."""
    if workdir is not None:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{workdir}: cannot create the work folder: {exc.strerror}") from exc
    return Path(tempfile.mkdtemp(prefix="p2v-ova-", dir=workdir)).absolute()


def _remover(path: Path) -> Callable[[], None]:
    def remove() -> None:
        shutil.rmtree(path, ignore_errors=True)

    return remove


@dataclass
class _Scratch:
    """The private extraction folder, created on first use, removed on error or by close()."""

    workdir: Path | None
    path: Path | None = None

    def get(self) -> Path:
        if self.path is None:
            self.path = new_extract_dir(self.workdir)
        return self.path

    def discard(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _machine(desc: OvfDescriptor, disks: list[SourceDisk], *, kind: str, origin: Path, notes: list[str],
             scratch: _Scratch) -> SourceMachine:
    if not disks:
        raise InvalidInput(f"{desc.origin}: OVF lists no disk files")
    all_notes = [*desc.notes, *notes]
    if desc.secure_boot:
        all_notes.append("source VM has UEFI Secure Boot enabled")
    machine = SourceMachine(
        kind=kind,
        name=desc.name,
        disks=disks,
        cpus=desc.cpus,
        memory_mib=desc.memory_mib,
        firmware=desc.firmware,
        nics=[SourceNic(mac=n.mac, model=n.model, network=n.network) for n in desc.nics],
        description=desc.os_description or "",
        notes=all_notes,
        origin=origin,
    )
    if scratch.path is not None:
        machine.cleanup.append(_remover(scratch.path))
    return machine


def _with_ovf_facts(disk: SourceDisk, od: OvfDisk) -> SourceDisk:
    disk.bus = od.bus or disk.bus
    disk.controller = od.controller or disk.controller
    disk.label = od.label
    if disk.capacity is None:
        disk.capacity = od.capacity
    return disk


def _standalone_disk(filename: str, head: bytes, od: OvfDisk, label: str, window: tuple[Path, int, int]
                     ) -> SourceDisk:
    """Check a disk that must stand alone (in an OVA, or extracted); ``window`` locates its bytes."""
    fmt = choose_format(detect_format(head), od.format, label=label)
    if fmt == "vmdk":
        if head[:4] != vmdk.SPARSE_MAGIC:
            raise InvalidInput(f"{label}: only sparse/streamOptimized VMDKs can be read from an OVA "
                               "(this one needs separate extent files); unpack it and open the folder")
        _header, desc = vmdk.inspect_sparse(window[0], offset=window[1], size=window[2], label=label)
        if desc is not None and desc.parent_hint:
            raise UnsafeInput(f"{label}: VMDK names a parent {desc.parent_hint!r}; an OVA disk must stand "
                              "alone, refusing to follow it")
    facts = vmdk.check_image(filename, fmt, display=label, allow_backing=False)
    disk = SourceDisk(qemu_filename=filename, format=fmt, display=label, capacity=facts.virtual_size)
    return _with_ovf_facts(disk, od)


def _check_declared_size(od: OvfDisk, actual: int, label: str) -> None:
    if od.file and od.file.size is not None and od.file.size != actual:
        raise InvalidInput(f"{label}: the OVF says {od.file.size} bytes, the package holds {actual} "
                           "(truncated or damaged)")


# --- unpacked folder ------------------------------------------------------------------------------


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise UnsafeInput(f"{path}: {size} bytes; refusing (limit {limit})")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{path}: file not found") from exc
    except OSError as exc:
        raise SourceNotFound(f"{path}: cannot read: {exc.strerror}") from exc


def open_unpacked(path: Path, *, workdir: Path | None, verify_manifest: bool = True) -> SourceMachine:
    """Open an OVF descriptor with its files beside it (see :func:`p2v.sources.ovf.open_ovf`)."""
    if path.is_dir():
        raise InvalidInput(f"{path}: is a folder; give its .ovf file (open_ova accepts folders)")
    desc = parse_ovf(_read_limited(path, MAX_OVF_BYTES), origin=str(path))
    folder = path.absolute().parent
    scratch = _Scratch(workdir)
    notes: list[str] = []

    def local(rel: str, what: str) -> Path:
        target = folder / rel
        if not target.resolve().is_relative_to(folder.resolve()):
            raise UnsafeInput(f"{path}: {what} {rel!r} resolves outside {folder}; refusing")
        return target

    try:
        mf = path.with_suffix(".mf")
        if verify_manifest and mf.is_file():
            for entry in parse_manifest(_read_limited(mf, MAX_MANIFEST_BYTES).decode("utf-8", "replace"),
                                        origin=str(mf)):
                target = local(normalize_href(entry.name, base="", origin=str(mf)), "manifest entry")
                if not target.is_file():
                    raise InvalidInput(f"{mf}: lists {entry.name!r}, which is not in {folder}")
                with open(target, "rb") as f:
                    check_digest(entry, hash_stream(f, entry.algorithm), label=str(target))
        elif verify_manifest:
            notes.append("no manifest (.mf): file checksums not verified")
        disks = []
        for od in desc.disks:
            if od.href is None:
                notes.append(f"disk {od.disk_id!r} has no file (blank disk of {od.capacity} bytes); skipped")
                continue
            rel = normalize_href(od.href, base="", origin=str(path))
            target = local(rel, "disk file")
            label = str(path.parent / rel)
            if not target.is_file():
                raise InvalidInput(f"{path}: disk file {od.href!r} is referenced but missing from {folder}")
            if od.file and od.file.chunk_size:
                raise InvalidInput(f"{label}: disk file is split into chunks; join them first")
            with open(target, "rb") as f:
                head = f.read(4096)
            if (od.file is not None and od.file.compression == "gzip") or is_gzip(head):
                out = scratch.get() / f"disk{od.order}-{target.name.removesuffix('.gz')}"
                limit, why = extraction_budget(out.parent, od.capacity)
                with open(target, "rb") as f:
                    gunzip_to(f, out, limit=limit, why=why, label=label)
                with open(out, "rb") as f:
                    head = f.read(4096)
                disks.append(_standalone_disk(str(out), head, od, label, (out, 0, out.stat().st_size)))
                continue
            _check_declared_size(od, target.stat().st_size, label)
            fmt = choose_format(detect_format(head), od.format, label=label)
            if fmt == "vmdk":  # descriptors with extents and snapshot parents inside the folder are fine
                disk = vmdk.validate_vmdk(target)
            else:
                image = str(target.absolute())
                facts = vmdk.check_image(image, fmt, display=label, allow_backing=False)
                disk = SourceDisk(qemu_filename=image, format=fmt, display=label, capacity=facts.virtual_size)
            disk.display = label
            disks.append(_with_ovf_facts(disk, od))
        return _machine(desc, disks, kind="ovf", origin=path, notes=notes, scratch=scratch)
    except BaseException:
        scratch.discard()
        raise


# --- OVA tar --------------------------------------------------------------------------------------


@dataclass
class _Tar:
    """An uncompressed OVA, indexed: each member is a byte range of the file."""

    path: Path
    members: dict[str, tarfile.TarInfo]
    notes: list[str] = field(default_factory=list)

    def label(self, name: str) -> str:
        return f"{self.path}:{name}"

    def open(self, name: str) -> io.BufferedReader:
        info = self.members[name]
        return _range(self.path, info.offset_data, info.size)

    def read(self, name: str, limit: int) -> bytes:
        size = self.members[name].size
        if size > limit:
            raise UnsafeInput(f"{self.label(name)}: {size} bytes; refusing (limit {limit})")
        with self.open(name) as r:
            return r.read()


def _check_member(ova: Path, info: tarfile.TarInfo) -> str | None:
    """The member's normalized name, None for a directory; raises UnsafeInput for anything unsafe."""
    raw = info.name
    where = f"{ova}: member {raw!r}"
    if raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":"):
        raise UnsafeInput(f"{where} has an absolute path; refusing this OVA")
    parts = raw.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeInput(f"{where} climbs out of the archive with '..'; refusing this OVA")
    if info.issym() or info.islnk():
        kind = "symbolic" if info.issym() else "hard"
        raise UnsafeInput(f"{where} is a {kind} link to {info.linkname!r}; refusing this OVA")
    if info.ischr() or info.isblk() or info.isfifo():
        raise UnsafeInput(f"{where} is a device or fifo; refusing this OVA")
    if info.isdir():
        return None
    if not info.isreg():
        raise UnsafeInput(f"{where} has unsupported tar type {info.type!r}; refusing this OVA")
    if info.sparse is not None:
        raise InvalidInput(f"{where} is a GNU sparse member; re-create the OVA without --sparse")
    name = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")))
    if name in ("", "."):
        raise UnsafeInput(f"{where} has no usable file name; refusing this OVA")
    return name


def _index(ova: Path) -> _Tar:
    file_size = ova.stat().st_size
    infos: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(ova, mode="r:") as tf:
            for info in tf:
                infos.append(info)
                if len(infos) > MAX_MEMBERS:
                    raise UnsafeInput(f"{ova}: more than {MAX_MEMBERS} members; refusing this OVA")
    except tarfile.TarError as exc:
        last = infos[-1] if infos else None
        if last is not None and last.offset_data + last.size > file_size:
            raise InvalidInput(
                f"{ova}: member {last.name!r} is cut short: the OVA file is truncated"
            ) from exc
        raise InvalidInput(f"{ova}: not a valid OVA (tar archive): {exc}") from exc
    members: dict[str, tarfile.TarInfo] = {}
    for info in infos:
        name = _check_member(ova, info)
        if name is None:
            continue
        if name in members:
            raise UnsafeInput(f"{ova}: member {name!r} appears twice; refusing this ambiguous OVA")
        if info.offset_data + info.size > file_size:
            raise InvalidInput(f"{ova}: member {name!r} is cut short: the OVA file is truncated")
        members[name] = info
    return _Tar(ova, members)


def _single_ovf(names: list[str], where: Path) -> str:
    ovfs = [n for n in names if n.lower().endswith(".ovf")]
    if not ovfs:
        raise InvalidInput(f"{where}: contains no .ovf descriptor")
    if len(ovfs) > 1:
        raise InvalidInput(f"{where}: contains {len(ovfs)} .ovf descriptors ({', '.join(sorted(ovfs))}); "
                           "expected exactly one")
    return ovfs[0]


def _manifest_name(names: list[str], ovf_name: str, where: Path) -> str | None:
    wanted = ovf_name[: -len(".ovf")].lower() + ".mf"
    for n in names:
        if n.lower() == wanted:
            return n
    mfs = [n for n in names if n.lower().endswith(".mf")]
    if len(mfs) > 1:
        raise InvalidInput(f"{where}: contains {len(mfs)} manifests and none matches {ovf_name!r}")
    return mfs[0] if mfs else None


def open_ova(
    path: Path,
    *,
    workdir: Path,
    verify_manifest: bool = True,
    max_extract_bytes: int | None = None,
) -> SourceMachine:
    """Open an OVA (tar or compressed tar), an unpacked OVA folder, or a bare ``.ovf``.

    ``workdir`` receives extracted files (in a private subfolder, only when
    something must be extracted); ``max_extract_bytes`` caps the total extracted
    from a compressed OVA. Raises SourceNotFound, UnsafeInput (unsafe member,
    DTD in the OVF, decompression bomb), ChecksumMismatch (manifest), InvalidInput
    (not a tar, no or several .ovf, missing referenced member, corrupt or
    truncated disk), OutputError (workdir not writable or full). On error
    nothing is left in ``workdir``.
    """
    path = Path(path)
    if not path.exists():
        raise SourceNotFound(f"{path}: no such OVA file or folder")
    if path.is_dir():
        names = [str(p.relative_to(path)) for p in _walk_files(path)]
        ovf = path / _single_ovf(names, path)
        return open_unpacked(ovf, workdir=workdir, verify_manifest=verify_manifest)
    if path.suffix.lower() == ".ovf":
        return open_unpacked(path, workdir=workdir, verify_manifest=verify_manifest)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise SourceNotFound(f"{path}: cannot read: {exc.strerror}") from exc
    if magic.startswith(_COMPRESSED_MAGIC):
        return _open_compressed(path, workdir, verify_manifest, max_extract_bytes)
    scratch = _Scratch(workdir)
    try:
        return _open_tar(_index(path), scratch, verify_manifest)
    except BaseException:
        scratch.discard()
        raise


def _walk_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files))
    return found


def _open_tar(tar: _Tar, scratch: _Scratch, verify_manifest: bool) -> SourceMachine:
    names = list(tar.members)
    ovf_name = _single_ovf(names, tar.path)
    desc = parse_ovf(tar.read(ovf_name, MAX_OVF_BYTES), origin=tar.label(ovf_name))
    base = posixpath.dirname(ovf_name)

    entries: dict[str, ManifestEntry] = {}
    mf_name = _manifest_name(names, ovf_name, tar.path) if verify_manifest else None
    if mf_name is not None:
        mf_text = tar.read(mf_name, MAX_MANIFEST_BYTES).decode("utf-8", "replace")
        for entry in parse_manifest(mf_text, origin=tar.label(mf_name)):
            member = normalize_href(entry.name, base=posixpath.dirname(mf_name), origin=tar.label(mf_name))
            if member not in tar.members:
                raise InvalidInput(f"{tar.label(mf_name)}: lists {entry.name!r}, which is not in the OVA")
            entries[member] = entry
    elif verify_manifest:
        tar.notes.append("no manifest (.mf) in the OVA: checksums not verified")

    disks: list[SourceDisk] = []
    for od in desc.disks:
        if od.href is None:
            tar.notes.append(f"disk {od.disk_id!r} has no file (blank disk of {od.capacity} bytes); skipped")
            continue
        name = normalize_href(od.href, base=base, origin=tar.label(ovf_name))
        if name not in tar.members:
            raise InvalidInput(
                f"{tar.label(name)}: disk file referenced by {ovf_name!r} is missing from the OVA"
            )
        if od.file and od.file.chunk_size:
            raise InvalidInput(f"{tar.label(name)}: disk file is split into chunks; not supported")
        disks.append(_tar_disk(tar, name, od, entries.pop(name, None), scratch))

    for name, entry in entries.items():  # the rest of the manifest: the descriptor, other files
        with tar.open(name) as r:
            check_digest(entry, hash_stream(r, entry.algorithm), label=tar.label(name))
    return _machine(desc, disks, kind="ova", origin=tar.path, notes=tar.notes, scratch=scratch)


def _tar_disk(tar: _Tar, name: str, od: OvfDisk, entry: ManifestEntry | None,
              scratch: _Scratch) -> SourceDisk:
    label = tar.label(name)
    info = tar.members[name]
    with tar.open(name) as r:
        head = r.read(4096)
    if (od.file is not None and od.file.compression == "gzip") or is_gzip(head):
        target = scratch.get() / f"disk{od.order}-{posixpath.basename(name).removesuffix('.gz')}"
        limit, why = extraction_budget(target.parent, od.capacity)
        with tar.open(name) as raw:  # one pass: hash the compressed bytes while inflating them
            hashing = _Passthrough(raw, algorithm=entry.algorithm if entry else None)
            reader = io.BufferedReader(hashing, CHUNK)
            gunzip_to(reader, target, limit=limit, why=why, label=label)
            while reader.read(CHUNK):  # whatever the decompressor left unread
                pass
        if entry is not None:
            check_digest(entry, hashing.hexdigest(), label=label)
        with open(target, "rb") as f:
            head = f.read(4096)
        return _standalone_disk(str(target), head, od, label, (target, 0, target.stat().st_size))

    _check_declared_size(od, info.size, label)
    if entry is not None:  # one streaming pass over the member before qemu touches it
        with tar.open(name) as r:
            check_digest(entry, hash_stream(r, entry.algorithm), label=label)
    # qemu's raw driver wants whole sectors; tar pads every member with zeros to 512 bytes
    padded = -(-info.size // 512) * 512
    inner = {"driver": "file", "filename": str(tar.path.absolute())}
    window = {"driver": "raw", "offset": info.offset_data, "size": padded, "file": inner}
    fmt = choose_format(detect_format(head), od.format, label=label)
    filename = "json:" + json.dumps(window if fmt == "raw" else {"driver": fmt, "file": window})
    return _standalone_disk(filename, head, od, label, (tar.path, info.offset_data, info.size))


# --- compressed OVA: one streaming pass extracts it, then it is an unpacked folder -----------------


def _open_compressed(path: Path, workdir: Path, verify_manifest: bool,
                     max_extract_bytes: int | None) -> SourceMachine:
    dest = new_extract_dir(workdir)
    try:
        _extract_stream(path, dest, max_extract_bytes)
        names = [str(p.relative_to(dest)) for p in _walk_files(dest)]
        try:
            machine = open_unpacked(dest / _single_ovf(names, path), workdir=dest,
                                    verify_manifest=verify_manifest)
        except P2VError as exc:  # name the OVA and its member, not our scratch folder
            exc.message = exc.message.replace(f"{dest}/", f"{path}:").replace(str(dest), str(path))
            exc.args = (exc.message,)
            raise
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    for disk in machine.disks:
        disk.display = disk.display.replace(f"{dest}/", f"{path}:")
    machine.kind = "ova"
    machine.origin = path
    machine.notes.append(f"compressed OVA: extracted to {dest}")
    machine.cleanup.append(_remover(dest))
    return machine


def _extract_stream(path: Path, dest: Path, max_total: int | None) -> None:
    cap = shutil.disk_usage(dest).free - FREE_SPACE_RESERVE
    error: type[P2VError] = OutputError
    why = f"the free space in {dest.parent}"
    if max_total is not None and max_total < cap:
        cap, error, why = max_total, UnsafeInput, f"the {max_total}-byte extraction limit"
    total = 0
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for count, info in enumerate(tf):
                if count >= MAX_MEMBERS:
                    raise UnsafeInput(f"{path}: more than {MAX_MEMBERS} members; refusing this OVA")
                name = _check_member(path, info)
                if name is None:
                    continue
                if name in seen:
                    raise UnsafeInput(f"{path}: member {name!r} appears twice; refusing this ambiguous OVA")
                seen.add(name)
                total += info.size
                if total > cap:
                    raise error(f"{path}: member {name!r} would bring the extracted size to {total} "
                                f"bytes, beyond {why}")
                target = dest.joinpath(*name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                stream = tf.extractfile(info)
                if stream is None:
                    raise InvalidInput(f"{path}: member {name!r} cannot be read")
                try:
                    with open(target, "wb") as out:
                        shutil.copyfileobj(stream, out, CHUNK)
                except OSError as exc:
                    raise OutputError(f"{target}: cannot write the extracted member: {exc.strerror}") from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise InvalidInput(f"{path}: corrupt or truncated compressed OVA: {exc}") from exc
