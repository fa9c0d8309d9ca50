"""Crash safety of the DR site with real qemu-img: a sync killed before or inside commit, a
full site filesystem, the machine lock, and removing a machine (also when interrupted)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2v.errors import Busy, OutputError, SiteError, UnknownMachine
from p2v.replication.model import SyncCounters, SyncResult
from p2v.site import DiskSpec, ProtectionPolicy, Site
from tests.integration.test_site_chain import KB, MB, ROOT, Chain, four_points, map_of, qemu_io, run_retention_child

KILLED_SYNC = textwrap.dedent("""
    import os, signal, subprocess, sys
    sys.path.insert(0, {root!r})
    from p2v.replication.model import HashMap, SyncCounters, SyncResult
    from p2v.site import Site, catalog
    site = Site.open({site!r})
    lock = site.lock("web1")
    lock.__enter__()
    tx = site.begin_point("web1")
    for d in tx.disks:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 256k", str(d.partial_path)], check=True)
    if {where!r} == "before-commit":
        os.kill(os.getpid(), signal.SIGKILL)
    # inside commit: after the layers and maps are renamed, before the catalog transaction
    catalog.Catalog.insert_point = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    tx.commit([SyncResult(d.old_map, SyncCounters(mode="hash")) for d in tx.disks], "fuzzy")
""")


@pytest.mark.parametrize("where", ["before-commit", "inside-commit"])
def test_a_sync_killed_before_its_point_is_recorded_leaves_earlier_points_and_is_cleaned_up(
    tmp_path: Path, where: str
) -> None:
    chain = four_points(tmp_path / "site", ProtectionPolicy())
    child = subprocess.run(
        [sys.executable, "-c", KILLED_SYNC.format(root=str(ROOT), site=str(tmp_path / "site"), where=where)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = {"before-commit": ["rp-000005.qcow2.partial"], "inside-commit": ["rp-000005.map", "rp-000005.qcow2"]}
    assert set(leftovers[where]) <= set(chain.files(0))
    assert chain.check_points(tmp_path) == [1, 2, 3, 4]
    with Site.open(tmp_path / "site") as site:
        st = site.status()[0]
        assert st.last_result == "failed" and st.last_error and "interrupted" in st.last_error
        with site.lock("web1"):  # the dead process's lock is gone
            tx = site.begin_point("web1")
            assert tx.seq == 5
            assert sorted(p.name for p in tx.cleaned) == sorted(leftovers[where] * 2)
            tx.abort("test")
    assert "rp-000005.qcow2" not in chain.files(0) and "rp-000005.qcow2.partial" not in chain.files(1)
    chain.sync([[(0x55, 0, 4 * KB)], [(0x56, 8 * KB, 4 * KB)]])
    assert chain.check_points(tmp_path) == [1, 2, 3, 4, 5]


def test_an_exception_inside_the_point_block_aborts_and_records_the_error(tmp_path: Path) -> None:
    chain = four_points(tmp_path / "site", ProtectionPolicy())
    with Site.open(tmp_path / "site") as site, site.lock("web1"):
        with pytest.raises(RuntimeError), site.begin_point("web1") as tx:
            qemu_io(tx.disks[0].partial_path, [(0x66, 0, 64 * KB)])
            raise RuntimeError("source went away")
        rec = site.machine("web1")
    assert (rec.last_result, rec.last_error) == ("failed", "source went away")
    assert not any(n.endswith(".partial") for n in chain.files(0) + chain.files(1))
    assert chain.check_points(tmp_path) == [1, 2, 3, 4]


def test_begin_point_needs_the_lock_and_a_second_lock_is_busy(tmp_path: Path) -> None:
    Chain(tmp_path / "site", "m1", [1 * MB], ProtectionPolicy())
    with Site.open(tmp_path / "site") as site:
        with pytest.raises(SiteError) as err:
            site.begin_point("m1")
        assert "lock" in err.value.message
        with site.lock("m1"):
            with pytest.raises(Busy) as busy, site.lock("m1"):
                pass
            assert busy.value.message == f"machine m1 is busy: pid {os.getpid()} is running p2v sync"
            assert (tmp_path / "site/machines/m1/lock").read_text().split() == [str(os.getpid()), "sync"]
        with site.lock("m1", purpose="retention"):  # released, can be taken again
            pass
        with pytest.raises(UnknownMachine):
            site.lock("nope").__enter__()


def test_seed_then_sync_reads_back_and_records_counters_and_state(tmp_path: Path) -> None:
    chain = Chain(tmp_path / "site", "m1", [8 * MB], ProtectionPolicy(block_size=16 * KB))
    with Site.open(tmp_path / "site") as site, site.lock("m1"), site.begin_point("m1") as tx:
        d = tx.disks[0]
        assert tx.seed and d.backing is None and d.old_map == map_of(bytes(8 * MB), 16 * KB)
        assert d.partial_path.name == "base.qcow2.partial"
        tx.abort("not now")
    seed = chain.sync([[(0x42, 1 * MB, 1 * MB)]], mode="seed")
    assert (seed.seq, seed.mode, [lay.layer for lay in seed.layers]) == (1, "seed", ["base.qcow2"])
    with Site.open(tmp_path / "site") as site, site.lock("m1"), site.begin_point("m1") as tx:
        d = tx.disks[0]
        assert not tx.seed and d.backing and d.backing.name == "base.qcow2"
        assert d.old_map == map_of(chain.expected[1][0], 16 * KB) and d.state == {"generation": 1}
        assert d.partial_path.name == "rp-000002.qcow2.partial"
        counters = SyncCounters(mode="hash", bytes_read=8 * MB, bytes_sent=70_000, bytes_written=64 * KB)
        qemu_io(d.partial_path, [(0x43, 0, 64 * KB)])
        new = bytearray(chain.expected[1][0])
        new[0 : 64 * KB] = b"\x43" * (64 * KB)
        point = tx.commit([SyncResult(map_of(new, 16 * KB), counters, {"bitmap": "p2v-2"})], "crash-consistent",
                          {"captured_at": 1_800_000_000.0, "wall_s": 2.5, "source": "test"})  # fmt: skip
    assert (point.seq, point.created_at, point.wall_s, point.bytes_sent) == (2, 1_800_000_000.0, 2.5, 70_000)
    with Site.open(tmp_path / "site") as site:
        again = site.point("m1")
        assert (again.seq, again.mode, again.consistency, again.meta["source"]) == (2, "hash", "crash-consistent",
                                                                                      "test")  # fmt: skip
        assert again.layers[0].counters["bytes_read"] == 8 * MB
        assert site.machine("m1").disks[0].state == {"bitmap": "p2v-2"}
        assert site.machine("m1").newest_point_at == 1_800_000_000.0


def test_remove_machine_deletes_files_and_rows_and_finishes_when_interrupted(tmp_path: Path) -> None:
    four_points(tmp_path / "site", ProtectionPolicy(), name="web1")
    four_points(tmp_path / "site", ProtectionPolicy(), name="web2")
    with Site.open(tmp_path / "site") as site:
        site.remove_machine("web1")
        assert [m.name for m in site.machines()] == ["web2"]
        assert [s.name for s in site.status()] == ["web2"]
        assert sorted(p.name for p in (tmp_path / "site/machines").iterdir()) == ["web2"]
        with pytest.raises(UnknownMachine):
            site.points("web1")
        # interrupted removal: the folder was renamed away, the process died before the rows went
        mid = site.catalog.machine_row("web2")["id"]  # type: ignore[index]
    os.replace(tmp_path / "site/machines/web2", tmp_path / f"site/machines/.removing-{mid}-web2")
    with Site.open(tmp_path / "site") as site:
        assert site.machines() == []
    assert list((tmp_path / "site/machines").iterdir()) == []
    with Site.open(tmp_path / "site") as site:  # the name can be used again
        site.add_machine("web1", [DiskSpec("file:///new", 1 * MB)], ProtectionPolicy())
        assert site.machine("web1").disks[0].url == "file:///new"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(fs: Path, leave: int) -> Path:
    st = os.statvfs(fs)
    filler = fs / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(4096, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_site_fails_the_sync_cleanly_and_earlier_points_stay(small_fs: Path, tmp_path: Path) -> None:
    chain = Chain(small_fs / "site", "m1", [16 * MB], ProtectionPolicy())
    chain.sync([[(0x11, 0, 2 * MB)]], mode="seed")
    filler = fill(small_fs, 64 * KB)
    with Site.open(small_fs / "site") as site, site.lock("m1"):
        with pytest.raises(OutputError) as err:
            site.begin_point("m1")
        assert err.value.message.startswith(f"no space left on the DR site at {small_fs / 'site'}")
        assert err.value.exit_code == 11
    assert chain.files() == ["base.map", "base.qcow2"]
    filler.unlink()
    # space runs out while the point is committed: the map cannot be written
    with Site.open(small_fs / "site") as site, site.lock("m1"):
        tx = site.begin_point("m1")
        qemu_io(tx.disks[0].partial_path, [(0x12, 0, 1 * MB)])
        filler = fill(small_fs, 0)
        with pytest.raises(OutputError) as err:
            tx.commit([SyncResult(map_of(b"\x12" * MB + b"\x11" * MB + bytes(14 * MB)), SyncCounters(mode="hash"))],
                      "fuzzy")  # fmt: skip
        assert "no space left on the DR site" in err.value.message
    assert chain.files() == ["base.map", "base.qcow2"]
    filler.unlink()
    assert chain.check_points(tmp_path) == [1]
    chain.sync([[(0x13, 4 * MB, 4 * KB)]])
    assert chain.check_points(tmp_path) == [1, 2]


def test_a_sync_goes_on_while_a_reader_blocks_an_interrupted_merge(tmp_path: Path) -> None:
    """A drill holding base.qcow2 open makes qemu-img commit fail: retention reports it, syncs
    continue on top of the chain, and the merge completes once the reader is gone."""
    chain = four_points(tmp_path / "site", ProtectionPolicy(retain_count=2))
    child = run_retention_child(tmp_path / "site", "web1", "after-start")
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    base = tmp_path / "site/machines/web1/disk0/base.qcow2"
    reader = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(base)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)  # let it open the image
        with Site.open(tmp_path / "site") as site:
            with pytest.raises(SiteError) as err:
                site.apply_retention("web1")
            assert "base.qcow2" in err.value.message or "rp-000002.qcow2" in err.value.message
            assert "lock" in err.value.message
            with site.lock("web1"), site.begin_point("web1") as tx:
                assert tx.warnings and "retention merge" in tx.warnings[0]
                tx.abort("checked")
        chain.sync([[(0x57, 0, 4 * KB)], [(0x58, 0, 4 * KB)]])
        assert chain.check_points(tmp_path) == [2, 3, 4, 5]
    finally:
        reader.communicate(b"quit\n", timeout=30)
    with Site.open(tmp_path / "site") as site:
        result = site.apply_retention("web1")
    assert (result.resumed, result.expired, result.kept) == (True, [2, 3], [4, 5])
    assert chain.check_points(tmp_path) == [4, 5]
