"""Bad input gets one error line naming the input and the problem, a documented exit code,
and an output directory left exactly as it was."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.sshd import LoopbackSshd

pytestmark = pytest.mark.integration


def p2v(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2v", *args], capture_output=True, text=True, check=False)


def assert_refused(
    src: str | Path, tmp_path: Path, code: int, *needles: str, extra: tuple[str, ...] = (), fresh: bool = True
) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("untouched")
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    proc = p2v("convert", str(src), "--out", str(out), "--name", "bad", *extra)
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("p2v: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    if fresh:  # a fresh output directory is not even created
        new = tmp_path / "fresh-out"
        proc2 = p2v("convert", str(src), "--out", str(new), *extra)
        assert proc2.returncode == code and not new.exists()
    return errors[0]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_missing_source(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.raw", tmp_path, 3, "nope.raw", "no such file")


def test_truncated_vmdk(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\x5a" * (8 << 20))
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse", str(raw), str(vmdk))
    with vmdk.open("r+b") as f:
        f.truncate(vmdk.stat().st_size // 2)
    assert_refused(vmdk, tmp_path, 4, "disk.vmdk", "truncated")


def test_random_bytes_named_vhdx(tmp_path: Path) -> None:
    p = tmp_path / "disk.vhdx"
    p.write_bytes(hashlib.sha256(b"x").digest() * 4096)
    assert_refused(p, tmp_path, 4, "disk.vhdx", "VHDX")


def test_qcow2_backing_file_outside_its_directory(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    qemu_img("create", "-f", "raw", str(other / "base.raw"), "16M")
    img = tmp_path / "img"
    img.mkdir()
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "../other/base.raw", str(img / "disk.qcow2"))
    assert_refused(img / "disk.qcow2", tmp_path, 4, "disk.qcow2", "outside")


def _ova(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


OVF = b"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References><File ovf:href="disk1.vmdk" ovf:id="file1"/></References>
 <DiskSection><Info>disks</Info><Disk ovf:capacity="16777216" ovf:diskId="vmdisk1" ovf:fileRef="file1"
  ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
 <VirtualSystem ovf:id="vm"><Info>vm</Info><Name>vm</Name>
  <VirtualHardwareSection><Info>hw</Info>
   <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>1</rasd:VirtualQuantity><rasd:ElementName>cpu</rasd:ElementName></Item>
   <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
    <rasd:VirtualQuantity>512</rasd:VirtualQuantity><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
    <rasd:ElementName>mem</rasd:ElementName></Item>
   <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType>
    <rasd:ElementName>scsi</rasd:ElementName></Item>
   <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>3</rasd:Parent>
    <rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
    <rasd:ElementName>disk</rasd:ElementName></Item>
  </VirtualHardwareSection></VirtualSystem></Envelope>
"""


@pytest.fixture(scope="module")
def small_vmdk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("vmdk")
    qemu_img("create", "-f", "raw", str(d / "r.raw"), "16M")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             str(d / "r.raw"), str(d / "disk1.vmdk"))  # fmt: skip
    return (d / "disk1.vmdk").read_bytes()


@pytest.mark.parametrize("member", ["../evil.vmdk", "/etc/evil.vmdk"])
def test_ova_member_escaping_the_archive(tmp_path: Path, small_vmdk: bytes, member: str) -> None:
    ova = _ova(tmp_path / "vm.ova", [(tarfile.TarInfo("vm.ovf"), OVF), (tarfile.TarInfo(member), small_vmdk)])
    assert_refused(ova, tmp_path, 4, "vm.ova", member.lstrip("/").split("/")[-1])


def test_ova_manifest_checksum_mismatch(tmp_path: Path, small_vmdk: bytes) -> None:
    mf = f"SHA256(vm.ovf)= {hashlib.sha256(OVF).hexdigest()}\nSHA256(disk1.vmdk)= {'0' * 64}\n".encode()
    ova = _ova(tmp_path / "vm.ova", [(tarfile.TarInfo("vm.ovf"), OVF), (tarfile.TarInfo("disk1.vmdk"), small_vmdk),
                                     (tarfile.TarInfo("vm.mf"), mf)])  # fmt: skip
    assert_refused(ova, tmp_path, 4, "vm.ova", "disk1.vmdk")


def test_ovf_entity_bomb(tmp_path: Path, small_vmdk: bytes) -> None:
    bomb = b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">' + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10)
    ) + b"]>\n<Envelope>&lol9;</Envelope>\n"
    (tmp_path / "vm.ovf").write_bytes(bomb)
    (tmp_path / "disk1.vmdk").write_bytes(small_vmdk)
    assert_refused(tmp_path / "vm.ovf", tmp_path, 4, "vm.ovf")


def test_image_with_no_operating_system(tmp_path: Path) -> None:
    img = tmp_path / "blank.raw"
    qemu_img("create", "-f", "raw", str(img), "64M")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    assert_refused(img, tmp_path, 5, "blank.raw", "no operating system", fresh=False)


@pytest.fixture(scope="module")
def luks_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from p2v.disks.guestfs import open_guestfs

    img = tmp_path_factory.mktemp("luks") / "encrypted.raw"
    qemu_img("create", "-f", "raw", str(img), "64M")
    with open_guestfs([(img, "raw")], readonly=False) as g:
        g.part_disk("/dev/sda", "mbr")
        g.luks_format("/dev/sda1", "correct horse", 0)
        g.cryptsetup_open("/dev/sda1", "correct horse", "root")
        g.mkfs("ext4", "/dev/mapper/root")
    return img


def test_luks_root_without_key(tmp_path: Path, luks_disk: Path) -> None:
    assert_refused(luks_disk, tmp_path, 5, "encrypted.raw", "LUKS", "--luks-key", fresh=False)


def test_luks_with_wrong_key(tmp_path: Path, luks_disk: Path) -> None:
    key = tmp_path / "key"
    key.write_text("wrong\n")
    assert_refused(luks_disk, tmp_path, 5, "encrypted.raw", "LUKS", extra=("--luks-key", str(key)), fresh=False)


@pytest.fixture
def sshd(tmp_path: Path):
    server = LoopbackSshd(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_ssh_host_not_trusted(tmp_path: Path, sshd: LoopbackSshd) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    line = assert_refused(sshd.url(disk), tmp_path, 6, f"127.0.0.1:{sshd.port}", "p2v trust",
                          extra=("--known-hosts", str(empty), "--identity", str(sshd.client_key)))  # fmt: skip
    assert sshd.host_fingerprint() in line


def test_ssh_host_key_changed(tmp_path: Path, sshd: LoopbackSshd) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text())
    sshd.rotate_host_key()
    assert_refused(sshd.url(disk), tmp_path, 6, f"127.0.0.1:{sshd.port}", "changed",
                   extra=("--known-hosts", str(known), "--identity", str(sshd.client_key)))  # fmt: skip


def test_windows_version_without_drivers(tmp_path: Path) -> None:
    import images

    iso = images.ensure("virtio-win-iso")
    line = assert_refused(images.ensure("windows-2008"), tmp_path, 5, "Windows", "2008",
                          extra=("--virtio-win", str(iso)), fresh=False)  # fmt: skip
    assert str(iso) in line or iso.name in line


def test_windows_without_virtio_win_is_a_usage_error(tmp_path: Path) -> None:
    import images

    assert_refused(images.ensure("windows-2019"), tmp_path, 2, "Windows", "--virtio-win", fresh=False)


def test_luks_with_the_right_key_gets_past_decryption(tmp_path: Path, luks_disk: Path) -> None:
    key = tmp_path / "key"
    key.write_text("correct horse\n")
    line = assert_refused(luks_disk, tmp_path, 5, "encrypted.raw", "no operating system",
                          extra=("--luks-key", str(key)), fresh=False)  # fmt: skip
    assert "--luks-key" not in line
