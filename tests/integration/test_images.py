"""The test-image cache and the exports of guest 1, checked with real qemu-img.

The export tests build `debian-physical-bios` (and its rootfs) on first use when the
cache does not have them (a few minutes); the cache tests use throw-away recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from defusedxml import ElementTree

import images
from images.cache import BuildFn, ImageBuildError, UnknownRecipe
from p2v.disks.guestfs import open_guestfs

GIB = 1024**3
OVF_NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
}


def qemu_img_info(target: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", target], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return dict(json.loads(out))


# --- what the guests' files say (read offline with libguestfs) -----------------------------


def _initramfs_modules(g: object, tmp_path: Path) -> set[str]:
    initrds = [f for f in g.ls("/boot") if f.startswith("initrd.img-")]  # type: ignore[attr-defined]
    assert len(initrds) == 1
    local = tmp_path / initrds[0]
    g.download(f"/boot/{initrds[0]}", str(local))  # type: ignore[attr-defined]
    listing = subprocess.run(["lsinitramfs", str(local)], capture_output=True, text=True, check=True).stdout
    kos = [Path(line).name for line in listing.splitlines() if ".ko" in line]
    return {name.split(".ko")[0].replace("-", "_") for name in kos}


def test_physical_guest_names_devices_and_knows_only_sata_ide(tmp_path: Path) -> None:
    disk = images.ensure("debian-physical-bios")
    with open_guestfs([(disk, "raw")], readonly=True) as g:
        assert g.part_get_parttype("/dev/sda") == "msdos"
        assert g.vfs_type("/dev/sda1") == "ext4" and g.vfs_type("/dev/sda2") == "swap"
        g.mount_ro("/dev/sda1", "/")
        fstab = [ln.split()[:3] for ln in g.cat("/etc/fstab").splitlines() if ln and not ln.startswith("#")]
        assert fstab == [["/dev/sda1", "/", "ext4"], ["/dev/sda2", "none", "swap"]]
        assert g.cat("/etc/initramfs-tools/conf.d/resume").strip() == "RESUME=/dev/sda2"
        grub_cfg = g.cat("/boot/grub/grub.cfg")
        assert "root=/dev/sda1" in grub_cfg and "root=UUID=" not in grub_cfg
        assert 'NAME="eth0"' in g.cat("/etc/udev/rules.d/70-persistent-net.rules")
        assert 'ATTR{address}=="00:1b:21:3a:4f:5e"' in g.cat("/etc/udev/rules.d/70-persistent-net.rules")
        assert "iface eth0 inet dhcp" in g.cat("/etc/network/interfaces")
        assert g.cat("/etc/hostname").strip() == "srv-physical"
        pub = Path(f"{images.test_ssh_key()}.pub").read_text().split()[1]
        assert pub in g.cat("/root/.ssh/authorized_keys")
        modules = _initramfs_modules(g, tmp_path)
        mbr = g.pread_device("/dev/sda", 512, 0)
    assert {"ahci", "ata_piix", "ata_generic", "sd_mod", "ext4", "e1000"} <= modules
    assert not {m for m in modules if m.startswith("virtio")}, "the physical guest must not know virtio"
    assert b"GRUB" in mbr and mbr[510:512] == b"\x55\xaa"


def test_uefi_guest_layout_and_missing_fallback_loader(tmp_path: Path) -> None:
    disk = images.ensure("debian-uefi-lvm")
    assert qemu_img_info(str(disk))["virtual-size"] == 4 * GIB
    with open_guestfs([(disk, "qcow2")], readonly=True) as g:
        assert g.part_get_parttype("/dev/sda") == "gpt"
        assert g.part_get_gpt_type("/dev/sda", 1) == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        assert g.vfs_type("/dev/sda1") == "vfat" and g.vfs_type("/dev/sda2") == "ext4"
        assert g.lvs() == ["/dev/vg0/root"]
        assert g.lvs_full()[0]["lv_size"] == 2560 * 1024**2
        assert g.vgs_full()[0]["vg_free"] > 0, "free extents are left in vg0"
        g.mount_ro("/dev/vg0/root", "/")
        g.mount_ro("/dev/sda2", "/boot")
        g.mount_ro("/dev/sda1", "/boot/efi")
        fstab = g.cat("/etc/fstab")
        assert "/dev/mapper/vg0-root" in fstab
        assert f"UUID={g.vfs_uuid('/dev/sda2')}" in fstab and f"UUID={g.vfs_uuid('/dev/sda1')}" in fstab
        assert g.is_file("/boot/efi/EFI/debian/grubx64.efi")
        assert g.ls("/boot/efi/EFI") == ["debian"], "no EFI/BOOT fallback: firmware would not find it"
        interfaces = g.cat("/etc/network/interfaces")
        assert "iface ens192 inet static" in interfaces and "10.0.2.15/24" in interfaces
        assert "hwaddress" not in interfaces and not g.exists("/etc/udev/rules.d/70-persistent-net.rules")
        modules = _initramfs_modules(g, tmp_path)
    assert {"ahci", "sd_mod", "dm_mod", "ext4"} <= modules
    assert not {m for m in modules if m.startswith("virtio")}


# --- exports of guest 1 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "fmt", "create_type"),
    [
        ("vmdk-sparse", "vmdk", "monolithicSparse"),
        ("vmdk-stream", "vmdk", "streamOptimized"),
        ("vmdk-flat", "vmdk", "monolithicFlat"),
        ("vhd", "vpc", None),
        ("vhdx", "vhdx", None),
        ("vmx", "vmdk", "monolithicSparse"),
    ],
)
def test_export_opens_with_expected_format_and_size(kind: str, fmt: str, create_type: str | None) -> None:
    name = f"debian-physical-bios.{kind}"
    path = images.ensure(name)
    disk = path
    if kind == "vmx":
        vmx = dict(
            (k.strip(), v.strip().strip('"'))
            for k, v in (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        )
        assert vmx["scsi0.virtualDev"] == "lsilogic"
        assert vmx["ethernet0.address"] == "00:1B:21:3A:4F:5E"
        assert (vmx["numvcpus"], vmx["memsize"], vmx["guestOS"]) == ("2", "1024", "debian12-64")
        disk = path.parent / vmx["scsi0:0.fileName"]
    if kind == "vmdk-flat":
        assert (path.parent / "srv-physical-flat.vmdk").stat().st_size == 3 * GIB
        assert 'RW 6291456 FLAT "srv-physical-flat.vmdk" 0' in path.read_text()
    info = qemu_img_info(str(disk))
    assert info["format"] == fmt
    assert info["virtual-size"] == 3 * GIB == images.GUESTS[name]["virtual_size"]
    assert images.GUESTS[name]["format"] == fmt
    if create_type:
        data = info["format-specific"]["data"]  # type: ignore[index]
        assert data["create-type"] == create_type


def test_ova_members_manifest_and_descriptor() -> None:
    ova = images.ensure("debian-physical-bios.ova")
    with open(ova, "rb") as fh:
        assert fh.read(512)[257:263] == b"ustar\x00", "the OVA must be a POSIX ustar archive"
    with tarfile.open(ova) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["srv-physical.ovf", "srv-physical-disk1.vmdk", "srv-physical.mf"]
        blobs = {m.name: tar.extractfile(m).read() for m in members if m.name != "srv-physical-disk1.vmdk"}  # type: ignore[union-attr]
        disk = members[1]
        h = hashlib.sha256()
        fh2 = tar.extractfile(disk)
        assert fh2 is not None
        while chunk := fh2.read(1 << 22):
            h.update(chunk)
    manifest = dict(line.split("= ") for line in blobs["srv-physical.mf"].decode().splitlines())
    assert manifest == {
        "SHA256(srv-physical.ovf)": hashlib.sha256(blobs["srv-physical.ovf"]).hexdigest(),
        "SHA256(srv-physical-disk1.vmdk)": h.hexdigest(),
    }

    root = ElementTree.fromstring(blobs["srv-physical.ovf"])
    vs = root.find("ovf:VirtualSystem", OVF_NS)
    assert vs is not None and vs.get(f"{{{OVF_NS['ovf']}}}id") == "srv-physical"
    file_ref = root.find("ovf:References/ovf:File", OVF_NS)
    assert file_ref is not None and file_ref.get(f"{{{OVF_NS['ovf']}}}href") == "srv-physical-disk1.vmdk"
    assert int(file_ref.get(f"{{{OVF_NS['ovf']}}}size", "0")) == disk.size
    d = root.find("ovf:DiskSection/ovf:Disk", OVF_NS)
    assert d is not None
    assert (d.get(f"{{{OVF_NS['ovf']}}}capacity"), d.get(f"{{{OVF_NS['ovf']}}}capacityAllocationUnits")) == (
        "3", "byte * 2^30")  # fmt: skip
    assert 0 < int(d.get(f"{{{OVF_NS['ovf']}}}populatedSize", "0")) < 3 * GIB
    items = vs.findall("ovf:VirtualHardwareSection/ovf:Item", OVF_NS)
    by_type = {i.findtext("rasd:ResourceType", namespaces=OVF_NS): i for i in items}
    assert by_type["3"].findtext("rasd:VirtualQuantity", namespaces=OVF_NS) == "2"
    assert by_type["4"].findtext("rasd:VirtualQuantity", namespaces=OVF_NS) == "1024"
    assert by_type["6"].findtext("rasd:ResourceSubType", namespaces=OVF_NS) == "lsilogic"
    nic = by_type["10"]
    assert nic.findtext("rasd:Address", namespaces=OVF_NS) == "00:1b:21:3a:4f:5e"
    assert nic.findtext("rasd:ResourceSubType", namespaces=OVF_NS) == "E1000"
    assert nic.findtext("rasd:Connection", namespaces=OVF_NS) == "VM Network"
    firmware = [c.get(f"{{{OVF_NS['vmw']}}}value") for c in vs.iter(f"{{{OVF_NS['vmw']}}}Config")
                if c.get(f"{{{OVF_NS['vmw']}}}key") == "firmware"]  # fmt: skip
    assert firmware == ["bios"]

    # The disk inside the tar is a streamOptimized VMDK of the full 3 GiB, read in place.
    spec = {"driver": "vmdk", "file": {"driver": "raw", "offset": disk.offset_data, "size": disk.size,
                                       "file": {"driver": "file", "filename": str(ova)}}}  # fmt: skip
    info = qemu_img_info("json:" + json.dumps(spec))
    assert info["virtual-size"] == 3 * GIB
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"  # type: ignore[index]


# --- the cache ------------------------------------------------------------------------------


_REGISTERED: list[str] = []


@pytest.fixture
def scratch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private cache folder; throw-away recipes are unregistered afterwards."""
    monkeypatch.setenv("P2V_CACHE", str(tmp_path / "cache"))
    yield tmp_path
    while _REGISTERED:
        images.unregister(_REGISTERED.pop())


def _register(name: str, source: Path, build: BuildFn, *, params: Mapping[str, object] | None = None,
              parents: tuple[str, ...] = (), ext: str = "txt", entry: str | None = None,
              uses_ssh_keys: bool = False) -> None:  # fmt: skip
    images.register(images.Recipe(name=name, ext=ext, build=build, sources=(source,),
                                  params=dict(params or {}), parents=parents, entry=entry,
                                  uses_ssh_keys=uses_ssh_keys))  # fmt: skip
    _REGISTERED.append(name)


def test_cache_key_follows_recipe_inputs(scratch_cache: Path) -> None:
    src = scratch_cache / "recipe_src.py"
    src.write_text("VERSION = 1\n")
    builds: list[Path] = []

    def build(out: Path, parents: Mapping[str, Path]) -> None:
        builds.append(out)
        out.write_text(src.read_text() + "".join(p.read_text() for p in parents.values()))

    _register("synthetic-base", src, build, params={"size": 1})
    child_src = scratch_cache / "child_src.py"
    child_src.write_text("CHILD = 1\n")
    _register("synthetic-child", child_src, build, parents=("synthetic-base",))

    first = images.ensure("synthetic-base")
    assert first.parent == scratch_cache / "cache" / "images"
    assert first.name == f"synthetic-base-{images.recipe_hash('synthetic-base')[:12]}.txt"
    assert images.ensure("synthetic-base") == first and len(builds) == 1, "a cached artifact is not rebuilt"
    child1 = images.ensure("synthetic-child")
    assert len(builds) == 2

    src.write_text("VERSION = 2\n")  # the recipe's source text changes
    second = images.ensure("synthetic-base")
    assert second != first and second.read_text() == "VERSION = 2\n"
    assert not first.exists(), "the stale artifact of the same recipe is removed"
    child2 = images.ensure("synthetic-child")
    assert child2 != child1 and "VERSION = 2" in child2.read_text(), "a parent change rebuilds the child"
    assert len(builds) == 4

    images.unregister("synthetic-base")
    _register("synthetic-base", src, build, params={"size": 2})  # a parameter changes
    assert images.ensure("synthetic-base") != second


def test_cache_key_includes_the_test_ssh_key(scratch_cache: Path) -> None:
    src = scratch_cache / "src.py"
    src.write_text("X = 1\n")
    _register("synthetic-keyed", src, lambda out, parents: out.write_text("x"), uses_ssh_keys=True)
    before = images.recipe_hash("synthetic-keyed")
    key = images.test_ssh_key()
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert Path(f"{key}.pub").read_text().startswith("ssh-ed25519 ")
    assert images.recipe_hash("synthetic-keyed") == before
    key.unlink()  # a new key means new authorized_keys in the guests
    assert images.recipe_hash("synthetic-keyed") != before


def test_failed_build_leaves_nothing(scratch_cache: Path) -> None:
    src = scratch_cache / "src.py"
    src.write_text("X = 1\n")

    def build(out: Path, parents: Mapping[str, Path]) -> None:
        out.write_text("half written")
        raise RuntimeError("disk full")

    _register("synthetic-broken", src, build)
    with pytest.raises(ImageBuildError, match=r"synthetic-broken.*disk full"):
        images.ensure("synthetic-broken")
    leftovers = [p.name for p in (scratch_cache / "cache" / "images").iterdir() if not p.name.startswith(".")]
    assert leftovers == []
    assert not list((scratch_cache / "cache" / "images").glob(".synthetic-broken*"))
    with pytest.raises(UnknownRecipe, match="no-such-recipe"):
        images.ensure("no-such-recipe")


def test_directory_artifact_returns_its_entry(scratch_cache: Path) -> None:
    src = scratch_cache / "src.py"
    src.write_text("X = 1\n")

    def build(out: Path, parents: Mapping[str, Path]) -> None:
        (out / "vm.vmx").write_text('scsi0:0.fileName = "vm.vmdk"\n')
        (out / "vm.vmdk").write_text("disk")

    _register("synthetic-dir", src, build, ext="", entry="vm.vmx")
    entry = images.ensure("synthetic-dir")
    assert entry.name == "vm.vmx" and entry.parent.is_dir()
    assert sorted(p.name for p in entry.parent.iterdir()) == ["vm.vmdk", "vm.vmx"]


def test_two_processes_build_once(scratch_cache: Path) -> None:
    script = scratch_cache / "racer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import images

        def build(out, parents):
            with open({str(scratch_cache / "builds.log")!r}, "a") as log:
                log.write("build\\n")
            time.sleep(2)
            out.write_text("done")

        images.register(images.Recipe(name="synthetic-race", ext="txt", build=build,
                                      sources=(Path({str(script)!r}),), uses_ssh_keys=False))
        print(images.ensure("synthetic-race"))
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(images.__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).read_text() == "done"
    assert (scratch_cache / "builds.log").read_text() == "build\n", "the second process waited and reused it"
