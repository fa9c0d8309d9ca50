"""Bootloader fixes: regenerate the GRUB config, add the UEFI fallback loader path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from p2v.errors import ConversionError

FALLBACK_DIR = "/boot/efi/EFI/BOOT"
FALLBACK = f"{FALLBACK_DIR}/BOOTX64.EFI"


@dataclass
class BootloaderResult:
    regenerated: str | None  # grub.cfg path regenerated
    uefi_fallback: str | None  # loader copied to EFI/BOOT/BOOTX64.EFI
    seconds: float


def grub_cfg_path(g: Any) -> str | None:
    for p in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"):
        if g.is_file(p):
            return p
    return None


def regenerate_grub(g: Any, mkconfig: str) -> str | None:
    cfg = grub_cfg_path(g)
    if cfg is None:
        return None
    try:
        g.command([mkconfig, "-o", cfg])
    except RuntimeError as exc:
        tail = str(exc).strip().splitlines()[-2:]
        raise ConversionError(f"{mkconfig} -o {cfg} failed in the guest: {' / '.join(tail)}") from exc
    return cfg


def _find_ci(g: Any, d: str, name: str) -> str | None:
    if not g.is_dir(d):
        return None
    for f in g.ls(d):
        if f.lower() == name.lower():
            return f"{d}/{f}"
    return None


def ensure_uefi_fallback(g: Any) -> str | None:
    """A fresh VM's NVRAM has no boot entry: make sure \\EFI\\BOOT\\BOOTX64.EFI exists.

    Copies the installed loader (shim + grub when shim is used) into the removable-media
    path. Returns the loader copied, or None when nothing was needed or found.
    """
    efi = None
    for d in ("/boot/efi/EFI", "/boot/efi/efi"):
        if g.is_dir(d):
            efi = d
            break
    if efi is None:
        return None
    boot = _find_ci(g, efi, "BOOT")
    if boot and _find_ci(g, boot, "BOOTX64.EFI"):
        return None
    for vendor in sorted(g.ls(efi)):
        vdir = f"{efi}/{vendor}"
        if vendor.upper() == "BOOT" or not g.is_dir(vdir):
            continue
        shim = _find_ci(g, vdir, "shimx64.efi")
        grub = _find_ci(g, vdir, "grubx64.efi")
        loader = shim or grub
        if loader is None:
            continue
        target_dir = boot or f"{efi}/BOOT"
        g.mkdir_p(target_dir)
        g.cp(loader, f"{target_dir}/BOOTX64.EFI")
        if shim and grub:
            g.cp(grub, f"{target_dir}/grubx64.efi")
        # grub looks for grub.cfg beside itself first when built with a relative prefix
        cfg = _find_ci(g, vdir, "grub.cfg")
        if cfg and not _find_ci(g, target_dir, "grub.cfg"):
            g.cp(cfg, f"{target_dir}/grub.cfg")
        return loader
    return None


def fix_bootloader(g: Any, mkconfig: str | None, *, regenerate: bool, uefi: bool) -> BootloaderResult:
    t0 = time.monotonic()
    regen = regenerate_grub(g, mkconfig) if (regenerate and mkconfig) else None
    fallback = ensure_uefi_fallback(g) if uefi else None
    return BootloaderResult(regen, fallback, time.monotonic() - t0)
