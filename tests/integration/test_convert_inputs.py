"""VHD, flat VMDK (descriptor + extent) and VMX inputs inspect and convert correctly
(the converted disks of the bootable formats are booted in tests/vm)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import images
from p2v.vm.spec import VmSpec

pytestmark = pytest.mark.integration


def p2v_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "p2v", *args, "--json"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("export", ["vhd", "vmdk-flat", "vmx"])
def test_inspect_and_convert(tmp_path: Path, export: str) -> None:
    name = f"debian-physical-bios.{export}"
    facts = images.GUESTS[name]
    src = images.ensure(name)

    rep = p2v_json("inspect", str(src))
    g = rep["guest"]
    assert (g["type"], g["distro"], g["hostname"]) == ("linux", "debian", facts["hostname"])
    assert g["firmware"] == "bios" and g["mountpoints"] == {"/": "/dev/sda1"}
    lx = rep["linux"]
    boot = [k for k in lx["kernels"] if k["boots"]]
    assert len(boot) == 1 and boot[0]["virtio_in_initrd"] == []  # not converted yet
    assert "virtio_blk" in boot[0]["virtio_available"]
    assert lx["initramfs_tool"] == "initramfs-tools" and lx["bootloader"] == "grub2-bios"
    assert {(n["name"], n["mac"]) for n in lx["nics"]} == {("eth0", facts["mac"])}
    assert any(r["device"] == "/dev/sda1" and r["file"] == "/etc/fstab" for r in lx["devrefs"])
    if export == "vmx":
        md = rep["metadata"]
        assert (md["cpus"], md["memory_mib"]) == (facts["vcpus"], facts["memory_mib"])
        assert [n["mac"] for n in md["nics"]] == [facts["mac"]]

    out = tmp_path / "out"
    conv = p2v_json("convert", str(src), "--out", str(out), "--name", "c1")
    assert {s["name"] for s in conv["steps"] if s["changed"]} >= {"device-names", "initramfs", "nic-names"}
    spec = VmSpec.load(out / "c1.vm.json")
    assert [n.mac for n in spec.nics] == [facts["mac"]]
    if export == "vmx":
        assert (spec.cpus, spec.memory_mib) == (facts["vcpus"], facts["memory_mib"])

    if export != "vhd":
        return
    # the converted disk reads back converted
    after = p2v_json("inspect", str(out / "c1-disk0.qcow2"))
    kern = next(k for k in after["linux"]["kernels"] if k["boots"])
    assert set(kern["virtio_in_initrd"]) >= {"virtio_blk", "virtio_pci", "virtio_net", "virtio_scsi"}
    assert not after["linux"]["devrefs"], after["linux"]["devrefs"]
