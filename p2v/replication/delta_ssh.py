"""Hash-mode sync of a source host's block device over SSH (``model.DiskSource``).

The helper in :mod:`p2v.replication.delta_helper` runs on the source and reads the device
once; this module is the DR side: it answers the helper's map requests from the old map,
answers each CHANGED block with the 4 KiB pieces that differ from the layer's old block
(it holds that block, so the comparison costs one local read), and writes what arrives.
One thread, no deadlock: what the DR side sends is bounded (one map chunk ahead, one
answer per block in the helper's window) and far below the SSH channel window, so its
sends never block while the helper waits to write.

Long syncs run as several helper runs ("ranges"), each on a fresh channel carrying at
most ``range_bytes`` from the source, so the session re-keys between them (paramiko
issue #822, see :mod:`p2v.sources.ssh_session`).

Without python3 on the source (or ``use_python=False``) the device is streamed with
``dd`` and compared here (mode ``"stream"``): same result, every byte on the wire.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from p2v.errors import P2VError, RemoteError, SourceChanged, SourceNotFound, UsageError
from p2v.replication.delta import BlockDelta, Progress, check_geometry, mode_for
from p2v.replication.delta_helper import (
    CHANGED,
    COMPRESSED,
    DATA,
    END,
    EXIT_OPEN,
    EXIT_READ,
    FLAG_COMPRESS,
    FRAME,
    HELLO,
    HELPER_SOURCE,
    HELPER_TIMINGS,
    MAP_CHUNK,
    MAP_REQUEST,
    NEED,
    PROGRESS,
    SEEDED,
    TOTALS,
    ZERO_BLOCK,
    ZERO_DATA,
)
from p2v.replication.delta_reads import DEFAULT_READERS, OldBlockReader
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
)
from p2v.sources.ssh import SshTarget
from p2v.sources.ssh_copy import remote_device_size
from p2v.sources.ssh_session import REKEY_AFTER_BYTES, RemoteProcess, SshSession

log = logging.getLogger(__name__)

MiB = 1 << 20
READ_TIMEOUT = 120.0  # seconds without a byte from the source before we call it stalled
DEFAULT_WINDOW = 16 * MiB
DEFAULT_READ = 4 * MiB
DEFAULT_HASH_THREADS = 4  # on the source, at most its CPU count
MAP_BLOCKS = 4096  # map entries per chunk the helper asks for (64 KiB of map)
OUTBOX_LIMIT = 16 << 10
INPUT_CHUNK = 256 << 10
IDLE_POLL_S = 0.002  # while old blocks are being read, how often to look for new input


class FrameLink(Protocol):
    """A byte pipe to the helper (an SSH channel, or a local pipe in tests)."""

    def read(self, size: int) -> bytes: ...  # up to ``size`` bytes, b"" at end of stream

    def send(self, data: bytes) -> None: ...

    def ready(self) -> bool: ...  # input can be read without waiting


class SshLink:
    """:class:`FrameLink` over a :class:`RemoteProcess`."""

    def __init__(self, proc: RemoteProcess) -> None:
        self.proc = proc

    def read(self, size: int) -> bytes:
        return self.proc.read(size)

    def send(self, data: bytes) -> None:
        self.proc.send(data)

    def ready(self) -> bool:
        return bool(self.proc.channel.recv_ready())


class EndOfStream(Exception):
    """The helper's output ended before its END frame."""


class NoPython(Exception):
    """The source host has no usable python3: sync in stream mode instead."""


class _Input:
    """Buffered frame reader with byte counting and an optional rate limit (bytes/s)."""

    def __init__(self, link: FrameLink, bwlimit: int | None, on_idle: Callable[[], None] | None = None) -> None:
        self.link = link
        self.bwlimit = bwlimit
        self.on_idle = on_idle  # called before a read that would wait
        self.buf = bytearray()
        self.pos = 0
        self.nbytes = 0
        self.wait_s = 0.0
        self._t0 = time.monotonic()
        self._allowance_bytes = 0

    def _fill(self) -> None:
        if self.on_idle is not None and not self.link.ready():
            self.on_idle()
        t0 = time.monotonic()
        data = self.link.read(INPUT_CHUNK)
        self.wait_s += time.monotonic() - t0
        if not data:
            raise EndOfStream
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data
        self.nbytes += len(data)
        if self.bwlimit:
            # token bucket, one second of burst: sleep until the average is back under the limit
            due = (self.nbytes - self.bwlimit) / self.bwlimit - (time.monotonic() - self._t0)
            if due > 0:
                time.sleep(due)

    def exact(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def frame(self) -> tuple[bytes, int, int]:
        kind, a, b = FRAME.unpack(self.exact(FRAME.size))
        return kind, a, b

    def buffered(self) -> bool:
        return len(self.buf) - self.pos > 0


class DeltaReceiver:
    """The DR side of every helper run of one sync: map answers, NEED answers, writes."""

    def __init__(
        self,
        target: LayerTarget,
        old: HashMap,
        counters: SyncCounters,
        *,
        where: str,
        progress: Progress,
        readers: int = DEFAULT_READERS,
    ) -> None:
        self.old = old
        self.bs = old.block_size
        self.delta = BlockDelta(target, old, counters)
        self.counters = counters
        self.where = where
        self.progress = progress
        self.upstream = 0  # bytes sent to the helper
        self.read_s = 0.0  # waiting for old blocks to be read from the layer
        self.wait_s = 0.0  # waiting for the source
        self.hellos = 0  # helper runs that started
        self.reads = OldBlockReader(target, readers)

    def close(self) -> None:
        self.reads.close()

    @property
    def new(self) -> HashMap:
        return self.delta.new

    def run(self, link: FrameLink, start: int, bwlimit: int | None) -> int:
        """Consume one helper run from ``start``; returns where it stopped."""
        outbox = bytearray()

        def answer(results: list[tuple[int, int]]) -> None:
            for index, mask in results:
                if mask:
                    expected[index] = mask
                nbytes = (mask.bit_length() + 7) // 8
                outbox.extend(FRAME.pack(NEED, index, nbytes) + mask.to_bytes(nbytes, "little"))

        def send_outbox() -> None:
            if outbox:
                link.send(bytes(outbox))
                self.upstream += len(outbox)
                outbox.clear()

        def on_idle() -> None:
            # about to wait for input: the helper may be waiting for our answers, so send them
            # as the old blocks come in, until all are out or the helper sends more
            answer(reads.done())
            send_outbox()
            t0 = time.monotonic()
            while reads.pending and not link.ready():
                answer(reads.wait_some(IDLE_POLL_S))
                send_outbox()
            self.read_s += time.monotonic() - t0

        reads = self.reads
        inp = _Input(link, bwlimit, on_idle=on_idle)
        expected: dict[int, int] = {}  # block -> bitmask of the pieces still due
        seeded = -1  # block whose pieces follow an S frame
        frames = changed = 0
        c = self.counters
        try:
            kind, size, bs = inp.frame()
            if kind != HELLO:
                raise RemoteError(f"{self.where}: unexpected first reply from the helper ({kind!r})")
            if size != self.old.size:
                raise SourceChanged(
                    f"{self.where} is now {size} bytes, the site recorded {self.old.size}; re-add the machine",
                    hint="a disk that grew or shrank needs a new seed: p2v protect remove, then p2v protect add",
                )
            if bs != self.bs:
                raise RemoteError(f"{self.where}: the helper uses {bs}-byte blocks, expected {self.bs}")
            self.hellos += 1
            while True:
                kind, a, n = inp.frame()
                if kind in (DATA, COMPRESSED, ZERO_DATA):
                    frames += 1
                    data = self._piece(inp, kind, a, n)
                    block = a // self.bs
                    if block != seeded:
                        mask = expected.get(block)
                        bits = self._bits(a, len(data) if data is not None else n)
                        if mask is None or mask & bits != bits:
                            raise RemoteError(f"{self.where}: unrequested data at offset {a}")
                        if mask == bits:
                            del expected[block]
                        else:
                            expected[block] = mask & ~bits
                    if data is None:
                        self.delta.writes.zero(a, n)
                    else:
                        self.delta.writes.write(a, data)
                    continue
                seeded = -1
                if kind in (CHANGED, SEEDED, ZERO_BLOCK):
                    self.progress(a * self.bs)
                if kind == CHANGED:
                    changed += 1
                    self._changed(a, inp.exact(n), reads)
                elif kind == SEEDED:
                    changed += 1
                    self._check_block(a)
                    if n != DIGEST_SIZE:
                        raise RemoteError(f"{self.where}: bad seeded-block frame for block {a}")
                    self.new[a] = inp.exact(n)
                    seeded = a
                elif kind == ZERO_BLOCK:
                    changed += 1
                    self._check_block(a)
                    off, length = self.old.block_range(a)
                    self.new[a] = ZERO_DIGEST
                    self.delta.writes.zero(off, length)
                elif kind == MAP_REQUEST:
                    if a + n > self.old.count or n > MAP_BLOCKS:
                        raise RemoteError(f"{self.where}: bad map request ({n} blocks at {a})")
                    chunk = self.old.data[a * DIGEST_SIZE : (a + n) * DIGEST_SIZE]
                    outbox += FRAME.pack(MAP_CHUNK, a, len(chunk)) + chunk
                elif kind == PROGRESS:
                    self.progress(a)
                elif kind == END:
                    totals = TOTALS.unpack(inp.exact(n)) if n == TOTALS.size else None
                    if totals is None:
                        raise RemoteError(f"{self.where}: truncated end record")
                    nread, nchanged, _data_bytes, nzero, nframes = totals[:5]
                    timings = c.extra.setdefault("source_s", dict.fromkeys(HELPER_TIMINGS, 0.0))
                    for name, ms in zip(HELPER_TIMINGS, totals[5:], strict=True):
                        timings[name] = round(timings[name] + ms / 1000, 3)
                    if expected or (nchanged, nframes) != (changed, frames) or a != start + nread:
                        raise RemoteError(
                            f"{self.where}: totals do not match: the helper changed {nchanged} blocks in "
                            f"{nframes} pieces over {nread} bytes, received {changed} blocks and {frames} "
                            f"pieces, {len(expected)} blocks incomplete"
                        )
                    c.bytes_read += nread
                    c.zero_bytes += nzero
                    c.blocks_changed += changed
                    c.extra["data_bytes"] = c.extra.get("data_bytes", 0) + _data_bytes
                    self.progress(a)
                    return a
                else:
                    raise RemoteError(f"{self.where}: unknown frame type {kind!r} from the helper")
                if reads.pending:
                    answer(reads.done())
                if len(outbox) >= OUTBOX_LIMIT:
                    send_outbox()
        finally:
            c.bytes_sent += inp.nbytes
            self.wait_s += inp.wait_s

    def _check_block(self, index: int) -> None:
        if not 0 <= index < self.old.count:
            raise RemoteError(f"{self.where}: block {index} is outside the disk")

    def _bits(self, offset: int, length: int) -> int:
        first = (offset % self.bs) // SUB_BLOCK
        count = (length + SUB_BLOCK - 1) // SUB_BLOCK
        return ((1 << count) - 1) << first

    def _piece(self, inp: _Input, kind: bytes, offset: int, n: int) -> bytes | None:
        block_off = offset - offset % self.bs
        limit = min(self.bs, self.old.size - block_off) - offset % self.bs
        if (
            offset % SUB_BLOCK
            or offset >= self.old.size
            or (kind != COMPRESSED and not (0 < n <= limit and (n % SUB_BLOCK == 0 or offset + n == self.old.size)))
        ):
            raise RemoteError(f"{self.where}: bad data frame (offset {offset}, {n} bytes)")
        if kind == ZERO_DATA:
            return None
        payload = inp.exact(n)
        if kind == DATA:
            return payload
        if n > self.bs + 1024:
            raise RemoteError(f"{self.where}: bad compressed frame (offset {offset}, {n} bytes)")
        unz = zlib.decompressobj()
        try:
            data = unz.decompress(payload, limit)
        except zlib.error as exc:
            raise RemoteError(f"{self.where}: corrupt compressed data at offset {offset}: {exc}") from exc
        ragged = len(data) % SUB_BLOCK and offset + len(data) != self.old.size
        if not unz.eof or unz.unconsumed_tail or not data or ragged:
            raise RemoteError(f"{self.where}: compressed data at offset {offset} does not fit its block")
        return data

    def _changed(self, index: int, payload: bytes, reads: OldBlockReader) -> None:
        """Record block ``index``'s new digest; queue the read that finds the pieces to ask for."""
        self._check_block(index)
        off, length = self.old.block_range(index)
        pieces = (length + SUB_BLOCK - 1) // SUB_BLOCK
        if len(payload) != DIGEST_SIZE * (1 + pieces):
            raise RemoteError(f"{self.where}: bad changed-block frame for block {index}")
        self.new[index] = payload[:DIGEST_SIZE]
        self.delta.writes.flush_overlapping(off, length)
        reads.submit(index, off, length, payload[DIGEST_SIZE:])


class SshDiskSource:
    """A block device (or file) on an SSH host as a protected disk (``model.DiskSource``).

    ``size`` is what the site recorded; a device of another size raises
    :class:`SourceChanged`. ``url`` defaults to ``ssh://user@host[:port]/device``; pass the
    original URL when ``device`` is a snapshot view of it. ``use_python=None`` runs the
    helper and falls back to stream mode when the host has no python3 >= 3.5 (found from
    the helper's own failure: no extra round trip); ``False`` forces stream mode.
    ``hash_threads`` bounds the threads the helper hashes with on the source. ``bwlimit`` is in bytes/s
    (what the DR side reads from the channel). The session stays the caller's.
    """

    def __init__(
        self,
        session: SshSession,
        device: str,
        size: int,
        *,
        block_size: int = DEFAULT_BLOCK,
        compress: bool = False,
        bwlimit: int | None = None,
        use_python: bool | None = None,
        range_bytes: int = REKEY_AFTER_BYTES,
        window: int = DEFAULT_WINDOW,
        read_size: int = DEFAULT_READ,
        hash_threads: int = DEFAULT_HASH_THREADS,
        url: str | None = None,
    ) -> None:
        if read_size % block_size or window < block_size or range_bytes < block_size:
            raise UsageError(
                f"read size {read_size}, window {window} and range {range_bytes} must be multiples of / "
                f"at least the block size {block_size}"
            )
        self.session = session
        self.device = device
        self.size = size
        self.block_size = block_size
        self.compress = compress
        self.bwlimit = bwlimit
        self.use_python = use_python
        self.range_bytes = range_bytes
        self.window = window
        self.read_size = read_size
        self.hash_threads = hash_threads
        self.url = url or SshTarget(session.host, device, session.user, session.port).url

    def close(self) -> None:
        pass

    def sync(
        self,
        target: LayerTarget,
        old: HashMap,
        state: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> SyncResult:
        """Write every 4 KiB piece that differs from ``old`` into ``target``; the new map.

        Raises :class:`RemoteError` (connection lost, helper failed: nothing of this sync
        may be committed), :class:`SourceNotFound` (device missing or unreadable),
        :class:`SourceChanged` (size differs from the site's record).
        """
        started = time.monotonic()
        if old.block_size != self.block_size:
            raise UsageError(f"{self.url}: the site's map uses {old.block_size}-byte blocks, not {self.block_size}")
        check_geometry(self.url, self.size, old, target)
        use_python = self.use_python
        counters = SyncCounters(mode=mode_for(old, state) if use_python is not False else "stream", disk_size=self.size)
        rekeys = self.session.rekeys
        tick = Progress(progress, self.size)
        try:
            new: HashMap | None = None
            if use_python is not False:
                try:
                    new = self._sync_helper(target, old, counters, tick)
                except NoPython as exc:
                    if use_python:
                        raise RemoteError(str(exc), hint="install python3 on the source, or use stream mode") from exc
                    log.info("%s: %s; streaming the device instead", self.url, exc)
                    use_python = False
                    counters = SyncCounters(mode="stream", disk_size=self.size)
            if new is None:
                new = self._sync_stream(target, old, counters, tick)
            target.flush()
        except (SourceChanged, SourceNotFound):
            raise
        except P2VError as exc:
            if isinstance(exc, RemoteError):
                msg = f"{self.url}: sync failed, no changes recorded: {exc.message}"
                raise RemoteError(msg, hint=exc.hint) from exc
            raise
        counters.extra["rekeys"] = self.session.rekeys - rekeys
        counters.wall_s = time.monotonic() - started
        tick(self.size, force=True)
        log.info("%s: %s sync, %d blocks changed, %d bytes on the wire, %.1f s", self.url, counters.mode,
                 counters.blocks_changed, counters.bytes_sent, counters.wall_s)  # fmt: skip
        return SyncResult(new, counters, {"kind": "ssh", "reader": "python" if use_python else "dd"})

    # -- helper mode --------------------------------------------------------

    def _sync_helper(self, target: LayerTarget, old: HashMap, counters: SyncCounters, tick: Progress) -> HashMap:
        receiver = DeltaReceiver(target, old, counters, where=self.url, progress=tick)
        try:
            return self._run_ranges(receiver, counters)
        finally:
            receiver.close()

    def _run_ranges(self, receiver: DeltaReceiver, counters: SyncCounters) -> HashMap:
        flags = FLAG_COMPRESS if self.compress else 0
        pos = ranges = 0
        while pos < self.size or ranges == 0:
            argv = ["python3", "-c", HELPER_SOURCE, self.device, str(pos), "0", str(self.block_size)]
            argv += [str(self.read_size), str(self.window), str(self.range_bytes), str(flags), str(MAP_BLOCKS)]
            argv.append(str(self.hash_threads))
            with self.session.start(argv, read_timeout=READ_TIMEOUT, name=f"reading {self.device}") as proc:
                try:
                    stop = receiver.run(SshLink(proc), pos, self.bwlimit)
                except EndOfStream:
                    raise self._helper_failed(proc, started=ranges > 0 or receiver.hellos > 0) from None
                rc = proc.wait()
                if rc != 0:
                    raise self._helper_failed(proc, rc)
            ranges += 1
            if stop <= pos and pos < self.size:
                raise RemoteError(f"{self.url}: the helper made no progress at offset {pos}")
            pos = stop
        receiver.delta.finish()
        counters.extra.update(
            ranges=ranges,
            bytes_upstream=receiver.upstream,
            compress=self.compress,
            dr_read_old_s=round(receiver.read_s, 3),
            dr_wait_source_s=round(receiver.wait_s, 3),
        )
        return receiver.new

    def _helper_failed(self, proc: RemoteProcess, rc: int | None = None, *, started: bool = True) -> Exception:
        if not self.session.is_alive():
            return RemoteError(f"{self.session.label}: connection lost while reading {self.device}")
        if rc is None:
            try:
                rc = proc.wait(10)
            except RemoteError:
                rc = -1
        tail = proc.stderr_tail() or "(no message)"
        if rc in (EXIT_OPEN, EXIT_READ):
            return SourceNotFound(f"{self.url}: {tail.removeprefix('p2v-delta: ')}")
        unusable = ("SyntaxError", "ImportError", "ModuleNotFoundError")
        if not started and (rc == 127 or any(word in tail for word in unusable)):
            # no python3 (>= 3.5) on the host, or one without a module the helper needs
            return NoPython(f"{self.session.label}: python3 >= 3.5 is not available ({tail[-300:]})")
        return RemoteError(f"{self.session.label}: the helper reading {self.device} failed (exit {rc}): {tail}")

    # -- stream mode (no python on the source) ------------------------------

    def _sync_stream(self, target: LayerTarget, old: HashMap, counters: SyncCounters, tick: Progress) -> HashMap:
        try:
            size = remote_device_size(self.session, self.device)
        except RemoteError as exc:
            if "not a block device or regular file" in exc.message or "No such file" in exc.message:
                raise SourceNotFound(f"{self.url}: no such device or file on the host") from exc
            raise
        if size != self.size:
            raise SourceChanged(f"{self.url} is now {size} bytes, the site recorded {self.size}; re-add the machine")
        delta = BlockDelta(target, old, counters)
        bs = self.block_size
        dd_bs = max(bs, MiB // bs * bs)
        per_range = max(1, self.range_bytes // dd_bs)
        pos = ranges = 0
        while pos < size:
            expected = min(per_range * dd_bs, size - pos)
            argv = ["dd", f"if={self.device}", f"bs={dd_bs}", f"skip={pos // dd_bs}", f"count={per_range}"]
            got = 0
            with self.session.start(argv, read_timeout=READ_TIMEOUT, name=f"dd {self.device}") as proc:
                inp = _Input(SshLink(proc), self.bwlimit)
                try:
                    while got < expected:
                        n = min(dd_bs, expected - got)
                        data = inp.exact(n)
                        for i in range(0, n, bs):
                            delta.apply((pos + got + i) // bs, data[i : i + bs])
                        got += n
                        tick(pos + got)
                except EndOfStream:
                    if not self.session.is_alive():
                        lost = f"{self.session.label}: connection lost while reading {self.device}"
                        raise RemoteError(lost) from None
                    raise SourceNotFound(
                        f"{self.url}: dd stopped at offset {pos + got} of {size}: {proc.stderr_tail()}"
                    ) from None
                finally:
                    counters.bytes_sent += inp.nbytes
                rc = proc.wait()
                if rc != 0:
                    why = proc.stderr_tail()
                    raise RemoteError(f"{self.session.label}: dd {self.device} failed (exit {rc}): {why}")
            counters.bytes_read += got
            pos += got
            ranges += 1
        delta.finish()
        counters.extra.update(ranges=ranges, bytes_upstream=0)
        return delta.new
