"""Recovery-point chains with real qemu-img/qemu-io: points read back exactly, retention merges
keep every remaining point readable, and a retention killed at any stage is finished by a rerun.

The tests play the sync engine: they write into the partial layers with ``qemu-io`` and keep
the expected bytes of every point in memory; points are read back with ``qemu-img convert``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2v.errors import Busy, SiteError
from p2v.replication.model import HashMap, SyncCounters, SyncResult, digest
from p2v.site import DiskSpec, ProtectionPolicy, RecoveryPoint, Site

ROOT = Path(__file__).resolve().parents[2]
KB, MB = 1024, 1024 * 1024
Write = tuple[int | None, int, int]  # (pattern byte or None for zeroes, offset, length)


def qemu_io(image: Path, writes: list[Write]) -> None:
    args: list[str] = []
    for pattern, off, length in writes:
        args += ["-c", f"write -z {off} {length}" if pattern is None else f"write -P {pattern} {off} {length}"]
    if args:
        subprocess.run(["qemu-io", "-f", "qcow2", *args, str(image)], check=True, capture_output=True)


def read_image(image: Path, tmp: Path) -> bytes:
    out = tmp / "read.raw"
    proc = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, f"{image} cannot be read: {proc.stderr}"
    data = out.read_bytes()
    out.unlink()
    return data


def map_of(data: bytes | bytearray, block: int = 64 * KB) -> HashMap:
    m = HashMap.zeros(len(data), block)
    for i in range(m.count):
        off, length = m.block_range(i)
        m[i] = digest(bytes(data[off : off + length]))
    return m


class Chain:
    """A machine at a site plus the bytes every point's disks must read as."""

    def __init__(self, root: Path, name: str, sizes: list[int], policy: ProtectionPolicy) -> None:
        self.root, self.name, self.sizes, self.block = root, name, sizes, policy.block_size
        with Site.open(root) as site:
            site.add_machine(name, [DiskSpec(f"file:///src/{name}-{i}.img", s) for i, s in enumerate(sizes)], policy)
        self.current = [bytearray(s) for s in sizes]
        self.expected: dict[int, list[bytes]] = {}

    def sync(self, writes: list[list[Write]], mode: str = "hash") -> RecoveryPoint:
        with Site.open(self.root) as site, site.lock(self.name), site.begin_point(self.name) as tx:
            results = []
            for d in tx.disks:
                qemu_io(d.partial_path, writes[d.index])
                for pattern, off, length in writes[d.index]:
                    self.current[d.index][off : off + length] = bytes([pattern or 0]) * length
                written = sum(length for _, _, length in writes[d.index])
                counters = SyncCounters(mode=mode, bytes_written=written)
                results.append(SyncResult(map_of(self.current[d.index], self.block), counters, {"generation": tx.seq}))
            point = tx.commit(results, "crash-consistent", {"captured_at": time.time()})
        self.expected[point.seq] = [bytes(c) for c in self.current]
        return point

    def check_points(self, tmp: Path) -> list[int]:
        """Every point the site offers reads back exactly and has the right map. Returns their seqs."""
        with Site.open(self.root) as site:
            seqs = [p.seq for p in site.points(self.name)]
            for seq in seqs:
                for disk in range(len(self.sizes)):
                    image = site.point_image(self.name, seq, disk)
                    assert read_image(image, tmp) == self.expected[seq][disk], f"point {seq} disk {disk} differs"
                    stored = HashMap.load(site.point_map(self.name, seq, disk))
                    assert stored == map_of(self.expected[seq][disk], self.block)
        return seqs

    def files(self, disk: int = 0) -> list[str]:
        return sorted(p.name for p in (self.root / "machines" / self.name / f"disk{disk}").iterdir())


def four_points(root: Path, policy: ProtectionPolicy, name: str = "web1") -> Chain:
    chain = Chain(root, name, [4 * MB, 2 * MB], policy)
    chain.sync([[(0x11, 0, 1 * MB)], [(0x21, 0, 512 * KB)]], mode="seed")
    chain.sync([[(0x12, 4 * KB, 4 * KB), (0x12, 1 * MB + 64 * KB, 64 * KB)], [(0x22, 100 * KB, 4 * KB)]])
    chain.sync([[(None, 0, 64 * KB), (0x13, 2 * MB, 300 * KB)], [(0x23, 1 * MB, 4 * KB)]])
    chain.sync([[(0x14, 4 * KB, 4 * KB), (0x14, 3 * MB, 4 * KB)], [(None, 0, 4 * KB)]])
    return chain


def top_layer_allocated(image: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "-f", "qcow2", "--output=json", str(image)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and (e["data"] or e["zero"]))


def test_four_points_each_read_back_as_written(tmp_path: Path) -> None:
    chain = four_points(tmp_path / "site", ProtectionPolicy())
    assert chain.check_points(tmp_path) == [1, 2, 3, 4]
    assert chain.files() == ["base.map", "base.qcow2", "rp-000002.map", "rp-000002.qcow2",
                             "rp-000003.map", "rp-000003.qcow2", "rp-000004.map", "rp-000004.qcow2"]  # fmt: skip
    with Site.open(tmp_path / "site") as site:
        pts = site.points("web1")
        assert [p.mode for p in pts] == ["seed", "hash", "hash", "hash"]
        assert pts[1].bytes_written == 4 * KB + 64 * KB + 4 * KB
        assert [lay.layer for lay in pts[3].layers] == ["rp-000004.qcow2", "rp-000004.qcow2"]
        # 4 KiB subclusters: point 2's disk-0 layer holds 4 KiB + 64 KiB, not two 128 KiB clusters
        assert top_layer_allocated(site.point_image("web1", 2, 0)) == 68 * KB
        # ... and occupies far less than a layer of whole 128 KiB clusters (~780 KiB measured)
        assert pts[1].layers[0].layer_bytes < 450 * KB
        chain_info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", "--backing-chain", "-f", "qcow2", str(site.point_image("web1", 4))],
            check=True, capture_output=True, text=True).stdout)  # fmt: skip
        assert [Path(i["filename"]).name for i in chain_info] == [
            "rp-000004.qcow2", "rp-000003.qcow2", "rp-000002.qcow2", "base.qcow2"]  # fmt: skip
        assert all(i["format-specific"]["data"]["extended-l2"] for i in chain_info)
        rec = site.machine("web1")
        assert rec.disks[1].state == {"generation": 4}
        assert (rec.point_count, rec.chain_depth, rec.newest_seq, rec.last_result) == (4, 4, 4, "ok")
        assert rec.total_bytes == sum(p.layer_bytes for p in pts) > 0
        with pytest.raises(SiteError) as err:
            site.point_image("web1", 9)
        assert "no recovery point 9" in err.value.message and err.value.hint and "1, 2, 3, 4" in err.value.hint


def test_retention_merges_the_oldest_points_and_keeps_the_rest_readable(tmp_path: Path) -> None:
    chain = four_points(tmp_path / "site", ProtectionPolicy(retain_count=2))
    with Site.open(tmp_path / "site") as site:
        assert site.plan_retention("web1") == [1, 2]
        before = site.machine("web1").total_bytes
        result = site.apply_retention("web1")
    assert (result.expired, result.kept, result.resumed) == ([1, 2], [3, 4], False)
    assert result.bytes_before == before and result.bytes_after < before
    assert chain.check_points(tmp_path) == [3, 4]
    for disk in (0, 1):
        assert chain.files(disk) == ["base.map", "base.qcow2", "rp-000004.map", "rp-000004.qcow2"]
    with Site.open(tmp_path / "site") as site:
        assert [lay.layer for lay in site.point("web1", 3).layers] == ["base.qcow2", "base.qcow2"]
        assert (site.machine("web1").point_count, site.machine("web1").chain_depth) == (2, 2)
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(site.point_image("web1", 3))],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert site.apply_retention("web1").expired == []
    # the chain keeps growing on top of the merged base
    chain.sync([[(0x15, 64 * KB, 8 * KB)], [(0x25, 0, 4 * KB)]])
    assert chain.check_points(tmp_path) == [3, 4, 5]


STAGES = ["after-start", "after-commit", "after-map", "after-rebase", "after-switch", "after-delete"]

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from p2v.site import Site, retention
    stage = {stage!r}
    if stage:
        retention.stage_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == stage else None
    Site.open({site!r}).apply_retention({name!r})
""")


def run_retention_child(site: Path, name: str, stage: str | None = None) -> subprocess.Popen[bytes]:
    code = CHILD.format(root=str(ROOT), stage=stage, site=str(site), name=name)
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE)


@pytest.mark.parametrize("stage", STAGES)
def test_retention_killed_at_each_stage_keeps_points_readable_and_a_rerun_finishes(tmp_path: Path, stage: str) -> None:
    chain = four_points(tmp_path / "site", ProtectionPolicy(retain_count=2))
    child = run_retention_child(tmp_path / "site", "web1", stage)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err.decode()
    remaining = chain.check_points(tmp_path)  # readable right after the crash
    assert 1 not in remaining and remaining[-2:] == [3, 4]
    with Site.open(tmp_path / "site") as site:
        result = site.apply_retention("web1")
    assert result.resumed is True
    assert result.kept == [3, 4]
    assert chain.check_points(tmp_path) == [3, 4]
    assert chain.files(1) == ["base.map", "base.qcow2", "rp-000004.map", "rp-000004.qcow2"]


def _wait_for_merge(root: Path, child: subprocess.Popen[bytes]) -> None:
    """Until the child has started a merge (journal row present) or exited."""
    db = sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        while child.poll() is None:
            if db.execute("SELECT count(*) FROM retention_journal").fetchone()[0]:
                return
            time.sleep(0.002)
    finally:
        db.close()


def kill_group(pgid: int) -> None:
    """SIGKILL a process group and wait until none of it runs (its image locks are gone)."""
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still running 30 s after SIGKILL")


def test_retention_killed_at_random_moments_with_its_qemu_img(tmp_path: Path) -> None:
    """kill -9 of the whole process group (p2v and the qemu-img it runs) while big layers merge."""
    rng = random.Random(3)
    resumed = 0
    for trial in range(4):
        root = tmp_path / f"site{trial}"
        chain = Chain(root, "db", [32 * MB], ProtectionPolicy(retain_count=1))
        chain.sync([[(0x31, 0, 12 * MB)]], mode="seed")
        chain.sync([[(0x32, 4 * MB, 16 * MB)]])
        chain.sync([[(0x33, 10 * MB, 8 * MB), (None, 0, 1 * MB)]])
        chain.sync([[(0x34, 30 * MB, 4 * KB)]])
        child = run_retention_child(root, "db")
        _wait_for_merge(root, child)
        time.sleep(rng.uniform(0.0, 0.1))
        kill_group(child.pid)
        child.communicate(timeout=60)
        remaining = chain.check_points(tmp_path)
        assert remaining[-1] == 4
        with Site.open(root) as site:
            result = site.apply_retention("db")
        resumed += result.resumed
        assert result.kept == [4]
        assert chain.check_points(tmp_path) == [4]
        assert chain.files() == ["base.map", "base.qcow2"]
    assert resumed >= 1  # kills landed inside a merge (the test is not vacuous)


def test_retention_is_refused_while_a_sync_holds_the_lock(tmp_path: Path) -> None:
    four_points(tmp_path / "site", ProtectionPolicy(retain_count=1))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from p2v.site import Site
            site = Site.open({str(tmp_path / 'site')!r})
            with site.lock("web1"):
                print("locked", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "locked"
        with Site.open(tmp_path / "site") as site:
            with pytest.raises(Busy) as err:
                site.apply_retention("web1")
            assert f"machine web1 is busy: pid {holder.pid} is running p2v sync" == err.value.message
            assert err.value.exit_code == 13
            assert [p.seq for p in site.points("web1")] == [1, 2, 3, 4]
    finally:
        holder.communicate("", timeout=30)
    with Site.open(tmp_path / "site") as site:
        assert site.apply_retention("web1").kept == [4]
