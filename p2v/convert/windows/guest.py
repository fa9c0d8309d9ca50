"""What a Windows guest is, read from its mounted filesystem and its SYSTEM/SOFTWARE hives.

Works on a launched libguestfs handle whose guest filesystems are mounted (``/`` = C:).
The hives are downloaded into a host temporary folder and read there with python3-hivex.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from p2v.convert.windows.catalog import WindowsCatalog
from p2v.convert.windows.registry import Hive
from p2v.errors import ConversionError, UnsupportedGuest

T = TypeVar("T")

GUID_RE = re.compile(r"\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}")
UNINSTALL_KEYS = (
    "Microsoft\\Windows\\CurrentVersion\\Uninstall",
    "Wow6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall",
)


def gcall(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Call a guestfs method, turning its RuntimeError into ConversionError naming ``what``."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        raise ConversionError(f"{what}: {exc}") from exc


def resolve_nocase(g: Any, path: str) -> str:
    """``path`` with each existing component spelled as stored in the guest.

    Unlike ``case_sensitive_path`` this accepts several missing trailing components
    (they are kept as given), so it can name folders that are about to be created.
    """
    resolved = ""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        parent = resolved or "/"
        if not gcall(parent, g.is_dir, parent):
            return "/".join([resolved, *parts[i:]])
        names = gcall(parent, g.ls, parent)
        match = next((n for n in names if n == part), None) or next(
            (n for n in names if n.casefold() == part.casefold()), part
        )
        resolved = f"{resolved}/{match}"
    return resolved or "/"


def _pick(inspection: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = inspection.get(key)
        if value not in (None, "", "unknown"):
            return value
    return None


@dataclass(frozen=True)
class HivePaths:
    system: str  # guest paths, real case
    software: str


@dataclass(frozen=True)
class WindowsIdentity:
    """The guest's Windows version as the conversion needs it."""

    product: str
    major: int
    minor: int
    build: int | None
    variant: str  # "server" or "client"
    edition: str | None
    arch: str  # libguestfs arch name (x86_64, i386)
    systemroot: str  # guest path, e.g. /Windows

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"


def systemroot_and_arch(g: Any, root: str, inspection: Mapping[str, Any]) -> tuple[str, str]:
    if _pick(inspection, "type", "os_type") not in (None, "windows"):
        kind = inspection.get("type") or inspection.get("os_type")
        raise UnsupportedGuest(f"{root}: guest is {kind}, not Windows")
    systemroot = _pick(inspection, "windows_systemroot", "systemroot")
    if systemroot is None:
        systemroot = gcall(f"{root}: Windows system root", g.inspect_get_windows_systemroot, root)
    arch = _pick(inspection, "arch") or gcall(f"{root}: architecture", g.inspect_get_arch, root)
    return str(systemroot), str(arch)


def hive_paths(g: Any, systemroot: str) -> HivePaths:
    def find(name: str) -> str:
        path = gcall(
            f"{systemroot}/System32/config/{name}",
            g.case_sensitive_path,
            f"{systemroot}/system32/config/{name}",
        )
        if not gcall(path, g.is_file, path):
            raise UnsupportedGuest(f"{path}: the Windows {name.upper()} registry hive is missing")
        return str(path)

    return HivePaths(system=find("system"), software=find("software"))


@contextmanager
def downloaded_hives(g: Any, paths: HivePaths, workdir: Path) -> Iterator[tuple[Path, Path]]:
    """Copy SYSTEM and SOFTWARE from the guest into ``workdir``; yields their host paths."""
    system = workdir / "SYSTEM"
    software = workdir / "SOFTWARE"
    gcall(f"downloading {paths.system}", g.download, paths.system, str(system))
    gcall(f"downloading {paths.software}", g.download, paths.software, str(software))
    yield system, software


def hive_is_dirty(path: Path) -> bool:
    """True when the hive's two sequence numbers differ: Windows did not finish writing it
    (unclean shutdown, or hibernation/fast startup) and may replay its .LOG files at boot."""
    with path.open("rb") as fh:
        head = fh.read(12)
    return len(head) == 12 and head[:4] == b"regf" and head[4:8] != head[8:12]


def identify(software: Hive, *, systemroot: str, arch: str, inspection: Mapping[str, Any]) -> WindowsIdentity:
    """Version facts from SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion (inspection as fallback)."""
    cv_path = "Microsoft\\Windows NT\\CurrentVersion"
    node = software.node(cv_path)
    if node is None:
        raise UnsupportedGuest(f"{software.label}: has no {cv_path} key; is this a Windows SOFTWARE hive?")
    values = {k.casefold(): v for k, v in software.values(node).items()}

    def text(name: str) -> str | None:
        v = values.get(name.casefold())
        return v.as_str().strip() if v is not None else None

    def number(name: str) -> int | None:
        v = values.get(name.casefold())
        try:
            return v.as_int() if v is not None else None
        except ValueError:
            return None

    product = text("ProductName") or _pick(inspection, "product_name", "product") or "Windows"
    major, minor = number("CurrentMajorVersionNumber"), number("CurrentMinorVersionNumber")
    if major is None or minor is None:
        m = re.fullmatch(r"(\d+)\.(\d+)", text("CurrentVersion") or "")
        if m:
            major, minor = int(m.group(1)), int(m.group(2))
        else:
            major = _pick(inspection, "major_version", "major")
            minor = _pick(inspection, "minor_version", "minor")
    if major is None or minor is None:
        raise UnsupportedGuest(f"{software.label}: cannot tell the Windows version of {product}")
    build_text = text("CurrentBuildNumber") or text("CurrentBuild") or ""
    build = int(build_text) if build_text.isdigit() else _pick(inspection, "build")
    installation = text("InstallationType") or _pick(inspection, "product_variant", "variant") or ""
    if "server" in installation.casefold():
        variant = "server"
    elif "client" in installation.casefold():
        variant = "client"
    else:
        variant = "server" if "server" in product.casefold() else "client"
    return WindowsIdentity(
        product=str(product),
        major=int(major),
        minor=int(minor),
        build=int(build) if build is not None else None,
        variant=variant,
        edition=text("EditionID"),
        arch=arch,
        systemroot=systemroot,
    )


def current_control_set(system: Hive) -> str:
    """``ControlSet00N`` from SYSTEM\\Select\\Current; the key must exist."""
    value = system.get_at("Select", "Current")
    if value is None:
        raise UnsupportedGuest(f"{system.label}: has no Select\\Current value; cannot find the control set")
    try:
        name = f"ControlSet{value.as_int():03d}"
    except ValueError as exc:
        raise UnsupportedGuest(f"{system.label}: Select\\Current is not a number") from exc
    if system.node(name) is None:
        raise UnsupportedGuest(f"{system.label}: Select\\Current names {name}, which does not exist")
    return name


def rtc_mode(system: Hive, control_set: str) -> str:
    """``"utc"`` when TimeZoneInformation\\RealTimeIsUniversal is 1, else ``"localtime"``."""
    value = system.get_at(f"{control_set}\\Control\\TimeZoneInformation", "RealTimeIsUniversal")
    try:
        return "utc" if value is not None and value.as_int() & 0xFFFFFFFF == 1 else "localtime"
    except ValueError:
        return "localtime"


@dataclass(frozen=True)
class InstalledTool:
    kind: str  # catalog key, e.g. "vmware"
    display_name: str
    key: str  # the Uninstall subkey
    guid: str | None  # MSI product code, when it is an MSI install
    uninstall_string: str | None


def find_guest_tools(software: Hive, catalog: WindowsCatalog) -> list[InstalledTool]:
    """Hypervisor guest tools listed under the Uninstall keys (catalog ``guest_tools``)."""
    found: list[InstalledTool] = []
    for base in UNINSTALL_KEYS:
        parent = software.node(base)
        if parent is None:
            continue
        for key, node in software.children(parent):
            display = software.get(node, "DisplayName")
            if display is None:
                continue
            name = display.as_str()
            for kind, tool in catalog.guest_tools.items():
                if not any(name.casefold().startswith(d.casefold()) for d in tool.display_names):
                    continue
                uninstall = software.get(node, "UninstallString")
                text = uninstall.as_str() if uninstall is not None else None
                guid = None
                if text and "msiexec" in text.casefold():
                    m = GUID_RE.search(text)
                    guid = m.group(0).upper() if m else None
                if guid is None and GUID_RE.fullmatch(key):
                    guid = key.upper()
                found.append(InstalledTool(kind, name, f"{base}\\{key}", guid, text))
    return found


def services_present(system: Hive, control_set: str, names: list[str]) -> list[str]:
    """The services among ``names`` that exist in the control set (stored spelling)."""
    services = system.node(f"{control_set}\\Services")
    if services is None:
        return []
    have = {n.casefold(): n for n, _ in system.children(services)}
    return [have[n.casefold()] for n in names if n.casefold() in have]
