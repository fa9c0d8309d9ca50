"""Linux conversion: make a guest boot on virtio while it still boots on its old hardware.

Steps (each skipped when already satisfied, so a prepared guest converts in seconds):
1. device names -> UUID/LABEL in fstab, crypttab, resume, grub defaults and config;
2. NIC names pinned to MACs (systemd .link, or udev rules without systemd);
3. hypervisor guest tools disabled (units masked);
4. virtio modules into the boot kernel's initramfs with the guest's tool;
5. GRUB config regenerated when its inputs changed; UEFI fallback loader added;
6. SELinux relabel scheduled when SELinux is enabled and files were written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2v.convert.linux.bootloader import fix_bootloader, grub_cfg_path
from p2v.convert.linux.catalog import linux_catalog
from p2v.convert.linux.devices import disable_grub_no_uuid, rewrite_device_names
from p2v.convert.linux.facts import LinuxFacts, linux_facts
from p2v.convert.linux.initramfs import ensure_virtio_initramfs
from p2v.convert.linux.network import pin_names
from p2v.errors import UnsupportedGuest


@dataclass
class Step:
    name: str
    changed: bool
    detail: str
    seconds: float = 0.0


@dataclass
class LinuxConversion:
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    facts: LinuxFacts | None = None


def mask_guest_tools(g: Any, found: dict[str, list[str]]) -> list[str]:
    masked = []
    for hv in found:
        for unit in linux_catalog().guest_tools[hv].units:
            link = f"/etc/systemd/system/{unit}"
            exists = any(
                g.is_file(f"{d}/{unit}", followsymlinks=True)
                for d in ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system")
            )
            if not exists:
                continue
            try:
                if g.is_symlink(link) and g.readlink(link) == "/dev/null":
                    continue
            except RuntimeError:
                pass
            if g.exists(link):
                g.rm_f(link)
            g.ln_s("/dev/null", link)
            masked.append(unit)
    return masked


def convert_linux(
    g: Any,
    package_format: str,
    disks: list[str],
    nic_pins: list[tuple[str, str]],
    *,
    rebuild: str = "guest",
    on_step: Callable[[str], None] = lambda s: None,
) -> LinuxConversion:
    """Convert the mounted Linux guest on handle ``g`` (disks: appliance devices in source order).

    ``rebuild``: "guest" runs the guest's own initramfs tool and grub-mkconfig in the
    appliance; "host" adds virtio to the existing initramfs on the host and edits the
    GRUB config in place (see initramfs_host for why), leaving the guest's config such
    that its own tools produce the same on their next run.
    """
    res = LinuxConversion()
    on_step("reading guest configuration")
    facts = linux_facts(g, package_format)
    res.facts = facts
    kernel = facts.boot_kernel
    if kernel is None:
        raise UnsupportedGuest("no kernel found in /boot of the Linux guest")

    t = time.monotonic()
    on_step("rewriting device names to UUIDs")
    grub_changed = disable_grub_no_uuid(g)
    rewrites, warns, devmap = rewrite_device_names(g, disks)
    res.warnings += warns
    files = sorted({r.file for r in rewrites})
    pairs = dict.fromkeys(f"{r.old} -> {r.new}" for r in rewrites)
    detail = (f"{', '.join(pairs)} in {', '.join(files)}" if rewrites else "no hardware-bound device names")
    res.steps.append(Step("device-names", bool(rewrites) or grub_changed, detail, time.monotonic() - t))

    t = time.monotonic()
    on_step("pinning NIC names to MAC addresses")
    pinned = pin_names(g, nic_pins, facts.has_systemd)
    res.steps.append(
        Step("nic-names", bool(pinned),
             ", ".join(f"{n}={m}" for n, m in nic_pins) + (f" ({', '.join(pinned)})" if pinned else " (already)")
             if nic_pins else "no configured NICs", time.monotonic() - t)  # fmt: skip
    )

    t = time.monotonic()
    masked = mask_guest_tools(g, facts.guest_tools)
    res.steps.append(
        Step("guest-tools", bool(masked), f"masked {', '.join(masked)}" if masked else "none found",
             time.monotonic() - t)  # fmt: skip
    )

    t = time.monotonic()
    initramfs_inputs = {"/etc/initramfs-tools/conf.d/resume", "/etc/crypttab"}
    force = bool(initramfs_inputs & set(files)) and kernel.initrd is not None
    on_step(f"checking virtio in the initramfs of {kernel.version}")
    ir = ensure_virtio_initramfs(g, kernel, facts.initramfs_tool, facts.initramfs_modules_setting,
                                 force_rebuild=force and facts.initramfs_tool is not None,
                                 mode=rebuild, devmap=devmap)  # fmt: skip
    if ir.rebuilt:
        why = f"added {', '.join(ir.added)}" if ir.added else "config it embeds changed"
        verb = "updated" if rebuild == "host" else "rebuilt"
        detail = f"{ir.tool} {verb} {ir.image} ({why}; kept {len(ir.kept)} original modules)"
    else:
        detail = f"{kernel.version}: virtio already present"
    res.steps.append(Step("initramfs", ir.rebuilt, detail, ir.seconds))

    t = time.monotonic()
    cfg = grub_cfg_path(g)
    regen = rebuild == "guest" and (grub_changed or any(f in ("/etc/default/grub", cfg) for f in files))
    if regen:
        on_step("regenerating the bootloader configuration")
    bl = fix_bootloader(g, facts.grub_mkconfig, regenerate=regen, uefi=facts.firmware == "uefi")
    parts = []
    if bl.regenerated:
        parts.append(f"regenerated {bl.regenerated}")
    elif cfg in files:
        parts.append(f"{cfg} edited in place")
    if bl.uefi_fallback:
        parts.append(f"UEFI fallback EFI/BOOT/BOOTX64.EFI from {bl.uefi_fallback}")
    res.steps.append(Step("bootloader", bool(parts), "; ".join(parts) or "nothing to do", time.monotonic() - t))

    changed = any(s.changed for s in res.steps)
    if facts.selinux in ("enforcing", "permissive") and changed:
        g.touch("/.autorelabel")
        res.steps.append(Step("selinux", True, f"SELinux {facts.selinux}: relabel at first boot"))
    return res
