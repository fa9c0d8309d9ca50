"""OVA packages built here with tarfile around real qemu-img-made VMDKs; VMDK truncation checks.

Every failure test checks the exception type, that the message names the OVA and the
member at fault, and that nothing was left behind in ``workdir``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2v.errors import ChecksumMismatch, InvalidInput, P2VError, UnsafeInput
from p2v.sources.model import SourceMachine
from p2v.sources.ova import open_ova
from p2v.sources.vmdk import validate_vmdk

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1 << 20
STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


def qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4 MiB raw disk with recognisable content, and VMDKs made from it by qemu-img."""
    d = tmp_path_factory.mktemp("images")
    raw = bytearray(4 * MiB)
    raw[0:MiB] = os.urandom(MiB)
    raw[3 * MiB : 3 * MiB + 5000] = b"p2v-ova" * 714 + b"p2"
    (d / "disk.raw").write_bytes(bytes(raw))
    out = {"raw": d / "disk.raw"}
    for sub in ("streamOptimized", "monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"):
        out[sub] = d / f"{sub}.vmdk"
        qemu_img(
            "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(out["raw"]), str(out[sub])
        )
    out["qcow2"] = d / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(out["raw"]), str(out["qcow2"]))
    out["qcow2-backed"] = d / "backed.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(out["qcow2-backed"]), "4M")
    return out


def ovf_for(
    href: str, *, size: int | None, compression: str = "", fmt: str = STREAM, capacity: int = 4
) -> bytes:
    size_attr = f' ovf:size="{size}"' if size is not None else ""
    comp_attr = f' ovf:compression="{compression}"' if compression else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
 xmlns:vmw="http://www.vmware.com/schema/ovf">
 <References><File ovf:href="{href}" ovf:id="file1"{size_attr}{comp_attr}/></References>
 <DiskSection><Info>disks</Info><Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte * 2^20"
  ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="{fmt}"/></DiskSection>
 <VirtualSystem ovf:id="web01"><Info>vm</Info><Name>web01</Name>
  <VirtualHardwareSection><Info>hw</Info>
   <System><vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType></System>
   <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
    <rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
   <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
    <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>768</rasd:VirtualQuantity></Item>
   <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>
    <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
   <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName>
    <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>9</rasd:InstanceID>
    <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
   <Item><rasd:Address>00:50:56:01:02:03</rasd:Address><rasd:Connection>VM Network</rasd:Connection>
    <rasd:InstanceID>11</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
    <rasd:ResourceType>10</rasd:ResourceType></Item>
   <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
  </VirtualHardwareSection>
 </VirtualSystem>
</Envelope>
""".encode()


Member = tuple[str, bytes] | tarfile.TarInfo


def make_ova(path: Path, members: list[Member], *, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)  # addfile keeps the name as given (no stripping of "/")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def manifest(files: dict[str, bytes], algo: str = "sha256") -> tuple[str, bytes]:
    lines = [f"{algo.upper()}({n})= {hashlib.new(algo, data).hexdigest()}\n" for n, data in files.items()]
    return ("vm.mf", "".join(lines).encode())


def good_members(images: dict[str, Path], algo: str = "sha256") -> list[Member]:
    disk = images["streamOptimized"].read_bytes()
    ovf = ovf_for("disk1.vmdk", size=len(disk))
    return [("vm.ovf", ovf), manifest({"vm.ovf": ovf, "disk1.vmdk": disk}, algo), ("disk1.vmdk", disk)]


def converted(machine: SourceMachine, tmp_path: Path) -> bytes:
    (disk,) = machine.disks
    out = tmp_path / "out.raw"
    qemu_img("convert", "-f", disk.format, "-O", "raw", disk.qemu_filename, str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def leftovers(workdir: Path) -> list[Path]:
    return list(workdir.rglob("*")) if workdir.exists() else []


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "work"


# --- good packages -----------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha512"])
def test_good_ova_is_read_in_place(images: dict[str, Path], tmp_path: Path, workdir: Path, algo: str) -> None:
    ova = make_ova(tmp_path / "web01.ova", good_members(images, algo))
    with open_ova(ova, workdir=workdir) as machine:
        assert machine.kind == "ova"
        assert (machine.name, machine.cpus, machine.memory_mib, machine.firmware) == ("web01", 2, 768, "uefi")
        assert [(n.mac, n.model, n.network) for n in machine.nics] == [
            ("00:50:56:01:02:03", "vmxnet3", "VM Network")
        ]
        (disk,) = machine.disks
        assert disk.qemu_filename.startswith("json:")
        assert str(ova.absolute()) in disk.qemu_filename
        assert (disk.format, disk.capacity, disk.bus, disk.controller) == (
            "vmdk",
            4 * MiB,
            "scsi",
            "lsilogic",
        )
        assert disk.display == f"{ova}:disk1.vmdk"
        assert not leftovers(workdir)  # nothing copied
        assert converted(machine, tmp_path) == images["raw"].read_bytes()


@pytest.mark.parametrize(
    ("image", "fmt_uri", "fmt"),
    [
        ("monolithicSparse", "http://www.vmware.com/interfaces/specifications/vmdk.html#sparse", "vmdk"),
        ("qcow2", "http://www.gnome.org/~markmc/qcow-image-format.html", "qcow2"),
        ("raw", "", "raw"),
    ],
)
def test_other_formats_are_read_in_place(
    images: dict[str, Path], tmp_path: Path, workdir: Path, image: str, fmt_uri: str, fmt: str
) -> None:
    data = images[image].read_bytes()
    ovf = ovf_for(f"disk1.{fmt}", size=len(data), fmt=fmt_uri)
    ova = make_ova(tmp_path / "x.ova", [("vm.ovf", ovf), (f"disk1.{fmt}", data)])
    with open_ova(ova, workdir=workdir) as machine:
        (disk,) = machine.disks
        assert disk.qemu_filename.startswith("json:")
        assert (disk.format, disk.capacity) == (fmt, 4 * MiB)
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
    assert not leftovers(workdir)


def test_ovf_not_first_and_in_a_subfolder(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    disk = images["streamOptimized"].read_bytes()
    ovf = ovf_for("disk1.vmdk", size=len(disk))
    ova = make_ova(
        tmp_path / "x.ova", [special("vm", tarfile.DIRTYPE), ("./vm/disk1.vmdk", disk), ("./vm/vm.ovf", ovf)]
    )
    with open_ova(ova, workdir=workdir) as machine:
        assert machine.disks[0].display == f"{ova}:vm/disk1.vmdk"
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
        assert any("no manifest" in n for n in machine.notes)


def test_gzip_member_is_extracted_and_cleaned(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    gz = gzip.compress(images["streamOptimized"].read_bytes(), compresslevel=1)
    ovf = ovf_for("disk1.vmdk.gz", size=len(gz), compression="gzip")
    ova = make_ova(
        tmp_path / "gz.ova",
        [("vm.ovf", ovf), manifest({"vm.ovf": ovf, "disk1.vmdk.gz": gz}, "sha1"), ("disk1.vmdk.gz", gz)],
    )
    machine = open_ova(ova, workdir=workdir)
    try:
        (disk,) = machine.disks
        assert Path(disk.qemu_filename).is_file()
        assert Path(disk.qemu_filename).is_relative_to(workdir.absolute())
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
    finally:
        machine.close()
    assert not leftovers(workdir)


def test_compressed_ova_and_unpacked_folder(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    members = good_members(images)
    ova = make_ova(tmp_path / "web01.ova", members, mode="w:gz")
    with open_ova(ova, workdir=workdir) as machine:
        assert machine.kind == "ova"
        assert machine.disks[0].display == f"{ova}:disk1.vmdk"
        assert leftovers(workdir)  # extracted while open
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
    assert not leftovers(workdir)

    folder = tmp_path / "unpacked"
    folder.mkdir()
    for name, data in members:  # type: ignore[misc]
        (folder / name).write_bytes(data)
    with open_ova(folder, workdir=workdir) as machine:
        assert machine.kind == "ovf"
        assert machine.disks[0].qemu_filename == str(folder / "disk1.vmdk")
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
    assert not leftovers(workdir)


# --- refused packages ---------------------------------------------------------------------------


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def expect_failure(ova: Path, workdir: Path, error: type[P2VError], *needles: str) -> P2VError:
    with pytest.raises(error) as err:
        open_ova(ova, workdir=workdir)
    message = err.value.message
    assert str(ova) in message, message
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message
    assert "p2v-ova-" not in message  # never our scratch folder
    assert not leftovers(workdir)
    return err.value


@pytest.mark.parametrize("mode", ["w", "w:gz"])
@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (("../evil", b"x"), "'../evil'"),
        (("vm/../../evil", b"x"), "'vm/../../evil'"),
        (("/etc/cron.d/evil", b"x"), "'/etc/cron.d/evil'"),
        (special("disk2.vmdk", tarfile.SYMTYPE, "/etc/shadow"), "'disk2.vmdk' is a symbolic link"),
        (special("disk2.vmdk", tarfile.LNKTYPE, "disk1.vmdk"), "'disk2.vmdk' is a hard link"),
        (special("fifo", tarfile.FIFOTYPE), "'fifo' is a device or fifo"),
        (special("sda", tarfile.BLKTYPE), "'sda' is a device or fifo"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo", "blockdev"],
)
def test_unsafe_members_are_refused(
    images: dict[str, Path], tmp_path: Path, workdir: Path, member: Member, needle: str, mode: str
) -> None:
    ova = make_ova(tmp_path / "evil.ova", [*good_members(images), member], mode=mode)
    expect_failure(ova, workdir, UnsafeInput, needle)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_manifest_mismatch(images: dict[str, Path], tmp_path: Path, workdir: Path, mode: str) -> None:
    disk = images["streamOptimized"].read_bytes()
    ovf = ovf_for("disk1.vmdk", size=len(disk))
    fake = "ab" * 32
    mf = f"SHA256(vm.ovf)= {hashlib.sha256(ovf).hexdigest()}\nSHA256(disk1.vmdk)= {fake}\n".encode()
    ova = make_ova(tmp_path / "bad.ova", [("vm.ovf", ovf), ("vm.mf", mf), ("disk1.vmdk", disk)], mode=mode)
    expect_failure(ova, workdir, ChecksumMismatch, "disk1.vmdk", fake, hashlib.sha256(disk).hexdigest())


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_manifest_mismatch_on_gzip_member(
    images: dict[str, Path], tmp_path: Path, workdir: Path, mode: str
) -> None:
    gz = gzip.compress(images["streamOptimized"].read_bytes(), compresslevel=1)
    ovf = ovf_for("disk1.vmdk.gz", size=None, compression="gzip")
    mf = f"SHA1(disk1.vmdk.gz)= {'0' * 40}\n".encode()
    ova = make_ova(tmp_path / "bad.ova", [("vm.ovf", ovf), ("vm.mf", mf), ("disk1.vmdk.gz", gz)], mode=mode)
    expect_failure(ova, workdir, ChecksumMismatch, "disk1.vmdk.gz", "0" * 40, hashlib.sha1(gz).hexdigest())


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_two_ovfs(images: dict[str, Path], tmp_path: Path, workdir: Path, mode: str) -> None:
    members = good_members(images)
    ova = make_ova(tmp_path / "two.ova", [*members, ("other.ovf", members[0][1])], mode=mode)  # type: ignore[index]
    expect_failure(ova, workdir, InvalidInput, "vm.ovf", "other.ovf")


def test_no_ovf(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    ova = make_ova(tmp_path / "none.ova", good_members(images)[2:])
    expect_failure(ova, workdir, InvalidInput, "no .ovf")


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_missing_referenced_disk(images: dict[str, Path], tmp_path: Path, workdir: Path, mode: str) -> None:
    ovf = ovf_for("disk1.vmdk", size=None)
    ova = make_ova(tmp_path / "missing.ova", [("vm.ovf", ovf)], mode=mode)
    expect_failure(ova, workdir, InvalidInput, "disk1.vmdk", "missing")


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_entity_bomb_ovf(tmp_path: Path, workdir: Path, mode: str) -> None:
    bomb = b"""<?xml version="1.0"?>
<!DOCTYPE Envelope [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><VirtualSystem><Name>&d;</Name></VirtualSystem></Envelope>
"""
    ova = make_ova(tmp_path / "bomb.ova", [("vm.ovf", bomb)], mode=mode)
    expect_failure(ova, workdir, UnsafeInput, "vm.ovf", "DTD")


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_gzip_bomb_member(tmp_path: Path, workdir: Path, mode: str) -> None:
    gz = gzip.compress(bytes(80 * MiB), compresslevel=1)  # 80 MiB of zeros for a 1 MiB disk
    ova = make_ova(
        tmp_path / "gzbomb.ova",
        [
            ("vm.ovf", ovf_for("disk1.vmdk.gz", size=None, compression="gzip", capacity=1)),
            ("disk1.vmdk.gz", gz),
        ],
        mode=mode,
    )
    expect_failure(ova, workdir, UnsafeInput, "disk1.vmdk.gz", "expands beyond")


def test_truncated_ova(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    ova = make_ova(tmp_path / "cut.ova", good_members(images))
    with open(ova, "r+b") as f:
        f.truncate(os.path.getsize(ova) - 20 * 1024)
    expect_failure(ova, workdir, InvalidInput, "disk1.vmdk", "truncated")


def test_member_shorter_than_the_ovf_says(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    disk = images["streamOptimized"].read_bytes()
    cut = disk[: len(disk) // 2]
    ova = make_ova(
        tmp_path / "short.ova", [("vm.ovf", ovf_for("disk1.vmdk", size=len(disk))), ("disk1.vmdk", cut)]
    )
    expect_failure(ova, workdir, InvalidInput, "disk1.vmdk", f"the OVF says {len(disk)} bytes")


def test_truncated_vmdk_member_without_size(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    disk = images["monolithicSparse"].read_bytes()
    cut = disk[: len(disk) - 512]  # qemu-img check alone does not notice this one
    ova = make_ova(
        tmp_path / "short.ova", [("vm.ovf", ovf_for("disk1.vmdk", size=None, fmt="")), ("disk1.vmdk", cut)]
    )
    expect_failure(ova, workdir, InvalidInput, "disk1.vmdk", "truncated")


def test_qcow2_with_backing_file_is_refused(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    data = images["qcow2-backed"].read_bytes()
    ovf = ovf_for("disk1.qcow2", size=len(data), fmt="http://www.gnome.org/~markmc/qcow-image-format.html")
    ova = make_ova(tmp_path / "backed.ova", [("vm.ovf", ovf), ("disk1.qcow2", data)])
    expect_failure(ova, workdir, UnsafeInput, "disk1.qcow2", "/etc/hostname")


def test_format_lie_is_refused(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    data = images["qcow2-backed"].read_bytes()
    ova = make_ova(
        tmp_path / "lie.ova", [("vm.ovf", ovf_for("disk1.vmdk", size=len(data))), ("disk1.vmdk", data)]
    )
    expect_failure(ova, workdir, InvalidInput, "disk1.vmdk", "the OVF says vmdk but the file is qcow2")


def test_extraction_limit_for_compressed_ova(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    ova = make_ova(tmp_path / "big.ova", good_members(images), mode="w:gz")
    with pytest.raises(UnsafeInput, match="extraction limit") as err:
        open_ova(ova, workdir=workdir, max_extract_bytes=100_000)
    assert str(ova) in err.value.message and "disk1.vmdk" in err.value.message
    assert not leftovers(workdir)


# --- VMDK files made by qemu-img ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sub", ["streamOptimized", "monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"]
)
def test_qemu_made_vmdks_validate(images: dict[str, Path], tmp_path: Path, sub: str) -> None:
    for f in images[sub].parent.glob(f"{sub}*"):
        shutil.copy(f, tmp_path / f.name)
    disk = validate_vmdk(tmp_path / f"{sub}.vmdk")
    assert (disk.format, disk.capacity) == ("vmdk", 4 * MiB)


@pytest.mark.parametrize(
    ("sub", "keep"),
    [
        ("monolithicSparse", 0.5),
        ("monolithicSparse", -512),
        ("streamOptimized", 0.5),
        ("streamOptimized", 0.1),
    ],
    ids=["sparse-half", "sparse-last-sector", "stream-half", "stream-tenth"],
)
def test_truncated_vmdk_is_detected(images: dict[str, Path], tmp_path: Path, sub: str, keep: float) -> None:
    data = images[sub].read_bytes()
    size = int(len(data) * keep) if keep > 0 else len(data) + int(keep)
    path = tmp_path / "cut.vmdk"
    path.write_bytes(data[:size])
    with pytest.raises(InvalidInput) as err:
        validate_vmdk(path)
    msg = err.value.message
    assert msg.startswith(f"{path}: ")
    assert "truncated" in msg
    assert "\n" not in msg


def test_split_sparse_with_a_cut_extent(images: dict[str, Path], tmp_path: Path) -> None:
    src = images["twoGbMaxExtentSparse"]
    for f in src.parent.glob("twoGbMaxExtentSparse*"):
        shutil.copy(f, tmp_path / f.name)
    extent = tmp_path / "twoGbMaxExtentSparse-s001.vmdk"
    with open(extent, "r+b") as f:
        f.truncate(extent.stat().st_size - 4096)
    with pytest.raises(InvalidInput, match=r"s001\.vmdk.*truncated"):
        validate_vmdk(tmp_path / "twoGbMaxExtentSparse.vmdk")


def test_unpacked_folder_with_gzip_disk(images: dict[str, Path], tmp_path: Path, workdir: Path) -> None:
    folder = tmp_path / "unpacked"
    folder.mkdir()
    gz = gzip.compress(images["streamOptimized"].read_bytes(), compresslevel=1)
    (folder / "disk1.vmdk.gz").write_bytes(gz)
    (folder / "vm.ovf").write_bytes(ovf_for("disk1.vmdk.gz", size=len(gz), compression="gzip"))
    (folder / "vm.mf").write_bytes(manifest({"disk1.vmdk.gz": gz})[1])
    with open_ova(folder, workdir=workdir) as machine:
        (disk,) = machine.disks
        assert Path(disk.qemu_filename).is_relative_to(workdir.absolute())
        assert disk.display == str(folder / "disk1.vmdk.gz")
        assert converted(machine, tmp_path) == images["raw"].read_bytes()
    assert not leftovers(workdir)
    assert sorted(p.name for p in folder.iterdir()) == [
        "disk1.vmdk.gz",
        "vm.mf",
        "vm.ovf",
    ]  # source untouched
