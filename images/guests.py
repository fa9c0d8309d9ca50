"""Facts about the test guests that tests check, by recipe name (filled in by the recipe modules).

``GUESTS[name]`` is a plain dict. Keys for the Debian guests (``debian-physical-bios``,
``debian-uefi-lvm``; the exports ``debian-physical-bios.<kind>`` repeat guest 1's facts):

=====================  =====================================================================
hostname               what ``hostname`` prints in the guest (``srv-physical``, ``srv-uefi``)
mac                    the NIC's MAC the guest expects (guest 1), or None (guest 2 names none)
nic_name               the interface name the guest's config uses (``eth0``, ``ens192``)
nic_model              QEMU NIC model the guest has a driver for (``e1000``)
network                ``dhcp`` or ``static``; ``ipv4`` / ``gateway`` for static (10.0.2.15/24)
marker                 (path, content) of a file written at build time; content has no newline
format                 qemu-img format name of the artifact (``raw``, ``qcow2``, ``vmdk``, ``vpc``,
                       ``vhdx``); ``virtual_size`` is the disk size in bytes
firmware, machine      ``bios`` + ``pc`` or ``uefi`` + ``q35`` (what it boots on before conversion)
disk_bus               the bus it boots on before conversion (``ide``, ``sata``)
partition_table        ``mbr`` or ``gpt``
root_device            the root device named in fstab / on the kernel command line
swap_device            guest 1 only: ``/dev/sda2``
fstab_devices          mount point -> device spec in /etc/fstab (``UUID=`` = some UUID)
kernel_cmdline         guest 1: a substring of /proc/cmdline after boot
initramfs_modules      MODULES=list content; no virtio module is in either initramfs
boots_on_virtio        False for both (that is what conversion must fix)
virtio_failure_console guest 1: console lines initramfs-tools prints when booted on virtio-blk
efi_loader             guest 2: the only loader on the ESP; ``efi_fallback_present`` is False
volume_group           guest 2: ``vg0`` (LV ``root``, free extents left)
user, root_password    SSH as root with :func:`images.test_ssh_key`; the password works on the
                       serial console only (sshd refuses passwords)
login_prompt           text of the getty prompt (``<hostname> login:``)
os, distro_version, initramfs_tool   ``debian``, ``12``, ``initramfs-tools``
=====================  =====================================================================

Exports add: ``source_recipe``, ``export`` (the kind), ``vmdk_subformat``, ``vm_name``
(``srv-physical``), ``vcpus`` (2), ``memory_mib`` (1024), ``network_name`` (``VM Network``),
``controller`` (``lsilogic`` for the .ova and .vmx descriptors).

Other engineers' recipes (Windows guests) add their own entries and document them there.
"""

from __future__ import annotations

from typing import Any

GUESTS: dict[str, dict[str, Any]] = {}
