"""LVM snapshot views on a real Linux source: the "physical" Debian guest (kernel 6.1, LVM
2.03.16) runs under QEMU with a second 256 MiB disk, SSH forwarded to loopback. Each test lays
out GPT + LVM on that disk, mounts it, and reads it through consistent_view over SSH.

(The same scenario runs in tests/integration on hosts whose kernel has device-mapper.)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import images
from images.boot import boot_guest
from p2v.errors import RemoteError
from p2v.replication.consistency import consistent_view
from p2v.sources.ssh_session import SshSession
from tests.integration.test_consistency import (
    build_lvm_disk,
    lvm_snapshot_scenario,
    remote_p2v_objects,
    remote_sh,
    remove_lvm_disk,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

GUEST = "debian-physical-bios"
DISK = "/dev/sdb"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The booted guest's SSH port and a known_hosts file for it."""
    work = tmp_path_factory.mktemp("consistency-guest")
    extra = work / "p2vtest-sdb.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "256M"], check=True)
    facts = images.GUESTS[GUEST]
    drive = ["-drive", f"file={extra},format=qcow2,if=none,id=disk1,cache=unsafe",
             "-device", "ide-hd,drive=disk1,bus=ide.1"]  # fmt: skip
    with boot_guest(images.ensure(GUEST), fmt="raw", disk_bus="ide", mac=facts["mac"], extra_args=drive) as vm:
        vm.wait_for_login(timeout=600)
        vm.wait_for_ssh(timeout=120)
        assert vm.ssh_port is not None
        known = work / "known_hosts"
        known.write_text(images.known_hosts_line("127.0.0.1", vm.ssh_port))
        yield vm.ssh_port, known


def _session(guest: tuple[int, Path]) -> SshSession:
    port, known = guest
    return SshSession("127.0.0.1", port=port, user="root", identity=images.test_ssh_key(), known_hosts=known)


def _wipe(session: SshSession) -> None:
    remote_sh(session, f"wipefs -qa {DISK}1 {DISK}2 {DISK}3 2>/dev/null; wipefs -qa {DISK}; true")


def test_lvm_snapshot_point_holds_the_data_as_it_was(guest: tuple[int, Path], tmp_path: Path) -> None:
    with _session(guest) as s:
        _wipe(s)
        timings = lvm_snapshot_scenario(s, DISK, DISK, tmp_path)
    print(f"lvm snapshot view timings (TCG guest, 256 MiB disk over SSH): {timings}")


def test_a_snapshot_that_overflows_during_the_read_fails_the_point(guest: tuple[int, Path]) -> None:
    vg, root = "p2vtestov", "/run/p2vtest-ov"
    with _session(guest) as s:
        _wipe(s)
        try:
            build_lvm_disk(s, DISK, DISK, vg, root)
            # leave 12 free extents (48 MiB) and only the data LV active (filler and logs are not): its COW
            # gets all 48 MiB
            free = f"$(vgs --noheadings -o vg_free_count {vg})"
            filler = f"lvcreate -q -y -an -Zn -n filler -l $(({free} - 12)) {vg}"
            remote_sh(s, f"umount {root}/logs && lvchange -an {vg}/logs && {filler}")
            with pytest.raises(RemoteError, match=rf"snapshot of {vg}/data overflowed its 48 MiB"):
                with consistent_view(s, DISK, "lvm-snapshot") as view:
                    assert f"{vg}/data (48 MiB cow)" in view.detail
                    # the source rewrites 60 MiB while the point is read: more than the COW holds
                    remote_sh(s, f"dd if=/dev/urandom of={root}/data/old.bin bs=1M count=60 conv=notrunc,fsync "
                           "status=none")  # fmt: skip
            assert remote_p2v_objects(s) == ""
        finally:
            remove_lvm_disk(s, vg, root)


def test_leftovers_of_a_dropped_connection_are_removed_by_the_next_run(guest: tuple[int, Path]) -> None:
    vg, root = "p2vtestdrop", "/run/p2vtest-drop"
    with _session(guest) as s:
        _wipe(s)
        build_lvm_disk(s, DISK, DISK, vg, root)
    try:
        a = _session(guest)
        a.connect()
        with consistent_view(a, DISK, "auto") as view:
            assert view.method == "lvm-snapshot"
            crashed = view.device.rsplit("/", 1)[1].removeprefix("p2v-view-").split("-")[0]
            a.transport.close()  # the connection drops while the point is being read
        assert any("connection lost" in w for w in view.warnings)
        a.close()
        with _session(guest) as b:
            left = remote_p2v_objects(b)
            assert crashed in left and "p2v-snap" in left and "p2v-view" in left
            t0 = time.monotonic()
            with consistent_view(b, DISK, "auto") as again:
                assert again.method == "lvm-snapshot"
                assert crashed not in remote_p2v_objects(b)
            print(f"second run incl. removal of the crashed run's leftovers: {time.monotonic() - t0:.1f} s")
            assert again.warnings == []
            assert remote_p2v_objects(b) == ""
    finally:
        with _session(guest) as s:
            remove_lvm_disk(s, vg, root)
