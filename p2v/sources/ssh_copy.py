"""Copy a source host's block device (or file) once, over SSH, into a sparse raw file.

Two modes:

``python``  (default when the host has python3 >= 3.5) the helper in
            :mod:`p2v.sources.ssh_helper` reads the device on the host and sends only
            blocks that are not all zero, as framed records.
``stream``  (no python3, or ``use_python=False``) ``dd`` streams every byte; zero
            blocks are skipped here while writing.

Either way the device is read in runs ("ranges") on fresh channels, each carrying
at most about ``REKEY_AFTER_BYTES`` on the wire, so the session can re-key between
them (paramiko issue #822, see :mod:`p2v.sources.ssh_session`). The output is
written to ``DEST.partial`` and renamed to ``DEST`` only when every byte arrived
and the totals match; on any failure nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from p2v.errors import InvalidInput, OutputError, P2VError, RemoteError, UsageError
from p2v.sources.ssh_helper import DATA, END, END_TOTALS, FRAME, HELLO, HELPER_SOURCE, PROGRESS
from p2v.sources.ssh_session import REKEY_AFTER_BYTES, RemoteProcess, SshSession

log = logging.getLogger(__name__)

MiB = 1 << 20
ZERO_BLOCK = 64 << 10  # granularity of zero detection (and of the DR block map)
READ_TIMEOUT = 120.0  # seconds without a byte from the host before we call it stalled

CopyMode = Literal["python", "stream"]
ProgressCallback = Callable[[int, int], None]


@dataclass
class CopyStats:
    bytes_total: int  # size of the device
    bytes_sent: int  # bytes that crossed the wire (records and framing)
    bytes_zero_skipped: int  # all-zero blocks not sent (python) or not written (stream)
    seconds: float
    mode: CopyMode
    ranges: int = 1  # channels used
    rekeys: int = 0  # key re-exchanges done between ranges

    @property
    def mb_per_s(self) -> float:
        """Device bytes covered per second (MB = 10**6 bytes)."""
        return self.bytes_total / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 1)}


class _Progress:
    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.total = 0
        self._last = 0.0

    def __call__(self, done: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= 0.2:
            self._last = now
            self.callback(done, self.total)


class _SparseWriter:
    """``DEST.partial`` preallocated (sparse) to the device size; renamed on commit.

    Writes go through a small queue to a thread, so the disk write of one record
    overlaps the network read of the next (``pwrite`` releases the GIL).
    """

    QUEUE_DEPTH = 16  # records (each at most one read block) waiting to be written

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".partial")
        if dest.exists():
            raise OutputError(f"{dest}: already exists; remove it or choose another destination")
        if not dest.parent.is_dir():
            raise OutputError(f"{dest.parent}: not a directory")
        try:
            self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot create: {exc.strerror}") from exc
        self.size: int | None = None
        self._queue: queue.Queue[tuple[int, bytes | memoryview] | None] = queue.Queue(self.QUEUE_DEPTH)
        self._error: OutputError | None = None
        self._thread = threading.Thread(target=self._write_queued, name="p2v-ssh-writer", daemon=True)
        self._thread.start()

    def preallocate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot size to {size} bytes: {exc.strerror}") from exc
        self.size = size

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks
            offset, data = item
            try:
                written = os.pwrite(self.fd, data, offset)
                if written != len(data):
                    raise OSError(28, f"short write ({written} of {len(data)} bytes)")
            except OSError as exc:
                self._error = OutputError(f"{self.partial}: write at offset {offset} failed: {exc.strerror or exc}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((offset, data))

    def _drain(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def commit(self) -> None:
        self._drain()
        if self._error is not None:
            raise self._error
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.partial, self.dest)
        except OSError as exc:
            raise OutputError(f"{self.dest}: cannot finish writing: {exc.strerror}") from exc

    def discard(self) -> None:
        self._drain()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.partial.unlink(missing_ok=True)


def remote_device_size(session: SshSession, device: str) -> int:
    """Bytes in ``device`` on the host: ``blockdev --getsize64`` or ``stat`` for a file."""
    script = (
        'if [ -b "$1" ]; then exec blockdev --getsize64 "$1"; '
        'elif [ -f "$1" ]; then exec stat -L -c %s "$1"; '
        'else echo "$1: not a block device or regular file" >&2; exit 3; fi'
    )
    res = session.run(["sh", "-c", script, "p2v-size", device], timeout=60)
    try:
        return int(res.text.strip())
    except ValueError as exc:
        raise RemoteError(f"{session.label}: size of {device}: unexpected output {res.text[:80]!r}") from exc


def copy_device(
    session: SshSession,
    device: str,
    dest: Path,
    *,
    progress: ProgressCallback | None = None,
    block_size: int = MiB,
    use_python: bool | None = None,
    range_bytes: int = REKEY_AFTER_BYTES,
) -> CopyStats:
    """Copy ``device`` from the host into the sparse raw file ``dest``.

    ``progress(done_bytes, total_bytes)`` is called a few times a second.
    ``use_python=None`` picks the helper when the host has python3 >= 3.5.
    ``range_bytes`` bounds the wire bytes per channel (re-key granularity).
    Raises :class:`RemoteError` (connection lost, device unreadable, totals wrong)
    or :class:`OutputError` (``dest`` exists or cannot be written); ``dest`` is then
    absent and no ``dest.partial`` is left.
    """
    if block_size < ZERO_BLOCK or block_size % ZERO_BLOCK or block_size > 64 * MiB:
        raise UsageError(f"block size {block_size}: must be a multiple of {ZERO_BLOCK} up to {64 * MiB}")
    if range_bytes < block_size:
        raise UsageError(f"range size {range_bytes}: must be at least the block size ({block_size})")
    if use_python is None:
        use_python = session.python3_version() is not None
    writer = _SparseWriter(dest)
    rekeys_before = session.rekeys
    started = time.monotonic()
    try:
        if use_python:
            stats = _copy_with_helper(session, device, writer, _Progress(progress), block_size, range_bytes)
        else:
            stats = _copy_streamed(session, device, writer, _Progress(progress), block_size, range_bytes)
        writer.commit()
    except BaseException as exc:
        writer.discard()
        if isinstance(exc, P2VError | KeyboardInterrupt | SystemExit):
            raise
        raise RemoteError(f"{session.label}: copying {device} failed: {exc}") from exc
    stats.seconds = time.monotonic() - started
    stats.rekeys = session.rekeys - rekeys_before
    log.info(
        "%s:%s -> %s: %d bytes, %d on the wire, %d zero skipped, %.1f s (%.0f MB/s, %s)",
        session.label, device, dest, stats.bytes_total, stats.bytes_sent,
        stats.bytes_zero_skipped, stats.seconds, stats.mb_per_s, stats.mode,
    )  # fmt: skip
    return stats


# -- python helper mode ---------------------------------------------------


def _copy_with_helper(
    session: SshSession,
    device: str,
    writer: _SparseWriter,
    progress: _Progress,
    block_size: int,
    range_bytes: int,
) -> CopyStats:
    stats = CopyStats(0, 0, 0, 0.0, "python", ranges=0)
    pos = 0
    size: int | None = None
    while size is None or pos < size:
        argv = ["python3", "-c", HELPER_SOURCE, device, str(pos), "0", str(range_bytes)]
        argv += [str(block_size), str(ZERO_BLOCK)]
        with session.start(argv, read_timeout=READ_TIMEOUT, name=f"reading {device}") as proc:
            size, stop = _read_range(proc, device, writer, progress, stats, pos, size, block_size)
            rc = proc.wait()
            if rc != 0:
                raise RemoteError(f"{session.label}: reading {device} failed (exit {rc}): {proc.stderr_tail()}")
        if stop <= pos < size:
            raise RemoteError(f"{session.label}: reading {device} made no progress at offset {pos}")
        pos = stop
        stats.ranges += 1
    stats.bytes_total = size
    progress(size, force=True)
    return stats


def _read_range(
    proc: RemoteProcess,
    device: str,
    writer: _SparseWriter,
    progress: _Progress,
    stats: CopyStats,
    start: int,
    size: int | None,
    block_size: int,
) -> tuple[int, int]:
    """Consume one helper run; return (device size, offset where it stopped)."""
    where = f"{proc.session.label}:{device}"

    def frame() -> tuple[bytes, int, int]:
        head = proc.read_exact(FRAME.size)
        if len(head) < FRAME.size:
            tail = proc.stderr_tail()
            if not proc.session.is_alive():
                raise RemoteError(f"{where}: connection lost during the copy")
            raise RemoteError(f"{where}: the reader on the host stopped early: {tail or '(no message)'}")
        stats.bytes_sent += FRAME.size
        kind, offset, length = FRAME.unpack(head)
        return kind, offset, length

    kind, dev_size, zsize = frame()
    if kind != HELLO or zsize != ZERO_BLOCK:
        raise RemoteError(f"{where}: unexpected reply from the reader on the host ({kind!r})")
    if size is None:
        writer.preallocate(dev_size)
        progress.total = size = dev_size
    elif dev_size != size:
        raise InvalidInput(f"{where}: the device changed size during the copy ({size} -> {dev_size} bytes)")
    pos = start
    sent = records = 0
    while True:
        kind, offset, length = frame()
        if kind == DATA:
            if offset < pos or offset + length > size or length > block_size:
                raise RemoteError(f"{where}: bad record (offset {offset}, length {length})")
            data = proc.read_exact(length)
            if len(data) < length:
                raise RemoteError(f"{where}: connection lost during the copy (record at offset {offset} cut)")
            writer.write(offset, data)
            stats.bytes_sent += length
            sent += length
            records += 1
            pos = offset + length
            progress(pos)
        elif kind == PROGRESS:
            pos = max(pos, offset)
            progress(pos)
        elif kind == END:
            totals = proc.read_exact(END_TOTALS.size)
            if length != END_TOTALS.size or len(totals) != END_TOTALS.size:
                raise RemoteError(f"{where}: truncated end record")
            stats.bytes_sent += END_TOTALS.size
            nread, nsent, nzero, nrecords = END_TOTALS.unpack(totals)
            if (nread, nsent, nrecords) != (offset - start, sent, records) or nsent + nzero != nread:
                raise RemoteError(
                    f"{where}: totals do not match: host read {nread} bytes and sent {nsent} in "
                    f"{nrecords} records, received {sent} in {records} records for {offset - start} bytes"
                )
            stats.bytes_zero_skipped += nzero
            return size, offset
        else:
            raise RemoteError(f"{where}: unknown record type {kind!r}")


# -- stream mode (no python on the host) ----------------------------------


def _copy_streamed(
    session: SshSession,
    device: str,
    writer: _SparseWriter,
    progress: _Progress,
    block_size: int,
    range_bytes: int,
) -> CopyStats:
    size = remote_device_size(session, device)
    writer.preallocate(size)
    progress.total = size
    stats = CopyStats(size, 0, 0, 0.0, "stream", ranges=0)
    blocks_per_range = max(1, range_bytes // block_size)
    zero = bytes(ZERO_BLOCK)
    pos = 0
    while pos < size:
        expected = min(blocks_per_range * block_size, size - pos)
        argv = ["dd", f"if={device}", f"bs={block_size}", f"skip={pos // block_size}"]
        argv.append(f"count={blocks_per_range}")
        got = 0
        with session.start(argv, read_timeout=READ_TIMEOUT, name=f"dd {device}") as proc:
            while got < expected:
                data = proc.read_exact(min(block_size, expected - got))
                if not data:
                    break
                stats.bytes_sent += len(data)
                view = memoryview(data)
                for i in range(0, len(data), ZERO_BLOCK):
                    chunk = data[i : i + ZERO_BLOCK]
                    if chunk == zero or (len(chunk) < ZERO_BLOCK and chunk.count(0) == len(chunk)):
                        stats.bytes_zero_skipped += len(chunk)
                    else:
                        writer.write(pos + got + i, view[i : i + len(chunk)])
                got += len(data)
                progress(pos + got)
            if got < expected:
                if not session.is_alive():
                    raise RemoteError(f"{session.label}:{device}: connection lost during the copy")
                raise RemoteError(
                    f"{session.label}:{device}: dd stopped at offset {pos + got} of {size}: {proc.stderr_tail()}"
                )
            if proc.read(1):
                raise InvalidInput(f"{session.label}:{device}: the device grew during the copy")
            rc = proc.wait()
            if rc != 0:
                raise RemoteError(f"{session.label}: dd {device} failed (exit {rc}): {proc.stderr_tail()}")
        pos += got
        stats.ranges += 1
    progress(size, force=True)
    return stats
