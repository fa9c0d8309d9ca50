"""Install a boot storage driver offline, in the SYSTEM hive.

Windows must load the virtio storage driver before it can read C: on KVM, so it is
installed the way Windows setup would have left it, without booting:

* ``<ControlSet>\\Services\\<service>``: Type 1 (kernel driver), Start 0 (boot),
  ErrorControl 1, the load-order Group, ImagePath ``System32\\drivers\\<sys>``, a Tag
  after the highest one already used in that group, Owners = the .inf, and the
  ``Parameters`` (BusType, ``PnpInterface\\5`` = PCI) that the .inf's AddReg sets;
* ``<ControlSet>\\Control\\CriticalDeviceDatabase\\pci#ven_..&dev_..[&subsys_..[&rev_..]]``
  for every hardware ID (legacy and modern virtio): Service + ClassGUID. Windows up to
  7/2008 R2 binds boot devices through this table;
* from Windows 8/2012 (6.2) on, which ignore that table, the DriverDatabase entries
  Windows 10 consults at boot: ``DriverDatabase\\DriverInfFiles\\<inf>`` (the active
  package), ``DriverDatabase\\DriverPackages\\<inf>_<arch>_<hash>`` (with its
  Configurations\\<install section> naming the service and a Descriptor per hardware ID),
  and ``DriverDatabase\\DeviceIds\\PCI\\<hardware id>`` pointing at the .inf.

The package name's hash is the first 16 hex digits of the sha256 of the .inf, so a
re-run writes the same keys. The original storage drivers' keys are never touched.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass

from p2v.convert.windows.registry import REG_BINARY, Hive, RegValue

SERVICE_KERNEL_DRIVER = 1
SERVICE_BOOT_START = 0
SERVICE_ERROR_NORMAL = 1
DEVICE_ID_RANK = bytes([0x01, 0xFF, 0x00, 0x00])  # DeviceIds\<id>\<inf>: binary rank record
SIGNER_NAME = "Microsoft Windows Hardware Compatibility Publisher"
SIGNER_SCORE_WHQL = 0x0D000005
STATUS_FLAGS = 0x00000012
FILETIME_EPOCH_OFFSET = 116444736000000000  # 1601-01-01 to 1970-01-01 in 100 ns units


@dataclass(frozen=True)
class BootDriverInstall:
    """What to install: the catalog data plus where things are in this guest."""

    service: str
    sys_name: str
    inf_name: str
    inf_bytes: bytes
    inf_section: str
    description: str
    provider: str
    class_guid: str
    group: str
    hardware_ids: tuple[str, ...]  # most specific forms, e.g. VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00
    all_hardware_ids: tuple[str, ...]  # every form (with and without SUBSYS/REV)
    service_parameters: tuple[tuple[str, int], ...]
    pnp_interface: int | None
    arch_folder: str  # amd64 / x86 / ARM64
    oem_path: str  # Windows path of the staged driver folder


def package_name(inf_name: str, arch_folder: str, inf_bytes: bytes) -> str:
    digest = hashlib.sha256(inf_bytes).hexdigest()[:16]
    return f"{inf_name.casefold()}_{arch_folder.casefold()}_{digest}"


def _guid_bytes(guid: str) -> bytes:
    """A registry-format GUID string as Windows stores it in binary (mixed endian)."""
    hexes = guid.strip("{}").split("-")
    return (
        struct.pack("<IHH", int(hexes[0], 16), int(hexes[1], 16), int(hexes[2], 16))
        + bytes.fromhex(hexes[3])
        + bytes.fromhex(hexes[4])
    )


def _filetime(epoch_seconds: float) -> int:
    return int(epoch_seconds * 10_000_000) + FILETIME_EPOCH_OFFSET


def next_tag(system: Hive, control_set: str, group: str, service: str) -> int:
    """The service's existing Tag, or one above the highest Tag used in ``group``."""
    services = system.node(f"{control_set}\\Services")
    highest = 0
    if services is None:
        return 1
    for name, node in system.children(services):
        tag = system.get(node, "Tag")
        if name.casefold() == service.casefold() and tag is not None:
            return tag.as_int()
        grp = system.get(node, "Group")
        if grp is None or tag is None or grp.as_str().casefold() != group.casefold():
            continue
        try:
            highest = max(highest, tag.as_int())
        except ValueError:
            continue
    return highest + 1


def install_service(system: Hive, control_set: str, d: BootDriverInstall) -> None:
    base = f"{control_set}\\Services\\{d.service}"
    tag = next_tag(system, control_set, d.group, d.service)
    system.set_values(
        base,
        {
            "Type": RegValue.dword(SERVICE_KERNEL_DRIVER),
            "Start": RegValue.dword(SERVICE_BOOT_START),
            "ErrorControl": RegValue.dword(SERVICE_ERROR_NORMAL),
            "Group": RegValue.sz(d.group),
            "ImagePath": RegValue.expand_sz(f"System32\\drivers\\{d.sys_name}"),
            "DisplayName": RegValue.sz(d.description),
            "Owners": RegValue.multi_sz([d.inf_name]),
            "Tag": RegValue.dword(tag),
        },
    )
    if d.service_parameters:
        system.set_values(f"{base}\\Parameters", {k: RegValue.dword(v) for k, v in d.service_parameters})
    if d.pnp_interface is not None:
        system.set_values(f"{base}\\Parameters\\PnpInterface", {str(d.pnp_interface): RegValue.dword(1)})


def install_critical_device_entries(system: Hive, control_set: str, d: BootDriverInstall) -> None:
    cdd = f"{control_set}\\Control\\CriticalDeviceDatabase"
    for hwid in d.all_hardware_ids:
        system.set_values(
            f"{cdd}\\pci#{hwid.casefold()}",
            {"Service": RegValue.sz(d.service), "ClassGUID": RegValue.sz(d.class_guid)},
        )


def install_driver_database(system: Hive, d: BootDriverInstall, *, now: float | None = None) -> str:
    """Write the DriverDatabase entries; returns the package name."""
    pkg = package_name(d.inf_name, d.arch_folder, d.inf_bytes)
    ddb = "DriverDatabase"
    system.set_values(
        f"{ddb}\\DriverInfFiles\\{d.inf_name}",
        {
            "": RegValue.multi_sz([pkg]),
            "Active": RegValue.sz(pkg),
            "Configurations": RegValue.multi_sz([d.inf_section]),
        },
    )
    stamp = struct.pack("<Q", _filetime(time.time() if now is None else now))
    # Version record: class GUID, driver date (FILETIME, unknown: 0), driver version (0).
    version_record = _guid_bytes(d.class_guid) + struct.pack("<QQ", 0, 0)
    pkg_key = f"{ddb}\\DriverPackages\\{pkg}"
    system.set_values(
        pkg_key,
        {
            "": RegValue.sz(d.inf_name),
            "Catalog": RegValue.sz(d.inf_name.rsplit(".", 1)[0] + ".cat"),
            "ImportDate": RegValue(REG_BINARY, stamp),
            "InfName": RegValue.sz(d.inf_name),
            "OemPath": RegValue.sz(d.oem_path),
            "Provider": RegValue.sz(d.provider),
            "SignerName": RegValue.sz(SIGNER_NAME),
            "SignerScore": RegValue.dword(SIGNER_SCORE_WHQL),
            "StatusFlags": RegValue.dword(STATUS_FLAGS),
            "Version": RegValue.binary(version_record),
        },
    )
    system.set_values(
        f"{pkg_key}\\Configurations\\{d.inf_section}",
        {"ConfigFlags": RegValue.dword(0), "Service": RegValue.sz(d.service)},
    )
    for hwid in d.hardware_ids:
        system.set_values(
            f"{pkg_key}\\Descriptors\\PCI\\{hwid}",
            {
                "Configuration": RegValue.sz(d.inf_section),
                "Manufacturer": RegValue.sz(d.provider),
                "Description": RegValue.sz(d.description),
            },
        )
        system.set_values(f"{ddb}\\DeviceIds\\PCI\\{hwid}", {d.inf_name: RegValue.binary(DEVICE_ID_RANK)})
    return pkg
