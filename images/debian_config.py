"""Configure an extracted Debian tree (in a host chroot) as one of the test guests.

Everything a guest's files say is decided here: hostname, SSH access, network naming,
fstab, GRUB defaults, the initramfs module list. The disk layout and the boot loader
are written by :mod:`images.debian` with libguestfs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from images.host import in_chroot, write_file
from images.keys import test_host_key, test_ssh_key

log = logging.getLogger("images")

ROOT_CONSOLE_PASSWORD = "p2v-test"  # serial-console login only; sshd refuses passwords

# Timers and first-boot units that only slow a test boot down.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-firstboot.service",
)

# Kernel driver folders a server test guest never loads: dropped to keep images small.
DROPPED_DRIVER_DIRS = (
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/isdn",
    "drivers/iio",
    "sound",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
)

SSHD_CONFIG = """\
# p2v test guest: root logs in with the test key only.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
"""


@dataclass
class GuestConfig:
    """What one guest's configuration files say."""

    hostname: str
    fstab: str
    interfaces: str
    grub_defaults: str
    initramfs_modules: tuple[str, ...]
    marker: tuple[str, str]
    resume: str | None = None
    udev_net_rules: str | None = None
    resolv_conf: str = "nameserver 10.0.2.3\n"
    extra_files: dict[str, str] = field(default_factory=dict)


def kernel_version(root: Path) -> str:
    """The version of the (single) kernel installed in `root`."""
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise RuntimeError(f"{root}: expected exactly one kernel in /boot, found {found or 'none'}")
    return found[0]


def _install_ssh(root: Path) -> None:
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    pub = Path(f"{test_ssh_key()}.pub").read_text()
    write_file(root, "root/.ssh/authorized_keys", pub, 0o600)
    for old in (root / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    host_key = test_host_key()
    write_file(root, "etc/ssh/ssh_host_ed25519_key", host_key.read_text(), 0o600)
    write_file(root, "etc/ssh/ssh_host_ed25519_key.pub", Path(f"{host_key}.pub").read_text(), 0o644)
    write_file(root, "etc/ssh/sshd_config.d/p2v-test.conf", SSHD_CONFIG)


def _slim_kernel_modules(root: Path, kver: str) -> None:
    from images.host import remove_tree

    kdir = root / "lib/modules" / kver / "kernel"
    for rel in DROPPED_DRIVER_DIRS:
        if (kdir / rel).is_dir():
            remove_tree(kdir / rel)
    for rel in ("usr/share/doc", "usr/share/man", "usr/share/info"):
        for item in (root / rel).glob("*"):
            if item.is_dir() and not item.is_symlink():
                remove_tree(item)
            else:
                item.unlink()


def configure(root: Path, cfg: GuestConfig) -> str:
    """Write `cfg` into the tree at `root` and rebuild its initramfs; return the kernel version.

    `root` must be under :func:`images.host.chroot_mounts`.
    """
    kver = kernel_version(root)
    write_file(root, "etc/hostname", f"{cfg.hostname}\n")
    write_file(
        root,
        "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{cfg.hostname}\n\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    )
    write_file(root, "etc/fstab", cfg.fstab)
    write_file(root, "etc/network/interfaces", cfg.interfaces)
    write_file(root, "etc/resolv.conf", cfg.resolv_conf)
    write_file(root, "etc/default/grub", cfg.grub_defaults)
    if cfg.udev_net_rules is not None:
        write_file(root, "etc/udev/rules.d/70-persistent-net.rules", cfg.udev_net_rules)
    marker_path, marker_text = cfg.marker
    write_file(root, marker_path, f"{marker_text}\n")
    for rel, text in cfg.extra_files.items():
        write_file(root, rel, text)
    _install_ssh(root)

    # A fixed machine id: an empty one would make systemd treat every boot as a first boot.
    for rel in ("etc/machine-id", "var/lib/dbus/machine-id"):
        (root / rel).unlink(missing_ok=True)
    in_chroot(root, ["systemd-machine-id-setup"])
    in_chroot(root, ["systemctl", "mask", *MASKED_UNITS])
    in_chroot(root, ["systemctl", "enable", "ssh.service"])
    in_chroot(root, ["chpasswd"], input_text=f"root:{ROOT_CONSOLE_PASSWORD}\n")

    _slim_kernel_modules(root, kver)
    in_chroot(root, ["depmod", "-a", kver])

    # initramfs: only the listed drivers (MODULES=list does not look at the build host).
    conf = root / "etc/initramfs-tools/initramfs.conf"
    text = re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text())
    if "MODULES=list" not in text:
        text += "MODULES=list\n"
    conf.write_text(text)
    write_file(
        root,
        "etc/initramfs-tools/modules",
        "# Storage and network drivers of the original hardware only.\n"
        + "".join(f"{m}\n" for m in cfg.initramfs_modules),
    )
    if cfg.resume is not None:
        write_file(root, "etc/initramfs-tools/conf.d/resume", f"RESUME={cfg.resume}\n")
    modules = " ".join(cfg.initramfs_modules)
    log.info("%s: update-initramfs for %s (MODULES=list: %s)", cfg.hostname, kver, modules)
    in_chroot(root, ["update-initramfs", "-u", "-k", kver], timeout=900)
    return kver


def initramfs_modules(root: Path, kver: str) -> set[str]:
    """Kernel module names (without .ko[.xz|.zst]) inside the tree's initramfs for `kver`."""
    listing = in_chroot(root, ["lsinitramfs", f"/boot/initrd.img-{kver}"], timeout=300)
    names = set()
    for line in listing.splitlines():
        m = re.search(r"/([^/]+)\.ko(\.xz|\.zst|\.gz)?$", line)
        if m:
            names.add(m.group(1).replace("-", "_"))
    return names
