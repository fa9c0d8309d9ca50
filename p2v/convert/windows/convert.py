"""Convert a Windows guest to boot on KVM: inject virtio-win drivers offline.

:func:`convert_windows` works on a launched, writable libguestfs handle whose guest
filesystems are mounted (``/`` = C:). Order of work, so that a failure never leaves
a half-converted guest:

1. read: system root, the SYSTEM and SOFTWARE hives (downloaded to the host), the
   Windows version, the current control set, the RTC mode, installed guest tools;
2. decide: the catalog entry for this Windows and every driver's folder in the
   virtio-win source, reading all driver files into memory. **Nothing is written
   before this step succeeded**: no matching drivers raises DriversNotFound and leaves
   the guest untouched;
3. edit the host copy of SYSTEM (boot driver services, CriticalDeviceDatabase,
   DriverDatabase, the first-boot service) and render the first-boot script; still
   nothing in the guest has changed;
4. write into the guest: the boot storage drivers (viostor.sys, vioscsi.sys) into
   ``System32\\drivers``, the full driver set of that version into
   ``Windows\\Drivers\\VirtIO\\<driver>\\``, the script, and last the edited SYSTEM,
   uploaded next to the original and renamed over it in one step (an interruption
   before that leaves the registry, hence the boot, as it was).

The original storage and network drivers' services are never modified (the disk must
still boot on its original hardware after fallback). See :mod:`.bootdriver` for the
registry entries and :mod:`.firstboot` for the first-boot mechanism.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.convert.windows.bootdriver import (
    BootDriverInstall,
    install_critical_device_entries,
    install_driver_database,
    install_service,
)
from p2v.convert.windows.catalog import WindowsCatalog, windows_catalog
from p2v.convert.windows.firstboot import (
    FIRSTBOOT_DIR,
    SCRIPT_NAME,
    SERVICE_NAME,
    FirstBootPlan,
    msi_uninstall_action,
    pnputil_action,
    render_script,
    service_values,
)
from p2v.convert.windows.guest import (
    InstalledTool,
    WindowsIdentity,
    current_control_set,
    downloaded_hives,
    find_guest_tools,
    gcall,
    hive_is_dirty,
    hive_paths,
    identify,
    resolve_nocase,
    rtc_mode,
    systemroot_and_arch,
)
from p2v.convert.windows.registry import Hive
from p2v.convert.windows.resolve import DriverSelection, ResolvedDriver, resolve_drivers
from p2v.convert.windows.virtio_source import VirtioWinSource
from p2v.errors import DriversNotFound, UnsupportedGuest, UsageError

log = logging.getLogger(__name__)

STAGING_DIR = "Drivers/VirtIO"  # below the system root
STAGING_DIR_WIN = "%SystemRoot%\\Drivers\\VirtIO"  # the same, as the guest's first-boot script names it
DRIVE = "C:"
# guestfs_write carries the data in one protocol message (limit 2-4 MB); an upload is a
# chunked transfer that costs ~0.4 s each under TCG. Driver files are mostly < 1 MiB.
WRITE_LIMIT = 1 << 20


@dataclass(frozen=True)
class CopiedFile:
    source: str  # path inside the virtio-win source
    guest_path: str  # where it was written in the guest
    size: int
    sha256: str


@dataclass
class WindowsConversion:
    """What :func:`convert_windows` did to the guest."""

    product: str
    version: str  # "10.0"
    build: int | None
    variant: str  # "server" / "client"
    arch: str
    systemroot: str
    control_set: str
    virtio_win: str  # the source, e.g. "/isos/virtio-win.iso (iso)"
    catalog_entry: str  # e.g. "Windows Server 2019"
    driver_folder: str  # virtio-win version folder chosen, e.g. "2k19"
    driver_dirs: dict[str, str]  # driver -> folder in the source
    drivers_missing: list[str]  # optional drivers this source lacks for that version
    boot_drivers: list[str]  # services installed offline as boot drivers
    files_copied: list[CopiedFile]
    registry_keys: list[str]  # keys created or changed, "HKLM\\SYSTEM\\..."
    services_added: list[str]  # services that did not exist before
    staged_dir: str  # guest path of the staged driver set
    driver_packages: dict[str, str]  # inf -> DriverDatabase package name (6.2 and later)
    first_boot_service: str
    first_boot_script: str  # guest path
    first_boot_commands: list[str]
    first_boot_retries: int
    vmware_tools_uninstall: bool
    vmware_tools_guid: str | None
    rtc_mode: str  # "localtime" or "utc"
    warnings: list[str] = field(default_factory=list)

    @property
    def rtc(self) -> str:
        """Alias of :attr:`rtc_mode` (what the VM spec's ``rtc`` should be)."""
        return self.rtc_mode

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_path(guest_path: str) -> str:
    """``/Windows/Drivers`` -> ``C:\\Windows\\Drivers`` (the guest's ``/`` is C:)."""
    return DRIVE + guest_path.replace("/", "\\")


def _describe(ident: WindowsIdentity) -> str:
    build = "unknown" if ident.build is None else str(ident.build)
    return f"{ident.product} ({ident.version}, build {build}, {ident.variant}, {ident.arch})"


def _boot_install(
    d: ResolvedDriver, selection: DriverSelection, contents: dict[str, bytes], staged_win: str
) -> BootDriverInstall:
    spec = d.spec
    inf = d.file(spec.inf)
    assert inf is not None and spec.sys is not None and spec.inf_section and spec.group
    return BootDriverInstall(
        service=spec.service,
        sys_name=spec.sys,
        inf_name=spec.inf,
        inf_bytes=contents[inf.path],
        inf_section=spec.inf_section,
        description=spec.description,
        provider=spec.provider,
        class_guid=spec.class_guid,
        group=spec.group,
        hardware_ids=tuple(p.full_id for p in spec.pci_ids),
        all_hardware_ids=tuple(h for p in spec.pci_ids for h in p.hardware_ids()),
        service_parameters=tuple(spec.service_parameters.items()),
        pnp_interface=spec.pnp_interface,
        arch_folder=selection.arch_folder,
        oem_path=f"{staged_win}\\{d.key}",
    )


def _upload(g: Any, data: bytes, guest_path: str, scratch: Path) -> None:
    """Write ``data`` to the guest: one message when small, a file transfer when large."""
    if len(data) <= WRITE_LIMIT:
        gcall(f"writing {guest_path}", g.write, guest_path, data)
        return
    local = scratch / "upload.bin"
    local.write_bytes(data)
    gcall(f"writing {guest_path}", g.upload, str(local), guest_path)


def _hive_warnings(hives: tuple[tuple[Path, str], ...]) -> list[str]:
    return [
        f"{guest_path}: Windows did not close this hive cleanly (unclean shutdown or fast startup); "
        "it may replay its .LOG files at boot. Shut the source down cleanly (fast startup off) and "
        "convert again if the guest misbehaves"
        for local, guest_path in hives
        if hive_is_dirty(local)
    ]


def _first_boot_plan(
    tools: list[InstalledTool], retries: int, modern_pnputil: bool, warnings: list[str]
) -> tuple[FirstBootPlan, str | None]:
    """pnputil for the staged drivers, then an MSI uninstall per guest tool found."""
    plan = FirstBootPlan(retries=retries)
    plan.actions.append(pnputil_action(STAGING_DIR_WIN, modern=modern_pnputil))
    vmware_guid: str | None = None
    for tool in tools:
        if tool.guid:
            plan.actions.append(msi_uninstall_action(tool.display_name, tool.guid))
            if tool.kind == "vmware" and vmware_guid is None:
                vmware_guid = tool.guid
        else:
            warnings.append(
                f"{tool.display_name} is installed but not as an MSI package "
                f"({tool.uninstall_string or 'no UninstallString'}); remove it by hand after conversion"
            )
    return plan, vmware_guid


def convert_windows(
    g: Any,
    root: str,
    inspection: dict[str, Any],
    virtio_win: Path,
    *,
    first_boot_retries: int = 3,
    catalog: WindowsCatalog | None = None,
) -> WindowsConversion:
    """Inject virtio-win drivers into the mounted Windows guest ``root``.

    ``inspection`` may carry libguestfs inspection results (``type``,
    ``windows_systemroot``, ``arch``, ``product``/``product_name``, ``major``/``major_version``,
    ``minor``/``minor_version``, ``product_variant``); what is missing is asked from ``g``
    or read from the hives (which win where both exist). ``virtio_win`` is a
    virtio-win ISO or directory.

    Raises :class:`DriversNotFound` (guest untouched) when the source has no drivers
    for this Windows, :class:`UnsupportedGuest` when the guest is not a usable Windows,
    :class:`SourceNotFound`/:class:`InvalidInput` for a missing or unreadable source,
    :class:`ConversionError` when libguestfs or hivex fail.
    """
    if first_boot_retries < 1:
        raise UsageError(f"first_boot_retries must be at least 1 (got {first_boot_retries})")
    catalog = catalog or windows_catalog()
    systemroot, arch = systemroot_and_arch(g, root, inspection)
    paths = hive_paths(g, systemroot)
    drivers_dir = resolve_nocase(g, f"{systemroot}/system32/drivers")
    if not gcall(drivers_dir, g.is_dir, drivers_dir):
        raise UnsupportedGuest(f"{root}: {drivers_dir} is not a directory; is {systemroot} a Windows system root?")

    with tempfile.TemporaryDirectory(prefix="p2v-windows-") as tmpname:
        tmp = Path(tmpname)
        with downloaded_hives(g, paths, tmp) as (system_file, software_file):
            software = Hive(software_file, label=paths.software)
            ident = identify(software, systemroot=systemroot, arch=arch, inspection=inspection)
            tools = find_guest_tools(software, catalog)
            system = Hive(system_file, write=True, label=paths.system)
            control_set = current_control_set(system)
            rtc = rtc_mode(system, control_set)
            guest = _describe(ident)

            # -- decide (no writes) ----------------------------------------------------------
            with VirtioWinSource(virtio_win) as source:
                source_text = str(source)
                version = catalog.select_version(
                    product=ident.product, major=ident.major, minor=ident.minor, build=ident.build,
                    variant=ident.variant, arch=arch, source=source_text,
                )  # fmt: skip
                selection = resolve_drivers(catalog, version, arch, source, guest=guest)
                contents = {f.path: source.read(f.path) for d in selection.drivers.values() for f in d.files}
            boot = [d for d in selection.drivers.values() if d.spec.boot_storage]
            if not any(d.spec.required for d in boot):  # resolve_drivers guarantees it; be explicit
                raise DriversNotFound(f"no virtio-win boot storage driver for {guest} in {source_text}")
            services_node = system.node(f"{control_set}\\Services")
            if services_node is None:
                raise UnsupportedGuest(f"{paths.system}: has no {control_set}\\Services key")
            existing_services = {n.casefold() for n, _ in system.children(services_node)}
            staged = resolve_nocase(g, f"{systemroot}/{STAGING_DIR}")
            fb_dir = resolve_nocase(g, f"{systemroot}/{FIRSTBOOT_DIR}")
            for folder in (staged, fb_dir):
                if gcall(folder, g.exists, folder) and not gcall(folder, g.is_dir, folder):
                    raise UnsupportedGuest(f"{root}: {folder} exists and is not a folder")
            log.info("%s: virtio-win %s, folder %s", guest, source_text, selection.version_folder)

            warnings = _hive_warnings(((system_file, paths.system), (software_file, paths.software)))
            for key in selection.missing:
                if catalog.drivers[key].warn_if_missing:
                    warnings.append(f"{source_text} has no {key} driver for {guest}")
            for d in boot:
                if d.spec.service.casefold() in existing_services:
                    warnings.append(
                        f"{d.spec.service} was already installed in the guest; replaced by the one "
                        f"from {source_text} ({d.source_dir})"
                    )
            modern = ident.build >= catalog.pnputil_modern_min_build if ident.build else ident.major >= 10
            plan, vmware_guid = _first_boot_plan(tools, first_boot_retries, modern, warnings)
            script = render_script(plan)

            # -- edit the registry on the host (nothing in the guest changes yet) ------------
            packages: dict[str, str] = {}
            for d in boot:
                install = _boot_install(d, selection, contents, windows_path(staged))
                install_service(system, control_set, install)
                install_critical_device_entries(system, control_set, install)
                if (ident.major, ident.minor) >= (6, 2):
                    packages[install.inf_name] = install_driver_database(system, install)
            system.set_values(f"{control_set}\\Services\\{SERVICE_NAME}", service_values(first_boot_retries))
            edited = tmp / "SYSTEM.new"
            system.commit(edited)

            # -- write into the guest: files first, the registry last ------------------------
            copied: list[CopiedFile] = []

            def put(src_path: str, guest_path: str) -> None:
                data = contents[src_path]
                _upload(g, data, guest_path, tmp)
                copied.append(CopiedFile(src_path, guest_path, len(data), hashlib.sha256(data).hexdigest()))

            for d in boot:
                sys_file = d.file(d.spec.sys or "")
                assert sys_file is not None
                put(sys_file.path, f"{drivers_dir}/{d.spec.sys}")
            for d in selection.drivers.values():
                target = f"{staged}/{d.key}"
                gcall(f"creating {target}", g.mkdir_p, target)
                for f in d.files:
                    put(f.path, f"{target}/{f.name}")
            gcall(f"creating {fb_dir}", g.mkdir_p, fb_dir)
            script_path = f"{fb_dir}/{SCRIPT_NAME}"
            _upload(g, script, script_path, tmp)
            pending = f"{paths.system}.p2v-new"
            gcall(f"writing {pending}", g.upload, str(edited), pending)
            gcall(f"replacing {paths.system}", g.mv, pending, paths.system)
            gcall("flushing the guest disk", g.sync)

    added = [d.spec.service for d in boot if d.spec.service.casefold() not in existing_services]
    if SERVICE_NAME.casefold() not in existing_services:
        added.append(SERVICE_NAME)
    return WindowsConversion(
        product=ident.product,
        version=ident.version,
        build=ident.build,
        variant=ident.variant,
        arch=arch,
        systemroot=systemroot,
        control_set=control_set,
        virtio_win=source_text,
        catalog_entry=version.name,
        driver_folder=selection.version_folder,
        driver_dirs={k: d.source_dir for k, d in selection.drivers.items()},
        drivers_missing=list(selection.missing),
        boot_drivers=[d.spec.service for d in boot],
        files_copied=copied,
        registry_keys=[f"HKLM\\SYSTEM\\{k}" for k in system.changed_keys],
        services_added=added,
        staged_dir=staged,
        driver_packages=packages,
        first_boot_service=SERVICE_NAME,
        first_boot_script=script_path,
        first_boot_commands=plan.commands,
        first_boot_retries=first_boot_retries,
        vmware_tools_uninstall=vmware_guid is not None,
        vmware_tools_guid=vmware_guid,
        rtc_mode=rtc,
        warnings=warnings,
    )
