"""Put virtio drivers into the boot kernel's initramfs with the guest's own tool,
keeping every driver the original initramfs had (so it still boots on the old box).

Tools that size the initramfs to "the hardware we run on" (initramfs-tools
``MODULES=dep``, dracut's host-only mode) would look at the *appliance* hardware
here, so for them the original module list is pinned in the config as well.
After the rebuild the new image is listed on the host and checked: every
virtio module present and no original module lost.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from p2v.convert.linux.catalog import linux_catalog
from p2v.convert.linux.facts import KernelInfo
from p2v.convert.linux.initrd import list_initrd, modules_in
from p2v.errors import ConversionError, UnsupportedGuest

MARK = "# added by p2v (virtio for KVM; original drivers kept)"


@dataclass
class InitramfsResult:
    kernel: str
    tool: str
    image: str
    added: list[str]
    rebuilt: bool
    seconds: float
    kept: list[str] = field(default_factory=list)
    config_files: list[str] = field(default_factory=list)


def _text(g: Any, path: str) -> str:
    return bytes(g.read_file(path)).decode("utf-8", "replace") if g.is_file(path) else ""


def _configure_initramfs_tools(g: Any, wanted: list[str], pinned: list[str]) -> list[str]:
    path = linux_catalog().tools["initramfs-tools"].modules_file or "/etc/initramfs-tools/modules"
    text = _text(g, path)
    present = {ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")}
    add = [m for m in wanted + pinned if m not in present]
    if not add:
        return []
    if text and not text.endswith("\n"):
        text += "\n"
    text += MARK + "\n" + "".join(f"{m}\n" for m in add)
    g.write(path, text.encode())
    return [path]


def _configure_dracut(g: Any, wanted: list[str], pinned: list[str]) -> list[str]:
    path = linux_catalog().tools["dracut"].conf_file or "/etc/dracut.conf.d/60-p2v-virtio.conf"
    mods = " ".join(dict.fromkeys(wanted + pinned))
    text = f'{MARK}\nadd_drivers+=" {mods} "\n'
    if _text(g, path) == text:
        return []
    g.mkdir_p(path.rsplit("/", 1)[0])
    g.write(path, text.encode())
    return [path]


def _configure_mkinitrd(g: Any, wanted: list[str], pinned: list[str]) -> list[str]:
    path = linux_catalog().tools["mkinitrd"].sysconfig_file or "/etc/sysconfig/kernel"
    text = _text(g, path)
    m = re.search(r'^INITRD_MODULES="([^"]*)"', text, re.M)
    cur = m.group(1).split() if m else []
    new = list(dict.fromkeys(cur + wanted + pinned))
    if new == cur:
        return []
    line = f'INITRD_MODULES="{" ".join(new)}"'
    text = text[: m.start()] + line + text[m.end() :] if m else text + f"{MARK}\n{line}\n"
    g.write(path, text.encode())
    return [path]


def _needs_pinning(tool: str, modules_setting: str | None, g: Any) -> bool:
    if tool == "initramfs-tools":
        return (modules_setting or "most") == "dep"
    if tool == "dracut":
        confd = g.ls("/etc/dracut.conf.d") if g.is_dir("/etc/dracut.conf.d") else []
        conf = _text(g, "/etc/dracut.conf") + "".join(_text(g, f"/etc/dracut.conf.d/{f}") for f in confd)
        return bool(re.search(r'^\s*hostonly\s*=\s*"?yes', conf, re.M)) or g.is_file("/etc/redhat-release")
    return False


def ensure_virtio_initramfs(
    g: Any,
    kernel: KernelInfo,
    tool: str | None,
    modules_setting: str | None,
    *,
    force_rebuild: bool = False,
    mode: str = "guest",
    devmap: dict[str, str] | None = None,
) -> InitramfsResult:
    """Make ``kernel``'s initramfs hold the virtio modules; rebuild only when needed."""
    cat = linux_catalog()
    wanted = cat.virtio_modules
    missing_files = [m for m in wanted if m not in kernel.virtio_available and m not in kernel.virtio_builtin]
    if missing_files:
        raise UnsupportedGuest(
            f"kernel {kernel.version} has no virtio driver(s) {', '.join(missing_files)}; "
            "install a kernel with virtio support in the guest first"
        )
    need = kernel.missing_virtio(wanted)
    if not need and not force_rebuild:
        return InitramfsResult(kernel.version, tool or "none", kernel.initrd or "", [], False, 0.0)
    if tool is None:
        raise UnsupportedGuest(
            f"kernel {kernel.version}: initramfs lacks {', '.join(need)} and no initramfs tool "
            "(initramfs-tools, dracut, mkinitrd) was found in the guest"
        )
    spec = cat.tools[tool]
    image = kernel.initrd or spec.image_candidates(kernel.version)[0]
    original = set(kernel.initrd_modules)
    to_add = [m for m in wanted if m not in kernel.virtio_builtin]
    pinned = sorted(original - set(to_add)) if _needs_pinning(tool, modules_setting, g) else []
    configure = {"initramfs-tools": _configure_initramfs_tools, "dracut": _configure_dracut,
                 "mkinitrd": _configure_mkinitrd}[tool]  # fmt: skip
    files = configure(g, to_add, pinned)
    if mode == "host":
        if not kernel.initrd:
            raise UnsupportedGuest(f"kernel {kernel.version} has no initramfs to add virtio drivers to")
        from p2v.convert.linux.initramfs_host import augment_initramfs

        aug = augment_initramfs(g, kernel.version, kernel.initrd, to_add, devmap or {})
        return InitramfsResult(
            kernel=kernel.version, tool=f"{tool} config + host-side augment", image=kernel.initrd,
            added=need, rebuilt=True, seconds=aug.seconds, kept=sorted(original), config_files=files,
        )  # fmt: skip
    argv = [a.format(kver=kernel.version, image=image) for a in spec.rebuild]
    t0 = time.monotonic()
    try:
        g.command(argv)
    except RuntimeError as exc:
        tail = str(exc).strip().splitlines()[-3:]
        raise ConversionError(f"{' '.join(argv)} failed in the guest: {' / '.join(tail)}") from exc
    secs = time.monotonic() - t0
    # verify on the host: virtio in, nothing original lost
    try:
        now = modules_in(list_initrd(g.read_file(image)))
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(f"{image}: cannot read the rebuilt initramfs: {exc}") from exc
    still_missing = [m for m in to_add if m not in now]
    if still_missing:
        raise ConversionError(f"{image}: rebuilt initramfs still lacks {', '.join(still_missing)}")
    lost = sorted(original - now)
    if lost:
        raise ConversionError(f"{image}: rebuilding dropped original drivers {', '.join(lost)}")
    return InitramfsResult(
        kernel=kernel.version, tool=tool, image=image, added=need, rebuilt=True, seconds=secs,
        kept=sorted(original & now), config_files=files,
    )  # fmt: skip
