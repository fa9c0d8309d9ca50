"""Hash-map delta into a recovery-point layer, and the local image-file source.

:class:`BlockDelta` is the DR-side half every hash-mode source shares: given the new
content of a coarse block and the old map, it writes into the layer only the 4 KiB
sub-blocks that differ from what the layer already reads there (zeroing those that
became zero) and records the new digest. Writes are combined into runs before they reach
the layer, so a seed writes megabyte requests, not 4 KiB ones.

:class:`FileDiskSource` syncs an image file of any format qemu reads (raw, qcow2, vmdk,
vhd, vhdx...) through a read-only ``qemu-nbd``: zero extents are skipped without reading,
the rest is read once in 4 MiB pieces by a reader thread while this thread hashes.
Memory: a few pieces in flight plus the maps (16 bytes per block).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from p2v.disks import qemuimg
from p2v.disks.formats import detect_format
from p2v.disks.nbd import open_image
from p2v.errors import InvalidInput, SourceChanged
from p2v.replication.model import (
    DEFAULT_BLOCK,
    DIGEST_SIZE,
    SUB_BLOCK,
    ZERO_DIGEST,
    HashMap,
    LayerTarget,
    ProgressCallback,
    SyncCounters,
    SyncResult,
    digest,
    zeros,
)

log = logging.getLogger(__name__)

COMBINE_LIMIT = 1 << 20  # largest combined write
SCAN_CHUNK = 4 << 20
block_digest = digest  # the name the engine's modules use


def sub_digests(block: bytes) -> list[bytes]:
    """The :func:`block_digest` of each 4 KiB piece of ``block`` (the last may be short)."""
    return [block_digest(block[i : i + SUB_BLOCK]) for i in range(0, len(block), SUB_BLOCK)]


def is_zero_map(m: HashMap) -> bool:
    return m.data == zeros(len(m.data))


class Progress:
    """Calls ``callback(done, total)`` at most five times a second (and once at the end)."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self._last = 0.0

    def __call__(self, done: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= 0.2:
            self._last = now
            self.callback(min(done, self.total), self.total)


class CombinedWrites:
    """Merges adjacent writes (and adjacent zeroings) into runs of up to 1 MiB.

    Call :meth:`flush_pending` before reading a range that may be pending, and at the end.
    """

    def __init__(self, target: LayerTarget, counters: SyncCounters) -> None:
        self.target = target
        self.counters = counters
        self._buf = bytearray()
        self._at = -1  # offset of _buf
        self._zero_at = -1
        self._zero_len = 0

    def write(self, offset: int, data: bytes) -> None:
        if self._zero_len:
            self._flush_zero()
        if self._buf and (offset != self._at + len(self._buf) or len(self._buf) + len(data) > COMBINE_LIMIT):
            self._flush_data()
        if not self._buf:
            self._at = offset
        self._buf += data

    def zero(self, offset: int, length: int) -> None:
        if self._buf:
            self._flush_data()
        if self._zero_len and offset == self._zero_at + self._zero_len:
            self._zero_len += length
            return
        if self._zero_len:
            self._flush_zero()
        self._zero_at, self._zero_len = offset, length

    def _flush_data(self) -> None:
        self.target.pwrite(bytes(self._buf), self._at)
        self.counters.bytes_written += len(self._buf)
        self._buf.clear()

    def _flush_zero(self) -> None:
        self.target.zero(self._zero_len, self._zero_at)
        extra = self.counters.extra
        extra["bytes_zeroed"] = extra.get("bytes_zeroed", 0) + self._zero_len
        self._zero_len = 0

    def flush_overlapping(self, offset: int, length: int) -> None:
        """Hand queued writes to the layer if they touch ``[offset, offset+length)``."""
        end = offset + length
        if (self._buf and self._at < end and offset < self._at + len(self._buf)) or (
            self._zero_len and self._zero_at < end and offset < self._zero_at + self._zero_len
        ):
            self.flush_pending()

    def flush_pending(self) -> None:
        if self._buf:
            self._flush_data()
        if self._zero_len:
            self._flush_zero()


class BlockDelta:
    """Applies new block contents to ``target`` against the ``old`` map, building ``new``."""

    def __init__(self, target: LayerTarget, old: HashMap, counters: SyncCounters) -> None:
        self.target = target
        self.old = old
        self.new = old.copy()
        self.counters = counters
        self.writes = CombinedWrites(target, counters)
        self.bs = old.block_size

    def apply(self, index: int, data: bytes) -> bool:
        """Make block ``index`` read as ``data``; True when it changed."""
        new_digest = block_digest(data)
        old_digest = self.old[index]
        if new_digest == old_digest:
            if new_digest == ZERO_DIGEST:
                self.counters.zero_bytes += len(data)
            return False
        off = index * self.bs
        self.counters.blocks_changed += 1
        self.new[index] = new_digest
        if new_digest == ZERO_DIGEST:
            self.counters.zero_bytes += len(data)
            self.writes.zero(off, len(data))
            return True
        if old_digest == ZERO_DIGEST:  # the layer reads zeros here: write the non-zero pieces
            for i in range(0, len(data), SUB_BLOCK):
                piece = data[i : i + SUB_BLOCK]
                if piece != zeros(len(piece)):
                    self.writes.write(off + i, piece)
            return True
        self.writes.flush_overlapping(off, len(data))
        old_block = self.target.pread(len(data), off)
        for i in range(0, len(data), SUB_BLOCK):
            piece = data[i : i + SUB_BLOCK]
            if piece == old_block[i : i + SUB_BLOCK]:
                continue
            if piece == zeros(len(piece)):
                self.writes.zero(off + i, len(piece))
            else:
                self.writes.write(off + i, piece)
        return True

    def zero_range(self, offset: int, length: int) -> None:
        """The source reads zeros over the whole blocks in ``[offset, offset+length)``."""
        self.counters.zero_bytes += length
        first = offset // self.bs
        last = (offset + length + self.bs - 1) // self.bs
        lo, hi = first * DIGEST_SIZE, last * DIGEST_SIZE
        if self.old.data[lo:hi] == zeros(hi - lo):
            return
        for index in range(first, last):
            if self.old[index] != ZERO_DIGEST:
                boff, blen = self.old.block_range(index)
                self.counters.blocks_changed += 1
                self.new[index] = ZERO_DIGEST
                self.writes.zero(boff, blen)

    def finish(self) -> None:
        self.writes.flush_pending()


def mode_for(old: HashMap, state: dict[str, Any]) -> str:
    """``"seed"`` onto an empty layer (all-zero map, no recorded state), else ``"hash"``."""
    return "seed" if not state and is_zero_map(old) else "hash"


def check_geometry(url: str, size: int, old: HashMap, target: LayerTarget) -> None:
    """SourceChanged when the source size is not what the site recorded; InvalidInput when the
    layer does not match the map."""
    if size != old.size:
        raise SourceChanged(
            f"{url} is now {size} bytes, the site recorded {old.size}; re-add the machine",
            hint="a disk that grew or shrank needs a new seed: p2v protect remove, then p2v protect add",
        )
    if not layer_fits(target.size, old.size):
        raise InvalidInput(f"the recovery-point layer is {target.size} bytes, its map says {old.size}")


def layer_fits(layer_size: int, disk_size: int) -> bool:
    """A layer holds a disk of ``disk_size`` bytes: same size, or rounded up to 512 bytes (qemu
    rounds image sizes up to whole sectors; only files can have other sizes)."""
    return layer_size == disk_size or layer_size == -(-disk_size // 512) * 512


class FileDiskSource:
    """An image file as a protected disk (``model.DiskSource``), synced in hash mode.

    ``fmt`` defaults to the format the file's signature says (never guessed by qemu).
    ``block_size`` must match the map the site keeps (it is checked at sync time).
    """

    def __init__(self, path: Path | str, fmt: str | None = None, block_size: int = DEFAULT_BLOCK) -> None:
        self.path = Path(path).absolute()
        self.fmt = fmt or detect_format(self.path)
        self.block_size = block_size
        self.url = str(self.path)
        data = qemuimg.info(str(self.path), self.fmt, what=str(self.path))
        self.size: int = int(data["virtual-size"])

    def sync(
        self,
        target: LayerTarget,
        old: HashMap,
        state: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> SyncResult:
        started = time.monotonic()
        if old.block_size != self.block_size:
            raise InvalidInput(f"{self.url}: the site's map uses {old.block_size}-byte blocks, not {self.block_size}")
        counters = SyncCounters(mode=mode_for(old, state), disk_size=self.size)
        with open_image(self.path, self.fmt, what=self.url) as src:
            check_geometry(self.url, src.size, old, target)
            delta = BlockDelta(target, old, counters)
            tick = Progress(progress, self.size)
            for off, length, data in src.scan(old.block_size, chunk=SCAN_CHUNK):
                if data is None:
                    delta.zero_range(off, length)
                else:
                    counters.bytes_read += length
                    bs = old.block_size
                    for i in range(0, length, bs):
                        delta.apply((off + i) // bs, data[i : i + bs])
                tick(off + length)
            delta.finish()
        target.flush()
        tick(self.size, force=True)
        counters.wall_s = time.monotonic() - started
        log.info("%s: %s sync, %d blocks changed, %d bytes written in %.1f s", self.url, counters.mode,
                 counters.blocks_changed, counters.bytes_written, counters.wall_s)  # fmt: skip
        return SyncResult(delta.new, counters, {"kind": "file", "format": self.fmt})

    def close(self) -> None:
        pass
