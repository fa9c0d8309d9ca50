"""Write a minimal, empty Windows registry hive file (the "regf" format).

The file this module writes holds just the root key, and is meant to be
opened with hivex (``hivex.Hivex(path, write=True)``) and filled with keys and
values there. Layout, from the format's public descriptions (hivex's
``lib/hivex-internal.h`` notes and the "Windows registry file format
specification"):

* a 4 KiB **base block**: signature ``regf``, primary/secondary sequence
  numbers (equal = cleanly written), last-written FILETIME, format version 1.5,
  file type 0 (primary) and format 1 (direct memory load), the offset of the
  root key cell (relative to the first hive bin, which starts at 0x1000), the
  total size of the hive bins, the clustering factor, a UTF-16 file name, and
  at 0x1FC a checksum: the XOR of the 127 little-endian dwords before it;
* one 4 KiB **hive bin** (``hbin``: signature, its own offset, its size,
  timestamp) holding cells. A cell starts with a signed 32-bit size (negative
  while in use) and is 8-byte aligned. Ours are: the root ``nk`` (key node)
  cell, one ``sk`` (security) cell that the root refers to and that hivex
  copies to every key it adds, and one free cell covering the rest of the bin.

The security descriptor is self-relative: owner Administrators, group SYSTEM,
and a DACL granting SYSTEM and Administrators full control and Users read,
all inherited by sub-keys, which is how Windows ships its machine hives.
"""

from __future__ import annotations

import struct
from pathlib import Path

BASE_BLOCK_SIZE = 0x1000
HBIN_SIZE = 0x1000
HBIN_HEADER_SIZE = 0x20
NO_CELL = 0xFFFFFFFF

# Key node flags.
KEY_HIVE_ENTRY = 0x0004
KEY_NO_DELETE = 0x0008
KEY_COMP_NAME = 0x0020

# Registry key access masks and ACE flags used in the default descriptor.
KEY_ALL_ACCESS = 0x000F003F
KEY_READ = 0x00020019
ACCESS_ALLOWED_ACE = 0
CONTAINER_INHERIT_ACE = 0x02
SE_DACL_PRESENT = 0x0004
SE_SELF_RELATIVE = 0x8000

# 2020-01-01T00:00:00Z as a FILETIME: fixed, so that a recipe's output is reproducible.
DEFAULT_FILETIME = 132223104000000000


def _align8(n: int) -> int:
    return (n + 7) & ~7


def sid(authority: int, *sub_authorities: int) -> bytes:
    """Binary SID S-1-<authority>-<sub...>."""
    return (
        struct.pack("<BB", 1, len(sub_authorities))
        + authority.to_bytes(6, "big")
        + b"".join(struct.pack("<I", s) for s in sub_authorities)
    )


SID_SYSTEM = sid(5, 18)
SID_ADMINISTRATORS = sid(5, 32, 544)
SID_USERS = sid(5, 32, 545)


def _ace(mask: int, who: bytes) -> bytes:
    size = 8 + len(who)
    return struct.pack("<BBHI", ACCESS_ALLOWED_ACE, CONTAINER_INHERIT_ACE, size, mask) + who


def default_security_descriptor() -> bytes:
    """Self-relative descriptor: SYSTEM/Administrators full control, Users read."""
    aces = [
        _ace(KEY_ALL_ACCESS, SID_SYSTEM),
        _ace(KEY_ALL_ACCESS, SID_ADMINISTRATORS),
        _ace(KEY_READ, SID_USERS),
    ]
    body = b"".join(aces)
    dacl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    header_size = 20
    dacl_off = header_size
    owner_off = dacl_off + len(dacl)
    group_off = owner_off + len(SID_ADMINISTRATORS)
    header = struct.pack("<BBHIIII", 1, 0, SE_SELF_RELATIVE | SE_DACL_PRESENT, owner_off, group_off, 0, dacl_off)
    return header + dacl + SID_ADMINISTRATORS + SID_SYSTEM


def _nk_cell(name: str, sk_offset: int, filetime: int) -> bytes:
    raw_name = name.encode("ascii")
    fields = struct.pack(
        "<2sHQ" + "I" * 15 + "HH",
        b"nk",
        KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME,
        filetime,
        0,  # access bits
        0,  # parent: none for the root key
        0,  # number of subkeys
        0,  # number of volatile subkeys
        NO_CELL,  # subkeys list
        NO_CELL,  # volatile subkeys list
        0,  # number of values
        NO_CELL,  # values list
        sk_offset,
        NO_CELL,  # class name
        0,  # largest subkey name length
        0,  # largest subkey class name length
        0,  # largest value name length
        0,  # largest value data size
        0,  # work var
        len(raw_name),
        0,  # class name length
    )
    return fields + raw_name


def _sk_cell(own_offset: int, descriptor: bytes) -> bytes:
    # The list of security cells is circular: with one cell it points at itself.
    return struct.pack("<2sHIIII", b"sk", 0, own_offset, own_offset, 1, len(descriptor)) + descriptor


def _cell(payload: bytes, *, used: bool = True) -> bytes:
    size = _align8(4 + len(payload))
    body = payload + b"\0" * (size - 4 - len(payload))
    return struct.pack("<i", -size if used else size) + body


def _utf16_name(file_name: str) -> bytes:
    # The base block keeps only the last 31 characters of the hive's path (64 bytes, NUL-padded).
    raw = file_name[-31:].encode("utf-16-le")
    return raw + b"\0" * (64 - len(raw))


def header_checksum(block: bytes) -> int:
    """XOR of the 127 dwords that precede the checksum field at 0x1FC."""
    total = 0
    for (dword,) in struct.iter_unpack("<I", block[:0x1FC]):
        total ^= dword
    return total


def empty_hive(*, root_name: str = "ROOT", file_name: str = "", filetime: int = DEFAULT_FILETIME) -> bytes:
    """Bytes of a hive with only its root key ``root_name`` (8 KiB)."""
    if not root_name or not root_name.isascii() or "\\" in root_name:
        raise ValueError(f"root key name {root_name!r} must be non-empty ASCII without backslashes")
    descriptor = default_security_descriptor()

    # Cell offsets are relative to the start of the first hive bin.
    nk_offset = HBIN_HEADER_SIZE
    nk_len = _align8(4 + len(_nk_cell(root_name, 0, filetime)))
    sk_offset = nk_offset + nk_len
    nk = _cell(_nk_cell(root_name, sk_offset, filetime))
    sk = _cell(_sk_cell(sk_offset, descriptor))
    used = HBIN_HEADER_SIZE + len(nk) + len(sk)
    free = HBIN_SIZE - used
    if free < 8:
        raise ValueError(f"root key name {root_name!r} is too long for a one-bin hive")
    free_cell = struct.pack("<i", free) + b"\0" * (free - 4)

    hbin_header = struct.pack("<4sIIQQI", b"hbin", 0, HBIN_SIZE, 0, filetime, 0)
    hbin = hbin_header + nk + sk + free_cell
    assert len(hbin) == HBIN_SIZE

    base = bytearray(BASE_BLOCK_SIZE)
    struct.pack_into(
        "<4sIIQIIIIIII",
        base,
        0,
        b"regf",
        1,  # primary sequence number
        1,  # secondary sequence number (equal: the hive was written completely)
        filetime,
        1,  # major version
        5,  # minor version
        0,  # file type: primary
        1,  # file format: direct memory load
        nk_offset,  # root cell offset
        HBIN_SIZE,  # size of the hive bins data
        1,  # clustering factor
    )
    base[0x30:0x70] = _utf16_name(file_name)
    struct.pack_into("<I", base, 0x1FC, header_checksum(bytes(base)))
    return bytes(base) + hbin


def write_empty_hive(path: Path | str, *, root_name: str = "ROOT", file_name: str = "") -> Path:
    """Write :func:`empty_hive` to ``path`` and return it."""
    out = Path(path)
    out.write_bytes(empty_hive(root_name=root_name, file_name=file_name or out.name))
    return out
