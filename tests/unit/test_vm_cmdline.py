"""The QEMU command line built from a VM spec (no QEMU is started here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2v.errors import InvalidInput, MissingComponent, UsageError
from p2v.vm.accel import AccelVerdict
from p2v.vm.cmdline import RunOverrides, build_command, effective_machine, run_files
from p2v.vm.firmware import OvmfFirmware, find_ovmf
from p2v.vm.spec import DiskSpec, NicSpec, VmSpec

TCG = AccelVerdict("tcg", False, "test", "max", 0.0)
KVM = AccelVerdict("kvm", True, "test", "host", 0.0)
OVMF = OvmfFirmware(Path("/fw/CODE.fd"), Path("/fw/VARS.fd"))
MAC1 = "52:54:00:aa:bb:01"
MAC2 = "52:54:00:aa:bb:02"


def values(cmd: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` in ``cmd``, in order."""
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]


def devices(cmd: list[str], driver: str) -> list[str]:
    return [d for d in values(cmd, "-device") if d.split(",")[0] == driver]


def spec_with(**kw: object) -> VmSpec:
    base: dict[str, object] = {"name": "web1", "disks": [DiskSpec(path="web1-sda.qcow2")]}
    base.update(kw)
    return VmSpec.model_validate(base)


def build(spec: VmSpec, tmp_path: Path, **ov: Any) -> list[str]:
    return build_command(
        spec, tmp_path / "out", tmp_path / "run", accel=TCG, overrides=RunOverrides(**ov), ovmf=OVMF
    )


def test_bios_virtio_defaults(tmp_path: Path) -> None:
    cmd = build(spec_with(cpus=2, memory_mib=2048), tmp_path)
    assert cmd[0] == "qemu-system-x86_64"
    assert values(cmd, "-machine") == ["q35"]
    assert values(cmd, "-smp") == ["2"] and values(cmd, "-m") == ["2048"]
    assert "-nodefaults" in cmd and "-no-user-config" in cmd and values(cmd, "-display") == ["none"]
    assert "-snapshot" not in cmd
    # disk path resolved against the spec's folder, explicit format, no cache mode unless asked
    assert values(cmd, "-drive") == [
        f"file={tmp_path}/out/web1-sda.qcow2,format=qcow2,if=none,id=disk0,discard=unmap"
    ]
    assert devices(cmd, "virtio-blk-pci") == ["virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1"]
    assert not any("pflash" in d for d in values(cmd, "-drive")), "BIOS guests use QEMU's default SeaBIOS"


def test_accel_args_follow_the_verdict(tmp_path: Path) -> None:
    cmd = build(spec_with(), tmp_path)
    assert values(cmd, "-accel") == ["tcg,thread=multi"] and values(cmd, "-cpu") == ["max"]
    cmd = build_command(spec_with(), tmp_path, tmp_path / "run", accel=KVM)
    assert values(cmd, "-accel") == ["kvm"] and values(cmd, "-cpu") == ["host"]


def test_uefi_uses_readonly_code_and_a_per_vm_vars_copy(tmp_path: Path) -> None:
    cmd = build(spec_with(firmware="uefi"), tmp_path)
    pflash = [d for d in values(cmd, "-drive") if d.startswith("if=pflash")]
    assert pflash == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd",
        f"if=pflash,format=raw,unit=1,file={tmp_path}/run/OVMF_VARS.fd",
    ]


def test_uefi_without_ovmf_names_the_missing_firmware(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2V_OVMF_CODE", str(tmp_path / "nope-CODE.fd"))
    monkeypatch.setenv("P2V_OVMF_VARS", str(tmp_path / "nope-VARS.fd"))
    with pytest.raises(MissingComponent, match=r"nope-CODE\.fd"):
        build_command(spec_with(firmware="uefi"), tmp_path, tmp_path / "run", accel=TCG)


def test_find_ovmf_takes_the_first_complete_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2V_OVMF_CODE", raising=False)
    monkeypatch.delenv("P2V_OVMF_VARS", raising=False)
    (tmp_path / "A_CODE.fd").write_bytes(b"x")  # its VARS is missing: the pair is skipped
    (tmp_path / "B_CODE.fd").write_bytes(b"x")
    (tmp_path / "B_VARS.fd").write_bytes(b"x")
    pairs = [(str(tmp_path / f"{p}_CODE.fd"), str(tmp_path / f"{p}_VARS.fd")) for p in "AB"]
    assert find_ovmf(pairs) == OvmfFirmware(tmp_path / "B_CODE.fd", tmp_path / "B_VARS.fd")
    with pytest.raises(MissingComponent, match="OVMF"):
        find_ovmf(pairs[:1])


def test_virtio_scsi_shares_one_controller(tmp_path: Path) -> None:
    spec = spec_with(
        disks=[
            DiskSpec(path="a.qcow2", bus="virtio-scsi"),
            DiskSpec(path="b.raw", format="raw", bus="virtio-scsi"),
        ]
    )
    cmd = build(spec, tmp_path)
    assert devices(cmd, "virtio-scsi-pci") == ["virtio-scsi-pci,id=scsi0"]
    hds = devices(cmd, "scsi-hd")
    assert "drive=disk0" in hds[0] and "scsi-id=0" in hds[0]
    assert "drive=disk1" in hds[1] and "scsi-id=1" in hds[1] and "bus=scsi0.0" in hds[1]
    assert "format=raw" in values(cmd, "-drive")[1]


def test_legacy_scsi_uses_an_lsi_controller(tmp_path: Path) -> None:
    cmd = build(spec_with(disks=[DiskSpec(path="a.qcow2", bus="scsi")]), tmp_path)
    assert devices(cmd, "lsi53c895a") == ["lsi53c895a,id=lsi0"]
    assert "bus=lsi0.0" in devices(cmd, "scsi-hd")[0]


def test_sata_on_q35_uses_the_builtin_ahci(tmp_path: Path) -> None:
    spec = spec_with(disks=[DiskSpec(path="a.qcow2", bus="sata"), DiskSpec(path="b.qcow2", bus="sata")])
    cmd = build(spec, tmp_path)
    assert values(cmd, "-machine") == ["q35"]
    assert devices(cmd, "ich9-ahci") == []
    assert ["bus=ide.0" in d for d in devices(cmd, "ide-hd")] == [True, False]
    assert "bus=ide.1" in devices(cmd, "ide-hd")[1]


def test_sata_on_pc_adds_an_ahci_controller(tmp_path: Path) -> None:
    cmd = build(spec_with(machine="pc", disks=[DiskSpec(path="a.qcow2", bus="sata")]), tmp_path)
    assert values(cmd, "-machine") == ["pc"]
    assert devices(cmd, "ich9-ahci") == ["ich9-ahci,id=sata0"]
    assert "bus=sata0.0" in devices(cmd, "ide-hd")[0]


def test_ide_switches_to_pc_and_fills_channels(tmp_path: Path) -> None:
    spec = spec_with(disks=[DiskSpec(path=f"d{i}.qcow2", bus="ide") for i in range(3)])
    cmd = build(spec, tmp_path)
    assert values(cmd, "-machine") == ["pc"]
    placement = [d.split(",")[-2:] for d in devices(cmd, "ide-hd")]
    assert placement == [["bus=ide.0", "unit=0"], ["bus=ide.0", "unit=1"], ["bus=ide.1", "unit=0"]]


def test_ide_with_forced_q35_is_refused(tmp_path: Path) -> None:
    spec = spec_with(disks=[DiskSpec(path="a.qcow2", bus="ide")])
    with pytest.raises(UsageError, match="IDE disks need machine type pc"):
        build(spec, tmp_path, machine="q35")
    assert effective_machine(spec, RunOverrides(machine="pc")) == "pc"


def test_too_many_disks_on_one_controller_are_refused(tmp_path: Path) -> None:
    spec = spec_with(disks=[DiskSpec(path=f"d{i}.qcow2", bus="sata") for i in range(7)])
    with pytest.raises(InvalidInput, match="more than 6 SATA disks"):
        build(spec, tmp_path)
    spec = spec_with(disks=[DiskSpec(path=f"d{i}.qcow2", bus="ide") for i in range(5)])
    with pytest.raises(InvalidInput, match="more than 4 IDE disks"):
        build(spec, tmp_path)


@pytest.mark.parametrize(
    ("model", "device"),
    [
        ("virtio", "virtio-net-pci"),
        ("e1000", "e1000"),
        ("e1000e", "e1000e"),
        ("rtl8139", "rtl8139"),
        ("vmxnet3", "vmxnet3"),
    ],
)
def test_each_nic_model_keeps_its_mac(tmp_path: Path, model: str, device: str) -> None:
    cmd = build(spec_with(nics=[NicSpec(mac=MAC1, model=model)]), tmp_path)  # type: ignore[arg-type]
    assert devices(cmd, device) == [f"{device},netdev=net0,mac={MAC1},id=nic0"]


def test_isolated_network_is_restricted_and_first_nic_gets_ssh(tmp_path: Path) -> None:
    spec = spec_with(nics=[NicSpec(mac=MAC1, network="isolated"), NicSpec(mac=MAC2, network="lan")])
    cmd = build(spec, tmp_path, ssh_port=2222)
    assert values(cmd, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
        "user,id=net1",
    ]
    assert values(build(spec, tmp_path), "-netdev")[0] == "user,id=net0,restrict=on", "no port, no forward"


def test_overrides_replace_spec_hardware(tmp_path: Path) -> None:
    spec = spec_with(nics=[NicSpec(mac=MAC1, model="e1000")], cpus=1, memory_mib=1024)
    cmd = build(
        spec, tmp_path, disk_bus="sata", nic_model="virtio", memory_mib=512, cpus=4,
        machine="pc", cache="unsafe", extra_args=("-S", "-boot", "menu=on"),
    )  # fmt: skip
    assert values(cmd, "-machine") == ["pc"] and values(cmd, "-smp") == ["4"] and values(cmd, "-m") == ["512"]
    assert devices(cmd, "ide-hd") and not devices(cmd, "virtio-blk-pci")
    assert devices(cmd, "virtio-net-pci") and not devices(cmd, "e1000")
    assert values(cmd, "-drive")[0].endswith(",cache=unsafe")
    assert cmd[-3:] == ["-S", "-boot", "menu=on"], "extra args come last so they can override"


def test_snapshot_boots_on_overlays_in_the_run_dir(tmp_path: Path) -> None:
    spec = spec_with(disks=[DiskSpec(path="a.raw", format="raw"), DiskSpec(path="b.qcow2")])
    cmd = build(spec, tmp_path, snapshot=True)
    assert "-snapshot" not in cmd
    assert [d.split(",")[:2] for d in values(cmd, "-drive")] == [
        [f"file={tmp_path}/run/overlay-0.qcow2", "format=qcow2"],
        [f"file={tmp_path}/run/overlay-1.qcow2", "format=qcow2"],
    ]
    assert not any("a.raw" in a for a in cmd), "the original disk is only the overlay's backing file"


@pytest.mark.parametrize("rtc", ["utc", "localtime"])
def test_rtc_base(tmp_path: Path, rtc: str) -> None:
    assert values(build(spec_with(rtc=rtc), tmp_path), "-rtc") == [f"base={rtc}"]


def test_console_qmp_and_guest_agent_live_in_the_run_dir(tmp_path: Path) -> None:
    cmd = build(spec_with(), tmp_path)
    run = tmp_path / "run"
    chardevs = values(cmd, "-chardev")
    assert (
        f"socket,id=console0,path={run}/console.sock,server=on,wait=off,"
        f"logfile={run}/console.log,logappend=on"
    ) in chardevs
    assert f"socket,id=qmp0,path={run}/qmp.sock,server=on,wait=off" in chardevs
    assert values(cmd, "-mon") == ["chardev=qmp0,mode=control"]
    assert devices(cmd, "isa-serial") == ["isa-serial,chardev=console0"]
    assert devices(cmd, "virtserialport") == [
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"
    ]
    assert values(cmd, "-pidfile") == [f"{run}/qemu.pid"]


def test_commas_in_paths_are_escaped(tmp_path: Path) -> None:
    cmd = build(spec_with(disks=[DiskSpec(path="a,b.qcow2")]), tmp_path)
    assert values(cmd, "-drive")[0].startswith(f"file={tmp_path}/out/a,,b.qcow2,format=qcow2")


def test_long_run_dirs_put_sockets_somewhere_short(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120) / "run"
    files = run_files(deep)
    assert files.console_log == deep / "console.log"
    assert len(str(files.qmp_socket)) < 108
    assert files.socket_dir == run_files(deep).socket_dir, "the socket folder must be stable for a run dir"
    cmd = build_command(spec_with(), tmp_path, deep, accel=TCG)
    assert any(str(files.qmp_socket) in c for c in values(cmd, "-chardev"))
    assert run_files(tmp_path / "run").socket_dir == tmp_path / "run"
