"""VMX reader: the real VMware .vmx fixtures against virt-v2v's reading, plus safety rules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2v.errors import InvalidInput, SourceNotFound, UnsafeInput
from p2v.sources.vmx import open_vmx, parse_vmx

FIXTURES = Path("/work/shared/fixtures/vmware")
VMX_FIXTURES = sorted(FIXTURES.glob("test-i-vmx-*.vmx"))
MiB = 1 << 20


@dataclass
class Expected:
    name: str = ""
    memory_mib: int = 0
    cpus: int = 0
    firmware: str = ""
    secure_boot: bool = False
    disk_buses: list[str] = field(default_factory=list)
    cdrom_buses: list[str] = field(default_factory=list)
    nics: list[tuple[str, str, str | None, str]] = field(default_factory=list)  # kind, net, mac, model


_NIC = re.compile(r'^(Network|Bridge) "([^"]*)"(?: mac: (\S+))? \[(\w+)\]$')


def read_expected(path: Path) -> Expected:
    """Parse virt-v2v's --print-source output."""
    exp = Expected()
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if raw.startswith("\t") and line:
            if section == "disks":
                exp.disk_buses.append(re.search(r"\[(\w+)\]", line).group(1))  # type: ignore[union-attr]
            elif section == "removable":
                exp.cdrom_buses.append(re.search(r"\[(\w+)\]", line).group(1))  # type: ignore[union-attr]
            elif section == "nics":
                m = _NIC.match(line)
                assert m, line
                exp.nics.append((m.group(1), m.group(2), m.group(3), m.group(4)))
            continue
        key, _, value = line.partition(":")
        value = value.strip()
        match key.strip():
            case "source name":
                exp.name = value
            case "memory":
                exp.memory_mib = int(value.split()[0]) // MiB
            case "nr vCPUs":
                exp.cpus = int(value)
            case "firmware":
                exp.firmware = value
            case "UEFI secureboot":
                exp.secure_boot = value == "true"
            case "disks":
                section = "disks"
            case "removable media":
                section = "removable"
            case "NICs":
                section = "nics"
    return exp


def test_all_fixtures_are_found() -> None:
    assert len(VMX_FIXTURES) == 7


@pytest.mark.parametrize("vmx", VMX_FIXTURES, ids=lambda p: p.stem)
def test_fixture_matches_virt_v2v_reading(vmx: Path) -> None:
    exp = read_expected(vmx.with_suffix(".expected"))
    desc = parse_vmx(vmx.read_text(), origin=str(vmx))
    assert desc.name == exp.name
    assert desc.memory_mib == exp.memory_mib
    assert desc.cpus == exp.cpus
    assert desc.firmware == exp.firmware
    assert desc.secure_boot == exp.secure_boot
    assert [d.bus for d in desc.disks] == exp.disk_buses
    cdrom_buses = [r.rstrip("0123456789:") for r in desc.removable]
    # virt-v2v lists only IDE CD-ROMs; we also see the SATA ones (vmx-2, -6, -7 have one each)
    assert [b for b in cdrom_buses if b == "ide"] == exp.cdrom_buses
    assert cdrom_buses.count("sata") == vmx.read_text().count('deviceType = "cdrom') - len(exp.cdrom_buses)
    assert len(desc.nics) == len(exp.nics)
    for nic, (kind, network, mac, model) in zip(desc.nics, exp.nics, strict=True):
        assert nic.mac == mac
        assert nic.model == model
        if kind == "Bridge" and network == f"ethernet{nic.index}":
            # virt-v2v shows the device name when the .vmx names no network (bridged NIC); we say None
            assert nic.network is None
            assert nic.connection_type == "bridged"
        else:
            assert nic.network == network


def test_21_disk_fixture_keeps_controller_then_unit_order() -> None:
    vmx = FIXTURES / "test-i-vmx-1.vmx"
    desc = parse_vmx(vmx.read_text(), origin=str(vmx))
    slots = [d.slot for d in desc.disks]
    assert slots[:8] == [f"scsi0:{u}" for u in (0, 1, 2, 3, 4, 5, 6, 8)]  # unit 7 is the HBA itself
    assert slots[-1] == "scsi1:5"
    assert desc.disks[7].filename == "BZ1308535_21disks_7.vmdk"
    assert desc.disks[15].filename == "BZ1308535_21disks_15.vmdk"
    assert {d.controller_model for d in desc.disks} == {"pvscsi"}


def _flat_vmdk(folder: Path, name: str, sectors: int = 2048) -> Path:
    """A tiny monolithicFlat VMDK: a descriptor and a (sparse) flat extent, no qemu needed."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = name.removesuffix(".vmdk") + "-flat.vmdk"
    with open(folder / flat, "wb") as f:
        f.truncate(sectors * 512)
    desc = folder / name
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW {sectors} FLAT "{flat}" 0\n\nddb.adapterType = "lsilogic"\n'
    )
    return desc


@pytest.mark.parametrize("vmx", VMX_FIXTURES, ids=lambda p: p.stem)
def test_open_fixture_with_placeholder_disks(vmx: Path, tmp_path: Path) -> None:
    desc = parse_vmx(vmx.read_text(), origin=str(vmx))
    for d in desc.disks:
        _flat_vmdk(tmp_path, d.filename)
    copy = tmp_path / vmx.name
    copy.write_bytes(vmx.read_bytes())
    exp = read_expected(vmx.with_suffix(".expected"))
    with open_vmx(copy) as machine:
        assert machine.kind == "vmx"
        assert machine.name == exp.name
        assert machine.cpus == exp.cpus
        assert machine.memory_mib == exp.memory_mib
        assert machine.firmware == exp.firmware
        assert [d.bus for d in machine.disks] == exp.disk_buses
        assert [Path(d.qemu_filename).name for d in machine.disks] == [d.filename for d in desc.disks]
        assert all(d.format == "vmdk" and d.capacity == 1 * MiB for d in machine.disks)
        assert [n.mac for n in machine.nics] == [n[2] for n in exp.nics]


VMX_HEAD = '.encoding = "UTF-8"\nconfig.version = "8"\n'


def test_quoted_escapes_and_case_insensitive_keys(tmp_path: Path) -> None:
    text = VMX_HEAD + (
        'DISPLAYNAME = "web |22front|22 |7C prod"\n'
        "MemSize = 512\n"
        'NumVCPUs = "4"  \n'
        '# comment line\n'
        'FIRMWARE = "EFI"\n'
        'SCSI0.Present = "TRUE"\nScsi0.VirtualDev = "LSILOGIC"\n'
        'scsi0:0.PRESENT = "true"\nscsi0:0.FileName = "a b.vmdk"\n'
    )
    desc = parse_vmx(text, origin="x.vmx")
    assert desc.name == 'web "front" | prod'
    assert (desc.memory_mib, desc.cpus, desc.firmware) == (512, 4, "uefi")
    disks = [(d.slot, d.filename, d.controller_model) for d in desc.disks]
    assert disks == [("scsi0:0", "a b.vmdk", "lsilogic")]


def test_absent_devices_and_cdroms_are_skipped() -> None:
    text = VMX_HEAD + (
        'scsi0.present = "TRUE"\n'
        'scsi0:0.present = "FALSE"\nscsi0:0.fileName = "gone.vmdk"\n'
        'scsi0:1.fileName = "no-present-key.vmdk"\n'
        'ide0:0.present = "TRUE"\nide0:0.deviceType = "atapi-cdrom"\nide0:0.fileName = "auto detect"\n'
        'ide0:1.present = "TRUE"\nide0:1.fileName = "/isos/x.iso"\n'
        'sata0.present = "FALSE"\nsata0:0.present = "TRUE"\nsata0:0.fileName = "ctl-absent.vmdk"\n'
        'nvme0.present = "TRUE"\nnvme0:0.present = "TRUE"\nnvme0:0.fileName = "real.vmdk"\n'
        'ethernet0.present = "FALSE"\nethernet0.virtualDev = "e1000"\n'
        'ethernet1.present = "TRUE"\nethernet1.addressType = "static"\n'
        'ethernet1.address = "00:50:56:AA:BB:CC"\nethernet1.generatedAddress = "00:0c:29:00:00:01"\n'
    )
    desc = parse_vmx(text, origin="x.vmx")
    assert [d.slot for d in desc.disks] == ["nvme0:0"]
    assert desc.removable == ["ide0:0", "ide0:1"]
    assert len(desc.nics) == 1
    assert desc.nics[0].index == 1
    assert desc.nics[0].mac == "00:50:56:aa:bb:cc"  # static wins over a stale generated one


def test_malformed_line_names_file_and_line() -> None:
    with pytest.raises(InvalidInput, match=r"bad\.vmx: line 3"):
        parse_vmx(VMX_HEAD + "this is not a pair\n", origin="bad.vmx")
    with pytest.raises(InvalidInput, match=r"bad\.vmx: line 3: unterminated"):
        parse_vmx(VMX_HEAD + 'memsize = "1024\n', origin="bad.vmx")
    with pytest.raises(InvalidInput, match=r"memsize"):
        parse_vmx(VMX_HEAD + 'memsize = "lots"\n', origin="bad.vmx")


def _vm(tmp_path: Path, filename: str) -> Path:
    vmx = tmp_path / "vm" / "vm.vmx"
    vmx.parent.mkdir(parents=True, exist_ok=True)
    vmx.write_text(
        VMX_HEAD + f'displayName = "vm"\nmemsize = "256"\nscsi0.present = "TRUE"\n'
        f'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "{filename}"\n'
    )
    return vmx


def test_disk_path_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    _flat_vmdk(tmp_path, "outside.vmdk")
    for name in ("../outside.vmdk", str(tmp_path / "outside.vmdk")):
        vmx = _vm(tmp_path, name)
        with pytest.raises(UnsafeInput) as err:
            open_vmx(vmx)
        assert str(vmx) in err.value.message
        assert "outside.vmdk" in err.value.message


def test_symlinked_disk_pointing_outside_is_refused(tmp_path: Path) -> None:
    target = _flat_vmdk(tmp_path / "elsewhere", "secret.vmdk")
    vmx = _vm(tmp_path, "disk.vmdk")
    (vmx.parent / "disk.vmdk").symlink_to(target)
    with pytest.raises(UnsafeInput, match=r"disk\.vmdk"):
        open_vmx(vmx)


def test_missing_disk_is_source_not_found(tmp_path: Path) -> None:
    vmx = _vm(tmp_path, "missing.vmdk")
    with pytest.raises(SourceNotFound) as err:
        open_vmx(vmx)
    assert "missing.vmdk" in err.value.message
    assert err.value.exit_code == 3


def test_disk_in_subfolder_and_windows_1252_encoding(tmp_path: Path) -> None:
    _flat_vmdk(tmp_path / "vm" / "disks", "d.vmdk")
    vmx = tmp_path / "vm" / "vm.vmx"
    vmx.write_bytes(
        b'.encoding = "windows-1252"\ndisplayName = "caf\xe9"\nmemsize = "128"\n'
        b'sata0.present = "TRUE"\nsata0:2.present = "TRUE"\nsata0:2.fileName = "disks/d.vmdk"\n'
    )
    with open_vmx(vmx) as machine:
        assert machine.name == "café"
        assert machine.disks[0].bus == "sata"
        assert machine.disks[0].label == "sata0:2"
        assert machine.firmware == "bios"
        assert machine.cpus == 1
