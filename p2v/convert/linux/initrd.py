"""List the files inside a Linux initramfs on the host (no guest code runs).

An initramfs is one or more cpio "newc" archives, concatenated: often an
uncompressed early-microcode archive first, then the main archive compressed
with gzip, zstd, xz, lz4, bzip2 or lzma. We walk the uncompressed archives
ourselves and hand the compressed remainder to the host's decompressor.
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


def _parse_cpio(data: bytes, pos: int, names: set[str]) -> int:
    """Parse one newc archive at ``pos``; return the offset after its trailer."""
    n = len(data)
    while pos + 110 <= n:
        hdr = data[pos : pos + 110]
        if hdr[:6] not in CPIO_MAGICS:
            raise ValueError(f"bad cpio header at {pos}")
        filesize = int(hdr[54:62], 16)
        namesize = int(hdr[94:102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "replace")
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return pos
        names.add(name[2:] if name.startswith("./") else name)
    raise ValueError("cpio archive ends without trailer")


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


def list_initrd(data: bytes) -> set[str]:
    """All file names in an initramfs image (paths without a leading './')."""
    names: set[str] = set()
    pos = 0
    n = len(data)
    while pos < n:
        # archives are padded with zeroes between them
        while pos < n and data[pos] == 0:
            pos += 1
        if pos >= n:
            break
        if data[pos : pos + 6] in CPIO_MAGICS:
            pos = _parse_cpio(data, pos, names)
            continue
        for magic, kind in COMPRESSORS:
            if data.startswith(magic, pos):
                inner = _decompress(kind, data[pos:])
                ipos = 0
                while ipos < len(inner):
                    while ipos < len(inner) and inner[ipos] == 0:
                        ipos += 1
                    if ipos >= len(inner):
                        break
                    ipos = _parse_cpio(inner, ipos, names)
                return names
        raise ValueError(f"unknown data at offset {pos} of initramfs")
    return names


def modules_in(names: set[str]) -> set[str]:
    """Kernel module names (``virtio_blk``) present as .ko files in an initramfs listing."""
    mods = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(ext):
                mods.add(base[: -len(ext)].replace("-", "_"))
    return mods


# -- full archive model (for host-side augmentation) ---------------------------------

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


def _read_entries(data: bytes) -> list[CpioEntry]:
    out: list[CpioEntry] = []
    pos = 0
    n = len(data)
    while pos + 110 <= n:
        hdr = data[pos : pos + 110]
        if hdr[:6] not in CPIO_MAGICS:
            if hdr[:1] == b"\0":
                pos += 4
                continue
            raise ValueError(f"bad cpio header at {pos}")
        v = {f: int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i, f in enumerate(_FIELDS)}
        name = data[pos + 110 : pos + 110 + v["namesize"] - 1].decode("utf-8", "surrogateescape")
        pos = (pos + 110 + v["namesize"] + 3) & ~3
        body = data[pos : pos + v["filesize"]]
        pos = (pos + v["filesize"] + 3) & ~3
        if name == "TRAILER!!!":
            break
        out.append(CpioEntry(name, v["mode"], body, v["ino"], v["uid"], v["gid"], v["nlink"], v["mtime"],
                             v["devmajor"], v["devminor"], v["rdevmajor"], v["rdevminor"]))  # fmt: skip
    return out


def read_initrd(data: bytes) -> InitrdImage:
    """Split an initramfs into its plain prefix and the entries of its main archive."""
    pos = 0
    n = len(data)
    last_plain_start = None
    while pos < n:
        while pos < n and data[pos] == 0:
            pos += 1
        if pos >= n:
            break
        if data[pos : pos + 6] in CPIO_MAGICS:
            last_plain_start = pos
            end = _parse_cpio(data, pos, set())
            if end >= n or not any(data[end:]):  # the plain archive is the whole main archive
                return InitrdImage(data[:pos], None, _read_entries(data[pos:end]))
            pos = end
            continue
        for magic, kind in COMPRESSORS:
            if data.startswith(magic, pos):
                return InitrdImage(data[:pos], kind, _read_entries(_decompress(kind, data[pos:])))
        raise ValueError(f"unknown data at offset {pos} of initramfs")
    raise ValueError(f"no main archive in initramfs (last archive at {last_plain_start})")


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
