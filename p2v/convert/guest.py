"""Find the operating system on a set of disks and mount it in the appliance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2v.errors import ConversionError, UnsupportedGuest


@dataclass
class GuestRoot:
    root: str  # appliance device of the root filesystem
    type: str  # linux | windows | ...
    distro: str
    major: int
    minor: int
    product: str
    arch: str
    hostname: str
    package_format: str
    mountpoints: dict[str, str]  # mountpoint -> appliance device
    disks: list[str]  # appliance devices of the disks, in source order
    filesystems: dict[str, str] = field(default_factory=dict)  # device -> fs type
    unlocked: list[str] = field(default_factory=list)  # LUKS devices opened with a key
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"


def _luks_devices(g: Any) -> list[str]:
    """Partitions and whole disks holding a LUKS container (list_filesystems leaves them out)."""
    found = []
    for dev in [*g.list_partitions(), *g.list_devices()]:
        try:
            if g.vfs_type(dev) == "crypto_LUKS":
                found.append(dev)
        except RuntimeError:
            continue
    return found


def _unlock_luks(g: Any, luks: list[str], keys: list[str], what: str) -> list[str]:
    opened = []
    for i, dev in enumerate(luks):
        for key in keys:
            try:
                g.cryptsetup_open(dev, key, f"p2vluks{i}", readonly=False)
                opened.append(dev)
                break
            except RuntimeError:
                continue
        else:
            raise UnsupportedGuest(f"{what}: none of the given LUKS keys opens {dev}")
    g.lvm_scan(True)
    return opened


def find_root(g: Any, *, what: str, luks_keys: list[str] | None = None, root: str | None = None) -> GuestRoot:
    """Inspect the launched handle ``g``; unlock LUKS with ``luks_keys``; pick the OS root."""
    try:
        fs: dict[str, str] = g.list_filesystems()
        luks = _luks_devices(g)
        unlocked: list[str] = []
        if luks and luks_keys:
            unlocked = _unlock_luks(g, luks, luks_keys, what)
            fs = g.list_filesystems()
        roots: list[str] = g.inspect_os()
    except RuntimeError as exc:
        raise ConversionError(f"{what}: inspecting the disks failed: {exc}") from exc
    if not roots:
        if luks and not luks_keys:
            raise UnsupportedGuest(
                f"{what}: no operating system found; {', '.join(luks)} is LUKS-encrypted "
                "(the root filesystem is probably inside): pass --luks-key FILE"
            )
        found = ", ".join(f"{d} ({t})" for d, t in fs.items() if t not in ("unknown", "swap")) or "none"
        raise UnsupportedGuest(f"{what}: no operating system found on the disk(s) (filesystems: {found})")
    if root is not None:
        if root not in roots:
            raise UnsupportedGuest(f"{what}: --root {root} is not an OS root; roots found: {', '.join(roots)}")
        chosen = root
    else:
        if len(roots) > 1:
            raise UnsupportedGuest(
                f"{what}: several operating systems found ({', '.join(roots)}); choose one with --root"
            )
        chosen = roots[0]
    r = GuestRoot(
        root=chosen,
        type=g.inspect_get_type(chosen),
        distro=g.inspect_get_distro(chosen),
        major=g.inspect_get_major_version(chosen),
        minor=g.inspect_get_minor_version(chosen),
        product=g.inspect_get_product_name(chosen),
        arch=g.inspect_get_arch(chosen),
        hostname=g.inspect_get_hostname(chosen),
        package_format=g.inspect_get_package_format(chosen),
        mountpoints=dict(g.inspect_get_mountpoints(chosen)),
        disks=list(g.list_devices()),
        filesystems=fs,
        unlocked=unlocked,
    )
    return r


def mount_guest(g: Any, r: GuestRoot, *, readonly: bool) -> None:
    """Mount the guest's filesystems (shortest mountpoint first) at the appliance's /."""
    for mp, dev in sorted(r.mountpoints.items(), key=lambda kv: len(kv[0])):
        try:
            if readonly:
                g.mount_ro(dev, mp)
            else:
                g.mount(dev, mp)
        except RuntimeError as exc:
            if mp == "/":
                raise ConversionError(f"cannot mount the root filesystem {dev}: {exc}") from exc
            r.notes.append(f"could not mount {dev} on {mp}: {str(exc).strip()}")
