"""Live QEMU source against a real, guestless QEMU (TCG): dirty bitmaps, point-in-time export.

The QEMU has no bootable disk and sits in its firmware; its drive ``disk0`` (qcow2, behind
a virtio-blk device ``vd0``) is written *through the running QEMU* with HMP ``qemu-io``
on the device, exactly as guest writes would arrive (dirty bitmaps see them, the fleecing
job copies before them). Recovery-point layers are qcow2 overlays written through a small
qemu-nbd + libnbd adaptor defined here; contents are compared with ``qemu-img compare``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from p2v.errors import SourceNotFound, UsageError, VmError
from p2v.replication.model import DEFAULT_BLOCK, HashMap, SyncResult, digest
from p2v.replication.qemu_live import LiveQemuSource, judge_bitmap, parse_qemu_url, qemu_url
from p2v.vm.qmp import QmpConnection

MiB = 1 << 20
GiB = 1 << 30
DEVICE = "/machine/peripheral/vd0/virtio-backend"
LAYER_OPTIONS = "cluster_size=128k,extended_l2=on"


# -- helpers: a guestless QEMU, layers, a LayerTarget -------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def create_qcow2(path: Path, size: int, backing: Path | None = None, options: str | None = None) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    res = qemu_img(*args, str(path), str(size))
    assert res.returncode == 0, res.stderr
    return path


class GuestlessQemu:
    """QEMU with one qcow2 drive (node ``disk0``, device ``vd0``), two QMP monitors: one
    for the source under test, one for the test itself."""

    def __init__(self, disk: Path, workdir: Path, fmt: str = "qcow2") -> None:
        self.disk = disk
        self.fmt = fmt
        self.workdir = workdir
        self.source_qmp = workdir / "qmp-src.sock"
        self.test_qmp = workdir / "qmp-test.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mon: QmpConnection | None = None

    def start(self) -> GuestlessQemu:
        for s in (self.source_qmp, self.test_qmp):
            s.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-m", "64", "-blockdev", f"driver=file,filename={self.disk},node-name=f0",
            "-blockdev", f"driver={self.fmt},file=f0,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0,id=vd0",
            "-qmp", f"unix:{self.source_qmp},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
        ]  # fmt: skip
        log = (self.workdir / "qemu.log").open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not (self.source_qmp.exists() and self.test_qmp.exists()):
            assert self.proc.poll() is None, (self.workdir / "qemu.log").read_text()
            assert time.monotonic() < deadline, "QEMU did not create its QMP sockets"
            time.sleep(0.05)
        while True:  # the socket file exists a moment before QEMU listens on it
            self.mon = QmpConnection(self.test_qmp, vm_name="test-monitor")
            try:
                self.mon.connect()
                return self
            except VmError:
                self.mon.close()
                assert self.proc.poll() is None, (self.workdir / "qemu.log").read_text()
                assert time.monotonic() < deadline, "QEMU does not answer on its QMP socket"
                time.sleep(0.1)

    def qmp(self, command: str, **args: Any) -> Any:
        assert self.mon is not None
        return self.mon.execute(command, args or None)

    def hmp_io(self, command: str) -> None:
        """Run a qemu-io command on the guest device's block backend. QEMU 7.2 prints
        qemu-io's report on its stdout (our log) and only errors come back over HMP."""
        log = self.workdir / "qemu.log"
        before = log.stat().st_size
        out: str = self.qmp("human-monitor-command", **{"command-line": f'qemu-io -d {DEVICE} "{command}"'})
        assert not out.strip(), out
        with log.open("rb") as f:
            f.seek(before)
            said = f.read().decode(errors="replace")
        assert "fail" not in said.lower() and "error" not in said.lower(), said

    def write(self, offset: int, length: int, pattern: int) -> None:
        """Write through the running QEMU, as the guest would."""
        self.hmp_io(f"write -P {pattern:#x} {offset} {length}")

    def zero(self, offset: int, length: int) -> None:
        self.hmp_io(f"write -z {offset} {length}")

    def bitmaps(self, node: str = "disk0") -> dict[str, dict[str, Any]]:
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        raise AssertionError(f"no node {node}")

    def flush(self) -> None:
        self.hmp_io("flush")

    def disconnect(self) -> None:
        if self.mon is not None:
            self.mon.close()
            self.mon = None

    def quit(self) -> None:
        """A clean stop: QEMU stores persistent bitmaps in the image."""
        with contextlib.suppress(VmError):
            self.qmp("quit")
        self.disconnect()
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: persistent bitmaps stay flagged in-use, i.e. inconsistent on the next start."""
        self.disconnect()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(name="qemu_factory")
def qemu_factory_fixture(tmp_path: Path) -> Iterator[Any]:
    """``qemu_factory(size, fmt="qcow2", disk=None)`` starts a GuestlessQemu; all are killed at the end."""
    started: list[GuestlessQemu] = []

    def make(size: int, fmt: str = "qcow2", disk: Path | None = None) -> GuestlessQemu:
        if disk is None:
            disk = tmp_path / f"source-{len(started)}.{fmt}"
            if fmt == "qcow2":
                create_qcow2(disk, size)
            else:
                with disk.open("wb") as f:
                    f.truncate(size)
        vm = GuestlessQemu(disk, tmp_path, fmt).start()
        started.append(vm)
        return vm

    yield make
    for vm in started:
        vm.kill()


class QemuNbdLayer:
    """A read-write recovery-point layer served by qemu-nbd, implementing model.LayerTarget."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.socket = image.with_suffix(".sock")
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(self.socket), "--cache=writeback",
                                      str(image)], stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 30
        try:
            while True:  # the socket file appears at bind(), before qemu-nbd listens: retry refusals
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                assert time.monotonic() < deadline
                if self.socket.exists():
                    self.h = nbd.NBD()
                    try:
                        self.h.connect_unix(str(self.socket))
                        break
                    except nbd.Error:
                        pass
                time.sleep(0.02)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.size = self.h.get_size()
        self.reads = 0

    def pread(self, length: int, offset: int) -> bytes:
        self.reads += length
        return bytes(self.h.pread(length, offset))

    def pwrite(self, data: bytes, offset: int) -> None:
        self.h.pwrite(bytes(data), offset)

    def zero(self, length: int, offset: int) -> None:
        self.h.zero(length, offset)

    def flush(self) -> None:
        self.h.flush()

    def close(self) -> None:
        with contextlib.suppress(nbd.Error):
            self.h.flush()
            self.h.shutdown()
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Chain:
    """A recovery-point chain in ``folder``: layer-1.qcow2 <- layer-2.qcow2 <- ..."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self.layers: list[Path] = []
        self.map = HashMap.zeros(size)
        self.state: dict[str, Any] = {}

    @property
    def head(self) -> Path:
        return self.layers[-1]

    def sync(self, source: LiveQemuSource, **kw: Any) -> SyncResult:
        """One sync into a new layer; the layer is kept only when the sync succeeds."""
        backing = self.layers[-1] if self.layers else None
        layer = create_qcow2(self.folder / f"layer-{len(self.layers) + 1}.qcow2", self.size, backing, LAYER_OPTIONS)
        target = QemuNbdLayer(layer)
        try:
            res = source.sync(target, self.map, self.state, **kw)
            target.flush()
        except BaseException:
            target.close()
            layer.unlink()
            raise
        target.close()
        self.layers.append(layer)
        self.map, self.state = res.hashmap, res.state
        res.counters.extra["target_reads"] = target.reads
        return res


def same_content(vm: GuestlessQemu, image: Path) -> bool:
    """qemu-img's verdict on the running drive against a chain head (holes equal zeros)."""
    vm.flush()
    res = qemu_img("compare", "-U", "-f", vm.fmt, "-F", "qcow2", str(vm.disk), str(image))
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def map_of(image: Path, size: int) -> HashMap:
    """The hash map of an image, computed independently (qemu-nbd read-only + model.digest)."""
    sock = image.with_suffix(".ro.sock")
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), str(image)])
    try:
        while not sock.exists():
            assert proc.poll() is None
            time.sleep(0.02)
        h = nbd.NBD()
        h.connect_unix(str(sock))
        m = HashMap.zeros(size)
        step = 4 * MiB
        for off in range(0, size, step):
            data = h.pread(min(step, size - off), off)
            for i in range(0, len(data), DEFAULT_BLOCK):
                m[(off + i) // DEFAULT_BLOCK] = digest(bytes(data[i : i + DEFAULT_BLOCK]))
        h.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return m


def leftovers(vm: GuestlessQemu) -> list[str]:
    """Temporary QEMU objects a sync must not leave behind."""
    names = [n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)]
    found = [n for n in names if n not in ("disk0", "f0") and not n.startswith("#")]
    found += [f"job {j['id']}" for j in vm.qmp("query-jobs")]
    found += [f"export {e['id']}" for e in vm.qmp("query-block-exports")]
    return found


def fleece_dirs(work: Path) -> list[Path]:
    return list(work.glob("p2v-fleece-*"))


def scatter(vm: GuestlessQemu, size: int, count: int, length: int, seed: int) -> int:
    """``count`` writes of ``length`` bytes at random aligned offsets; returns bytes written."""
    rng = random.Random(seed)
    offsets = rng.sample(range(0, size // length), count)
    for k, slot in enumerate(offsets):
        vm.write(slot * length, length, 0x10 + k % 200)
    return count * length


# -- unit-level checks (pure functions, no QEMU) ------------------------------------------------


def test_parse_qemu_url() -> None:
    assert parse_qemu_url("qemu:///run/vm/qmp.sock?node=disk0") == (Path("/run/vm/qmp.sock"), "disk0")
    assert parse_qemu_url("qemu:///run/my%20vm/qmp.sock?node=drive-virtio-disk0") == (
        Path("/run/my vm/qmp.sock"), "drive-virtio-disk0")  # fmt: skip
    for sock, node in [(Path("/run/a b/q.sock"), "#block123"), (Path("/q.sock"), "/machine/peripheral/vd0")]:
        assert parse_qemu_url(qemu_url(sock, node)) == (sock, node)
    for bad, why in [
        ("qemu:///run/qmp.sock?node=#block1", "fragments"),
        ("qemu://host/run/qmp.sock?node=d", "only local"),
        ("qemu:///run/qmp.sock", "node="),
        ("qemu:///run/qmp.sock?node=a&node=b", "node="),
        ("qemu:///run/qmp.sock?node=d&x=1", "unknown parameter"),
        ("qemu://?node=d", "absolute"),
        ("ssh://root@h/dev/sda", "qemu://"),
        ("qemu:///run/qmp.sock?node=a b", "characters"),
    ]:
        with pytest.raises(UsageError, match=why) as err:
            parse_qemu_url(bad)
        assert bad in err.value.message


def test_judge_bitmap_reasons() -> None:
    from p2v.replication.qemu_live import BitmapInfo, DriveNode

    good = BitmapInfo("p2v-3", 4096, recording=True, persistent=True)
    drive = DriveNode("disk0", "qcow2", GiB, True, (good,))
    state = {"bitmap": "p2v-3", "generation": 3, "node": "disk0", "granularity": 4096}
    assert judge_bitmap(state, "disk0", drive, 4096) is None
    cases = [
        ({**state, "bitmap": "p2v-2"}, drive, "no usable bitmap"),
        ({**state, "node": "disk1"}, drive, "belongs to node"),
        ({**state, "bitmap": "p2v-4", "generation": 4}, drive, "not on node"),
        (state, DriveNode("disk0", "qcow2", GiB, True, (BitmapInfo("p2v-3", 4096, inconsistent=True),)),
         "inconsistent"),
        (state, DriveNode("disk0", "qcow2", GiB, True, (BitmapInfo("p2v-3", 4096, recording=False),)), "disabled"),
        (state, DriveNode("disk0", "qcow2", GiB, True, (BitmapInfo("p2v-3", 65536),)), "granularity 65536"),
        ({**state, "bitmap": "p2v-4", "generation": 4}, DriveNode("disk0", "raw", GiB, False, ()),
         "non-persistent bitmaps are lost"),
    ]  # fmt: skip
    for st, dr, why in cases:
        reason = judge_bitmap(st, "disk0", dr, 4096)
        assert reason is not None and why in reason, (st, reason)


def test_range_arithmetic_matches_sets() -> None:
    from p2v.replication.qemu_live_io import clip, intersect, merge, subtract

    rng = random.Random(5)

    def ranges(n: int) -> list[tuple[int, int]]:
        return merge((a, a + rng.randrange(1, 20)) for a in rng.sample(range(300), n))

    def points(rs: list[tuple[int, int]]) -> set[int]:
        return {p for a, b in rs for p in range(a, b)}

    for _ in range(300):
        xs, ys = ranges(rng.randrange(0, 12)), ranges(rng.randrange(0, 12))
        for rs in (xs, ys):  # merged: sorted, disjoint, not touching
            assert all(a < b < c for (a, b), (c, _) in itertools.pairwise(rs))
        assert points(intersect(xs, ys)) == points(xs) & points(ys)
        assert points(subtract(xs, ys)) == points(xs) - points(ys)
        a = rng.randrange(320)
        b = a + rng.randrange(60)
        assert clip(xs, a, b) == intersect(xs, [(a, b)])


def test_unknown_node_and_missing_socket(qemu_factory: Any, tmp_path: Path) -> None:
    vm = qemu_factory(64 * MiB)
    with pytest.raises(SourceNotFound, match="no block node or drive named 'nope'") as err:
        LiveQemuSource(vm.source_qmp, "nope")
    assert err.value.hint is not None and "disk0" in err.value.hint
    with pytest.raises(SourceNotFound, match="no QMP socket"):
        LiveQemuSource(tmp_path / "absent.sock", "disk0")
    # The device id and the node name both reach the same drive; two sources share the one
    # monitor socket (each holds it only during a query or a sync).
    with LiveQemuSource(vm.source_qmp, "vd0") as by_device, LiveQemuSource(vm.source_qmp, "disk0") as by_node:
        assert by_device.drive().node_name == by_node.drive().node_name == "disk0"
        assert by_device.size == by_node.size == 64 * MiB


# -- seed, incremental, point in time -----------------------------------------------------------


def test_seed_then_dirty_extents_only(qemu_factory: Any, tmp_path: Path) -> None:
    size = 1 * GiB
    vm = qemu_factory(size)
    vm.write(0, 48 * MiB, 0x11)
    vm.write(700 * MiB, 16 * MiB, 0x22)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", size, work_dir=tmp_path, rehash_share=0.0) as src:
        seed = chain.sync(src)
        c = seed.counters
        assert c.mode == "seed" and seed.state["bitmap"] == "p2v-1" and seed.state["generation"] == 1
        assert c.bytes_read == 64 * MiB, c  # zero/unallocated extents are skipped, data read once
        assert c.zero_bytes == size - 64 * MiB
        assert same_content(vm, chain.head)
        assert seed.hashmap == map_of(chain.head, size)

        written = scatter(vm, size, 40, 64 * 1024, seed=1) + scatter(vm, size, 64, 4096, seed=2)
        vm.write(300 * MiB, 8 * MiB, 0x33)
        written += 8 * MiB
        inc = chain.sync(src)
        c = inc.counters
        assert c.mode == "bitmap" and c.extra["bitmap"] == "p2v-1" and inc.state["bitmap"] == "p2v-2"
        # Only what was written is read from QEMU (bitmap granularity 4 KiB: no slack needed here).
        assert written * 0.95 <= c.bytes_read <= written * 1.1 + 4096, (c.bytes_read, written)
        assert c.bytes_written <= c.bytes_read
        assert c.extra["dirty_extents"] >= 100
        assert same_content(vm, chain.head)
        # rehash_share=0: every partly dirty block is read back from the previous point and
        # re-hashed (here the 64 blocks of the 4 KiB writes, fewer if two share a block).
        assert inc.hashmap == map_of(chain.head, size) and inc.hashmap.unknown_count() == 0
        assert 60 * 64 * 1024 <= c.bytes_rehashed == c.extra["target_reads"] <= 64 * 64 * 1024
        # The previous bitmap stays until the next sync starts (the catalog commits in between).
        assert {"p2v-1", "p2v-2"} <= set(vm.bitmaps())

        third = chain.sync(src)
        assert third.counters.mode == "bitmap" and third.counters.bytes_read == 0
        assert set(b for b in vm.bitmaps() if b.startswith("p2v-")) == {"p2v-2", "p2v-3"}
        assert third.counters.extra["removed_bitmaps"] == ["p2v-1"]
    assert leftovers(vm) == [] and fleece_dirs(tmp_path) == []


def test_writes_during_sync_belong_to_the_next_point(qemu_factory: Any, tmp_path: Path) -> None:
    size = 256 * MiB
    vm = qemu_factory(size)
    vm.write(0, 32 * MiB, 0x41)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
        vm.write(1 * MiB, 4 * MiB, 0x42)  # before the point: in it
        expected = tmp_path / "expected.qcow2"
        vm.flush()
        assert qemu_img("convert", "-U", "-O", "qcow2", str(vm.disk), str(expected)).returncode == 0
        calls: list[int] = []

        def during(done: int, total: int) -> None:  # runs inside the sync, after the point was taken
            if not calls:
                vm.write(2 * MiB, 1 * MiB, 0x43)  # overwrites part of what the point must show
                vm.write(200 * MiB, 1 * MiB, 0x44)  # a region the point does not include at all
            calls.append(done)

        res = chain.sync(src, progress=during)
        assert calls[0] == 0 and calls[-1] == size
        assert res.counters.mode == "bitmap"
        assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(expected), str(chain.head)).returncode == 0
        assert not same_content(vm, chain.head)  # the drive moved on after the point
        nxt = chain.sync(src)
        assert nxt.counters.bytes_read == 2 * MiB  # exactly the two writes made during the last sync
        assert same_content(vm, chain.head)
    assert leftovers(vm) == []


def test_sparse_blocks_get_unknown_digests_dense_ones_exact(qemu_factory: Any, tmp_path: Path) -> None:
    size = 128 * MiB
    vm = qemu_factory(size)
    vm.write(0, 16 * MiB, 0x21)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:  # default rehash_share 0.5
        chain.sync(src)
        vm.write(1 * MiB + 4096, 4096, 0x22)  # block 16: 1/16 dirty -> digest left unknown
        vm.write(2 * MiB, 64 * 1024, 0x23)  # block 32: all dirty -> hashed from what was read
        vm.write(3 * MiB, 40 * 1024, 0x24)  # block 48: 5/8 dirty -> clean part read back, hashed
        res = chain.sync(src)
        c = res.counters
        truth = map_of(chain.head, size)
        assert [i for i in range(truth.count) if res.hashmap[i] != truth[i]] == [16]
        assert res.hashmap.unknown_count() == 1
        assert c.bytes_read == (4 + 64 + 40) * 1024 and c.bytes_rehashed == 64 * 1024
        assert c.blocks_changed == 3
        assert same_content(vm, chain.head)
        # A later hash-mode sync learns the unknown digest again (and finds nothing to write).
        vm.qmp("block-dirty-bitmap-remove", node="disk0", name=res.state["bitmap"])
        healed = chain.sync(src)
        assert healed.counters.mode == "hash" and healed.counters.bytes_written == 0
        assert healed.hashmap == map_of(chain.head, size) and healed.hashmap.unknown_count() == 0


def test_bytes_read_does_not_grow_with_disk_size(qemu_factory: Any, tmp_path: Path) -> None:
    results = {}
    for size in (1 * GiB, 4 * GiB):
        vm = qemu_factory(size)
        vm.write(0, 8 * MiB, 0x55)
        chain = Chain(tmp_path / f"{size}", size)
        chain.folder.mkdir()
        with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
            chain.sync(src)
            written = scatter(vm, size, 96, 64 * 1024, seed=7)
            res = chain.sync(src)
        assert res.counters.mode == "bitmap"
        assert same_content(vm, chain.head)
        results[size] = res.counters
        vm.kill()
    small, big = results[1 * GiB], results[4 * GiB]
    assert small.bytes_read == big.bytes_read == written
    # Random slots may touch each other (then one extent covers two writes): ~96 either way.
    assert 90 <= small.extra["dirty_extents"] <= 96 and 90 <= big.extra["dirty_extents"] <= 96


def test_zeroed_ranges_are_zeroed_not_read(qemu_factory: Any, tmp_path: Path) -> None:
    size = 128 * MiB
    vm = qemu_factory(size)
    vm.write(0, 16 * MiB, 0x61)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
        vm.zero(4 * MiB, 2 * MiB)  # a guest discard / write-zeroes
        vm.write(10 * MiB, 4096, 0x62)
        res = chain.sync(src)
    c = res.counters
    assert c.mode == "bitmap" and c.bytes_read == 4096
    assert c.extra["bytes_zeroed"] == 2 * MiB
    assert same_content(vm, chain.head)
