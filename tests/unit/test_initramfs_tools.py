"""How each initramfs tool is told to add virtio while keeping the original drivers
(a fake guest filesystem stands in for libguestfs; the real tools run in tests/vm)."""

from __future__ import annotations

import gzip

import pytest

from p2v.convert.linux.facts import KernelInfo
from p2v.convert.linux.initramfs import ensure_virtio_initramfs
from p2v.errors import ConversionError, UnsupportedGuest
from tests.unit.test_initrd import _newc

VIRTIO = ["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"]


def initrd_with(mods: list[str]) -> bytes:
    return gzip.compress(_newc({f"lib/modules/5.14/kernel/{m}.ko.xz": b"x" for m in mods}))


class FakeGuest:
    """Just enough of a guestfs handle: files in a dict; `command` runs a fake tool."""

    def __init__(self, files: dict[str, bytes], tool_output: list[str]) -> None:
        self.image = next((f for f in files if f.startswith("/boot/init")), "")
        self.files = dict(files)
        self.commands: list[list[str]] = []
        self.tool_output = tool_output

    def is_file(self, path: str, followsymlinks: bool = False) -> bool:
        return path in self.files

    def is_dir(self, path: str) -> bool:
        return any(f.startswith(path.rstrip("/") + "/") for f in self.files)

    def ls(self, path: str) -> list[str]:
        pre = path.rstrip("/") + "/"
        return sorted({f[len(pre):].split("/")[0] for f in self.files if f.startswith(pre)})

    def read_file(self, path: str) -> bytes:
        return self.files[path]

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def mkdir_p(self, path: str) -> None:
        pass

    def command(self, argv: list[str]) -> str:
        self.commands.append(argv)
        self.files[self.image] = initrd_with(self.tool_output)
        return ""


def kernel(initrd: str, mods: list[str]) -> KernelInfo:
    return KernelInfo("5.14", "/boot/vmlinuz-5.14", initrd, virtio_available=VIRTIO, virtio_builtin=[],
                      virtio_in_initrd=[m for m in VIRTIO if m in mods], initrd_modules=mods, boots=True)  # fmt: skip


def test_dracut_hostonly_pins_the_original_drivers_and_adds_virtio() -> None:
    orig = ["ahci", "sd_mod", "mptspi"]
    g = FakeGuest({"/etc/redhat-release": b"RHEL 9", "/boot/initramfs-5.14.img": initrd_with(orig)}, orig + VIRTIO)
    res = ensure_virtio_initramfs(g, kernel("/boot/initramfs-5.14.img", orig), "dracut", None)
    conf = g.files["/etc/dracut.conf.d/60-p2v-virtio.conf"].decode()
    assert 'add_drivers+="' in conf
    for m in VIRTIO + orig:
        assert f" {m} " in conf
    assert g.commands == [["dracut", "-f", "/boot/initramfs-5.14.img", "5.14"]]
    assert res.rebuilt and res.added == VIRTIO and res.kept == sorted(orig)


def test_mkinitrd_extends_initrd_modules() -> None:
    orig = ["ata_piix", "sd_mod"]
    g = FakeGuest({"/etc/sysconfig/kernel": b'INITRD_MODULES="ata_piix"\n', "/boot/initrd-5.14": initrd_with(orig)},
                  orig + VIRTIO)  # fmt: skip
    ensure_virtio_initramfs(g, kernel("/boot/initrd-5.14", orig), "mkinitrd", None)
    assert 'INITRD_MODULES="ata_piix virtio_pci virtio_blk virtio_scsi virtio_net"' in g.files[
        "/etc/sysconfig/kernel"
    ].decode()
    assert g.commands == [["mkinitrd", "-k", "/boot/vmlinuz-5.14", "-i", "/boot/initrd-5.14"]]


@pytest.mark.parametrize("setting,pinned", [("list", False), ("most", False), ("dep", True)])
def test_initramfs_tools_pins_originals_only_for_modules_dep(setting: str, pinned: bool) -> None:
    orig = ["ahci", "e1000"]
    g = FakeGuest({"/etc/initramfs-tools/modules": b"ahci\ne1000\n" if setting == "list" else b"",
                   "/boot/initrd.img-5.14": initrd_with(orig)}, orig + VIRTIO)  # fmt: skip
    ensure_virtio_initramfs(g, kernel("/boot/initrd.img-5.14", orig), "initramfs-tools", setting)
    lines = g.files["/etc/initramfs-tools/modules"].decode().split()
    assert all(m in lines for m in VIRTIO)
    assert ("ahci" in lines) == (pinned or setting == "list")
    assert g.commands == [["update-initramfs", "-u", "-k", "5.14"]]


def test_a_rebuild_that_drops_an_original_driver_is_an_error() -> None:
    orig = ["ahci", "megaraid_sas"]
    g = FakeGuest({"/boot/initrd.img-5.14": initrd_with(orig)}, ["ahci", *VIRTIO])
    with pytest.raises(ConversionError, match="megaraid_sas"):
        ensure_virtio_initramfs(g, kernel("/boot/initrd.img-5.14", orig), "initramfs-tools", "most")


def test_virtio_already_there_means_no_rebuild() -> None:
    g = FakeGuest({}, [])
    res = ensure_virtio_initramfs(g, kernel("/boot/initrd.img-5.14", ["ahci", *VIRTIO]), "initramfs-tools", "most")
    assert not res.rebuilt and g.commands == []


def test_kernel_without_virtio_is_unsupported() -> None:
    k = kernel("/boot/initrd.img-2.6.18", ["ata_piix"])
    k.virtio_available = []
    with pytest.raises(UnsupportedGuest, match="virtio"):
        ensure_virtio_initramfs(FakeGuest({}, []), k, "mkinitrd", None)
