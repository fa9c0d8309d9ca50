"""``images.GUESTS`` entries for the Debian guests built by :mod:`images.debian`.

Not part of any recipe's hash: facts can be corrected without rebuilding a guest.
The keys are documented in :mod:`images.guests`.
"""

from __future__ import annotations

from typing import Any

from images.debian import (
    PHYSICAL_MAC,
    PHYSICAL_MARKER,
    PHYSICAL_MODULES,
    PHYSICAL_SIZE,
    UEFI_MARKER,
    UEFI_MODULES,
    UEFI_SIZE,
)
from images.debian_config import ROOT_CONSOLE_PASSWORD
from images.guests import GUESTS

_COMMON: dict[str, Any] = {
    "user": "root",
    "root_password": ROOT_CONSOLE_PASSWORD,
    "marker_owner": "root",
    "os": "debian",
    "distro_version": "12",
    "initramfs_tool": "initramfs-tools",
    "login_prompt": "login:",
}

GUESTS["debian-physical-bios"] = {
    **_COMMON,
    "hostname": "srv-physical",
    "mac": PHYSICAL_MAC,
    "nic_name": "eth0",
    "nic_model": "e1000",
    "network": "dhcp",
    "ipv4": None,
    "marker": PHYSICAL_MARKER,
    "format": "raw",
    "virtual_size": PHYSICAL_SIZE,
    "firmware": "bios",
    "machine": "pc",
    "disk_bus": "ide",
    "partition_table": "mbr",
    "root_device": "/dev/sda1",
    "swap_device": "/dev/sda2",
    "fstab_devices": {"/": "/dev/sda1", "swap": "/dev/sda2"},
    "kernel_cmdline": "root=/dev/sda1 ro console=tty0 console=ttyS0,115200n8 resume=/dev/sda2",
    "initramfs_modules": PHYSICAL_MODULES,
    "boots_on_virtio": False,
    "virtio_failure_console": ("ALERT!  /dev/sda1 does not exist", "Gave up waiting for root"),
}

GUESTS["debian-uefi-lvm"] = {
    **_COMMON,
    "hostname": "srv-uefi",
    "mac": None,
    "nic_name": "ens192",
    "nic_model": "e1000",
    "network": "static",
    "ipv4": "10.0.2.15/24",
    "gateway": "10.0.2.2",
    "marker": UEFI_MARKER,
    "format": "qcow2",
    "virtual_size": UEFI_SIZE,
    "firmware": "uefi",
    "machine": "q35",
    "disk_bus": "sata",
    "partition_table": "gpt",
    "root_device": "/dev/mapper/vg0-root",
    "volume_group": "vg0",
    "fstab_devices": {"/": "/dev/mapper/vg0-root", "/boot": "UUID=", "/boot/efi": "UUID="},
    "efi_loader": "/EFI/debian/grubx64.efi",
    "efi_fallback_present": False,
    "initramfs_modules": UEFI_MODULES,
    "boots_on_virtio": False,
}
