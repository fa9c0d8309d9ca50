"""Hash-mode sync over SSH to a real loopback sshd, into qcow2 layers (no mocks).

The "device" on the source is a file path; the helper reads it like a block device.
"""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import p2v.sources.ssh_session as ssh_session
from p2v.disks.nbd import open_layer
from p2v.errors import RemoteError, SourceChanged, SourceNotFound
from p2v.replication.delta_ssh import SshDiskSource
from p2v.replication.model import HashMap, SyncResult
from p2v.replication.verify import verify_point
from p2v.sources.ssh_session import SshSession
from tests.integration.test_delta_file import BS, MiB, images_equal, make_disk, new_layer, scribble
from tests.sshd import LoopbackSshd, sshd_fixture  # noqa: F401

SIZE = 64 * MiB


def sync_into(layer: Path, source: SshDiskSource, old: HashMap, state: dict[str, object]) -> SyncResult:
    with open_layer(layer) as target:
        return source.sync(target, old, state)


@pytest.fixture(name="session")
def session_fixture(sshd: LoopbackSshd) -> Iterator[SshSession]:
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        yield s


def test_seed_and_delta_over_ssh(tmp_path: Path, session: SshSession) -> None:
    src = tmp_path / "sda"
    make_disk(src, SIZE)
    base = new_layer(tmp_path / "base.qcow2", SIZE)
    source = SshDiskSource(session, str(src), SIZE)
    assert source.url.startswith("ssh://") and source.url.endswith(str(src))
    first = sync_into(base, source, HashMap.zeros(SIZE, BS), {})
    assert first.counters.mode == "seed"
    assert images_equal(src, "raw", base)
    data_bytes = first.counters.bytes_written
    assert first.counters.bytes_sent < data_bytes * 1.01 + 100_000  # zeros never crossed the wire

    changed = scribble(src, 200, seed=11)
    top = new_layer(tmp_path / "rp-2.qcow2", backing=base)
    second = sync_into(top, source, first.hashmap, first.state)
    c = second.counters
    assert c.mode == "hash"
    assert images_equal(src, "raw", top)
    assert c.bytes_read == SIZE
    assert c.bytes_written <= len(changed) * 4096
    # the wire carries about the changed pieces plus ~300 bytes of digests per changed block
    assert c.bytes_sent <= len(changed) * (4096 + 320) + 64 * 1024
    assert c.extra["bytes_upstream"] < 64 * 1024 + len(changed) * 20
    assert verify_point(top, second.hashmap).ok
    assert verify_point(base, first.hashmap).ok


def test_compressed_bounded_ranges_with_rekeys(
    tmp_path: Path, session: SshSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many short channels, re-keying between them (the paramiko #822 guard), compression on."""
    monkeypatch.setattr(ssh_session, "REKEY_AFTER_BYTES", 2 * MiB)
    src = tmp_path / "sda"
    rng = random.Random(12)
    with src.open("wb") as f:  # half random, half text: compresses to about half
        for i in range(SIZE // 4096):
            f.write(rng.randbytes(2048) + (f"block {i:08d} " * 200).encode()[:2048])
    base = new_layer(tmp_path / "base.qcow2", SIZE)
    source = SshDiskSource(session, str(src), SIZE, compress=True, range_bytes=4 * MiB, read_size=MiB)
    result = sync_into(base, source, HashMap.zeros(SIZE, BS), {})
    c = result.counters
    assert images_equal(src, "raw", base)
    assert c.bytes_sent < SIZE * 0.6  # zlib at work
    assert c.extra["ranges"] >= 2
    assert c.extra["rekeys"] >= 1
    assert verify_point(base, result.hashmap).ok


def test_stream_fallback_gives_the_same_point(tmp_path: Path, session: SshSession) -> None:
    src = tmp_path / "sda"
    make_disk(src, 32 * MiB, seed=5)
    base = new_layer(tmp_path / "base.qcow2", 32 * MiB)
    first = sync_into(base, SshDiskSource(session, str(src), 32 * MiB), HashMap.zeros(32 * MiB, BS), {})
    scribble(src, 100, seed=6)
    top = new_layer(tmp_path / "rp-2.qcow2", backing=base)
    streamed = SshDiskSource(session, str(src), 32 * MiB, use_python=False, range_bytes=8 * MiB)
    second = sync_into(top, streamed, first.hashmap, first.state)
    c = second.counters
    assert c.mode == "stream"
    assert c.bytes_sent == 32 * MiB  # every byte crossed
    assert c.extra["ranges"] == 4
    assert c.bytes_written <= 100 * 4096  # but only the differences were written
    assert images_equal(src, "raw", top)
    assert verify_point(top, second.hashmap).ok


def test_size_change_refused(tmp_path: Path, session: SshSession) -> None:
    src = tmp_path / "sda"
    make_disk(src, 8 * MiB)
    layer = new_layer(tmp_path / "base.qcow2", 16 * MiB)
    for use_python in (True, False):
        source = SshDiskSource(session, str(src), 16 * MiB, use_python=use_python)
        with open_layer(layer) as target, pytest.raises(SourceChanged) as err:
            # the site recorded 16 MiB; the device is now 8 MiB
            source.sync(target, HashMap.zeros(16 * MiB, BS), {"kind": "ssh"})
        assert f"{source.url} is now {8 * MiB} bytes, the site recorded {16 * MiB}; re-add the machine" in str(
            err.value
        )


def test_missing_device_is_source_not_found(tmp_path: Path, session: SshSession) -> None:
    layer = new_layer(tmp_path / "base.qcow2", MiB)
    for use_python in (True, False):
        source = SshDiskSource(session, str(tmp_path / "nope"), MiB, use_python=use_python)
        with open_layer(layer) as target, pytest.raises(SourceNotFound, match=r"nope"):
            source.sync(target, HashMap.zeros(MiB, BS), {})


def test_connection_drop_mid_sync(tmp_path: Path, sshd: LoopbackSshd) -> None:
    src = tmp_path / "sda"
    make_disk(src, SIZE, seed=8)
    base = new_layer(tmp_path / "base.qcow2", SIZE)
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        # 4 MB/s: the seed takes ~10 s, the server goes away after 1.5 s
        source = SshDiskSource(s, str(src), SIZE, bwlimit=4_000_000)
        timer = threading.Timer(1.5, sshd.stop)
        timer.start()
        try:
            with open_layer(base) as target, pytest.raises(RemoteError) as err:
                source.sync(target, HashMap.zeros(SIZE, BS), {})
        finally:
            timer.cancel()
    message = str(err.value)
    assert source.url in message and "no changes recorded" in message
    # the session recovers for the next sync once the host is back
    sshd.start()
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        fresh = new_layer(tmp_path / "again.qcow2", SIZE)
        result = sync_into(fresh, SshDiskSource(s, str(src), SIZE), HashMap.zeros(SIZE, BS), {})
    assert images_equal(src, "raw", fresh)
    assert verify_point(fresh, result.hashmap).ok


def test_no_python_on_source_falls_back_to_stream(tmp_path: Path, sshd: LoopbackSshd) -> None:
    """A host whose PATH has no python3: use_python=None picks stream mode by itself."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("sh", "dd", "stat", "blockdev", "cat"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    sshd.stop()
    sshd.extra_config = f"SetEnv PATH={bindir}"
    sshd.start()
    src = tmp_path / "sda"
    make_disk(src, 8 * MiB)
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        assert s.python3_version() is None
        layer = new_layer(tmp_path / "base.qcow2", 8 * MiB)
        result = sync_into(layer, SshDiskSource(s, str(src), 8 * MiB), HashMap.zeros(8 * MiB, BS), {})
    assert result.counters.mode == "stream"
    assert images_equal(src, "raw", layer)


def test_odd_sized_source_file(tmp_path: Path, session: SshSession) -> None:
    """A source whose size is not a whole number of sectors: the layer is rounded up, the map not."""
    size = 3 * MiB + 4096 * 3 + 100
    src = tmp_path / "odd"
    src.write_bytes(random.Random(21).randbytes(size))
    base = new_layer(tmp_path / "base.qcow2", size)  # qemu rounds it up to 512 bytes
    result = sync_into(base, SshDiskSource(session, str(src), size), HashMap.zeros(size, BS), {})
    assert result.hashmap.size == size
    assert verify_point(base, result.hashmap).ok
    with open_layer(base) as layer:
        assert layer.size == size + 412
        assert layer.pread(size, 0) == src.read_bytes()
