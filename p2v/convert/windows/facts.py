"""Read-only facts about a Windows guest, for ``p2v inspect``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from p2v.convert.windows.catalog import WindowsCatalog, windows_catalog
from p2v.convert.windows.firstboot import SERVICE_NAME
from p2v.convert.windows.guest import (
    current_control_set,
    downloaded_hives,
    find_guest_tools,
    gcall,
    hive_is_dirty,
    hive_paths,
    identify,
    resolve_nocase,
    rtc_mode,
    services_present,
    systemroot_and_arch,
)
from p2v.convert.windows.registry import Hive


def windows_facts(
    g: Any, root: str, inspection: dict[str, Any], *, catalog: WindowsCatalog | None = None
) -> dict[str, Any]:
    """Facts about the mounted Windows guest ``root``; JSON-able, nothing is written.

    Keys: product, version, major, minor, build, variant, edition, arch, systemroot,
    current_control_set, hostname, storage_services / network_services (original
    hardware drivers present), virtio_drivers (catalog services present),
    virtio_boot_ready (a virtio boot storage driver is installed for boot with its
    .sys present), vmware_tools ({display_name, guid} or None), guest_tools (all
    found), rtc_mode, registry_clean (the hives were closed cleanly), first_boot_pending
    (a p2v first-boot service is still enabled).
    """
    catalog = catalog or windows_catalog()
    systemroot, arch = systemroot_and_arch(g, root, inspection)
    paths = hive_paths(g, systemroot)
    with tempfile.TemporaryDirectory(prefix="p2v-windows-facts-") as tmp:
        with downloaded_hives(g, paths, Path(tmp)) as (system_file, software_file):
            software = Hive(software_file, label=paths.software)
            system = Hive(system_file, label=paths.system)
            ident = identify(software, systemroot=systemroot, arch=arch, inspection=inspection)
            tools = find_guest_tools(software, catalog)
            ccs = current_control_set(system)
            hostname = system.get_at(f"{ccs}\\Services\\Tcpip\\Parameters", "Hostname")
            storage = services_present(system, ccs, catalog.original_services.storage)
            network = services_present(system, ccs, catalog.original_services.network)
            virtio = services_present(system, ccs, [d.service for d in catalog.drivers.values()])
            boot_ready = False
            for spec in catalog.boot_drivers().values():
                start = system.get_at(f"{ccs}\\Services\\{spec.service}", "Start")
                sys_path = resolve_nocase(g, f"{systemroot}/system32/drivers/{spec.sys}")
                if start is not None and start.as_int() == 0 and gcall(sys_path, g.is_file, sys_path):
                    boot_ready = True
            firstboot_start = system.get_at(f"{ccs}\\Services\\{SERVICE_NAME}", "Start")
            rtc = rtc_mode(system, ccs)
            clean = not (hive_is_dirty(system_file) or hive_is_dirty(software_file))
    vmware = next((t for t in tools if t.kind == "vmware"), None)
    return {
        "product": ident.product,
        "version": ident.version,
        "major": ident.major,
        "minor": ident.minor,
        "build": ident.build,
        "variant": ident.variant,
        "edition": ident.edition,
        "arch": ident.arch,
        "systemroot": ident.systemroot,
        "current_control_set": ccs,
        "hostname": hostname.as_str() if hostname is not None else None,
        "storage_services": storage,
        "network_services": network,
        "virtio_drivers": virtio,
        "virtio_boot_ready": boot_ready,
        "vmware_tools": (None if vmware is None else {"display_name": vmware.display_name, "guid": vmware.guid}),
        "guest_tools": [{"kind": t.kind, "display_name": t.display_name, "guid": t.guid, "key": t.key} for t in tools],
        "rtc_mode": rtc,
        "registry_clean": clean,
        "first_boot_pending": firstboot_start is not None and firstboot_start.as_int() != 4,
    }
