"""The hash-mode helper and its DR side, talking over a local pipe (no SSH, no QEMU).

The helper is the real script p2v streams to source hosts, run here with the system
python3 on a file standing in for the device; the DR side writes into memory.
"""

from __future__ import annotations

import ast
import os
import random
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from p2v.errors import RemoteError, SourceChanged
from p2v.replication.delta import Progress
from p2v.replication.delta_helper import (
    CHANGED,
    EXIT_OPEN,
    EXIT_PEER_GONE,
    FRAME,
    HELLO,
    HELPER_SOURCE,
    MAP_CHUNK,
    MAP_REQUEST,
    NEED,
    TOTALS,
)
from p2v.replication.delta_ssh import DeltaReceiver
from p2v.replication.model import HashMap, SyncCounters, digest

PYTHON3 = shutil.which("python3", path="/usr/bin:/bin") or "python3"
BS = 64 * 1024


class PipeLink:
    """FrameLink over a local helper process's pipes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.sent: list[bytes] = []

    def read(self, size: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), size)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.sent.append(data)
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def ready(self) -> bool:
        return bool(select.select([self.proc.stdout], [], [], 0)[0])


class MemoryLayer:
    """A LayerTarget in memory, holding the previous point's bytes."""

    def __init__(self, content: bytes | bytearray) -> None:
        self.buf = bytearray(content)
        self.size = len(content)
        self.writes = 0

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, data: bytes, offset: int) -> None:
        self.writes += 1
        self.buf[offset : offset + len(data)] = data

    def zero(self, length: int, offset: int) -> None:
        self.buf[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        pass


def start_helper(path: Path, start: int = 0, *, window: int = 16 << 20, budget: int = 1 << 40,
                 flags: int = 0, read: int = 1 << 20, mapchunk: int = 4096) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [PYTHON3, "-c", HELPER_SOURCE, str(path), str(start), "0", str(BS), str(read), str(window)]
    argv += [str(budget), str(flags), str(mapchunk), "2"]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def sync_file(path: Path, layer: MemoryLayer, old: HashMap, **kw: int) -> tuple[HashMap, SyncCounters, int]:
    counters = SyncCounters("hash", old.size)
    receiver = DeltaReceiver(layer, old, counters, where=str(path), progress=Progress(None, old.size))
    pos = runs = 0
    try:
        while pos < old.size or runs == 0:
            proc = start_helper(path, pos, **kw)
            try:
                pos = receiver.run(PipeLink(proc), pos, None)
                assert proc.wait(30) == 0
            finally:
                proc.kill()
                proc.wait()
            runs += 1
    finally:
        receiver.close()
    receiver.delta.finish()
    return receiver.new, counters, runs


def payload_size(kind: bytes, n: int) -> int:
    """Bytes after a helper frame's header (H, M, Z, 0 and P carry none)."""
    return n if kind in (b"C", b"S", b"D", b"X", b"E") else 0


def map_of(data: bytes | bytearray) -> HashMap:
    m = HashMap.zeros(len(data), BS)
    for i in range(m.count):
        m[i] = digest(bytes(data[i * BS : (i + 1) * BS]))
    return m


def disk_image(size: int, seed: int) -> bytearray:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 2 - size // 4)  # a zero region
    return data


def test_helper_parses_as_python_3_5() -> None:
    ast.parse(HELPER_SOURCE, feature_version=(3, 5))


def test_frame_round_trip() -> None:
    for kind in (HELLO, MAP_REQUEST, CHANGED, MAP_CHUNK, NEED):
        packed = FRAME.pack(kind, 2**63 + 5, 2**32 - 1)
        assert len(packed) == 13
        assert FRAME.unpack(packed) == (kind, 2**63 + 5, 2**32 - 1)
    values = tuple(range(1, TOTALS.size // 8 + 1))
    assert TOTALS.unpack(TOTALS.pack(*values)) == values


def test_seed_then_delta_moves_only_changed_pieces(tmp_path: Path) -> None:
    size = 8 << 20
    data = disk_image(size, 1)
    path = tmp_path / "disk"
    path.write_bytes(data)
    layer = MemoryLayer(bytes(size))
    seed_map, seed, _ = sync_file(path, layer, HashMap.zeros(size, BS))
    assert layer.buf == data
    assert seed_map == map_of(data)
    assert seed.bytes_written == size - (size // 2 - size // 4)  # zero region not written

    rng = random.Random(2)
    changed = {rng.randrange(size // 4096) for _ in range(40)}
    for piece in changed:
        data[piece * 4096 : piece * 4096 + 4096] = rng.randbytes(4096)
    data[size - BS : size] = bytes(BS)  # a block that became zero
    path.write_bytes(data)
    new_map, c, _ = sync_file(path, layer, seed_map)
    assert layer.buf == data
    assert new_map == map_of(data)
    # only the changed 4 KiB pieces cross: not whole 64 KiB blocks
    assert c.extra["data_bytes"] <= len(changed) * 4096
    assert c.bytes_sent < len(changed) * (4096 + 400) + 50_000
    assert c.blocks_changed == len({p // 16 for p in changed} | {size // BS - 1})


def test_compression_ranges_and_ragged_end(tmp_path: Path) -> None:
    size = 3 * BS + 4096 + 100  # last block short, last piece short
    data = bytearray(b"p2v-compressible-" * (size // 17 + 1))[:size]
    path = tmp_path / "disk"
    path.write_bytes(data)
    layer = MemoryLayer(bytes(size))
    m, c, runs = sync_file(path, layer, HashMap.zeros(size, BS), flags=1, budget=1, read=BS)
    assert layer.buf == data
    assert m == map_of(data)
    assert runs == 4  # the budget ends each run after one read
    assert c.bytes_sent < size // 4  # zlib on the data

    data[-50:] = b"x" * 50
    data[BS + 10] ^= 0xFF
    path.write_bytes(data)
    m2, c2, _ = sync_file(path, layer, m, flags=1)
    assert layer.buf == data
    assert m2 == map_of(data)
    assert c2.blocks_changed == 2


def test_stale_map_entry_is_repaired_from_layer_content(tmp_path: Path) -> None:
    """A block the map calls unknown is compared with the layer: identical pieces are not sent."""
    size = 4 * BS
    data = disk_image(size, 3)
    path = tmp_path / "disk"
    path.write_bytes(data)
    layer = MemoryLayer(data)
    old = map_of(data)
    old[1] = b"\xff" * 16  # unknown
    m, c, _ = sync_file(path, layer, old)
    assert m == map_of(data)
    assert c.blocks_changed == 1
    assert c.bytes_written == 0


def test_window_bounds_blocks_held_by_the_helper(tmp_path: Path) -> None:
    """With no answers, the helper holds at most WINDOW bytes of changed blocks and stops reading."""
    size = 64 * BS
    path = tmp_path / "disk"
    path.write_bytes(random.Random(4).randbytes(size))
    old = HashMap(size, BS, bytearray(b"\x11" * 16 * 64))  # every block "changed", none zero
    window = 4 * BS
    proc = start_helper(path, window=window, read=BS)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        buf = b""
        changed = 0
        deadline = time.monotonic() + 2
        answered_map = False
        while time.monotonic() < deadline:
            r = select.select([proc.stdout], [], [], 0.2)[0]
            if r:
                buf += os.read(proc.stdout.fileno(), 1 << 20)
            while len(buf) >= FRAME.size:
                kind, a, n = FRAME.unpack_from(buf)
                if len(buf) < FRAME.size + payload_size(kind, n):
                    break
                buf = buf[FRAME.size + payload_size(kind, n) :]
                if kind == MAP_REQUEST:
                    chunk = bytes(old.data[a * 16 : (a + n) * 16])
                    proc.stdin.write(FRAME.pack(MAP_CHUNK, a, len(chunk)) + chunk)
                    proc.stdin.flush()
                    answered_map = True
                elif kind == CHANGED:
                    changed += 1
        assert answered_map
        # window/BS blocks fit; the block that overflows it is the last one read
        assert changed == window // BS + 1
        assert proc.poll() is None  # still waiting for answers, not finished
        # answer one block: exactly one more CHANGED arrives
        proc.stdin.write(FRAME.pack(NEED, 0, 0))
        proc.stdin.flush()
        more = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not more:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                more += os.read(proc.stdout.fileno(), 1 << 20)
        time.sleep(0.3)
        if select.select([proc.stdout], [], [], 0)[0]:
            more += os.read(proc.stdout.fileno(), 1 << 20)
        frames = []
        while len(more) >= FRAME.size:
            kind, a, n = FRAME.unpack_from(more)
            frames.append(kind)
            more = more[FRAME.size + payload_size(kind, n) :]
        assert frames.count(CHANGED) == 1
    finally:
        proc.kill()
        proc.wait()


def test_helper_exit_codes(tmp_path: Path) -> None:
    proc = start_helper(tmp_path / "missing")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OPEN
    assert b"missing" in err and b"No such file" in err

    path = tmp_path / "disk"
    path.write_bytes(random.Random(5).randbytes(4 * BS))
    proc = start_helper(path)
    out, _ = proc.communicate(b"", timeout=30)  # the DR side goes away at once
    assert proc.returncode == EXIT_PEER_GONE
    assert out.startswith(FRAME.pack(HELLO, 4 * BS, BS))


def test_size_change_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(2 * BS))
    layer = MemoryLayer(bytes(3 * BS))
    with pytest.raises(SourceChanged, match=r"is now 131072 bytes, the site recorded 196608; re-add"):
        sync_file(path, layer, HashMap.zeros(3 * BS, BS))


def test_protocol_violation_is_an_error(tmp_path: Path) -> None:
    """Data for a piece nobody asked for is refused, not written."""
    old = HashMap(2 * BS, BS, bytearray(b"\x22" * 32))
    layer = MemoryLayer(bytes(2 * BS))
    counters = SyncCounters("hash", 2 * BS)
    receiver = DeltaReceiver(layer, old, counters, where="evil", progress=Progress(None, 2 * BS))

    class Scripted:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read(self, size: int) -> bytes:
            out, self.data = self.data[:size], self.data[size:]
            return out

        def send(self, data: bytes) -> None:
            pass

        def ready(self) -> bool:
            return bool(self.data)

    script = FRAME.pack(HELLO, 2 * BS, BS) + FRAME.pack(b"D", 4096, 4096) + b"evil" * 1024
    with pytest.raises(RemoteError, match="unrequested data at offset 4096"):
        receiver.run(Scripted(script), 0, None)
    receiver.close()
    assert layer.writes == 0 and layer.buf == bytes(2 * BS)


def test_frames_are_big_endian_fixed_size() -> None:
    assert FRAME.size == struct.calcsize(">cQI") == 13


# What Debian's python3-minimal (3.11) can import: the interpreter's built-in modules plus the
# pure-Python modules and extensions shipped in python3.11-minimal / libpython3.11-minimal.
# A server with only python3-minimal (our test guest, many minimal installs) must run the helper.
PYTHON3_MINIMAL = {
    "errno", "select", "sys", "time", "zlib", "posix", "array", "binascii", "fcntl", "math", "itertools",
    "_thread", "marshal", "atexit", "gc", "pwd", "grp",
    "abc", "argparse", "ast", "bisect", "codecs", "collections", "contextlib", "copy", "enum", "functools",
    "hashlib", "heapq", "io", "keyword", "operator", "os", "posixpath", "random", "re", "signal", "socket",
    "stat", "string", "struct", "subprocess", "tempfile", "threading", "traceback", "types", "typing",
    "warnings", "weakref",
}


def test_helper_imports_only_what_python3_minimal_ships() -> None:
    import ast

    from p2v.replication import delta_helper
    from p2v.sources import ssh_helper

    for source in (delta_helper.HELPER_SOURCE, ssh_helper.HELPER_SOURCE):
        required: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Try):
                continue
            if isinstance(node, ast.Import):
                required |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                required.add(node.module.split(".")[0])
        optional = {
            a.name
            for t in ast.walk(ast.parse(source))
            if isinstance(t, ast.Try)
            for n in t.body
            if isinstance(n, ast.Import)
            for a in n.names
        }
        assert required - optional <= PYTHON3_MINIMAL, required - optional - PYTHON3_MINIMAL
