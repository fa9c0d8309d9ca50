"""Recipe `debian-rootfs`: a debootstrapped Debian 12 tree, cached as a tarball.

The tarball (``.tar.zst``, numeric owners, xattrs) is the common parent of the Debian
guests; they extract it, configure it in a chroot and put it on a disk. Nothing
guest-specific happens here, so changing a guest never re-runs debootstrap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from images.cache import Recipe, module_source, register
from images.host import run, scratch_dir

log = logging.getLogger("images")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "linux-image-amd64",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",
    "initramfs-tools",
    "zstd",
    "udev",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3-minimal",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "lvm2",
    "e2fsprogs",
    "dosfstools",
    "procps",
    "kmod",
    "fdisk",
)


def build_rootfs(out: Path, parents: Mapping[str, Path]) -> None:
    with scratch_dir("rootfs") as work:
        target = work / "root"
        log.info("debian-rootfs: debootstrap %s (%d extra packages) from %s", SUITE, len(PACKAGES), MIRROR)
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--components=main",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(target),
                MIRROR,
            ],
            timeout=3600,
        )
        # Downloaded packages and index files are not part of an installed system.
        for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (target / folder).glob("*"):
                if item.is_file() and item.name != "lock":
                    item.unlink()
        log.info("debian-rootfs: packing the tree")
        run(
            [
                "tar",
                "--create",
                "--zstd",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                f"--file={out}",
                f"--directory={target}",
                ".",
            ],
            timeout=1800,
        )


register(
    Recipe(
        name="debian-rootfs",
        ext="tar.zst",
        build=build_rootfs,
        sources=(module_source(__name__),),
        params={"suite": SUITE, "mirror": MIRROR, "packages": list(PACKAGES)},
        uses_ssh_keys=False,
        description="debootstrap --variant=minbase bookworm + kernel, grub, sshd, lvm2 (tarball)",
    )
)
