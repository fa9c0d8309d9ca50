"""Reading a point-in-time NBD export of a running QEMU drive into a recovery-point layer.

:class:`ExportReader` is a libnbd connection to the export QEMU serves (see
:mod:`p2v.replication.qemu_live`): block status per meta context, looped until a range is
covered, and reads with several requests in flight straight into caller buffers.

Two passes fill the layer and build the new hash map, window by window (bounded memory):

- :func:`full_pass` (seed, or hash mode when the dirty bitmap cannot be trusted) reads every
  extent that is not a hole/zero, hashes every coarse block and writes the blocks whose
  digest differs from the old map, refined to the 4 KiB pieces that really differ.
- :func:`dirty_pass` (bitmap mode) reads only the extents the dirty bitmap marks and writes
  them. The new map needs a digest for every touched coarse block: a block entirely dirty is
  hashed from what was read; a block at least ``rehash_share`` dirty has its clean part read
  back from the target (the previous point, local: ``bytes_rehashed``), is patched and hashed,
  and only the 4 KiB pieces that really changed are written; a sparser block gets
  :data:`~p2v.replication.model.UNKNOWN_DIGEST` (the next hash-mode sync or verify learns it).

Why the default ``rehash_share`` is 0.5. Measured on the 2-core shared build host with
:func:`p2v.replication.qemu_live_bench.bench_bitmap_sync` (1% of the drive rewritten as random
4 KiB blocks through the running QEMU, 4 KiB bitmap; "hash pass" = the whole drive read from
QEMU's export, hashed and compared): re-hashing every touched block (``rehash_share=0``) reads
back ~15% of the drive, since each 4 KiB write drags its 64 KiB block (8 GiB: 1.28 GB read back
for 86 MB dirty; 13.4 s = 0.58x a 23.2 s hash pass; 1 GiB: 0.75 s = 0.22-0.34x); leaving sparse
blocks unknown takes 3.5-6.3 s = 0.13x at 8 GiB (load average 5-7), 0.29-0.37 s = 0.08-0.11x
at 1 GiB. What remains is I/O: QEMU answering ~5k 4 KiB reads/s and the layer taking ~5k 4 KiB
writes/s. So sparse random writes leave unknown digests, while dense writes (files, logs: most
blocks fully dirty) keep the map exact at almost no cost. A 16 KiB bitmap reads 4x more for
the same workload (42 MB instead of 10.7 MB at 1 GiB) for no gain: 4 KiB is the default.

In bitmap mode the dirty extents are read by a thread one window ahead of the hashing and
writing (:class:`_DirtyWindows`), and the 4 KiB writes go out asynchronously on one
connection (see :class:`p2v.disks.nbd.NbdDisk`). Measured at 2 GiB with 4% dirty (20,113
extents) on the idle host: 3.2-3.4 s when writes went through writer threads (the pass then
waited on their locks most of the time), 2.2-2.4 s with asynchronous writes, 2.0-2.4 s with
asynchronous writes and the read-ahead thread.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import nbd

from p2v.errors import VmError
from p2v.replication.model import (
    DIGEST_SIZE,
    SUB_BLOCK,
    UNKNOWN_DIGEST,
    ZERO_DIGEST,
    HashMap,
    LayerTarget,
    ProgressCallback,
    SyncCounters,
)

BASE_ALLOCATION = "base:allocation"
DIRTY_CONTEXT_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1  # base:allocation flags
STATE_ZERO = 2
STATE_DIRTY = 1  # qemu:dirty-bitmap flag
WINDOW = 32 << 20  # bytes of disk handled at once (multiple of any coarse block size we accept)
MAX_READ = 2 << 20  # one NBD read request at most
MAX_STATUS = 1 << 30  # one block-status request at most
REHASH_RUN = 1 << 20  # consecutive touched blocks read back from the target in one pread
DEFAULT_IN_FLIGHT = 32  # QEMU serves 16 requests at once per client; 32 keeps its queue full
DEFAULT_REHASH_SHARE = 0.5
READ_AHEAD = 1  # windows the dirty-extent reader runs ahead of hashing and writing
_PROGRESS_EVERY_S = 0.25

Range = tuple[int, int]  # half-open [start, end) disk offsets
_MAX = 1 << 63


# -- range arithmetic on sorted, non-overlapping lists ------------------------------------


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted ranges with touching/overlapping neighbours joined and empty ones dropped."""
    out: list[Range] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect(xs: list[Range], ys: list[Range]) -> list[Range]:
    out: list[Range] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(xs: list[Range], start: int, end: int) -> list[Range]:
    """The parts of sorted, disjoint ``xs`` inside ``[start, end)`` (binary search: no full scan)."""
    i = bisect.bisect_right(xs, (start, _MAX))
    if i and xs[i - 1][1] > start:
        i -= 1
    out = []
    while i < len(xs) and xs[i][0] < end:
        a, b = max(xs[i][0], start), min(xs[i][1], end)
        if a < b:
            out.append((a, b))
        i += 1
    return out


def subtract(xs: list[Range], ys: list[Range]) -> list[Range]:
    out: list[Range] = []
    j = 0
    for a, b in xs:
        cur = a
        while j < len(ys) and ys[j][1] <= cur:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            if ys[k][0] > cur:
                out.append((cur, ys[k][0]))
            cur = max(cur, ys[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def flagged(extents: list[tuple[int, int, int]], mask: int) -> list[Range]:
    """Merged ranges of the ``(offset, length, flags)`` extents having any bit of ``mask``."""
    return merge((off, off + length) for off, length, flags in extents if flags & mask)


def split(ranges: Iterable[Range], limit: int) -> list[Range]:
    """Ranges cut into pieces of at most ``limit`` bytes."""
    return [(s, min(s + limit, b)) for a, b in ranges for s in range(a, b, limit)]


# -- digests of buffer slices ---------------------------------------------------------------

_ZEROS = memoryview(bytes(WINDOW))


@functools.lru_cache(maxsize=16)
def _zero_bytes(length: int) -> bytes:
    return bytes(length)


def is_zero(view: memoryview) -> bool:
    # bytes == bytes is a memcmp; comparing memoryviews goes element by element (10x slower).
    return bytes(view) == _zero_bytes(view.nbytes)


def view_digest(view: memoryview) -> bytes:
    """:func:`p2v.replication.model.digest` of a buffer slice, without copying it twice."""
    if is_zero(view):
        return ZERO_DIGEST
    d = hashlib.sha256(view).digest()[:DIGEST_SIZE]
    return d if d not in (ZERO_DIGEST, UNKNOWN_DIGEST) else b"\x01" + d[1:]


# -- the export -----------------------------------------------------------------------------


class ExportReader:
    """A libnbd client of QEMU's point-in-time export (``what`` names it in errors)."""

    def __init__(self, socket_path: str, export: str, *, what: str, bitmap: str | None = None,
                 in_flight: int = DEFAULT_IN_FLIGHT) -> None:  # fmt: skip
        self.what = what
        self.in_flight = max(1, in_flight)
        self.contexts = [BASE_ALLOCATION] + ([DIRTY_CONTEXT_PREFIX + bitmap] if bitmap else [])
        self.dirty_context = DIRTY_CONTEXT_PREFIX + bitmap if bitmap else None
        self._h: nbd.NBD | None = nbd.NBD()
        h = self._h
        try:
            for ctx in self.contexts:
                h.add_meta_context(ctx)
            h.set_export_name(export)
            h.connect_unix(socket_path)
            self.size: int = h.get_size()
            missing = [c for c in self.contexts if not h.can_meta_context(c)]
        except nbd.Error as exc:
            self.close()
            raise VmError(f"{what}: cannot connect to QEMU's NBD export {export!r} at {socket_path}: {exc}") from exc
        if missing:
            self.close()
            raise VmError(f"{what}: QEMU's export {export!r} does not offer {', '.join(missing)}")

    def close(self) -> None:
        """Disconnect (libnbd frees the handle when it is collected)."""
        h, self._h = self._h, None
        if h is not None:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

    def _handle(self) -> nbd.NBD:
        if self._h is None:
            raise VmError(f"{self.what}: the export connection is closed")
        return self._h

    def status(self, start: int, end: int) -> dict[str, list[tuple[int, int, int]]]:
        """``{context: [(offset, length, flags), ...]}`` covering exactly ``[start, end)``."""
        out: dict[str, list[tuple[int, int, int]]] = {c: [] for c in self.contexts}
        pos = start
        while pos < end:
            got: dict[str, list[tuple[int, int, int]]] = {}

            def collect(ctx: str, off: int, entries: list[int], err: object,
                        got: dict[str, list[tuple[int, int, int]]] = got) -> int:  # fmt: skip
                ext, o = [], off
                for i in range(0, len(entries) - 1, 2):
                    ext.append((o, entries[i], entries[i + 1]))
                    o += entries[i]
                got[ctx] = ext
                return 0

            try:
                self._handle().block_status(min(end - pos, MAX_STATUS), pos, collect)
            except nbd.Error as exc:
                raise VmError(f"{self.what}: block status at offset {pos} failed: {exc}") from exc
            if any(not got.get(c) for c in self.contexts):
                raise VmError(f"{self.what}: QEMU answered block status at offset {pos} without "
                              f"{', '.join(c for c in self.contexts if not got.get(c))}")  # fmt: skip
            covered = min(end, *(e[-1][0] + e[-1][1] for e in got.values()))
            if covered <= pos:
                raise VmError(f"{self.what}: block status at offset {pos} made no progress")
            for ctx, ext in got.items():
                out[ctx].extend((o, min(o + n, covered) - o, f) for o, n, f in ext if o < covered)
            pos = covered
        return out

    def read_into(self, pieces: list[tuple[int, memoryview]]) -> int:
        """Read each ``(disk offset, buffer view)`` with up to ``in_flight`` requests queued;
        return the bytes read. Raises :class:`VmError` naming the first failed offset."""
        failed: list[tuple[int, int]] = []
        total = 0
        h = self._handle()

        def done(offset: int) -> Callable[[object], int]:
            def completion(err: object) -> int:
                code = err if isinstance(err, int) else getattr(err, "value", 0)
                if code:
                    failed.append((offset, code))
                return 1

            return completion

        try:
            for offset, view in pieces:
                for at in range(0, view.nbytes, MAX_READ):
                    while h.aio_in_flight() >= self.in_flight:
                        h.poll(-1)
                    part = view[at : at + MAX_READ]
                    h.aio_pread(part, offset + at, completion=done(offset + at))
                    total += part.nbytes
            while h.aio_in_flight() > 0:
                h.poll(-1)
        except nbd.Error as exc:
            raise VmError(f"{self.what}: read failed: {exc}") from exc
        if failed:
            off, code = min(failed)
            raise VmError(f"{self.what}: read at offset {off} failed (errno {code})")
        return total


# -- the passes -----------------------------------------------------------------------------


@dataclass
class PassStats:
    """Work done by a pass, folded into :class:`SyncCounters` by the caller."""

    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    zero_bytes: int = 0
    blocks_changed: int = 0
    bytes_rehashed: int = 0
    bytes_compared: int = 0
    dirty_extents: int = 0
    dirty_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def tick(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def fold(self, counters: SyncCounters) -> None:
        counters.bytes_read = self.bytes_read
        counters.bytes_sent = self.bytes_read  # local: what came out of QEMU's export
        counters.bytes_written = self.bytes_written
        counters.zero_bytes = self.zero_bytes
        counters.blocks_changed = self.blocks_changed
        counters.bytes_rehashed = self.bytes_rehashed
        counters.extra.update(
            bytes_zeroed=self.bytes_zeroed,
            dirty_extents=self.dirty_extents,
            dirty_bytes=self.dirty_bytes,
            bytes_compared=self.bytes_compared,
            timings_s={k: round(v, 3) for k, v in self.timings.items()},
        )


class _Writer:
    """Coalesces adjacent 4 KiB pieces into few ``pwrite``/``zero`` calls on the target."""

    def __init__(self, target: LayerTarget, stats: PassStats) -> None:
        self.target = target
        self.stats = stats
        self._run: tuple[int, int, bool] | None = None  # start, end, zero
        self._chunks: list[memoryview] = []

    def add(self, offset: int, data: memoryview, zero: bool) -> None:
        end = offset + data.nbytes
        if self._run is not None and self._run[1] == offset and self._run[2] == zero:
            self._run = (self._run[0], end, zero)
        else:
            self.flush()
            self._run = (offset, end, zero)
        if not zero:
            self._chunks.append(data)

    def flush(self) -> None:
        if self._run is None:
            return
        start, end, zero = self._run
        if zero:
            self.target.zero(end - start, start)
            self.stats.bytes_zeroed += end - start
        else:
            self.target.pwrite(b"".join(self._chunks), start)
            self.stats.bytes_written += end - start
        self._run, self._chunks = None, []


def _write_all(writer: _Writer, offset: int, new: memoryview, within: list[Range]) -> None:
    """Queue every 4 KiB piece of ``within`` (all-zero pieces as zeroing)."""
    for a, b in within:
        for p in range(a, b, SUB_BLOCK):
            piece = new[p - offset : min(p + SUB_BLOCK, b) - offset]
            writer.add(p, piece, is_zero(piece))


def _write_changes(writer: _Writer, offset: int, new: memoryview, old: memoryview | None,
                   within: list[Range] | None = None) -> None:  # fmt: skip
    """Queue the 4 KiB pieces of ``new`` (at disk ``offset``) that differ from ``old``
    (None: the old content is all zeros), limited to ``within`` when given."""
    spans = [(offset, offset + new.nbytes)] if within is None else within
    for a, b in spans:
        for p in range(a, b, SUB_BLOCK):
            q = min(p + SUB_BLOCK, b)
            piece = new[p - offset : q - offset]
            if old is None:
                if not is_zero(piece):
                    writer.add(p, piece, False)
            elif piece != old[p - offset : q - offset]:
                writer.add(p, piece, is_zero(piece))


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self._last = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= _PROGRESS_EVERY_S:
            self._last = now
            self.callback(done, self.total)


def _windows(size: int) -> Iterable[Range]:
    for start in range(0, size, WINDOW):
        yield start, min(start + WINDOW, size)


def full_pass(reader: ExportReader, target: LayerTarget, old: HashMap, new: HashMap, stats: PassStats,
              progress: ProgressCallback | None = None) -> None:  # fmt: skip
    """Read every non-zero extent, hash every block, write what differs from ``old``."""
    bs = old.block_size
    buf = bytearray(WINDOW)
    view = memoryview(buf)
    writer = _Writer(target, stats)
    report = _Progress(progress, old.size)
    report(0, force=True)
    for ws, we in _windows(old.size):
        t = time.perf_counter()
        zero = flagged(reader.status(ws, we)[BASE_ALLOCATION], STATE_ZERO)
        data = subtract([(ws, we)], zero)
        t = stats.tick("status", t)
        stats.bytes_read += reader.read_into([(a, view[a - ws : b - ws]) for a, b in split(data, MAX_READ)])
        for a, b in zero:
            view[a - ws : b - ws] = _ZEROS[: b - a]
        stats.zero_bytes += sum(b - a for a, b in zero)
        t = stats.tick("read", t)
        data_blocks = {i for a, b in data for i in range(a // bs, (b - 1) // bs + 1)}
        for i in range(ws // bs, (we + bs - 1) // bs):
            off, length = old.block_range(i)
            d = view_digest(view[off - ws : off - ws + length]) if i in data_blocks else ZERO_DIGEST
            new[i] = d
            if d == old[i]:
                continue
            stats.blocks_changed += 1
            block = view[off - ws : off - ws + length]
            if old[i] == ZERO_DIGEST:
                _write_changes(writer, off, block, None)
            else:
                before = memoryview(target.pread(length, off))
                stats.bytes_compared += length
                _write_changes(writer, off, block, before)
        writer.flush()
        stats.tick("hash_write", t)
        report(we)
    report(old.size, force=True)


def dirty_pass(reader: ExportReader, target: LayerTarget, old: HashMap, new: HashMap, stats: PassStats,
               progress: ProgressCallback | None = None, *,
               rehash_share: float = DEFAULT_REHASH_SHARE) -> None:  # fmt: skip
    """Read only the dirty extents; see the module docstring for ``rehash_share``.

    A reader thread asks QEMU for the next window's dirty extents while this thread hashes
    and writes the previous one (two window buffers): QEMU serving reads and qemu-nbd taking
    writes then work at the same time instead of in turns.
    """
    assert reader.dirty_context is not None
    writer = _Writer(target, stats)
    report = _Progress(progress, old.size)
    report(0, force=True)
    with _DirtyWindows(reader, old.size, stats) as windows:
        for ws, we, dirty, view in windows:
            if dirty:
                _patch_window(target, old, new, stats, writer, dirty, rehash_share, view, ws)
                writer.flush()  # before ``view`` goes back to the reader: queued data is copied by then
            report(we)
    report(old.size, force=True)


_Window = tuple[int, int, list[Range], memoryview]  # start, end, dirty ranges, buffer of the window


class _DirtyWindows:
    """Block status and export reads of the dirty extents, window by window, on a thread that
    runs up to :data:`READ_AHEAD` windows ahead of the caller. Each window comes as
    ``(start, end, dirty, view)``: ``view`` holds the dirty bytes at their offset from ``start``
    (dirty ranges QEMU reports as zero are zero-filled, not read); the rest of it is stale.
    The view is the caller's until it asks for the next window."""

    def __init__(self, reader: ExportReader, size: int, stats: PassStats) -> None:
        self.reader = reader
        self.size = size
        self.stats = stats
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(READ_AHEAD + 1):
            self._free.put(memoryview(bytearray(WINDOW)))
        self._out: queue.Queue[_Window | BaseException | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2v-dirty-reads", daemon=True)

    def __enter__(self) -> _DirtyWindows:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator[_Window]:
        held: memoryview | None = None
        while True:
            if held is not None:
                self._free.put(held)
                held = None
            t = time.perf_counter()
            item = self._out.get()
            self.stats.tick("wait_read", t)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if item[2]:
                held = item[3]
            yield item

    def _buffer(self) -> memoryview | None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                return self._free.get(timeout=0.2)
        return None

    def _run(self) -> None:
        stats = self.stats
        empty = memoryview(b"")
        try:
            for ws, we in _windows(self.size):
                if self._stop.is_set():
                    return
                t = time.perf_counter()
                status = self.reader.status(ws, we)
                dirty = flagged(status[self.reader.dirty_context or ""], STATE_DIRTY)
                t = stats.tick("status", t)
                if not dirty:
                    self._out.put((ws, we, [], empty))
                    continue
                zero = flagged(status[BASE_ALLOCATION], STATE_ZERO)
                stats.dirty_extents += len(dirty)
                stats.dirty_bytes += sum(b - a for a, b in dirty)
                dirty_zero = intersect(dirty, zero)
                stats.zero_bytes += sum(b - a for a, b in dirty_zero)
                buf = self._buffer()
                if buf is None:
                    return
                view = buf[: we - ws]
                to_read = split(subtract(dirty, zero), MAX_READ)
                stats.bytes_read += self.reader.read_into([(a, view[a - ws : b - ws]) for a, b in to_read])
                for a, b in dirty_zero:
                    view[a - ws : b - ws] = _ZEROS[: b - a]
                stats.tick("read", t)
                self._out.put((ws, we, dirty, view))
            self._out.put(None)
        except BaseException as exc:  # handed to the caller
            self._out.put(exc)


def _touched_runs(dirty: list[Range], old: HashMap) -> list[Range]:
    """Coarse-block-aligned ranges covering ``dirty``, at most :data:`REHASH_RUN` long."""
    bs = old.block_size
    aligned = merge((a // bs * bs, min(old.size, (b + bs - 1) // bs * bs)) for a, b in dirty)
    return split(aligned, max(bs, REHASH_RUN // bs * bs))


@dataclass
class _Touched:
    """One coarse block with dirty extents, and how the new map learns its digest."""

    index: int
    offset: int
    length: int
    dirty: list[Range]
    exact: bool  # digest computed (else UNKNOWN_DIGEST)
    read_back: bool  # its clean part read from the target first


def _plan(old: HashMap, a: int, b: int, dirty: list[Range], rehash_share: float) -> list[_Touched]:
    out = []
    for i in range(a // old.block_size, (b + old.block_size - 1) // old.block_size):
        off, length = old.block_range(i)
        within = clip(dirty, off, off + length)
        share = sum(y - x for x, y in within) / length
        exact = share >= rehash_share or share >= 1.0
        out.append(_Touched(i, off, length, within, exact, exact and share < 1.0))
    return out


def _patch_window(target: LayerTarget, old: HashMap, new: HashMap, stats: PassStats, writer: _Writer,
                  dirty: list[Range], rehash_share: float, scratch: memoryview, ws: int) -> None:  # fmt: skip
    """Hash and write the dirty extents of one window, whose dirty bytes are in ``scratch`` at
    their offset from ``ws``. A block to be hashed whole has its clean part read back from the
    target (the previous point) into ``scratch`` first; the rest of ``scratch`` is never used."""
    t = time.perf_counter()
    for a, b in _touched_runs(dirty, old):
        view = scratch[a - ws : b - ws]
        blocks = _plan(old, a, b, dirty, rehash_share)
        back = merge((k.offset, k.offset + k.length) for k in blocks if k.read_back)
        prev: bytearray | None = None
        if back:
            t = stats.tick("hash_write", t)
            prev = bytearray(b - a)
            for x, y in back:
                held = target.pread(y - x, x)
                stats.bytes_rehashed += y - x
                prev[x - a : y - a] = held
                for p, q in subtract([(x, y)], clip(dirty, x, y)):
                    view[p - a : q - a] = held[p - x : q - x]
            t = stats.tick("rehash_read", t)
        for k in blocks:
            d = view_digest(view[k.offset - a : k.offset - a + k.length]) if k.exact else UNKNOWN_DIGEST
            new[k.index] = d
            stats.blocks_changed += d != old[k.index]
            if k.read_back:
                # Pieces are compared with what the target holds, not with the map: the map only
                # decides what is counted, never what is skipped.
                assert prev is not None
                _write_changes(writer, a, view, memoryview(prev), k.dirty)
            else:
                _write_all(writer, a, view, k.dirty)
    stats.tick("hash_write", t)
