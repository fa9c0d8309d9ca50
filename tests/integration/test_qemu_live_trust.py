"""Live QEMU source: when the dirty bitmap cannot be trusted (removed, never stored, flagged
inconsistent after a kill, in-memory on a raw drive) the sync falls back to hash mode and is
still exact; failed and killed syncs leave nothing in QEMU and lose no write.

Same guestless QEMU and layer adaptor as :mod:`tests.integration.test_qemu_live`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2v.replication.qemu_live import LiveQemuSource
from tests.integration.test_qemu_live import (
    LAYER_OPTIONS,
    Chain,
    MiB,
    QemuNbdLayer,
    create_qcow2,
    fleece_dirs,
    leftovers,
    map_of,
    qemu_factory_fixture,  # noqa: F401 (the qemu_factory fixture)
    same_content,
    scatter,
)

# -- trust: missing, inconsistent, restarted ---------------------------------------------------


def test_missing_bitmap_falls_back_to_hash(qemu_factory: Any, tmp_path: Path) -> None:
    size = 256 * MiB
    vm = qemu_factory(size)
    vm.write(0, 20 * MiB, 0x71)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
        vm.qmp("block-dirty-bitmap-remove", node="disk0", name="p2v-1")
        vm.write(5 * MiB, 64 * 1024, 0x72)
        res = chain.sync(src)
        c = res.counters
        assert c.mode == "hash" and "p2v-1 is not on node disk0" in c.extra["fallback"]
        assert c.bytes_read == 20 * MiB  # the whole allocated drive, compared with the old map
        assert c.blocks_changed == 1 and c.bytes_written == 64 * 1024
        assert same_content(vm, chain.head)
        assert res.hashmap == map_of(chain.head, size)
        # Trust is regained with the next bitmap.
        vm.write(9 * MiB, 4096, 0x73)
        assert chain.sync(src).counters.mode == "bitmap"
        assert same_content(vm, chain.head)


def test_kill_before_bitmap_was_ever_stored_loses_it(qemu_factory: Any, tmp_path: Path) -> None:
    size = 128 * MiB
    vm = qemu_factory(size)
    vm.write(0, 8 * MiB, 0x81)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
    vm.write(3 * MiB, 1 * MiB, 0x82)
    vm.kill()  # QEMU stores a new persistent bitmap only when it closes the image: never, here
    vm = qemu_factory(size, disk=vm.disk)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        res = chain.sync(src)
    assert res.counters.mode == "hash" and "p2v-1 is not on node disk0" in res.counters.extra["fallback"]
    assert same_content(vm, chain.head)


def test_kill_and_restart_makes_bitmap_inconsistent(qemu_factory: Any, tmp_path: Path) -> None:
    size = 256 * MiB
    vm = qemu_factory(size)
    vm.write(0, 24 * MiB, 0x81)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
    vm.quit()  # stores p2v-1 in the image
    vm = qemu_factory(size, disk=vm.disk)  # loads it and flags it in use in the image
    assert not vm.bitmaps()["p2v-1"].get("inconsistent")
    vm.write(3 * MiB, 1 * MiB, 0x82)
    vm.kill()  # never stored again: the in-use flag stays
    vm = qemu_factory(size, disk=vm.disk)
    assert vm.bitmaps()["p2v-1"].get("inconsistent") is True
    vm.write(6 * MiB, 4096, 0x83)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        res = chain.sync(src)
    c = res.counters
    assert c.mode == "hash" and "inconsistent" in c.extra["fallback"]
    assert c.blocks_changed == 17  # 1 MiB before the kill + the 4 KiB after: all found by hashing
    assert same_content(vm, chain.head)
    assert "p2v-1" not in vm.bitmaps()  # an inconsistent bitmap is removed, never reused
    assert res.state["bitmap"] == "p2v-2"


def test_clean_restart_keeps_persistent_bitmap(qemu_factory: Any, tmp_path: Path) -> None:
    size = 128 * MiB
    vm = qemu_factory(size)
    vm.write(0, 8 * MiB, 0x91)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
    vm.write(1 * MiB, 128 * 1024, 0x92)
    vm.quit()
    vm = qemu_factory(size, disk=vm.disk)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        res = chain.sync(src)
    assert res.counters.mode == "bitmap" and res.counters.bytes_read == 128 * 1024
    assert same_content(vm, chain.head)


def test_raw_drive_bitmap_is_lost_on_restart(qemu_factory: Any, tmp_path: Path) -> None:
    size = 64 * MiB
    vm = qemu_factory(size, fmt="raw")
    vm.write(0, 4 * MiB, 0xA1)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        seed = chain.sync(src)
        assert seed.state["persistent"] is False
        vm.write(1 * MiB, 4096, 0xA2)
        assert chain.sync(src).counters.mode == "bitmap"  # in-memory bitmap works while QEMU runs
    vm.quit()
    vm = qemu_factory(size, fmt="raw", disk=vm.disk)
    vm.write(2 * MiB, 4096, 0xA3)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        res = chain.sync(src)
    assert res.counters.mode == "hash" and "non-persistent" in res.counters.extra["fallback"]
    assert same_content(vm, chain.head)


# -- failures clean up -----------------------------------------------------------------------------


class FailingLayer(QemuNbdLayer):
    def __init__(self, image: Path, fail_after: int) -> None:
        super().__init__(image)
        self.left = fail_after

    def pwrite(self, data: bytes, offset: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise OSError(28, "No space left on device (test)")
        super().pwrite(data, offset)


def test_failed_sync_cleans_up_and_loses_nothing(qemu_factory: Any, tmp_path: Path) -> None:
    size = 128 * MiB
    vm = qemu_factory(size)
    vm.write(0, 8 * MiB, 0xB1)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
        scatter(vm, size, 20, 64 * 1024, seed=3)
        layer = create_qcow2(tmp_path / "failed.qcow2", size, chain.head, LAYER_OPTIONS)
        target = FailingLayer(layer, fail_after=3)
        try:
            with pytest.raises(OSError, match="No space"):
                src.sync(target, chain.map, chain.state)
        finally:
            target.close()
        assert leftovers(vm) == [] and fleece_dirs(tmp_path) == []
        assert "p2v-2" in vm.bitmaps()  # the failed sync's bitmap: removed by the next sync
        vm.write(100 * MiB, 4096, 0xB2)
        res = chain.sync(src)  # from the last committed point's state: nothing is missed
        assert res.counters.mode == "bitmap" and res.counters.extra["removed_bitmaps"] == ["p2v-2"]
        assert res.counters.bytes_read == 20 * 64 * 1024 + 4096
        assert same_content(vm, chain.head)


def test_leftovers_of_a_killed_sync_are_removed(qemu_factory: Any, tmp_path: Path) -> None:
    size = 64 * MiB
    vm = qemu_factory(size)
    vm.write(0, 4 * MiB, 0xC1)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
    # Simulate a p2v process killed mid-sync: run a sync in a child and SIGKILL it while it reads.
    code = (
        "import sys, time, os\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from pathlib import Path\n"
        "from p2v.replication.qemu_live import LiveQemuSource\n"
        "from p2v.replication.model import HashMap\n"
        "class Slow:\n"
        f"    size = {size}\n"
        "    def pread(self, n, o): return bytes(n)\n"
        "    def pwrite(self, d, o): print('writing', flush=True); time.sleep(60)\n"
        "    def zero(self, n, o): pass\n"
        "    def flush(self): pass\n"
        f"src = LiveQemuSource(Path({str(vm.source_qmp)!r}), 'disk0', work_dir=Path({str(tmp_path)!r}))\n"
        f"src.sync(Slow(), HashMap.zeros({size}), {{}})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[2])  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait()
    assert leftovers(vm) != [] and len(fleece_dirs(tmp_path)) == 1
    vm.write(1 * MiB, 4096, 0xC2)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        res = chain.sync(src)
    assert res.counters.mode == "bitmap" and res.counters.bytes_read == 4096
    assert leftovers(vm) == [] and fleece_dirs(tmp_path) == []
    assert same_content(vm, chain.head)


def test_no_recorded_bitmap_with_a_real_map_compares_hashes(qemu_factory: Any, tmp_path: Path) -> None:
    """A machine first protected another way (no source state, but a real hash map) is not
    re-seeded: the whole drive is read and compared, only what differs is written."""
    size = 64 * MiB
    vm = qemu_factory(size)
    vm.write(0, 8 * MiB, 0xD1)
    chain = Chain(tmp_path, size)
    with LiveQemuSource(vm.source_qmp, "disk0", work_dir=tmp_path) as src:
        chain.sync(src)
        vm.write(2 * MiB, 4096, 0xD2)
        chain.state = {}
        res = chain.sync(src)
    c = res.counters
    assert c.mode == "hash" and "recorded no dirty bitmap" in c.extra["fallback"]
    assert c.bytes_read == 8 * MiB and c.bytes_written == 4096 and c.blocks_changed == 1
    assert same_content(vm, chain.head)
