"""The "before conversion" facts of the Debian test guests, proven by booting them.

- guest 1 (`debian-physical-bios`) boots on IDE with an e1000 NIC: login prompt on the
  serial console, SSH with the test key, hostname, eth0 with its MAC and a DHCP address;
- the same disk on virtio-blk does NOT boot: its initramfs never finds /dev/sda1;
- guest 2 (`debian-uefi-lvm`) boots under OVMF only once the removable-media fallback
  loader EFI/BOOT/BOOTX64.EFI is added (in a throw-away overlay); without it the
  firmware finds nothing to boot.

Timings are printed (run with -s to see them): boot-to-login under TCG is ~1.5 min.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import paramiko
import pytest

import images
from images.boot import boot_guest
from p2v.disks.guestfs import open_guestfs

PHYSICAL = images.GUESTS["debian-physical-bios"]
UEFI = images.GUESTS["debian-uefi-lvm"]


@pytest.fixture(scope="module")
def physical_disk() -> Path:
    return images.ensure("debian-physical-bios")


@pytest.fixture(scope="module")
def uefi_disk() -> Path:
    return images.ensure("debian-uefi-lvm")


def test_physical_boots_on_ide_and_answers_ssh(physical_disk: Path) -> None:
    with boot_guest(physical_disk, fmt="raw", machine="pc", disk_bus="ide", nic_model="e1000",
                    mac=PHYSICAL["mac"]) as vm:  # fmt: skip
        login_s = vm.wait_for_login(timeout=420)
        assert f"{PHYSICAL['hostname']} login:" in vm.console()
        ssh_s = vm.wait_for_ssh(timeout=120)
        print(f"\ndebian-physical-bios (IDE, TCG): login prompt after {login_s:.1f}s, SSH after {ssh_s:.1f}s")

        assert vm.ssh("hostname").stdout.strip() == "srv-physical"
        link = vm.ssh("ip -o link show eth0")
        assert link.rc == 0, link.stderr
        assert PHYSICAL["mac"] in link.stdout
        addr = vm.ssh("ip -o -4 addr show dev eth0").stdout
        assert re.search(r"inet 10\.0\.2\.\d+/24 .* dynamic", addr), addr
        path, text = PHYSICAL["marker"]
        assert vm.ssh(f"cat {path}").stdout.strip() == text
        cmdline = vm.ssh("cat /proc/cmdline").stdout
        assert "root=/dev/sda1" in cmdline and "resume=/dev/sda2" in cmdline
        assert "/dev/sda2" in vm.ssh("swapon --show=NAME --noheadings").stdout
        assert vm.ssh("findmnt -no SOURCE /").stdout.strip() == "/dev/sda1"
        # sshd takes keys only: the right password is not even offered as a method.
        assert vm.ssh_port is not None
        transport = paramiko.Transport(("127.0.0.1", vm.ssh_port))
        try:
            transport.start_client(timeout=30)
            with pytest.raises(paramiko.BadAuthenticationType):
                transport.auth_password("root", PHYSICAL["root_password"])
        finally:
            transport.close()


def test_physical_does_not_boot_on_virtio_blk(physical_disk: Path) -> None:
    with boot_guest(physical_disk, fmt="raw", machine="pc", disk_bus="virtio", nic_model="e1000",
                    mac=PHYSICAL["mac"], ssh=False) as vm:  # fmt: skip
        # initramfs-tools waits ~30 s for the resume device and ~30 s for root, then gives up.
        seen, t = vm.wait_for_console(["ALERT!  /dev/sda1 does not exist", "Gave up waiting for root"],
                                      timeout=480)  # fmt: skip
        print(f"\ndebian-physical-bios (virtio-blk, TCG): '{seen}' after {t:.1f}s")
        console = vm.console()
        assert "(initramfs)" in console or "Dropping to a shell" in console
        assert not re.search(r"\S+ login:", console)


def _add_efi_fallback(overlay: Path) -> None:
    """Copy the distro loader to the removable-media path, as a converter must."""
    with open_guestfs([(overlay, "qcow2")], readonly=False) as g:
        esp = next(dev for dev, fs in g.list_filesystems().items() if fs == "vfat")
        g.mount(esp, "/")
        assert g.is_file("/EFI/debian/grubx64.efi")
        assert not g.exists("/EFI/BOOT"), "the cached image must not have the fallback loader"
        g.mkdir_p("/EFI/BOOT")
        g.cp("/EFI/debian/grubx64.efi", "/EFI/BOOT/BOOTX64.EFI")
        g.umount_all()


def test_uefi_lvm_boots_under_ovmf_with_fallback_loader(uefi_disk: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "uefi-overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(uefi_disk),
                    str(overlay)], check=True)  # fmt: skip
    _add_efi_fallback(overlay)
    with boot_guest(overlay, fmt="qcow2", machine="q35", firmware="uefi", disk_bus="sata",
                    nic_model="e1000", ssh=False) as vm:  # fmt: skip
        login_s = vm.wait_for_login(timeout=480)
        print(f"\ndebian-uefi-lvm (OVMF, SATA, TCG): login prompt after {login_s:.1f}s")
        console = vm.console()
        assert f"{UEFI['hostname']} login:" in console
        assert "root=/dev/mapper/vg0-root" in console


def test_uefi_lvm_without_fallback_loader_finds_nothing_to_boot(uefi_disk: Path) -> None:
    with boot_guest(uefi_disk, fmt="qcow2", machine="q35", firmware="uefi", disk_bus="sata",
                    nic_model=None, ssh=False) as vm:  # fmt: skip
        seen, t = vm.wait_for_console(["Shell>", "No bootable option or device was found"], timeout=300)
        print(f"\ndebian-uefi-lvm without EFI/BOOT/BOOTX64.EFI: firmware stopped at '{seen}' after {t:.1f}s")
        assert "Linux version" not in vm.console()
