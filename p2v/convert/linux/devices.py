"""Rewrite hardware-bound block device names to filesystem UUIDs (or LABELs).

``/dev/sda1`` names a disk by its controller and probe order: it is ``/dev/vda1``
under virtio-blk and may be ``/dev/sdb1`` elsewhere. A UUID names the filesystem
itself, so the same config works on KVM and back on the original hardware
(virt-v2v rewrites to ``/dev/vdX``, which loses that property).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from p2v.convert.linux.facts import DEVNAME_RE, DEVREF_FILES

_PART_RE = re.compile(r"^/dev/(?:[shv]d|xvd)([a-z]{1,2})(\d*)$")
_CCISS_RE = re.compile(r"^/dev/cciss/c\d+d(\d+)(?:p(\d+))?$")
_BYX_RE = re.compile(r"^/dev/disk/by-(?:id|path)/.+?(?:-part(\d+))?$")


@dataclass
class Rewrite:
    file: str
    old: str
    new: str
    count: int


def _letters_to_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def appliance_device(guest_dev: str, disks: list[str]) -> str | None:
    """Map a device name as the guest saw it to the appliance's device for the same partition.

    Disks keep their order: the guest's first disk (sda/hda/vda/xvda/c0d0) is our
    first disk. ``/dev/disk/by-*`` names can only be mapped on single-disk guests.
    """
    m = _PART_RE.match(guest_dev)
    if m:
        idx, part = _letters_to_index(m.group(1)), m.group(2)
    else:
        m = _CCISS_RE.match(guest_dev)
        if m:
            idx, part = int(m.group(1)), m.group(2) or ""
        else:
            m = _BYX_RE.match(guest_dev)
            if not m or len(disks) != 1:
                return None
            idx, part = 0, m.group(1) or ""
    if idx >= len(disks):
        return None
    return f"{disks[idx]}{part}"


def stable_name(g: Any, adev: str) -> str | None:
    """``UUID=...`` for the filesystem/swap/LUKS on ``adev``, else ``LABEL=...``, else None."""
    for getter, key in ((g.vfs_uuid, "UUID"), (g.vfs_label, "LABEL")):
        try:
            val = getter(adev)
        except RuntimeError:
            continue
        if val and re.match(r"^[A-Za-z0-9_.:-]+$", val):
            return f"{key}={val}"
    return None


def plan_rewrites(g: Any, disks: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each device name referenced in the guest's config to its stable name.

    Returns (mapping, warnings) — a name we cannot map is left alone with a warning.
    """
    mapping: dict[str, str] = {}
    warnings: list[str] = []
    seen: set[str] = set()
    for path in DEVREF_FILES:
        try:
            if not g.is_file(path, followsymlinks=True):
                continue
            text = bytes(g.read_file(path)).decode("utf-8", "replace")
        except RuntimeError:
            continue
        for dev in DEVNAME_RE.findall(text):
            if dev in seen:
                continue
            seen.add(dev)
            adev = appliance_device(dev, disks)
            name = stable_name(g, adev) if adev else None
            if name:
                mapping[dev] = name
            else:
                warnings.append(f"{path}: cannot find a UUID or LABEL for {dev}; left as it is")
    return mapping, warnings


def _rewrite_text(path: str, text: str, mapping: dict[str, str]) -> tuple[str, list[Rewrite]]:
    done: list[Rewrite] = []
    out_lines = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            out_lines.append(line)
            continue
        for dev, new in mapping.items():
            # whole tokens only: /dev/sda1 must not match inside /dev/sda10
            pat = re.compile(re.escape(dev) + r"(?![\w/-])")
            line, n = pat.subn(new, line)
            if n:
                done.append(Rewrite(path, dev, new, n))
        out_lines.append(line)
    return "".join(out_lines), done


def disable_grub_no_uuid(g: Any) -> bool:
    """Comment out ``GRUB_DISABLE_LINUX_UUID=true`` so grub.cfg uses root=UUID=."""
    path = "/etc/default/grub"
    if not g.is_file(path):
        return False
    text = bytes(g.read_file(path)).decode("utf-8", "replace")
    new = re.sub(
        r"^(\s*GRUB_DISABLE_LINUX_UUID\s*=\s*\"?true\"?.*)$",
        r"# p2v: disabled so the kernel finds root by UUID on any hardware\n# \1",
        text,
        flags=re.M,
    )
    if new != text:
        g.write(path, new.encode())
        return True
    return False


def rewrite_device_names(
    g: Any, disks: list[str], *, skip: tuple[str, ...] = ()
) -> tuple[list[Rewrite], list[str], dict[str, str]]:
    """Rewrite device names in every config file that holds them. Idempotent.

    Returns (rewrites done, warnings, the device -> stable name mapping used)."""
    mapping, warnings = plan_rewrites(g, disks)
    rewrites: list[Rewrite] = []
    if not mapping:
        return rewrites, warnings, mapping
    for path in DEVREF_FILES:
        if path in skip or not g.is_file(path, followsymlinks=True):
            continue
        text = bytes(g.read_file(path)).decode("utf-8", "replace")
        new, done = _rewrite_text(path, text, mapping)
        if done:
            g.write(path, new.encode())
            rewrites += done
    return rewrites, warnings, mapping
