"""Guest 2 (UEFI + LVM) and foreign-format exports of guest 1 convert and boot."""

from __future__ import annotations

from pathlib import Path

import pytest

import images
from p2v.vm.spec import VmSpec
from tests.guestssh import ssh_run, wait_ssh
from tests.vm.test_convert_linux import BOOT_TIMEOUT, LOGIN, boot, convert_json

pytestmark = pytest.mark.vm


def test_uefi_lvm_guest_converts_and_boots_under_ovmf(tmp_path: Path) -> None:
    facts = images.GUESTS["debian-uefi-lvm"]
    rep = convert_json(images.ensure("debian-uefi-lvm"), tmp_path, "uefi1")
    steps = {s["name"]: s for s in rep["steps"]}
    assert "UEFI fallback" in steps["bootloader"]["detail"]
    assert steps["initramfs"]["changed"]
    spec = VmSpec.load(tmp_path / "uefi1.vm.json")
    assert spec.firmware == "uefi"
    assert [n.guest_name for n in spec.nics] == ["ens192"]
    with boot(tmp_path, "uefi1") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        # static IP on ens192 works: the name is pinned to the VM's MAC
        wait_ssh(vm.ssh_port, console=vm.console_text)
        rc, out, err = ssh_run(
            vm.ssh_port,
            "hostname; findmnt -no SOURCE /; cat /sys/class/net/ens192/address; ip -4 -o addr show dev ens192",
        )
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0] == facts["hostname"]
        assert lines[1] == "/dev/mapper/vg0-root"
        assert lines[2] == spec.nics[0].mac
        assert "inet 10.0.2.15/24" in lines[3]


@pytest.mark.parametrize("export", ["vmdk-stream", "vhdx", "ova"])
def test_foreign_export_converts_and_boots(tmp_path: Path, export: str) -> None:
    name = f"debian-physical-bios.{export}"
    facts = images.GUESTS[name]
    extra = ("--net", "VM Network=dr-lan") if export == "ova" else ()
    rep = convert_json(images.ensure(name), tmp_path, "x1", *extra)
    spec = VmSpec.load(tmp_path / "x1.vm.json")
    assert [n.mac for n in spec.nics] == [facts["mac"]]
    if export == "ova":  # metadata from the OVF lands in the spec
        assert (spec.cpus, spec.memory_mib) == (facts["vcpus"], facts["memory_mib"])
        assert [(n.source_network, n.network) for n in spec.nics] == [("VM Network", "dr-lan")]
    assert rep["source_kind"] == ("ova" if export == "ova" else "disk")
    with boot(tmp_path, "x1") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        wait_ssh(vm.ssh_port, console=vm.console_text)
        _, out, _ = ssh_run(vm.ssh_port, "hostname; cat /sys/class/net/eth0/address")
        assert out.split() == [facts["hostname"], facts["mac"]]
