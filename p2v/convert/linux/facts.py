"""Read what a mounted Linux guest is: kernels, which one boots, initramfs tool and
contents, bootloader, firmware, device-name references, NIC config, guest tools."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from p2v.convert.linux.catalog import linux_catalog
from p2v.convert.linux.initrd import list_initrd, modules_in
from p2v.convert.linux.network import NicConfig, read_nic_config

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DEVNAME_RE = re.compile(
    r"/dev/(?:(?:[shv]d|xvd)[a-z]{1,2}\d*|cciss/c\d+d\d+(?:p\d+)?|disk/by-(?:id|path)/[^\s\"',;]+)"
)
DEVREF_FILES = [
    "/etc/fstab",
    "/etc/crypttab",
    "/etc/default/grub",
    "/etc/initramfs-tools/conf.d/resume",
    "/etc/uswsusp.conf",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub/menu.lst",
    "/etc/sysconfig/grub",
]


@dataclass
class KernelInfo:
    version: str
    vmlinuz: str
    initrd: str | None
    virtio_available: list[str]  # virtio modules shipped as .ko for this kernel
    virtio_builtin: list[str]  # virtio drivers built into the kernel
    virtio_in_initrd: list[str]  # virtio modules found inside its initramfs
    initrd_modules: list[str] = field(default_factory=list)
    boots: bool = False

    def missing_virtio(self, wanted: list[str]) -> list[str]:
        have = set(self.virtio_builtin) | set(self.virtio_in_initrd)
        return [m for m in wanted if m not in have]


@dataclass
class DevRef:
    file: str
    line: int
    device: str
    text: str


@dataclass
class LinuxFacts:
    kernels: list[KernelInfo]
    default_kernel: str | None
    initramfs_tool: str | None
    initramfs_modules_setting: str | None  # initramfs-tools MODULES=most|dep|list|netboot
    bootloader: str
    firmware: str
    esp: str | None
    devrefs: list[DevRef]
    nics: list[NicConfig]
    guest_tools: dict[str, list[str]]
    selinux: str
    has_systemd: bool
    grub_mkconfig: str | None

    @property
    def boot_kernel(self) -> KernelInfo | None:
        for k in self.kernels:
            if k.boots:
                return k
        return self.kernels[0] if self.kernels else None


def _read(g: Any, path: str) -> str | None:
    try:
        if g.is_file(path, followsymlinks=True):
            data: bytes = g.read_file(path)
            return data.decode("utf-8", "replace")
    except RuntimeError:
        return None
    return None


def _vkey(v: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+_~]", v)]


def _grub_default_kernel(g: Any) -> str | None:
    for cfg in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/boot/efi/EFI/redhat/grub.cfg"):
        text = _read(g, cfg)
        if not text:
            continue
        for line in text.splitlines():
            m = re.match(r"\s*linux(?:16|efi)?\s+\S*vmlinuz-(\S+)", line)
            if m:
                return m.group(1)
    text = _read(g, "/boot/grub/menu.lst")
    if text:
        m = re.search(r"^\s*kernel\s+\S*vmlinuz-(\S+)", text, re.M)
        if m:
            return m.group(1)
    return None


def _modules_for(g: Any, kver: str) -> tuple[set[str], set[str]]:
    """(module names available as files, module names built into the kernel)."""
    avail: set[str] = set()
    builtin: set[str] = set()
    for base in (f"/lib/modules/{kver}", f"/usr/lib/modules/{kver}"):
        dep = _read(g, f"{base}/modules.dep")
        if dep:
            for line in dep.splitlines():
                path = line.split(":", 1)[0]
                avail |= modules_in({path})
        bi = _read(g, f"{base}/modules.builtin")
        if bi:
            builtin |= modules_in(set(bi.split()))
        if dep or bi:
            break
    return avail, builtin


def list_kernels(g: Any, tool: str | None) -> list[KernelInfo]:
    wanted = linux_catalog().virtio_modules
    kernels = []
    boot_files = g.ls("/boot") if g.is_dir("/boot") else []
    versions = sorted(
        {f[len("vmlinuz-") :] for f in boot_files if f.startswith("vmlinuz-")}, key=_vkey, reverse=True
    )
    for kver in versions:
        avail, builtin = _modules_for(g, kver)
        initrd = None
        cands = linux_catalog().tools[tool].image_candidates(kver) if tool else []
        cands += [f"/boot/initrd.img-{kver}", f"/boot/initramfs-{kver}.img", f"/boot/initrd-{kver}"]
        for c in cands:
            if g.is_file(c):
                initrd = c
                break
        in_initrd: list[str] = []
        initrd_mods: list[str] = []
        if initrd:
            try:
                mods = modules_in(list_initrd(g.read_file(initrd)))
                initrd_mods = sorted(mods)
                in_initrd = [m for m in wanted if m in mods]
            except (ValueError, RuntimeError):
                initrd_mods = []
        kernels.append(
            KernelInfo(
                version=kver,
                vmlinuz=f"/boot/vmlinuz-{kver}",
                initrd=initrd,
                virtio_available=[m for m in wanted if m in avail],
                virtio_builtin=[m for m in wanted if m in builtin],
                virtio_in_initrd=in_initrd,
                initrd_modules=initrd_mods,
            )
        )
    default = _grub_default_kernel(g)
    for k in kernels:
        if k.version == default:
            k.boots = True
            break
    else:
        if kernels:
            kernels[0].boots = True
    return kernels


def detect_initramfs_tool(g: Any, package_format: str) -> str | None:
    cat = linux_catalog().tools
    found = [name for name, t in cat.items() if any(g.is_file(p) for p in t.detect)]
    if not found:
        return None
    if package_format == "deb" and "initramfs-tools" in found:
        return "initramfs-tools"
    for pref in ("dracut", "initramfs-tools", "mkinitrd"):
        if pref in found:
            return pref
    return found[0]


def find_esp(g: Any) -> str | None:
    for dev in g.list_devices():
        try:
            if g.part_get_parttype(dev) != "gpt":
                continue
            for p in g.part_list(dev):
                num = p["part_num"]
                if g.part_get_gpt_type(dev, num).upper() == ESP_GUID:
                    return f"{dev}{num}"
        except RuntimeError:
            continue
    return None


def detect_bootloader(g: Any, esp: str | None) -> tuple[str, str]:
    """(bootloader, firmware)."""
    uefi = esp is not None or g.is_dir("/boot/efi/EFI")
    if g.is_dir("/boot/grub2") or g.is_dir("/boot/grub"):
        if g.is_file("/boot/grub/menu.lst") and not (
            g.is_file("/boot/grub/grub.cfg") or g.is_file("/boot/grub2/grub.cfg")
        ):
            return "grub-legacy", "uefi" if uefi else "bios"
        return ("grub2-efi" if uefi else "grub2-bios"), "uefi" if uefi else "bios"
    if g.is_file("/boot/extlinux/extlinux.conf") or g.is_file("/boot/syslinux/syslinux.cfg"):
        return "syslinux", "bios"
    if uefi and g.is_dir("/boot/efi/loader"):
        return "systemd-boot", "uefi"
    return "unknown", "uefi" if uefi else "bios"


def find_devrefs(g: Any) -> list[DevRef]:
    refs = []
    for path in DEVREF_FILES:
        text = _read(g, path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for m in DEVNAME_RE.finditer(line):
                refs.append(DevRef(path, n, m.group(0), line.strip()))
    return refs


def guest_tools(g: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for hv, spec in linux_catalog().guest_tools.items():
        hits = [f for f in spec.files if g.exists(f)]
        for d in ("/lib/systemd/system", "/usr/lib/systemd/system", "/etc/systemd/system"):
            hits += [f"{d}/{u}" for u in spec.units if g.is_file(f"{d}/{u}", followsymlinks=True)]
        if hits:
            found[hv] = hits
    return found


def selinux_mode(g: Any) -> str:
    text = _read(g, "/etc/selinux/config")
    if not text:
        return "absent"
    m = re.search(r"^\s*SELINUX\s*=\s*(\w+)", text, re.M)
    return m.group(1).lower() if m else "absent"


def initramfs_modules_setting(g: Any) -> str | None:
    text = _read(g, "/etc/initramfs-tools/initramfs.conf") or ""
    for extra in g.ls("/etc/initramfs-tools/conf.d") if g.is_dir("/etc/initramfs-tools/conf.d") else []:
        text += "\n" + (_read(g, f"/etc/initramfs-tools/conf.d/{extra}") or "")
    found = re.findall(r"^\s*MODULES\s*=\s*(\w+)", text, re.M)
    return found[-1] if found else None


def linux_facts(g: Any, package_format: str) -> LinuxFacts:
    tool = detect_initramfs_tool(g, package_format)
    esp = find_esp(g)
    bootloader, firmware = detect_bootloader(g, esp)
    mkconfig = None
    for c in ("/usr/sbin/grub-mkconfig", "/usr/sbin/grub2-mkconfig", "/sbin/grub2-mkconfig"):
        if g.is_file(c):
            mkconfig = c
            break
    return LinuxFacts(
        kernels=list_kernels(g, tool),
        default_kernel=_grub_default_kernel(g),
        initramfs_tool=tool,
        initramfs_modules_setting=initramfs_modules_setting(g) if tool == "initramfs-tools" else None,
        bootloader=bootloader,
        firmware=firmware,
        esp=esp,
        devrefs=find_devrefs(g),
        nics=read_nic_config(g),
        guest_tools=guest_tools(g),
        selinux=selinux_mode(g),
        has_systemd=g.is_dir("/lib/systemd/system") or g.is_dir("/usr/lib/systemd/system"),
        grub_mkconfig=mkconfig,
    )
