"""The fallback helper (the real script streamed to production hosts) and its DR side, over
local pipes with the system python3 on a file standing in for the device (no SSH, no QEMU)."""

from __future__ import annotations

import ast
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from p2v.errors import SourceNotFound, UsageError
from p2v.recovery.fallback_changes import DrChanges, block_runs, unknown_blocks
from p2v.recovery.fallback_targets import HelperProcess, SshDeviceTarget
from p2v.recovery.write_helper import FINISH, FRAME, HELPER_SOURCE, WRITE
from p2v.replication.model import UNKNOWN_DIGEST, ZERO_DIGEST, HashMap, digest

PYTHON3 = shutil.which("python3", path="/usr/bin:/bin") or "python3"
BS = 64 * 1024


class LocalHelper:
    """:class:`HelperProcess` over a local subprocess's pipes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = b""
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    def read(self, size: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), size)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout if timeout is not None else 30)

    def stderr_tail(self, limit: int = 2000) -> str:
        self._t.join(5)
        return self.err.decode(errors="replace").strip()[-limit:]

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._t.join(5)


def launch(argv: list[str], name: str) -> HelperProcess:
    return LocalHelper([PYTHON3 if argv[0] == "python3" else argv[0], *argv[1:]])


def make_target(path: Path, range_bytes: int = 1 << 28) -> SshDeviceTarget:
    return SshDeviceTarget(f"ssh://test{path}", str(path), launch, range_bytes=range_bytes)


def file_map(path: Path, size: int) -> HashMap:
    data = path.read_bytes()[:size]
    m = HashMap(size, BS)
    for i in range(m.count):
        m[i] = digest(data[i * BS : (i + 1) * BS])
    return m


def test_helper_source_is_python_3_5() -> None:
    ast.parse(HELPER_SOURCE, feature_version=(3, 5))


def test_scan_reports_only_the_blocks_that_differ(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 12288  # a short last block
    dev = tmp_path / "dev"
    rnd = random.Random(1)
    dev.write_bytes(rnd.randbytes(size // 2) + bytes(size - size // 2))
    expected = file_map(dev, size)
    with open(dev, "r+b") as f:
        for off in (0, 5 * BS + 100, size - 10):  # first, middle, the short last block
            f.seek(off)
            f.write(b"\x01\x02\x03")
        f.seek(2 * BS)
        f.write(bytes(BS))  # a block that became zero
    res = make_target(dev).scan(expected)
    assert sorted(res.mismatches) == [0, 2, 5, expected.count - 1]
    assert res.mismatches[2] == ZERO_DIGEST
    assert res.mismatches[5] == file_map(dev, size)[5]
    assert res.wire_up == len(expected.data)
    assert res.wire_down < 300  # hello, 4 records, end
    assert res.bytes_read == size


def test_writes_are_applied_in_runs_and_read_back(tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    dev = tmp_path / "dev"
    dev.write_bytes(random.Random(2).randbytes(size))
    target = make_target(dev, range_bytes=300 * 1024)  # several helper runs (one channel each over SSH)
    new = random.Random(3).randbytes(8 * BS)
    with target.writer(size, BS) as w:
        for k in range(8):
            w.write(k * 3 * BS, new[k * BS : (k + 1) * BS])
        w.zero(40 * BS, 2 * BS)
        out = w.finish()
    assert out.runs >= 2
    data = dev.read_bytes()
    for k in range(8):
        assert data[k * 3 * BS : k * 3 * BS + BS] == new[k * BS : (k + 1) * BS]
        assert out.digests[k * 3] == digest(new[k * BS : (k + 1) * BS])
    assert data[40 * BS : 42 * BS] == bytes(2 * BS)
    assert out.digests[40] == out.digests[41] == ZERO_DIGEST
    assert out.bytes_written == 10 * BS
    assert 8 * BS < out.bytes_sent < 8 * BS + 1024  # zeroing carries no payload


def test_missing_device_and_small_device(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="missing"):
        make_target(tmp_path / "missing").scan(HashMap.zeros(BS * 4, BS))
    small = tmp_path / "small"
    small.write_bytes(bytes(BS))
    with pytest.raises(UsageError, match="smaller than the protected disk"):
        make_target(small).scan(HashMap.zeros(BS * 4, BS))


def test_helper_refuses_writes_past_the_disk(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.write_bytes(bytes(4 * BS))
    proc = subprocess.run(
        [PYTHON3, "-c", HELPER_SOURCE, "write", str(dev), str(BS), str(2 * BS)],
        input=FRAME.pack(WRITE, 2 * BS, 16) + bytes(16) + FRAME.pack(FINISH, 0, 0),
        capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 4
    assert b"bad frame" in proc.stderr
    assert dev.read_bytes() == bytes(4 * BS)


def test_block_runs_and_unknown_blocks() -> None:
    assert list(block_runs([1, 2, 3, 7, 8, 100], BS, 1 << 30)) == [(1, 3), (7, 2), (100, 1)]
    assert list(block_runs(range(130), BS, 1 << 30)) == [(0, 64), (64, 64), (128, 2)]  # 4 MiB per run
    m = HashMap(20 * BS, BS)
    m[3] = UNKNOWN_DIGEST
    m[19] = UNKNOWN_DIGEST
    m[7] = b"\x00" * 15 + b"\xff"  # not aligned with a marker: must not be taken for one
    m[8] = b"\xff" * 15 + b"\x01"
    assert unknown_blocks(m) == [3, 19]


def test_allocated_pieces_of_a_block() -> None:
    c = DrChanges(BS, extents=[(4096, 12288), (BS - 4096, BS + 8192), (5 * BS, 7 * BS)], blocks=[0, 1, 5, 6])
    assert c.allocated_bytes == 8192 + 12288 + 2 * BS
    assert c.pieces(0, BS) == [(4096, 8192), (BS - 4096, 4096)]
    assert c.pieces(1, BS) == [(0, 8192)]
    assert c.pieces(6, BS) == [(0, BS)]
    assert c.pieces(3, BS) == []
