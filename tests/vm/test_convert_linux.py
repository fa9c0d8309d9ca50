"""Guest 1 (the "physical" Debian server) converted with `p2v convert` boots on virtio,
answers SSH with its MAC-bound network config, and still boots on IDE + e1000."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import images
from p2v.vm.cmdline import RunOverrides
from p2v.vm.runtime import VirtualMachine
from p2v.vm.spec import VmSpec
from tests.guestssh import ssh_run, wait_ssh

pytestmark = pytest.mark.vm
G1 = "debian-physical-bios"
LOGIN = r"login: ?"
BOOT_TIMEOUT = 600


def run_p2v(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "p2v", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"p2v {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def convert_json(src: Path | str, out: Path, name: str, *extra: str) -> dict:
    proc = run_p2v("convert", str(src), "--out", str(out), "--name", name, "--json", *extra)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def g1_converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("g1-converted")
    t0 = time.monotonic()
    report = convert_json(images.ensure(G1), out, "srv1")
    report["_wall"] = time.monotonic() - t0
    return out, report


def boot(out: Path, name: str, **overrides: object) -> VirtualMachine:
    spec = VmSpec.load(out / f"{name}.vm.json")
    ov = RunOverrides(snapshot=True, memory_mib=1024, cache="unsafe", **overrides)  # type: ignore[arg-type]
    return VirtualMachine(spec, out, overrides=ov)


def check_network_identity(port: int, expect_driver: str) -> None:
    facts = images.GUESTS[G1]
    rc, out, err = ssh_run(
        port,
        "hostname; cat /sys/class/net/eth0/address; basename $(readlink /sys/class/net/eth0/device/driver); "
        "ip -4 -o addr show dev eth0; findmnt -no SOURCE /; cat /proc/cmdline; "
        f"cat {facts['marker'][0]}",
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == facts["hostname"]
    assert lines[1] == facts["mac"], "eth0 must keep the source NIC's MAC"
    assert lines[2] == expect_driver
    assert "inet 10.0.2.15/24" in lines[3], "eth0 must get its DHCP address with the same config"
    assert "root=UUID=" in lines[5] and "/dev/sda1" not in lines[5]
    assert lines[6] == facts["marker"][1]


def test_conversion_report_says_what_changed(g1_converted: tuple[Path, dict]) -> None:
    out, rep = g1_converted
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["device-names"]["changed"] and "/dev/sda1 -> UUID=" in steps["device-names"]["detail"]
    assert steps["initramfs"]["changed"] and "virtio_blk" in steps["initramfs"]["detail"]
    assert steps["nic-names"]["changed"] and "eth0=00:1b:21:3a:4f:5e" in steps["nic-names"]["detail"]
    spec = VmSpec.load(out / "srv1.vm.json")
    assert [d.bus for d in spec.disks] == ["virtio"]
    assert [(n.mac, n.model, n.guest_name) for n in spec.nics] == [("00:1b:21:3a:4f:5e", "virtio", "eth0")]
    assert (out / "srv1.xml").read_text().lstrip().startswith("<domain")
    assert sorted(p.name for p in out.iterdir()) == ["srv1-disk0.qcow2", "srv1.vm.json", "srv1.xml"]


def test_converted_guest_boots_on_virtio_and_answers_ssh(g1_converted: tuple[Path, dict]) -> None:
    out, _ = g1_converted
    with boot(out, "srv1") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        wait_ssh(vm.ssh_port, console=vm.console_text)
        check_network_identity(vm.ssh_port, "virtio_net")
        _, dev, _ = ssh_run(vm.ssh_port, "findmnt -no SOURCE /; swapon --show=NAME --noheadings")
        assert dev.split() == ["/dev/vda1", "/dev/vda2"]


def test_converted_disk_still_boots_on_ide_and_e1000(g1_converted: tuple[Path, dict]) -> None:
    out, _ = g1_converted
    with boot(out, "srv1", disk_bus="ide", nic_model="e1000", machine="pc") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        wait_ssh(vm.ssh_port, console=vm.console_text)
        check_network_identity(vm.ssh_port, "e1000")
        _, dev, _ = ssh_run(vm.ssh_port, "findmnt -no SOURCE /")
        assert dev.strip() == "/dev/sda1"


def test_already_converted_guest_converts_without_changes(
    g1_converted: tuple[Path, dict], tmp_path: Path
) -> None:
    out, first = g1_converted
    t0 = time.monotonic()
    rep = convert_json(out / "srv1-disk0.qcow2", tmp_path, "again")
    wall = time.monotonic() - t0
    changed = [s["name"] for s in rep["steps"] if s["changed"]]
    assert changed == [], f"a converted guest needs no changes, got {changed}"
    # nothing rebuilt: much cheaper than the first conversion
    assert wall < first["_wall"], (wall, first["_wall"])


def test_rebuild_with_the_guests_own_tools_boots_on_virtio(tmp_path: Path) -> None:
    """--rebuild guest: update-initramfs and grub-mkconfig run in the appliance (the default when
    KVM works; minutes under TCG, which is why `auto` uses the host-side path there)."""
    rep = convert_json(images.ensure(G1), tmp_path, "srv-guesttool", "--rebuild", "guest")
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["initramfs"]["detail"].startswith("initramfs-tools rebuilt /boot/initrd.img-")
    assert steps["bootloader"]["detail"].startswith("regenerated /boot/grub/grub.cfg")
    with boot(tmp_path, "srv-guesttool") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        wait_ssh(vm.ssh_port, console=vm.console_text)
        check_network_identity(vm.ssh_port, "virtio_net")
