"""libvirt domain XML rendered from a VM spec (no libvirt needed: parsed back and compared)."""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as DET
import pytest

from p2v.errors import MissingComponent
from p2v.vm import libvirt
from p2v.vm.firmware import OvmfFirmware
from p2v.vm.libvirt import disk_dev_name, domain_xml
from p2v.vm.spec import DiskSpec, GuestInfo, NicSpec, VmSpec

OVMF = OvmfFirmware(Path("/fw/CODE_4M.fd"), Path("/fw/VARS_4M.fd"))


def render(spec: VmSpec, spec_dir: Path, ovmf: OvmfFirmware | None = OVMF) -> Element:
    text = domain_xml(spec, spec_dir, ovmf=ovmf)
    root: Element = DET.fromstring(text)
    return root


def attr(el: Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the first element at ``path`` below ``el`` (None when absent)."""
    found = el.find(path)
    return None if found is None else found.get(name)


def full_spec() -> VmSpec:
    return VmSpec(
        name="db1",
        cpus=4,
        memory_mib=3072,
        firmware="uefi",
        rtc="localtime",
        disks=[
            DiskSpec(path="db1-sda.qcow2", bus="virtio"),
            DiskSpec(path="/abs/db1-sdb.raw", format="raw", bus="virtio"),
            DiskSpec(path="db1-sdc.qcow2", bus="sata"),
            DiskSpec(path="db1-sdd.qcow2", bus="virtio-scsi"),
        ],
        nics=[
            NicSpec(mac="52:54:00:00:00:01", model="virtio", network="default"),
            NicSpec(mac="52:54:00:00:00:02", model="e1000", network="isolated"),
        ],
        guest=GuestInfo(type="linux", distro="debian", version="12"),
        source="ssh://root@db1.example",
    )


def test_domain_matches_the_spec(tmp_path: Path) -> None:
    root = render(full_spec(), tmp_path)
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("name") == "db1"
    assert attr(root, "memory", "unit") == "KiB"
    assert root.findtext("memory") == str(3072 * 1024)
    assert root.findtext("vcpu") == "4"
    assert attr(root, "clock", "offset") == "localtime"
    assert attr(root, "os/type", "machine") == "q35"
    assert "ssh://root@db1.example" in (root.findtext("description") or "")


def test_uefi_has_loader_and_per_domain_nvram(tmp_path: Path) -> None:
    os_el = render(full_spec(), tmp_path).find("os")
    assert os_el is not None
    loader = os_el.find("loader")
    assert loader is not None and loader.text == "/fw/CODE_4M.fd"
    assert loader.get("readonly") == "yes" and loader.get("type") == "pflash"
    nvram = os_el.find("nvram")
    assert nvram is not None and nvram.get("template") == "/fw/VARS_4M.fd"
    assert nvram.text == "/var/lib/libvirt/qemu/nvram/db1_VARS.fd"
    assert os_el.get("firmware") is None, "explicit loader and firmware='efi' are not combined"


def test_uefi_without_local_ovmf_lets_libvirt_choose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ovmf() -> OvmfFirmware:
        raise MissingComponent("no OVMF here")

    monkeypatch.setattr(libvirt, "find_ovmf", no_ovmf)
    os_el = render(full_spec(), tmp_path, ovmf=None).find("os")
    assert os_el is not None and os_el.get("firmware") == "efi" and os_el.find("loader") is None


def test_bios_has_no_loader(tmp_path: Path) -> None:
    os_el = render(VmSpec(name="old", firmware="bios"), tmp_path).find("os")
    assert os_el is not None and os_el.get("firmware") == "bios"
    assert os_el.find("loader") is None and os_el.find("nvram") is None


def test_disks_have_format_bus_and_linux_names(tmp_path: Path) -> None:
    root = render(full_spec(), tmp_path)
    disks = root.findall("devices/disk")
    got = [
        (
            attr(d, "source", "file"),
            attr(d, "driver", "type"),
            attr(d, "target", "dev"),
            attr(d, "target", "bus"),
        )
        for d in disks
    ]
    assert got == [
        (f"{tmp_path}/db1-sda.qcow2", "qcow2", "vda", "virtio"),
        ("/abs/db1-sdb.raw", "raw", "vdb", "virtio"),
        (f"{tmp_path}/db1-sdc.qcow2", "qcow2", "sda", "sata"),
        (f"{tmp_path}/db1-sdd.qcow2", "qcow2", "sdb", "scsi"),
    ]
    controllers = [(c.get("type"), c.get("model")) for c in root.findall("devices/controller")]
    assert controllers == [("scsi", "virtio-scsi")]


def test_ide_disks_force_machine_pc(tmp_path: Path) -> None:
    spec = VmSpec(
        name="nt",
        machine="q35",
        disks=[DiskSpec(path="a.qcow2", bus="ide"), DiskSpec(path="b.qcow2", bus="ide")],
    )
    root = render(spec, tmp_path)
    assert attr(root, "os/type", "machine") == "pc"
    assert [t.get("dev") for t in root.findall("devices/disk/target")] == ["hda", "hdb"]


def test_interfaces_keep_mac_model_and_network(tmp_path: Path) -> None:
    ifaces = render(full_spec(), tmp_path).findall("devices/interface")
    got = [
        (
            i.get("type"),
            attr(i, "mac", "address"),
            attr(i, "model", "type"),
            attr(i, "source", "network"),
        )
        for i in ifaces
    ]
    assert got == [
        ("network", "52:54:00:00:00:01", "virtio", "default"),
        ("network", "52:54:00:00:00:02", "e1000", "isolated"),
    ]


def test_serial_console_and_guest_agent_channel(tmp_path: Path) -> None:
    devices = render(full_spec(), tmp_path).find("devices")
    assert devices is not None
    assert attr(devices, "serial/target", "port") == "0"
    assert attr(devices, "console/target", "type") == "serial"
    channel = devices.find("channel/target")
    assert channel is not None and channel.get("name") == "org.qemu.guest_agent.0"
    assert channel.get("type") == "virtio"


def test_disk_names_continue_past_z() -> None:
    assert [disk_dev_name("sd", i) for i in (0, 25, 26, 27, 701, 702)] == [
        "sda",
        "sdz",
        "sdaa",
        "sdab",
        "sdzz",
        "sdaaa",
    ]


LIBVIRT_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


@pytest.mark.skipif(
    not LIBVIRT_SCHEMA.exists(), reason="libvirt's RelaxNG schemas are not installed (libvirt0)"
)
@pytest.mark.parametrize("firmware", ["uefi", "bios"])
def test_xml_validates_against_libvirts_own_schema(tmp_path: Path, firmware: str) -> None:
    etree = pytest.importorskip("lxml.etree")
    schema = etree.RelaxNG(etree.parse(str(LIBVIRT_SCHEMA)))
    spec = full_spec().model_copy(update={"firmware": firmware})
    spec.disks.append(DiskSpec(path="legacy.qcow2", bus="scsi"))
    doc = etree.fromstring(domain_xml(spec, tmp_path, ovmf=OVMF).encode())
    assert schema.validate(doc), str(schema.error_log)
