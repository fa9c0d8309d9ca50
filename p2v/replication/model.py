"""The shared vocabulary of replication: block hashes, the hash map, counters, and the two
interfaces every source and every DR-side layer speak.

A **hash map** holds one 16-byte digest per coarse block (default 64 KiB) of a disk at one
recovery point: ``sha256(block)[:16]``. Two digests are special: :data:`ZERO_DIGEST` marks a
block that is all zeros (never hashed, never sent) and :data:`UNKNOWN_DIGEST` marks a block
whose content the map does not know (treated as changed by the next hash-mode sync, skipped
and counted by verify). A seed is a sync against :meth:`HashMap.zeros` onto an empty layer, so
seed and incremental sync are one code path.

Changed coarse blocks are refined at :data:`SUB_BLOCK` (4 KiB): the DR side holds the old
block, so it can tell which 4 KiB pieces really differ and only those cross the wire.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from p2v.errors import InvalidInput, OutputError

DEFAULT_BLOCK = 64 * 1024
SUB_BLOCK = 4096
DIGEST_SIZE = 16
ZERO_DIGEST = bytes(DIGEST_SIZE)
UNKNOWN_DIGEST = b"\xff" * DIGEST_SIZE
HASH_NAME = "sha256-128"

_MAGIC = b"P2VMAP1\0"
_HEADER = struct.Struct(">8s16sIQQ")  # magic, hash name, block size, disk size, block count

ProgressCallback = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``: called at most a few times a second."""


_ZEROS: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """An all-zero ``bytes`` of length ``n`` for fast ``==`` zero tests (usual sizes cached)."""
    z = _ZEROS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZEROS) < 64 and n <= 4 << 20:
            _ZEROS[n] = z
    return z


def digest(block: bytes) -> bytes:
    """The map entry for one block: :data:`ZERO_DIGEST` if all zeros, else sha256[:16].

    Pass ``bytes``: comparing a memoryview with bytes goes element by element (20x slower).
    """
    if block == zeros(len(block)):
        return ZERO_DIGEST
    d = hashlib.sha256(block).digest()[:DIGEST_SIZE]
    # A real digest can never be mistaken for a marker (probability 2**-128, but be exact).
    return d if d not in (ZERO_DIGEST, UNKNOWN_DIGEST) else b"\x01" + d[1:]


class HashMap:
    """One digest per coarse block of a disk of ``size`` bytes (the last block may be short)."""

    def __init__(self, size: int, block_size: int = DEFAULT_BLOCK, data: bytearray | None = None) -> None:
        if block_size <= 0 or block_size % SUB_BLOCK:
            raise ValueError(f"block size {block_size} is not a positive multiple of {SUB_BLOCK}")
        self.size = size
        self.block_size = block_size
        self.count = (size + block_size - 1) // block_size
        if data is None:
            data = bytearray(self.count * DIGEST_SIZE)
        if len(data) != self.count * DIGEST_SIZE:
            raise ValueError("hash map data does not match the disk size")
        self.data = data

    @classmethod
    def zeros(cls, size: int, block_size: int = DEFAULT_BLOCK) -> HashMap:
        """The map of an empty (all-zero) disk: what a seed syncs against."""
        return cls(size, block_size)

    def copy(self) -> HashMap:
        return HashMap(self.size, self.block_size, bytearray(self.data))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return bytes(self.data[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def __setitem__(self, index: int, value: bytes) -> None:
        if len(value) != DIGEST_SIZE:
            raise ValueError("digest must be 16 bytes")
        if not 0 <= index < self.count:
            raise IndexError(index)
        self.data[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = value

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, HashMap)
            and (self.size, self.block_size) == (other.size, other.block_size)
            and self.data == other.data
        )

    def block_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of block ``index`` on the disk."""
        off = index * self.block_size
        return off, min(self.block_size, self.size - off)

    def differing(self, other: HashMap) -> Iterator[int]:
        """Indexes of blocks whose digests differ (both maps must describe the same geometry)."""
        if (self.size, self.block_size) != (other.size, other.block_size):
            raise ValueError("maps of different geometry")
        a, b = self.data, other.data
        step = DIGEST_SIZE * 4096
        for base in range(0, len(a), step):
            if a[base : base + step] == b[base : base + step]:
                continue
            for i in range(base, min(base + step, len(a)), DIGEST_SIZE):
                if a[i : i + DIGEST_SIZE] != b[i : i + DIGEST_SIZE]:
                    yield i // DIGEST_SIZE

    def unknown_count(self) -> int:
        return sum(1 for i in range(self.count) if self.data[i * 16 : i * 16 + 16] == UNKNOWN_DIGEST)

    # -- file format: header + digests, written atomically -------------------------------

    def save(self, path: Path) -> None:
        """Write to ``path`` (create/truncate) and fsync it. Callers rename into place."""
        try:
            with open(path, "wb") as f:
                f.write(
                    _HEADER.pack(_MAGIC, HASH_NAME.encode().ljust(16, b"\0"), self.block_size, self.size, self.count)
                )
                f.write(self.data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"{path}: cannot write hash map: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: Path) -> HashMap:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot read hash map: {exc.strerror}") from exc
        if len(raw) < _HEADER.size:
            raise InvalidInput(f"{path}: hash map is truncated")
        magic, name, block, size, count = _HEADER.unpack_from(raw)
        if magic != _MAGIC or name.rstrip(b"\0").decode(errors="replace") != HASH_NAME:
            raise InvalidInput(f"{path}: not a p2v hash map")
        try:
            m = cls(size, block, bytearray(raw[_HEADER.size :]))
        except ValueError as exc:
            raise InvalidInput(f"{path}: hash map is damaged ({exc})") from exc
        if m.count != count:
            raise InvalidInput(f"{path}: hash map block count does not match its header")
        return m


@dataclass
class SyncCounters:
    """What one disk's sync did. Stored with the recovery point."""

    mode: str  # "seed" | "hash" | "stream" | "bitmap"
    disk_size: int = 0
    bytes_read: int = 0  # read on the source side
    bytes_sent: int = 0  # crossed the wire from source to DR (payload + protocol); 0 for local files
    bytes_written: int = 0  # written into the new layer
    blocks_changed: int = 0  # coarse blocks whose digest changed
    zero_bytes: int = 0  # skipped as all-zero on the source
    bytes_rehashed: int = 0  # read back on the DR side to complete the hash map (bitmap mode)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LayerTarget(Protocol):
    """The new recovery-point layer, open read-write while a sync fills it.

    Reads fall through to the previous point (the layer's backing file), so ``pread`` of a
    block not yet written returns its old content. All offsets are disk offsets.
    """

    size: int

    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def zero(self, length: int, offset: int) -> None: ...

    def flush(self) -> None: ...


@dataclass
class SyncResult:
    """A disk source's answer: the new point's map, counters, and source state to record."""

    hashmap: HashMap
    counters: SyncCounters
    state: dict[str, Any] = field(default_factory=dict)  # e.g. the dirty bitmap to use next time


class DiskSource(Protocol):
    """One source disk. ``sync`` writes every block that differs from ``old`` into ``target``
    and returns the new map. ``state`` is what the previous committed point recorded for this
    source (empty on seed)."""

    url: str
    size: int

    def sync(
        self,
        target: LayerTarget,
        old: HashMap,
        state: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> SyncResult: ...

    def close(self) -> None: ...
