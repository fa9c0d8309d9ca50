"""Read and write Linux initramfs images on the host (no guest code runs).

An initramfs is one or more cpio "newc" archives, concatenated: often an
uncompressed early-microcode archive first, then the main archive compressed
with gzip, zstd, xz, lz4, bzip2 or lzma. We walk the cpio archives ourselves
and use Python's codecs or the host's (de)compressor for the compressed part.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
from dataclasses import dataclass

from p2v.errors import ConversionError

CPIO_MAGICS = (b"070701", b"070702")
COMPRESSORS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
]
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
           "rdevmajor", "rdevminor", "namesize", "check")  # fmt: skip


@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    ino: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0


@dataclass
class InitrdImage:
    prefix: bytes  # leading uncompressed archives (early microcode), kept byte for byte
    compression: str | None  # of the main archive; None when it is plain cpio
    entries: list[CpioEntry]


def _read_archive(data: bytes, pos: int) -> tuple[list[CpioEntry], int]:
    """Parse one newc archive starting at ``pos``: (entries, offset after its trailer)."""
    out: list[CpioEntry] = []
    n = len(data)
    while pos + 110 <= n:
        hdr = data[pos : pos + 110]
        if hdr[:6] not in CPIO_MAGICS:
            raise ValueError(f"bad cpio header at {pos}")
        v = {f: int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i, f in enumerate(_FIELDS)}
        name = data[pos + 110 : pos + 110 + v["namesize"] - 1].decode("utf-8", "surrogateescape")
        pos = (pos + 110 + v["namesize"] + 3) & ~3
        body = data[pos : pos + v["filesize"]]
        pos = (pos + v["filesize"] + 3) & ~3
        if name == "TRAILER!!!":
            return out, pos
        out.append(CpioEntry(name, v["mode"], body, v["ino"], v["uid"], v["gid"], v["nlink"], v["mtime"],
                             v["devmajor"], v["devminor"], v["rdevmajor"], v["rdevminor"]))  # fmt: skip
    raise ValueError("cpio archive ends without trailer")


def _skip_padding(data: bytes, pos: int) -> int:
    n = len(data)
    while pos < n and data[pos] == 0:
        pos += 1
    return pos


def _read_all(data: bytes) -> list[CpioEntry]:
    entries: list[CpioEntry] = []
    pos = _skip_padding(data, 0)
    while pos < len(data):
        got, pos = _read_archive(data, pos)
        entries += got
        pos = _skip_padding(data, pos)
    return entries


def _decompress(kind: str, blob: bytes) -> bytes:
    if kind == "gzip":
        return gzip.decompress(blob)
    if kind == "xz":
        return lzma.decompress(blob, format=lzma.FORMAT_XZ)
    if kind == "lzma":
        return lzma.decompress(blob, format=lzma.FORMAT_ALONE)
    if kind == "bzip2":
        return bz2.decompress(blob)
    tool = shutil.which(kind)
    if tool is None:
        raise ConversionError(f"cannot read a {kind}-compressed initramfs: install {kind} on this host")
    proc = subprocess.run([tool, "-dc"], input=blob, capture_output=True, check=False, timeout=120)
    if proc.returncode != 0 and not proc.stdout:
        raise ConversionError(f"{kind} failed on initramfs: {proc.stderr.decode(errors='replace')[-200:]}")
    return proc.stdout


def read_initrd(data: bytes) -> InitrdImage:
    """Split an initramfs into its plain prefix and the entries of its main archive.

    The main archive is the compressed tail, or the last plain archive when nothing is
    compressed. Raises ValueError on data that is not an initramfs.
    """
    pos = _skip_padding(data, 0)
    n = len(data)
    while pos < n:
        if data[pos : pos + 6] in CPIO_MAGICS:
            entries, end = _read_archive(data, pos)
            rest = _skip_padding(data, end)
            if rest >= n:  # the last archive, plain: it is the main one
                return InitrdImage(data[:pos], None, entries)
            pos = rest
            continue
        for magic, kind in COMPRESSORS:
            if data.startswith(magic, pos):
                return InitrdImage(data[:pos], kind, _read_all(_decompress(kind, data[pos:])))
        raise ValueError(f"unknown data at offset {pos} of initramfs")
    raise ValueError("no archive in initramfs")


def list_initrd(data: bytes) -> set[str]:
    """All file names in an initramfs image, early archives included (no leading './')."""
    img = read_initrd(data)
    names = {e.name for e in img.entries}
    if img.prefix:
        names |= {e.name for e in _read_all(img.prefix)}
    return {n[2:] if n.startswith("./") else n for n in names}


def modules_in(names: set[str]) -> set[str]:
    """Kernel module names (``virtio_blk``) present as .ko files in an initramfs listing."""
    mods = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(ext):
                mods.add(base[: -len(ext)].replace("-", "_"))
    return mods


def write_cpio(entries: list[CpioEntry]) -> bytes:
    parts: list[bytes] = []
    for e in [*entries, CpioEntry("TRAILER!!!", 0, nlink=1)]:
        nb = e.name.encode("utf-8", "surrogateescape") + b"\0"
        vals = (e.ino, e.mode, e.uid, e.gid, e.nlink, e.mtime, len(e.data), e.devmajor, e.devminor,
                e.rdevmajor, e.rdevminor, len(nb), 0)  # fmt: skip
        rec = b"070701" + b"".join(b"%08x" % v for v in vals) + nb
        rec += b"\0" * (-len(rec) % 4)
        parts.append(rec)
        parts.append(e.data)
        parts.append(b"\0" * (-len(e.data) % 4))
    return b"".join(parts)


def _compress(kind: str | None, blob: bytes) -> bytes:
    if kind is None:
        return blob
    if kind == "gzip":
        return gzip.compress(blob, compresslevel=6, mtime=0)
    if kind == "bzip2":
        return bz2.compress(blob)
    if kind == "lzma":
        return lzma.compress(blob, format=lzma.FORMAT_ALONE)
    if kind == "xz":  # the kernel's xz decoder needs CRC32 checks
        return lzma.compress(blob, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    args = {"zstd": ["-q", "-3", "-T0", "-c"], "lz4": ["-q", "-l", "-9", "-c"]}[kind]
    tool = shutil.which(kind)
    if tool is None:
        raise ConversionError(f"cannot write a {kind}-compressed initramfs: install {kind} on this host")
    proc = subprocess.run([tool, *args], input=blob, capture_output=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise ConversionError(f"{kind} failed compressing initramfs: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def write_initrd(img: InitrdImage) -> bytes:
    return img.prefix + _compress(img.compression, write_cpio(img.entries))
