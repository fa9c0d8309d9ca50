"""OVF reader: real VMware OVF descriptors against virt-v2v's reading, XML safety, manifests, folders."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest

from p2v.errors import ChecksumMismatch, InvalidInput, UnsafeInput
from p2v.sources.ovf import (
    choose_format,
    detect_format,
    format_from_uri,
    normalize_href,
    open_ovf,
    parse_manifest,
    parse_ovf,
    unit_multiplier,
)
from tests.unit.test_vmx import read_expected

FIXTURES = Path("/work/shared/fixtures/vmware")
WITH_EXPECTED = sorted(p for p in FIXTURES.glob("*.ovf") if p.with_suffix(".expected").exists())
GiB = 1 << 30


def test_fixture_set() -> None:
    assert len(WITH_EXPECTED) == 6
    assert len(list(FIXTURES.glob("*.ovf"))) == 9


@pytest.mark.parametrize("ovf", WITH_EXPECTED, ids=lambda p: p.stem)
def test_fixture_matches_virt_v2v_reading(ovf: Path) -> None:
    exp = read_expected(ovf.with_suffix(".expected"))
    desc = parse_ovf(ovf.read_bytes(), origin=str(ovf))
    assert desc.name == exp.name
    assert desc.memory_mib == exp.memory_mib
    assert desc.cpus == exp.cpus
    assert desc.firmware == exp.firmware
    assert desc.secure_boot == exp.secure_boot
    assert [d.bus for d in desc.disks] == exp.disk_buses
    assert [d.order for d in desc.disks] == list(range(len(exp.disk_buses)))
    assert desc.removable == exp.cdrom_buses
    nics = [(n.network, n.mac, n.model) for n in desc.nics]
    assert nics == [(net, mac, model) for _, net, mac, model in exp.nics]


def test_fixture_disk_details() -> None:
    two = parse_ovf((FIXTURES / "test-i-ova-two-disks.ovf").read_bytes(), origin="two")
    assert [(d.href, d.format, d.capacity, d.controller, d.unit) for d in two.disks] == [
        ("disk1.vmdk", "vmdk", 50 * GiB, "lsisas1068", 0),
        ("disk2.vmdk", "vmdk", 450 * GiB, "lsisas1068", 1),
    ]
    assert [(f.href, f.size) for f in two.files] == [("disk1.vmdk", 7804077568), ("disk2.vmdk", 178523318784)]
    gz = parse_ovf((FIXTURES / "test-i-ova-gz.ovf").read_bytes(), origin="gz")
    assert gz.disks[0].file is not None
    assert (gz.disks[0].href, gz.disks[0].file.compression) == ("disk1.vmdk.gz", "gzip")
    assert gz.os_type == "windows7Server64Guest"
    assert gz.os_description == "Microsoft Windows Server 2008 R2 (64-bit)"


@pytest.mark.parametrize(
    ("fixture", "name", "cpus", "mem", "href", "capacity", "controller", "nets"),
    [
        ("test-i-ova-as-root.ovf", "ova-test", 2, 4096, "disk.vmdk", 512 << 20, "lsilogic", []),
        ("test-i-ova-checksums.ovf", "ova-test", 2, 4096, "disk.vmdk", 512 << 20, "lsilogic", []),
        ("test-i-ova.ovf", "TestOva", 1, 2048, "test-ova.vmdk", 32 * GiB, "lsisas1068", ["VM Network"]),
    ],
)
def test_fixtures_without_expected_file(fixture: str, name: str, cpus: int, mem: int, href: str,
                                        capacity: int, controller: str, nets: list[str]) -> None:
    desc = parse_ovf((FIXTURES / fixture).read_bytes(), origin=fixture)
    assert (desc.name, desc.cpus, desc.memory_mib, desc.firmware) == (name, cpus, mem, "bios")
    disks = [(d.href, d.capacity, d.bus, d.controller) for d in desc.disks]
    assert disks == [(href, capacity, "scsi", controller)]
    assert [n.network for n in desc.nics] == nets


# --- XML safety --------------------------------------------------------------------------------

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><VirtualSystem><Name>&d;</Name></VirtualSystem></Envelope>
"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><VirtualSystem><Name>&x;</Name></VirtualSystem></Envelope>
"""


@pytest.mark.parametrize("xml", [BOMB, XXE], ids=["billion-laughs", "external-entity"])
def test_dtd_and_entities_are_unsafe(xml: bytes) -> None:
    with pytest.raises(UnsafeInput) as err:
        parse_ovf(xml, origin="pkg.ova:vm.ovf")
    assert err.value.message.startswith("pkg.ova:vm.ovf: ")
    assert "DTD" in err.value.message
    assert err.value.exit_code == 4


def test_malformed_xml_reports_line_and_column() -> None:
    xml = b'<?xml version="1.0"?>\n<Envelope>\n  <References>\n</Envelope>\n'
    with pytest.raises(InvalidInput) as err:
        parse_ovf(xml, origin="vm.ovf")
    assert not isinstance(err.value, UnsafeInput)
    assert "vm.ovf: malformed XML at line 4, column 2" in err.value.message


def test_structural_errors() -> None:
    with pytest.raises(InvalidInput, match="not an OVF descriptor"):
        parse_ovf(b"<domain/>", origin="x.ovf")
    with pytest.raises(InvalidInput, match="no <VirtualSystem>"):
        parse_ovf(b'<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>', origin="x.ovf")
    second = b"<VirtualSystem><VirtualHardwareSection/></VirtualSystem></Envelope>"
    two = ovf_xml(items="").replace(b"</Envelope>", second)
    with pytest.raises(InvalidInput, match="describes 2 virtual machines"):
        parse_ovf(two, origin="x.ovf")
    dangling = ovf_xml(items=DISK_ITEM.replace("vmdisk1", "nosuchdisk"))
    with pytest.raises(InvalidInput, match="refers to 'ovf:/disk/nosuchdisk'"):
        parse_ovf(dangling, origin="x.ovf")


# --- synthetic OVFs -------------------------------------------------------------------------------

DISK_ITEM = """<Item><rasd:AddressOnParent>0</rasd:AddressOnParent>
<rasd:ElementName>Hard disk 1</rasd:ElementName>
<rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>9</rasd:InstanceID>
<rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>"""
SCSI_ITEM = """<Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>
<rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>"""


def ovf_xml(*, items: str = SCSI_ITEM + DISK_ITEM, href: str = "disk1.vmdk", size: str = "",
            compression: str = "", capacity: str = "1", units: str = "byte * 2^20", fmt: str = "",
            extra: str = "") -> bytes:
    size_attr = f' ovf:size="{size}"' if size else ""
    comp_attr = f' ovf:compression="{compression}"' if compression else ""
    fmt_attr = f' ovf:format="{fmt}"' if fmt else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
 xmlns:vmw="http://www.vmware.com/schema/ovf">
 <References><File ovf:href="{href}" ovf:id="file1"{size_attr}{comp_attr}/></References>
 <DiskSection><Info>disks</Info><Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="{units}"
  ovf:diskId="vmdisk1" ovf:fileRef="file1"{fmt_attr}/></DiskSection>
 {extra}
 <VirtualSystem ovf:id="synthetic"><Info>vm</Info>
  <VirtualHardwareSection><Info>hw</Info>
   <System><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
   <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
   <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
    <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>3</rasd:VirtualQuantity></Item>
   {items}
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>
""".encode()


def test_units_mac_models_and_name_fallback() -> None:
    nic = """<Item><rasd:Address>00-50-56-AB-CD-EF</rasd:Address><rasd:Connection>DMZ</rasd:Connection>
    <rasd:InstanceID>11</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
    <rasd:ResourceType>10</rasd:ResourceType></Item>"""
    xml = ovf_xml(items=SCSI_ITEM + DISK_ITEM + nic, capacity="2", units="byte * 2^30")
    desc = parse_ovf(xml, origin="x")
    assert desc.name == "synthetic"  # no <Name>: the VirtualSystem id
    assert (desc.cpus, desc.memory_mib, desc.firmware) == (2, 3072, "bios")
    assert desc.disks[0].capacity == 2 * GiB
    assert (desc.disks[0].bus, desc.disks[0].controller) == ("scsi", "pvscsi")
    assert [(n.mac, n.model, n.network) for n in desc.nics] == [("00:50:56:ab:cd:ef", "vmxnet3", "DMZ")]


def test_sata_nvme_and_ide_disks_are_ordered_by_bus_then_address() -> None:
    def ctl(iid: int, rtype: int, sub: str, addr: int) -> str:
        return (f"<Item><rasd:Address>{addr}</rasd:Address><rasd:InstanceID>{iid}</rasd:InstanceID>"
                f"<rasd:ResourceSubType>{sub}</rasd:ResourceSubType><rasd:ResourceType>{rtype}</rasd:ResourceType>"
                "</Item>")

    def disk(parent: int, unit: int, name: str) -> str:
        return (f"<Item><rasd:AddressOnParent>{unit}</rasd:AddressOnParent><rasd:ElementName>{name}"
                f"</rasd:ElementName><rasd:HostResource>ovf:/file/file1</rasd:HostResource>"
                f"<rasd:Parent>{parent}</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>")

    items = (ctl(20, 5, "PIIX4", 0) + ctl(21, 20, "vmware.nvme.controller", 0) + ctl(22, 20, "AHCI", 0)
             + ctl(3, 6, "lsilogic", 0)
             + disk(20, 0, "ide") + disk(21, 0, "nvme") + disk(22, 1, "sata1") + disk(22, 0, "sata0")
             + disk(3, 0, "scsi") + DISK_ITEM.replace("Hard disk 1", "vmdisk"))
    desc = parse_ovf(ovf_xml(items=items), origin="x")
    assert [(d.label, d.bus, d.controller) for d in desc.disks] == [
        ("scsi", "scsi", "lsilogic"),
        ("vmdisk", "scsi", "lsilogic"),
        ("sata0", "sata", "ahci"),
        ("sata1", "sata", "ahci"),
        ("ide", "ide", "piix4"),
        ("nvme", "nvme", "nvme"),
    ]


def test_firmware_efi_secure_boot_and_deployment_option() -> None:
    extra = """<DeploymentOptionSection><Info>sizes</Info>
      <Configuration ovf:id="small"><Label>small</Label></Configuration>
      <Configuration ovf:id="large" ovf:default="true"><Label>large</Label></Configuration>
    </DeploymentOptionSection>"""
    items = SCSI_ITEM + DISK_ITEM + """
      <Item ovf:configuration="small"><rasd:InstanceID>30</rasd:InstanceID>
       <rasd:ResourceType>3</rasd:ResourceType>
       <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item ovf:configuration="large"><rasd:InstanceID>31</rasd:InstanceID>
       <rasd:ResourceType>3</rasd:ResourceType>
       <rasd:VirtualQuantity>8</rasd:VirtualQuantity></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="uefi.secureBoot.enabled" vmw:value="true"/>"""
    desc = parse_ovf(ovf_xml(items=items, extra=extra), origin="x")
    assert desc.cpus == 8
    assert (desc.firmware, desc.secure_boot) == ("uefi", True)


def test_unit_and_format_helpers() -> None:
    assert unit_multiplier("byte * 2^20", default=1, origin="x") == 1 << 20
    assert unit_multiplier("byte*10^9", default=1, origin="x") == 10**9
    assert unit_multiplier("MegaBytes", default=1, origin="x") == 1 << 20
    assert unit_multiplier(None, default=7, origin="x") == 7
    with pytest.raises(InvalidInput, match="unknown allocation units 'furlongs'"):
        unit_multiplier("furlongs", default=1, origin="x")
    stream = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
    assert format_from_uri(stream) == "vmdk"
    assert format_from_uri("http://www.gnome.org/~markmc/qcow-image-format.html") == "qcow2"
    assert format_from_uri(None) is None
    assert detect_format(b"QFI\xfb\0\0\0\3") == "qcow2"
    assert detect_format(b"KDMV\1\0\0\0") == "vmdk"
    assert detect_format(b"\0" * 16) is None
    assert choose_format(None, None, label="x") == "raw"
    with pytest.raises(InvalidInput, match="x: the OVF says vmdk but the file is qcow2"):
        choose_format("qcow2", "vmdk", label="x")
    with pytest.raises(InvalidInput, match="no vmdk header"):
        choose_format(None, "vmdk", label="x")


def test_manifest_and_href_rules() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    text = f"SHA256(disk1.vmdk)= {digest}\nSHA1(vm.ovf)={'A' * 40}\n\n"
    entries = parse_manifest(text, origin="vm.mf")
    assert [(e.algorithm, e.name, e.digest) for e in entries] == [
        ("sha256", "disk1.vmdk", digest), ("sha1", "vm.ovf", "a" * 40)]
    with pytest.raises(InvalidInput, match=r"vm\.mf: line 1 is not a manifest line"):
        parse_manifest("MD5(disk1.vmdk)= 00\n", origin="vm.mf")
    with pytest.raises(InvalidInput, match="wrong length"):
        parse_manifest("SHA256(disk1.vmdk)= abcd\n", origin="vm.mf")
    assert normalize_href("./sub/disk1.vmdk", base="", origin="o") == "sub/disk1.vmdk"
    assert normalize_href("disk1.vmdk", base="vm", origin="o") == "vm/disk1.vmdk"
    for bad in ("../x.vmdk", "/etc/passwd", "a/../../x", "http://evil/disk.vmdk", "C:\\x.vmdk"):
        with pytest.raises(UnsafeInput, match=re.escape(repr(bad))):
            normalize_href(bad, base="", origin="o")


# --- unpacked OVF folders (placeholder flat VMDKs: no qemu needed) -----------------------------------------


def flat_vmdk(folder: Path, name: str, sectors: int = 2048) -> Path:
    flat = name.removesuffix(".vmdk") + "-flat.vmdk"
    with open(folder / flat, "wb") as f:
        f.truncate(sectors * 512)
    (folder / name).write_text(
        f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW {sectors} FLAT "{flat}" 0\n'
    )
    return folder / name


def fixture_folder(tmp_path: Path, fixture: str) -> Path:
    """Copy a fixture OVF into a folder with placeholder disks (ovf:size dropped: they differ)."""
    xml = re.sub(rb' ovf:size="\d+"', b"", (FIXTURES / fixture).read_bytes())
    ovf = tmp_path / "vm.ovf"
    ovf.write_bytes(xml)
    for d in parse_ovf(xml, origin=fixture).disks:
        assert d.href
        flat_vmdk(tmp_path, d.href)
    return ovf


def test_open_two_disk_fixture_folder(tmp_path: Path) -> None:
    ovf = fixture_folder(tmp_path, "test-i-ova-two-disks.ovf")
    with open_ovf(ovf) as machine:
        assert machine.kind == "ovf"
        assert machine.name == "2K8R2EESP1_2_Medium"
        assert (machine.cpus, machine.memory_mib, machine.firmware) == (1, 1024, "bios")
        assert [Path(d.qemu_filename).name for d in machine.disks] == ["disk1.vmdk", "disk2.vmdk"]
        assert [(d.format, d.bus, d.controller, d.label) for d in machine.disks] == [
            ("vmdk", "scsi", "lsisas1068", "Hard disk 1"), ("vmdk", "scsi", "lsisas1068", "Hard disk 2")]
        assert [d.capacity for d in machine.disks] == [1 << 20, 1 << 20]  # the image's size, not the OVF's
        assert [(n.network, n.model) for n in machine.nics] == [("PG-VLAN60", "e1000")]
        assert any("no manifest" in n for n in machine.notes)


def write_manifest(folder: Path, algo: str = "sha256", override: dict[str, str] | None = None) -> Path:
    lines = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".mf":
            continue
        digest = (override or {}).get(f.name) or hashlib.new(algo, f.read_bytes()).hexdigest()
        lines.append(f"{algo.upper()}({f.name})= {digest}")
    mf = folder / "vm.mf"
    mf.write_text("\n".join(lines) + "\n")
    return mf


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha512"])
def test_folder_manifest_verified(tmp_path: Path, algo: str) -> None:
    ovf = fixture_folder(tmp_path, "test-i-ova-formats.ovf")
    write_manifest(tmp_path, algo)
    with open_ovf(ovf) as machine:
        assert not any("manifest" in n for n in machine.notes)


def test_folder_manifest_mismatch(tmp_path: Path) -> None:
    ovf = fixture_folder(tmp_path, "test-i-ova-formats.ovf")
    wrong = "0" * 64
    write_manifest(tmp_path, override={"disk1-flat.vmdk": wrong})
    real = hashlib.sha256((tmp_path / "disk1-flat.vmdk").read_bytes()).hexdigest()
    with pytest.raises(ChecksumMismatch) as err:
        open_ovf(ovf)
    assert "disk1-flat.vmdk" in err.value.message
    assert wrong in err.value.message and real in err.value.message


def test_folder_missing_disk_and_escaping_href(tmp_path: Path) -> None:
    ovf = fixture_folder(tmp_path, "test-i-ova-formats.ovf")
    (tmp_path / "disk1.vmdk").unlink()
    with pytest.raises(InvalidInput, match=r"disk file 'disk1\.vmdk' is referenced but missing"):
        open_ovf(ovf)
    ovf.write_bytes(ovf_xml(href="../outside.vmdk"))
    with pytest.raises(UnsafeInput, match=r"'\.\./outside\.vmdk'"):
        open_ovf(ovf)


def test_folder_size_mismatch_means_truncated(tmp_path: Path) -> None:
    flat_vmdk(tmp_path, "disk1.vmdk")
    ovf = tmp_path / "vm.ovf"
    ovf.write_bytes(ovf_xml(size="999999"))
    with pytest.raises(InvalidInput, match=r"the OVF says 999999 bytes, the package holds \d+ \(truncated"):
        open_ovf(ovf)


def test_gzip_bomb_is_refused_and_cleaned_up(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    with gzip.open(pkg / "disk1.vmdk.gz", "wb", compresslevel=1) as gz:
        zeros = bytes(1 << 20)
        for _ in range(80):  # 80 MiB of zeros for a disk declared as 1 MiB
            gz.write(zeros)
    ovf = pkg / "vm.ovf"
    ovf.write_bytes(ovf_xml(href="disk1.vmdk.gz", compression="gzip", capacity="1"))
    work = tmp_path / "work"
    with pytest.raises(UnsafeInput) as err:
        open_ovf(ovf, workdir=work)
    assert "disk1.vmdk.gz" in err.value.message
    assert "expands beyond" in err.value.message
    assert list(work.iterdir()) == []
