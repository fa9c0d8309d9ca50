"""A recovery point of the "physical" test guest (protected as an image file) booted as a DR VM:
converted on an overlay, it boots on virtio and answers SSH with the drill's extra file in place;
a second boot returns the running VM; while it runs its point is pinned and retention defers;
it is stopped by `poweroff` over SSH (stop_source); what it wrote is in its overlay and not in
the chain (layer and map byte-identical); discarding it leaves no file, no pin and no QEMU.
A point that holds no OS fails to prepare and leaves nothing behind."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

import images
from p2v.disks.guestfs import open_guestfs
from p2v.errors import UnsupportedGuest
from p2v.protection.service import ProtectOptions, protect_add
from p2v.protection.sources import SshOptions
from p2v.recovery.drvm import (
    RecoverySettings,
    RecoveryVm,
    boot_recovery_vm,
    discard_recovery_vm,
    prepare_recovery_vm,
    stop_recovery_vm,
)
from p2v.recovery.sources import source_reachable, stop_source
from p2v.site import Site
from p2v.site.pins import RetentionOutcome, active_pins
from p2v.vm.spec import DiskSpec, VmSpec
from tests.guestssh import ssh_run, wait_ssh
from tests.vm.test_convert_linux import BOOT_TIMEOUT, G1, LOGIN

pytestmark = pytest.mark.vm

DRILL_FILE = "/etc/p2v-drill-segment.conf"
DR_WRITE = "/root/written-at-dr.txt"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def qemu_pids(name: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", "--", f"-name {name} "], capture_output=True, text=True).stdout
    return out.split()


def test_recovery_vm_boots_from_a_point_and_leaves_the_chain_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    facts = images.GUESTS[G1]
    root, work = tmp_path / "site", tmp_path / "work"
    t0 = time.monotonic()
    protect_add(root, "db", [str(images.ensure(G1))], ProtectOptions())
    t_protect = time.monotonic() - t0
    site = Site.open(root)
    layer, hmap = site.point_image("db", 1), site.point_map("db", 1)
    before = (sha256(layer), sha256(hmap))
    settings = RecoverySettings(vm_name="db-drill", drill=True, memory_mib=1024,
                                extra_files={DRILL_FILE: "segment drill-1\n"})  # fmt: skip
    rvm = prepare_recovery_vm(site, "db", None, work, settings)
    timings = rvm.conversion["timings"]
    rounded = {k: round(v, 1) for k, v in timings.items()}
    print(f"\nprotect_add {t_protect:.1f}s; prepare {timings['prepare_total']:.1f}s: {rounded}; "
          f"overlay {rvm.conversion['bytes_allocated']} B")  # fmt: skip
    assert rvm.point["seq"] == 1 and rvm.point["layers"] == [str(layer)]
    assert [Path(p).name for p in rvm.overlays] == ["db-drill-disk0.qcow2"]
    steps = {s["name"]: s for s in rvm.conversion["steps"]}
    assert steps["initramfs"]["changed"] and steps["guest-files"]["detail"] == DRILL_FILE
    # preparing again (a resumed run) reuses the finished work
    assert prepare_recovery_vm(site, "db", 1, work, settings) == rvm

    t0 = time.monotonic()
    booted = boot_recovery_vm(rvm, wait_for=LOGIN, wait_timeout=BOOT_TIMEOUT)
    try:
        print(f"boot to login {time.monotonic() - t0:.1f}s")
        assert booted.detached and not booted.resumed and booted.ssh_port
        again = boot_recovery_vm(rvm)
        assert again.resumed and again.pid == booted.pid
        assert qemu_pids("db-drill") == [str(booted.pid)], "a second boot must not start a second QEMU"
        pins = active_pins(site, "db")
        assert [(p.seq, p.holder, p.pid) for p in pins] == [(1, "vm:db-drill", booted.pid)]
        retention = site.apply_retention("db")
        assert isinstance(retention, RetentionOutcome)
        assert retention.deferred == ["deferred: point 1 pinned by vm:db-drill"]

        wait_ssh(booted.ssh_port, console=lambda: Path(booted.console_log).read_text(errors="replace"))
        rc, out, err = ssh_run(booted.ssh_port, f"hostname; cat {DRILL_FILE}; cat {facts['marker'][0]}; "
                                                "findmnt -no SOURCE /; cat /sys/class/net/eth0/address; "
                                                f"echo 'DR data' > {DR_WRITE}; sync")  # fmt: skip
        assert rc == 0, err
        # eth0 keeps the MAC the guest's config binds it to (the source's), so its network comes up
        assert out.splitlines() == [facts["hostname"], "segment drill-1", facts["marker"][1], "/dev/vda1",
                                    facts["mac"]]  # fmt: skip

        known = tmp_path / "known_hosts"
        known.write_text(images.known_hosts_line("127.0.0.1", booted.ssh_port))
        url = f"ssh://root@127.0.0.1:{booted.ssh_port}/dev/vda"
        assert source_reachable(url)
        stopped = stop_source(url, timeout=120, ssh_options=SshOptions(images.test_ssh_key(), known))
        print(f"stop_source over SSH: {stopped.method} in {stopped.seconds}s")
        assert stopped.method == "poweroff"
        assert stop_source(url, timeout=10).method == "already-stopped"
    finally:
        result = stop_recovery_vm("db-drill", timeout=60)
    assert result.method in ("not-running", "powerdown"), result
    assert qemu_pids("db-drill") == []
    assert active_pins(site, "db") == []  # the QEMU is gone: its pin lapsed

    with open_guestfs([(rvm.overlays[0], "qcow2")], readonly=True) as g:
        g.mount_ro("/dev/sda1", "/")
        assert g.cat(DR_WRITE) == "DR data\n"
    assert (sha256(layer), sha256(hmap)) == before, "the recovery point's layer or map changed"

    removed = discard_recovery_vm(rvm)
    assert sorted(Path(p).name for p in removed) == ["db-drill-disk0.qcow2", "db-drill.recovery.json",
                                                     "db-drill.vm.json"]  # fmt: skip
    assert not work.exists()
    assert discard_recovery_vm(rvm) == []  # idempotent
    site.close()


def test_a_point_without_an_os_fails_to_prepare_and_leaves_nothing(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    with blank.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"not an operating system" * 1000)
    root, work = tmp_path / "site", tmp_path / "work"
    protect_add(root, "blank", [str(blank)], ProtectOptions())
    with Site.open(root) as site:
        with pytest.raises(UnsupportedGuest):
            prepare_recovery_vm(site, "blank", 1, work, RecoverySettings(vm_name="blank-dr", drill=True))
        assert not work.exists()
        assert active_pins(site, "blank") == []
        assert site.catalog.query("SELECT count(*) FROM point_pins")[0][0] == 0


def test_a_child_vm_stops_with_its_handle_and_a_detached_one_starts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No guest OS needed: a blank disk, the firmware spins."""
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    work = tmp_path / "work"
    work.mkdir()
    disk = work / "nos-disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    VmSpec(name="nos", cpus=1, memory_mib=128, disks=[DiskSpec(path=disk.name)]).save(work / "nos.vm.json")
    rvm = RecoveryVm(vm_name="nos", machine="nos", site_root=str(tmp_path / "site"), workdir=str(work),
                     spec_path=str(work / "nos.vm.json"), overlays=[str(disk)], point={"seq": 1}, conversion={},
                     pin_holder="vm:nos", drill=False)  # fmt: skip
    child = boot_recovery_vm(rvm, detached=False)
    assert child.vm is not None and not child.detached
    assert qemu_pids("nos") == [str(child.pid)]
    assert child.stop(timeout=0, hard=True).method == "quit"
    assert qemu_pids("nos") == []
    first = boot_recovery_vm(rvm)
    second = boot_recovery_vm(rvm)
    assert (second.pid, second.resumed, first.resumed) == (first.pid, True, False)
    assert qemu_pids("nos") == [str(first.pid)]
    assert sorted(Path(p).name for p in discard_recovery_vm(rvm, timeout=5)) == [
        "nos-disk0.qcow2", "nos.vm.json"]  # fmt: skip
    assert qemu_pids("nos") == [] and not work.exists()
