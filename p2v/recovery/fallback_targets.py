"""Production targets of a fallback: an image file (local, through qemu-nbd) or a block device
(or file) on an SSH host (through the helper in :mod:`p2v.recovery.write_helper`).

Both answer the same two questions: *where does the target differ from this hash map?*
(:meth:`scan`: block index -> the target's digest, for mismatching blocks only) and *write
these blocks, then tell me what is really there* (:meth:`writer`: the digests of every
touched block, read back after the data was made durable).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from p2v.disks.formats import detect_format
from p2v.disks.nbd import NbdDisk, NbdExport
from p2v.errors import OutputError, RemoteError, SourceNotFound, UsageError
from p2v.recovery.write_helper import (
    DIGESTS,
    END,
    END_TOTALS,
    EXIT_IO,
    EXIT_OPEN,
    FINISH,
    FRAME,
    HELLO,
    HELPER_SOURCE,
    MISMATCHES,
    PROGRESS,
    RECORD,
    WRITE,
    ZERO,
)
from p2v.replication.model import DIGEST_SIZE, ZERO_DIGEST, HashMap, digest
from p2v.sources.ssh_session import REKEY_AFTER_BYTES, SshSession

log = logging.getLogger(__name__)

SCAN_READ = 4 << 20
SCAN_CHUNK = 4 << 20
READ_TIMEOUT = 300.0  # seconds without a byte from the helper (a long fsync, a slow disk)
MAX_FRAME = 1 << 20  # largest write frame the DR side sends
MAP_PIECE = 1 << 16  # map bytes per send

ScanProgress = Callable[[int, int], None]


@dataclass
class ScanResult:
    """Blocks where the target differs from the map it was compared with."""

    mismatches: dict[int, bytes]  # block index -> the target's digest there
    bytes_read: int = 0  # read on the target side
    wire_up: int = 0  # map bytes sent to the target
    wire_down: int = 0  # reply bytes received


@dataclass
class WriteOutcome:
    """What a writer did: digests of every touched block, read back from the target."""

    digests: dict[int, bytes] = field(default_factory=dict)
    bytes_sent: int = 0  # frames + payload towards the target (for a file: data handed to the writer)
    bytes_written: int = 0  # data and zeros applied at the target
    runs: int = 0  # helper runs (SSH: one channel each)


class BlockWriter(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def finish(self) -> WriteOutcome: ...


class FallbackTarget(Protocol):
    url: str
    size: int  # bytes of the target device (at least the protected disk's size)

    def scan(self, expected: HashMap, progress: ScanProgress | None = None) -> ScanResult: ...

    def writer(self, disk_size: int, block_size: int) -> contextlib.AbstractContextManager[BlockWriter]: ...

    def close(self) -> None: ...


# -- image file ------------------------------------------------------------------------------


class ImageFileTarget:
    """A raw/qcow2/... image file as the production disk, written through ``qemu-nbd``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self.url = str(self.path)
        if not self.path.is_file():
            raise SourceNotFound(f"fallback target {self.url}: no such file")
        self.fmt = detect_format(self.path)
        self._export = NbdExport(self.path, self.fmt, read_only=False, what=f"fallback target {self.url}",
                                 error=OutputError)  # fmt: skip
        self._export.start()
        try:
            self._disk = self._export.connect()
        except BaseException:
            self._export.stop()
            raise
        self.size = self._disk.size

    def close(self) -> None:
        self._disk.close()
        self._export.stop()

    def scan(self, expected: HashMap, progress: ScanProgress | None = None) -> ScanResult:
        bs = expected.block_size
        out = ScanResult(mismatches={})
        for off, length, data in self._disk.scan(bs, 0, expected.size, chunk=SCAN_CHUNK):
            first = off // bs
            if data is None:
                lo, hi = first * DIGEST_SIZE, (first + (length + bs - 1) // bs) * DIGEST_SIZE
                if expected.data[lo:hi] != bytes(hi - lo):
                    for i in range(first, first + (length + bs - 1) // bs):
                        if expected[i] != ZERO_DIGEST:
                            out.mismatches[i] = ZERO_DIGEST
            else:
                out.bytes_read += length
                for k in range(0, length, bs):
                    d = digest(data[k : k + bs])
                    if d != expected[first + k // bs]:
                        out.mismatches[first + k // bs] = d
            if progress:
                progress(off + length, expected.size)
        return out

    @contextlib.contextmanager
    def writer(self, disk_size: int, block_size: int) -> Iterator[BlockWriter]:
        yield _ImageWriter(self._disk, disk_size, block_size)


class _ImageWriter:
    def __init__(self, disk: NbdDisk, disk_size: int, block_size: int) -> None:
        self.disk = disk
        self.size = disk_size
        self.bs = block_size
        self.outcome = WriteOutcome(runs=1)
        self.touched: set[int] = set()

    def _touch(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"write of {length} bytes at {offset} is outside the {self.size}-byte disk")
        self.touched.update(range(offset // self.bs, (offset + length - 1) // self.bs + 1))
        self.outcome.bytes_written += length

    def write(self, offset: int, data: bytes) -> None:
        self._touch(offset, len(data))
        self.outcome.bytes_sent += len(data)
        self.disk.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self._touch(offset, length)
        self.disk.zero(length, offset)

    def finish(self) -> WriteOutcome:
        self.disk.flush()
        for i in sorted(self.touched):
            off = i * self.bs
            self.outcome.digests[i] = digest(self.disk.pread(min(self.bs, self.size - off), off))
        return self.outcome


# -- SSH host --------------------------------------------------------------------------------


class HelperProcess(Protocol):
    """A running helper (a :class:`~p2v.sources.ssh_session.RemoteProcess`, or a local pipe)."""

    def read(self, size: int) -> bytes: ...

    def send(self, data: bytes) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def stderr_tail(self, limit: int = 2000) -> str: ...

    def close(self) -> None: ...


Launcher = Callable[[list[str], str], HelperProcess]
"""``launch(argv, name)`` starts ``argv`` on the target host."""


def ssh_launcher(session: SshSession) -> Launcher:
    def launch(argv: list[str], name: str) -> HelperProcess:
        return session.start(argv, read_timeout=READ_TIMEOUT, name=name)

    return launch


class _Reader:
    """Frames from a helper's stdout, with byte counting."""

    def __init__(self, proc: HelperProcess, where: str) -> None:
        self.proc = proc
        self.where = where
        self.buf = bytearray()
        self.nbytes = 0

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.proc.read(max(1 << 16, n - len(self.buf)))
            if not data:
                raise EOFError
            self.buf += data
            self.nbytes += len(data)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[bytes, int, int]:
        kind, a, n = FRAME.unpack(self.exact(FRAME.size))
        return kind, a, n

    def records(self, count: int, n: int) -> list[tuple[int, bytes]]:
        if n != count * RECORD.size:
            raise RemoteError(f"{self.where}: bad record frame from the fallback helper")
        raw = self.exact(n)
        return [RECORD.unpack_from(raw, k * RECORD.size) for k in range(count)]


class SshDeviceTarget:
    """A block device (or file) on an SSH host; python3 (>= 3.5) must be there.

    ``launch`` starts the helper (default: over ``session``). Writes go out in runs of at
    most ``range_bytes`` each on a fresh channel, so the session re-keys between them
    (see :mod:`p2v.sources.ssh_session`).
    """

    def __init__(self, url: str, device: str, launch: Launcher, *, python: str = "python3",
                 range_bytes: int = REKEY_AFTER_BYTES // 2) -> None:  # fmt: skip
        self.url = url
        self.device = device
        self.launch = launch
        self.python = python
        self.range_bytes = range_bytes
        self.size = -1  # known after the first helper run

    def close(self) -> None:
        pass

    def _argv(self, mode: str, *numbers: int) -> list[str]:
        return [self.python, "-c", HELPER_SOURCE, mode, self.device, *[str(n) for n in numbers]]

    def failed(self, proc: HelperProcess, what: str, rc: int | None = None) -> Exception:
        if rc is None:
            try:
                rc = proc.wait(10)
            except RemoteError:
                rc = -1
        tail = proc.stderr_tail() or "(no message)"
        tail = tail.replace("p2v-fallback: ", "")
        if rc == EXIT_OPEN:
            return SourceNotFound(f"fallback target {self.url}: {tail}")
        if rc == EXIT_IO:
            return OutputError(f"fallback target {self.url}: {tail}")
        if rc == 127 or any(w in tail for w in ("SyntaxError", "ImportError", "not found")):
            return RemoteError(f"fallback target {self.url}: python3 >= 3.5 is needed on the host ({tail[-300:]})")
        return RemoteError(f"fallback target {self.url}: the helper failed while {what} (exit {rc}): {tail}")

    def _hello(self, reader: _Reader, disk_size: int, block_size: int) -> None:
        kind, size, bs = reader.frame()
        if kind != HELLO or bs != block_size:
            raise RemoteError(f"{self.url}: unexpected first reply from the fallback helper ({kind!r})")
        self.size = size
        if size < disk_size:
            raise UsageError(
                f"fallback target {self.url} has {size} bytes, smaller than the protected disk ({disk_size} bytes)",
                hint="give a production disk at least as large as the protected one",
            )

    def scan(self, expected: HashMap, progress: ScanProgress | None = None) -> ScanResult:
        bs = expected.block_size
        out = ScanResult(mismatches={})
        proc = self.launch(self._argv("scan", bs, 0, expected.size, SCAN_READ), f"scanning {self.device}")
        reader = _Reader(proc, self.url)
        send_error: list[BaseException] = []

        def send_map() -> None:
            try:
                data = bytes(expected.data)
                for k in range(0, len(data), MAP_PIECE):
                    piece = data[k : k + MAP_PIECE]
                    proc.send(piece)
                    out.wire_up += len(piece)
            except BaseException as exc:  # reported by the reading side
                send_error.append(exc)

        sender = threading.Thread(target=send_map, name="p2v-fallback-map", daemon=True)
        try:
            try:
                self._hello(reader, expected.size, bs)
                sender.start()
                while True:
                    kind, a, n = reader.frame()
                    if kind == MISMATCHES:
                        for index, d in reader.records(a, n):
                            if not 0 <= index < expected.count:
                                raise RemoteError(f"{self.url}: the fallback helper reported block {index}")
                            out.mismatches[index] = d
                    elif kind == PROGRESS:
                        if progress:
                            progress(a, expected.size)
                    elif kind == END and n == END_TOTALS.size:
                        compared, _ = END_TOTALS.unpack(reader.exact(n))
                        out.bytes_read = a
                        if compared != expected.count:
                            raise RemoteError(f"{self.url}: the helper compared {compared} of {expected.count} blocks")
                        break
                    else:
                        raise RemoteError(f"{self.url}: unexpected frame {kind!r} from the fallback helper")
            except EOFError:
                raise self.failed(proc, f"scanning {self.device}") from None
            rc = proc.wait()
            if rc != 0:
                raise self.failed(proc, f"scanning {self.device}", rc)
        finally:
            proc.close()
            if sender.is_alive():
                sender.join(timeout=10)
        out.wire_down = reader.nbytes
        if progress:
            progress(expected.size, expected.size)
        return out

    @contextlib.contextmanager
    def writer(self, disk_size: int, block_size: int) -> Iterator[BlockWriter]:
        w = _SshWriter(self, disk_size, block_size)
        try:
            yield w
        finally:
            w.abort()


class _SshWriter:
    """Write runs through the helper; each run is one channel, verified on its own."""

    def __init__(self, target: SshDeviceTarget, disk_size: int, block_size: int) -> None:
        self.t = target
        self.size = disk_size
        self.bs = block_size
        self.outcome = WriteOutcome()
        self.proc: HelperProcess | None = None
        self.reader: _Reader | None = None
        self.run_bytes = 0
        self.out = bytearray()

    def _start(self) -> None:
        argv = self.t._argv("write", self.bs, self.size)
        self.proc = self.t.launch(argv, f"writing {self.t.device}")
        self.reader = _Reader(self.proc, self.t.url)
        self.run_bytes = 0
        try:
            self.t._hello(self.reader, self.size, self.bs)
        except EOFError:
            raise self.t.failed(self.proc, f"opening {self.t.device}") from None

    def _send(self, frame: bytes, data: bytes = b"") -> None:
        if self.proc is None:
            self._start()
        self.out += frame
        self.out += data
        self.outcome.bytes_sent += len(frame) + len(data)
        self.run_bytes += len(frame) + len(data)
        if len(self.out) >= 1 << 20:
            self._flush()
        if self.run_bytes >= self.t.range_bytes:
            self._end_run()

    def _flush(self) -> None:
        if self.out and self.proc is not None:
            try:
                self.proc.send(bytes(self.out))
            except RemoteError as exc:
                raise self.t.failed(self.proc, f"writing {self.t.device}") from exc
            self.out.clear()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"write of {length} bytes at {offset} is outside the {self.size}-byte disk")

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        for k in range(0, len(data), MAX_FRAME):
            piece = data[k : k + MAX_FRAME]
            self._send(FRAME.pack(WRITE, offset + k, len(piece)), piece)
        self.outcome.bytes_written += len(data)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._send(FRAME.pack(ZERO, offset, length))
        self.outcome.bytes_written += length

    def _end_run(self) -> None:
        proc, reader = self.proc, self.reader
        if proc is None or reader is None:
            return
        self.out += FRAME.pack(FINISH, 0, 0)
        self.outcome.bytes_sent += FRAME.size
        self._flush()
        try:
            try:
                while True:
                    kind, a, n = reader.frame()
                    if kind == DIGESTS:
                        for index, d in reader.records(a, n):
                            self.outcome.digests[index] = d
                    elif kind == END and n == END_TOTALS.size:
                        reader.exact(n)
                        break
                    else:
                        raise RemoteError(f"{self.t.url}: unexpected frame {kind!r} from the fallback helper")
            except EOFError:
                raise self.t.failed(proc, f"writing {self.t.device}") from None
            rc = proc.wait()
            if rc != 0:
                raise self.t.failed(proc, f"writing {self.t.device}", rc)
        finally:
            proc.close()
            self.proc = self.reader = None
        self.outcome.runs += 1

    def finish(self) -> WriteOutcome:
        t0 = time.monotonic()
        self._end_run()
        log.debug("%s: last write run finished in %.1f s", self.t.url, time.monotonic() - t0)
        return self.outcome

    def abort(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None
