"""Live QEMU protection of a booted guest: the "physical" Debian test guest runs on a qcow2
overlay (so QEMU keeps its dirty bitmaps in the image) with a QMP socket; it is seeded through
QEMU's own point-in-time export, then a file written in the guest with ``dd`` reaches the next
recovery point, which reads about what ``dd`` wrote (dirty extents only, not the 3 GiB disk).
The recovery point is checked with libguestfs: the file is there with the guest's checksum."""

from __future__ import annotations

from pathlib import Path

import pytest

import images
from images.boot import boot_guest
from p2v.disks.guestfs import open_guestfs
from p2v.replication.qemu_live import LiveQemuSource
from tests.integration.test_qemu_live import Chain
from tests.vm.test_convert_linux import BOOT_TIMEOUT, G1

pytestmark = pytest.mark.vm

MiB = 1 << 20
BLOB = "/root/live-blob"
BLOB_MIB = 32


def test_dd_in_guest_reaches_next_point_reading_only_dirty_extents(tmp_path: Path) -> None:
    facts = images.GUESTS[G1]
    qmp = tmp_path / "qmp.sock"
    with boot_guest(images.ensure(G1), fmt="raw", disk_bus="ide", nic_model="e1000", mac=facts["mac"],
                    extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"]) as guest:  # fmt: skip
        guest.wait_for_login(timeout=BOOT_TIMEOUT)
        guest.wait_for_ssh(timeout=120)
        # "disk0" is boot_guest's -drive id: the source finds the qcow2 node behind it.
        with LiveQemuSource(qmp, "disk0", work_dir=tmp_path) as src:
            chain = Chain(tmp_path, src.size)
            seed = chain.sync(src)
            assert seed.counters.mode == "seed" and seed.state["persistent"] is True
            assert 200 * MiB < seed.counters.bytes_read < src.size // 2  # allocated data only
            res = guest.ssh(f"dd if=/dev/urandom of={BLOB} bs=1M count={BLOB_MIB} conv=fsync status=none && "
                            f"sync && sha256sum {BLOB}")  # fmt: skip
            assert res.rc == 0, res.stderr
            checksum = res.stdout.split()[0]
            inc = chain.sync(src)
    c = inc.counters
    print(f"\nlive guest: seed {seed.counters.bytes_read / MiB:.0f} MiB in {seed.counters.wall_s:.1f}s; "
          f"after dd {BLOB_MIB} MiB: read {c.bytes_read / MiB:.1f} MiB in {c.wall_s:.2f}s, "
          f"{c.extra['dirty_extents']} dirty extents")  # fmt: skip
    assert c.mode == "bitmap" and c.extra["bitmap"] == "p2v-1"
    # The file plus what the guest wrote around it (ext4 metadata, journal, logs): not the disk.
    assert BLOB_MIB * MiB <= c.bytes_read <= BLOB_MIB * MiB * 1.1 + 16 * MiB, c
    assert c.wall_s < seed.counters.wall_s
    with open_guestfs([(chain.head, "qcow2")], readonly=True) as g:
        root = next(d for d, fs in g.list_filesystems().items() if fs == "ext4")
        g.mount_ro(root, "/")
        assert g.checksum("sha256", BLOB) == checksum
