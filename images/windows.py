"""Registry-level Windows test guests (they cannot boot: they exist to be converted and read).

Each guest is a qcow2 disk (200 MiB virtual): an MBR with a fixed disk signature, one
NTFS partition at 1 MiB, and on it the tree libguestfs inspection looks for
(``Windows/System32/config``, ``Windows/System32/cmd.exe``, which must be a PE file so
that libguestfs can tell the architecture) plus ``Program Files``, ``Users``,
``ProgramData`` and a few dummy driver files. The SYSTEM and SOFTWARE hives start as
empty hives from :mod:`images.regf` and are filled with python3-hivex:

* SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion: ProductName, CurrentVersion,
  CurrentMajor/MinorVersionNumber (10.0 guests only, as on real ones), CurrentBuild(Number),
  EditionID, InstallationType, SystemRoot; an Uninstall entry for VMware Tools on the
  guests that came from VMware;
* SYSTEM\\Select (Current/Default/LastKnownGood = 1), ControlSet001 with the original
  storage and NIC services (storahci, LSI_SAS, pvscsi, e1i63x64, vmxnet3ndis6, ...),
  Control\\Class, GroupOrderList, ServiceGroupOrder, TimeZoneInformation (the
  ``windows-10`` guest has RealTimeIsUniversal=1, the others keep the RTC in local
  time), ComputerName, Tcpip hostname, and MountedDevices mapping C: to the partition.

Recipes: ``windows-2019``, ``windows-2022``, ``windows-10`` and ``windows-2008`` (6.0,
for which the fake virtio-win source has no drivers). :data:`WINDOWS_GUESTS` holds what
each one is; ``images.GUESTS[name]`` the facts tests check.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from images.host import run, scratch_dir
from images.regf import write_empty_hive

log = logging.getLogger("images")

DISK_SIZE = "200M"
PART_START_SECTOR = 2048
PART_OFFSET = PART_START_SECTOR * 512


def disk_signature(name: str) -> int:
    """The MBR disk ID (at 0x1B8, also in MountedDevices): fixed per guest, distinct between guests."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") or 1


REG_SZ, REG_EXPAND_SZ, REG_BINARY, REG_DWORD, REG_MULTI_SZ = 1, 2, 3, 4, 7

CLASS_SCSIADAPTER = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
CLASS_NET = "{4D36E972-E325-11CE-BFC1-08002BE10318}"
CLASS_SYSTEM = "{4D36E97D-E325-11CE-BFC1-08002BE10318}"

VMWARE_TOOLS_GUID = "{8D8A1D6C-5C4E-4F2A-9E0B-3B1B5A7C2F10}"

ORIGINAL_STORAGE = ("storahci", "LSI_SAS", "stornvme")
ORIGINAL_STORAGE_2008 = ("msahci", "LSI_SAS", "atapi")
ORIGINAL_NETWORK = ("e1i63x64",)
ORIGINAL_NETWORK_2008 = ("E1G60",)
VMWARE_SERVICES = ("pvscsi", "vmxnet3ndis6", "VMTools")


@dataclass(frozen=True)
class WindowsGuest:
    """What one test guest is (also the recipe's hashed parameters)."""

    name: str
    product_name: str
    edition_id: str
    installation_type: str  # "Server" or "Client"
    major: int
    minor: int
    current_version: str  # the old-style "6.3" string
    build: int
    hostname: str
    arch: str = "x86_64"
    version_dwords: bool = True  # CurrentMajor/MinorVersionNumber exist from Windows 10 on
    vmware_tools: bool = False
    rtc_utc: bool = False
    storage_services: tuple[str, ...] = ORIGINAL_STORAGE
    network_services: tuple[str, ...] = ORIGINAL_NETWORK
    virtio_folder: str | None = None  # expected virtio-win version folder (None: none exists)
    extra: dict[str, str] = field(default_factory=dict)


WINDOWS_GUESTS: dict[str, WindowsGuest] = {
    g.name: g
    for g in (
        WindowsGuest(
            name="windows-2019",
            product_name="Windows Server 2019 Standard",
            edition_id="ServerStandard",
            installation_type="Server",
            major=10, minor=0, current_version="6.3", build=17763,
            hostname="WIN2019-APP",
            vmware_tools=True,
            storage_services=(*ORIGINAL_STORAGE, "pvscsi"),
            network_services=(*ORIGINAL_NETWORK, "vmxnet3ndis6"),
            virtio_folder="2k19",
        ),
        WindowsGuest(
            name="windows-2022",
            product_name="Windows Server 2022 Datacenter",
            edition_id="ServerDatacenter",
            installation_type="Server",
            major=10, minor=0, current_version="6.3", build=20348,
            hostname="WIN2022-DB",
            vmware_tools=True,
            storage_services=(*ORIGINAL_STORAGE, "pvscsi"),
            network_services=(*ORIGINAL_NETWORK, "vmxnet3ndis6"),
            virtio_folder="2k22",
        ),
        WindowsGuest(
            name="windows-10",
            product_name="Windows 10 Pro",
            edition_id="Professional",
            installation_type="Client",
            major=10, minor=0, current_version="6.3", build=19045,
            hostname="DESKTOP-P2V10",
            rtc_utc=True,
            virtio_folder="w10",
        ),
        WindowsGuest(
            name="windows-2008",
            product_name="Windows Server (R) 2008 Standard",
            edition_id="ServerStandard",
            installation_type="Server",
            major=6, minor=0, current_version="6.0", build=6002,
            hostname="WIN2008-OLD",
            version_dwords=False,
            storage_services=ORIGINAL_STORAGE_2008,
            network_services=ORIGINAL_NETWORK_2008,
            virtio_folder=None,
        ),
    )
}  # fmt: skip


# -- file contents ------------------------------------------------------------------------------


def pe_stub(label: str, *, arch: str = "x86_64", subsystem: int = 3) -> bytes:
    """A minimal PE header (what `file` needs to say "PE32+ executable ... x86-64").

    subsystem 3 = console (cmd.exe), 1 = native (ntoskrnl.exe), 2 = GUI.
    """
    pe32plus = arch == "x86_64"
    machine = 0x8664 if pe32plus else 0x014C
    opt_size = 0xF0 if pe32plus else 0xE0
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    dos[0x40 : 0x40 + 39] = b"This program cannot be run in DOS mode."
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", machine, 0, 0x5E000000, 0, 0, opt_size,
                       0x0022 if pe32plus else 0x0102)  # fmt: skip
    opt = bytearray(opt_size)
    struct.pack_into("<HBB", opt, 0, 0x20B if pe32plus else 0x10B, 14, 20)
    if pe32plus:
        struct.pack_into("<Q", opt, 24, 0x140000000)
    else:
        struct.pack_into("<I", opt, 28, 0x400000)
    struct.pack_into("<IIHHHHHHIIIIHH", opt, 32, 0x1000, 0x200, 10, 0, 10, 0, 10, 0, 0, 0x2000, 0x400, 0,
                     subsystem, 0x8160)  # fmt: skip
    struct.pack_into("<I", opt, opt_size - 132, 16)  # NumberOfRvaAndSizes, then 16 empty directories
    header = bytes(dos) + coff + bytes(opt)
    body = f"p2v registry-level test guest: dummy {label}\n".encode()
    return header + b"\0" * (0x400 - len(header)) + body


def dummy_file(label: str) -> bytes:
    return f"p2v registry-level test guest: dummy {label}\n".encode()


# -- hives --------------------------------------------------------------------------------------


def _sz(text: str, t: int = REG_SZ) -> tuple[int, bytes]:
    return t, (text + "\0").encode("utf-16-le")


def _multi(items: list[str]) -> tuple[int, bytes]:
    return REG_MULTI_SZ, ("".join(f"{s}\0" for s in items) + "\0").encode("utf-16-le")


def _dword(n: int) -> tuple[int, bytes]:
    return REG_DWORD, struct.pack("<I", n & 0xFFFFFFFF)


def _bin(data: bytes) -> tuple[int, bytes]:
    return REG_BINARY, data


class _HiveWriter:
    """Fill a fresh hive: ``put("A\\B", {"Name": (type, bytes)})``."""

    def __init__(self, path: Path) -> None:
        import hivex

        write_empty_hive(path)
        self.path = path
        self.h = hivex.Hivex(str(path), write=True)

    def key(self, path: str) -> int:
        node = self.h.root()
        for part in path.split("\\"):
            child = self.h.node_get_child(node, part)
            node = child if child else self.h.node_add_child(node, part)
        return int(node)

    def put(self, path: str, values: Mapping[str, tuple[int, bytes]]) -> None:
        node = self.key(path)
        self.h.node_set_values(node, [{"key": k, "t": t, "value": v} for k, (t, v) in values.items()])

    def commit(self) -> None:
        self.h.commit(str(self.path))


def _service(
    image: str,
    *,
    start: int,
    group: str | None,
    typ: int = 1,
    error_control: int = 1,
    display: str = "",
    tag: int | None = None,
    owners: list[str] | None = None,
) -> dict[str, tuple[int, bytes]]:
    values: dict[str, tuple[int, bytes]] = {
        "Type": _dword(typ),
        "Start": _dword(start),
        "ErrorControl": _dword(error_control),
        "ImagePath": _sz(image, REG_EXPAND_SZ),
    }
    if group:
        values["Group"] = _sz(group)
    if display:
        values["DisplayName"] = _sz(display)
    if tag is not None:
        values["Tag"] = _dword(tag)
    if owners:
        values["Owners"] = _multi(owners)
    return values


def _original_services(guest: WindowsGuest) -> dict[str, dict[str, tuple[int, bytes]]]:
    drv = "System32\\drivers\\"
    catalog: dict[str, dict[str, tuple[int, bytes]]] = {
        "storahci": _service(drv + "storahci.sys", start=0, group="SCSI Miniport", error_control=3, tag=65,
                             display="@mshdc.inf,%storahci.devicedesc%;Microsoft Standard SATA AHCI Driver",
                             owners=["mshdc.inf"]),
        "msahci": _service(drv + "msahci.sys", start=0, group="SCSI miniport", error_control=3, tag=33,
                           display="msahci", owners=["mshdc.inf"]),
        "atapi": _service(drv + "atapi.sys", start=0, group="SCSI miniport", tag=25,
                          display="atapi", owners=["mshdc.inf"]),
        "stornvme": _service(drv + "stornvme.sys", start=0, group="SCSI Miniport", tag=66,
                             display="@stornvme.inf,%StorNVMe.SvcDesc%;Microsoft Standard NVM Express Driver",
                             owners=["stornvme.inf"]),
        "LSI_SAS": _service(drv + "lsi_sas.sys", start=0, group="SCSI miniport", tag=34,
                            display="@lsi_sas.inf,%LSI_SAS.SvcDesc%;LSI SAS", owners=["lsi_sas.inf"]),
        "pvscsi": _service(drv + "pvscsi.sys", start=0, group="SCSI miniport", tag=35,
                           display="pvscsi", owners=["oem3.inf"]),
        "e1i63x64": _service("\\SystemRoot\\System32\\drivers\\e1i63x64.sys", start=3, group="NDIS",
                             display="@net1ic64.inf,%e1iExpress.Service.DispName%;Intel(R) PRO/1000 PCI-E",
                             owners=["net1ic64.inf"]),
        "E1G60": _service(drv + "E1G6032E.sys", start=3, group="NDIS", display="Intel(R) PRO/1000",
                          owners=["nete1g32.inf"]),
        "vmxnet3ndis6": _service(drv + "vmxnet3.sys", start=3, group="NDIS",
                                 display="vmxnet3 NDIS 6 Ethernet Adapter Driver", owners=["oem5.inf"]),
        "VMTools": _service("\"C:\\Program Files\\VMware\\VMware Tools\\vmtoolsd.exe\"", start=2, group=None,
                            typ=0x10, display="VMware Tools"),
    }  # fmt: skip
    names = [*guest.storage_services, *guest.network_services]
    if guest.vmware_tools:
        names += [s for s in VMWARE_SERVICES if s not in names]
    return {n: catalog[n] for n in names}


def build_system_hive(path: Path, guest: WindowsGuest) -> None:
    w = _HiveWriter(path)
    w.put("Select", {"Current": _dword(1), "Default": _dword(1), "LastKnownGood": _dword(1),
                     "Failed": _dword(0)})  # fmt: skip
    cs = "ControlSet001"
    w.put(f"{cs}\\Control", {"SystemBootDevice": _sz("multi(0)disk(0)rdisk(0)partition(1)"),
                             "SystemStartOptions": _sz(" NOEXECUTE=OPTOUT")})  # fmt: skip
    w.put(f"{cs}\\Control\\ComputerName\\ComputerName", {"ComputerName": _sz(guest.hostname)})
    tz: dict[str, tuple[int, bytes]] = {
        "TimeZoneKeyName": _sz("W. Europe Standard Time"),
        "StandardName": _sz("@tzres.dll,-322"),
        "DaylightName": _sz("@tzres.dll,-321"),
        "Bias": _dword(-60),
        "ActiveTimeBias": _dword(-60),
        "DaylightBias": _dword(-60),
        "StandardBias": _dword(0),
        "DynamicDaylightTimeDisabled": _dword(0),
    }
    if guest.rtc_utc:
        tz["RealTimeIsUniversal"] = _dword(1)
    w.put(f"{cs}\\Control\\TimeZoneInformation", tz)
    w.put(f"{cs}\\Control\\Session Manager\\Environment", {
        "PROCESSOR_ARCHITECTURE": _sz("AMD64" if guest.arch == "x86_64" else "x86"),
        "OS": _sz("Windows_NT"),
        "ComSpec": _sz("%SystemRoot%\\system32\\cmd.exe", REG_EXPAND_SZ),
    })  # fmt: skip
    w.put(f"{cs}\\Control\\ServiceGroupOrder", {"List": _multi([
        "System Reserved", "EMS", "WdfLoadGroup", "Boot Bus Extender", "System Bus Extender",
        "SCSI miniport", "Port", "Primary Disk", "SCSI Class", "SCSI CDROM Class", "FSFilter Infrastructure",
        "Filter", "Boot File System", "Base", "Pointer Port", "Keyboard Port", "Video Init", "Video",
        "File System", "Event Log", "Streams Drivers", "NDIS Wrapper", "NDIS", "PNP_TDI", "TDI",
        "NetBIOSGroup", "Extended Base"])})  # fmt: skip
    # GroupOrderList: a count, then the tags in load order.
    w.put(f"{cs}\\Control\\GroupOrderList", {
        "SCSI miniport": _bin(struct.pack("<6I", 5, 25, 33, 34, 35, 36)),
        "SCSI Miniport": _bin(struct.pack("<3I", 2, 65, 66)),
    })  # fmt: skip
    storage_desc = {
        "storahci": "Standard SATA AHCI Controller",
        "msahci": "Standard AHCI 1.0 Serial ATA Controller",
    }
    first_storage = guest.storage_services[0]
    w.put(f"{cs}\\Control\\Class\\{CLASS_SCSIADAPTER}",
          {"": _sz("Storage controllers"), "Class": _sz("SCSIAdapter")})  # fmt: skip
    w.put(f"{cs}\\Control\\Class\\{CLASS_SCSIADAPTER}\\0000", {
        "DriverDesc": _sz(storage_desc.get(first_storage, first_storage)),
        "ProviderName": _sz("Microsoft"),
        "InfPath": _sz("mshdc.inf"),
        "InfSection": _sz(first_storage),
        "MatchingDeviceId": _sz("pci\\cc_010601"),
        "DriverVersion": _sz(f"{guest.major}.{guest.minor}.{guest.build}.1"),
    })  # fmt: skip
    w.put(f"{cs}\\Control\\Class\\{CLASS_NET}", {"": _sz("Network adapters"), "Class": _sz("Net")})
    w.put(f"{cs}\\Control\\Class\\{CLASS_NET}\\0000", {
        "DriverDesc": _sz("Intel(R) 82574L Gigabit Network Connection"),
        "ProviderName": _sz("Intel"),
        "ComponentId": _sz("pci\\ven_8086&dev_10d3"),
        "MatchingDeviceId": _sz("pci\\ven_8086&dev_10d3"),
        "NetCfgInstanceId": _sz("{3C1B6E5A-8D2F-4C7E-9A1B-5E6D7F8A9B0C}"),
        "InfPath": _sz("net1ic64.inf"),
    })  # fmt: skip
    w.put(f"{cs}\\Control\\Class\\{CLASS_SYSTEM}", {"": _sz("System devices"), "Class": _sz("System")})
    if (guest.major, guest.minor) < (6, 2):
        # Windows before 8/2012 picks boot drivers through the CriticalDeviceDatabase.
        w.put(f"{cs}\\Control\\CriticalDeviceDatabase\\pci#cc_0106", {
            "Service": _sz(first_storage), "ClassGUID": _sz(CLASS_SCSIADAPTER)})  # fmt: skip
    for name, values in _original_services(guest).items():
        w.put(f"{cs}\\Services\\{name}", values)
    if "LSI_SAS" in guest.storage_services:
        w.put(f"{cs}\\Services\\LSI_SAS\\Parameters", {"BusType": _dword(10)})
        w.put(f"{cs}\\Services\\LSI_SAS\\Parameters\\PnpInterface", {"5": _dword(1)})
    if "storahci" in guest.storage_services:
        w.put(f"{cs}\\Services\\storahci\\Parameters", {"BusType": _dword(11)})
    w.put(f"{cs}\\Services\\disk", _service(
        "System32\\drivers\\disk.sys", start=0, group="SCSI Class", display="Disk Driver"))  # fmt: skip
    w.put(f"{cs}\\Services\\PlugPlay", _service(
        "%SystemRoot%\\system32\\svchost.exe -k DcomLaunch -p", start=2, group=None, typ=0x20,
        display="Plug and Play"))  # fmt: skip
    host = _sz(guest.hostname)
    w.put(f"{cs}\\Services\\Tcpip\\Parameters", {"Hostname": host, "NV Hostname": host, "Domain": _sz("")})
    blob = struct.pack("<IQ", disk_signature(guest.name), PART_OFFSET)
    w.put("MountedDevices", {
        "\\DosDevices\\C:": _bin(blob),
        "\\??\\Volume{6b29fc40-ca47-1067-b31d-00dd010662da}": _bin(blob),
    })  # fmt: skip
    w.commit()


def build_software_hive(path: Path, guest: WindowsGuest) -> None:
    w = _HiveWriter(path)
    cv: dict[str, tuple[int, bytes]] = {
        "ProductName": _sz(guest.product_name),
        "CurrentVersion": _sz(guest.current_version),
        "CurrentBuildNumber": _sz(str(guest.build)),
        "CurrentBuild": _sz(str(guest.build)),
        "EditionID": _sz(guest.edition_id),
        "InstallationType": _sz(guest.installation_type),
        "SystemRoot": _sz("C:\\Windows"),
        "PathName": _sz("C:\\Windows"),
        "RegisteredOwner": _sz("p2v test"),
        "InstallDate": _dword(1577836800),
        "BuildLab": _sz(f"{guest.build}.rs_release.p2v-test"),
    }
    if guest.version_dwords:
        cv["CurrentMajorVersionNumber"] = _dword(guest.major)
        cv["CurrentMinorVersionNumber"] = _dword(guest.minor)
        cv["UBR"] = _dword(1)
    w.put("Microsoft\\Windows NT\\CurrentVersion", cv)
    w.put("Microsoft\\Windows\\CurrentVersion", {
        "ProgramFilesDir": _sz("C:\\Program Files"),
        "CommonFilesDir": _sz("C:\\Program Files\\Common Files"),
        "DevicePath": _sz("%SystemRoot%\\inf", REG_EXPAND_SZ),
    })  # fmt: skip
    uninstall = "Microsoft\\Windows\\CurrentVersion\\Uninstall"
    w.put(f"{uninstall}\\7-Zip", {
        "DisplayName": _sz("7-Zip 19.00 (x64)"),
        "DisplayVersion": _sz("19.00"),
        "Publisher": _sz("Igor Pavlov"),
        "UninstallString": _sz("\"C:\\Program Files\\7-Zip\\Uninstall.exe\""),
    })  # fmt: skip
    if guest.vmware_tools:
        w.put(f"{uninstall}\\{VMWARE_TOOLS_GUID}", {
            "DisplayName": _sz("VMware Tools"),
            "DisplayVersion": _sz("11.3.5.18557794"),
            "Publisher": _sz("VMware, Inc."),
            "InstallLocation": _sz("C:\\Program Files\\VMware\\VMware Tools\\"),
            "UninstallString": _sz(f"MsiExec.exe /X{VMWARE_TOOLS_GUID}", REG_EXPAND_SZ),
            "WindowsInstaller": _dword(1),
        })  # fmt: skip
    w.commit()


# -- the disk -----------------------------------------------------------------------------------


def _guest_files(guest: WindowsGuest) -> dict[str, bytes]:
    files = {
        "/Windows/System32/cmd.exe": pe_stub("cmd.exe", arch=guest.arch, subsystem=3),
        "/Windows/System32/ntoskrnl.exe": pe_stub("ntoskrnl.exe", arch=guest.arch, subsystem=1),
        "/Windows/System32/hal.dll": pe_stub("hal.dll", arch=guest.arch, subsystem=1),
        "/Windows/System32/pnputil.exe": pe_stub("pnputil.exe", arch=guest.arch, subsystem=3),
        "/Windows/System32/drivers/disk.sys": pe_stub("disk.sys", arch=guest.arch, subsystem=1),
        "/Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
        "/Windows/win.ini": b"; for 16-bit app support\r\n[fonts]\r\n",
        "/bootmgr": dummy_file("bootmgr"),
        "/Users/Public/desktop.ini": b"[.ShellClassInfo]\r\n",
    }
    images = {
        "storahci": "storahci.sys", "msahci": "msahci.sys", "atapi": "atapi.sys", "stornvme": "stornvme.sys",
        "LSI_SAS": "lsi_sas.sys", "pvscsi": "pvscsi.sys", "e1i63x64": "e1i63x64.sys",
        "E1G60": "E1G6032E.sys", "vmxnet3ndis6": "vmxnet3.sys",
    }  # fmt: skip
    for svc in (*guest.storage_services, *guest.network_services):
        files[f"/Windows/System32/drivers/{images[svc]}"] = pe_stub(images[svc], arch=guest.arch, subsystem=1)
    if guest.vmware_tools:
        files["/Program Files/VMware/VMware Tools/vmtoolsd.exe"] = pe_stub("vmtoolsd.exe", arch=guest.arch)
        files["/Windows/System32/drivers/pvscsi.sys"] = pe_stub("pvscsi.sys", arch=guest.arch, subsystem=1)
    return files


DIRECTORIES = (
    "/Windows/System32/config",
    "/Windows/System32/drivers/etc",
    "/Windows/INF",
    "/Windows/Temp",
    "/Program Files/Common Files",
    "/Program Files (x86)",
    "/ProgramData",
    "/Users/Public",
    "/Users/Administrator",
    "/Boot",
)


def build_windows_image(out: Path, guest: WindowsGuest) -> Path:
    """Write guest ``guest`` as a qcow2 disk at ``out``."""
    from p2v.disks.guestfs import open_guestfs

    run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), DISK_SIZE])
    with scratch_dir(f"{guest.name}-hives") as work:
        system, software = work / "SYSTEM", work / "SOFTWARE"
        build_system_hive(system, guest)
        build_software_hive(software, guest)
        empties = {n: write_empty_hive(work / n) for n in ("SAM", "SECURITY", "DEFAULT")}
        bcd = write_empty_hive(work / "BCD", root_name="NewStoreRoot")
        with open_guestfs([(out, "qcow2")], readonly=False) as g:
            g.part_init("/dev/sda", "mbr")
            g.part_add("/dev/sda", "p", PART_START_SECTOR, -1)
            g.part_set_mbr_id("/dev/sda", 1, 0x07)
            g.part_set_bootable("/dev/sda", 1, True)
            g.pwrite_device("/dev/sda", struct.pack("<I", disk_signature(guest.name)), 0x1B8)
            g.mkfs("ntfs", "/dev/sda1", label="System")
            g.mount("/dev/sda1", "/")
            for d in DIRECTORIES:
                g.mkdir_p(d)
            for path, data in _guest_files(guest).items():
                g.mkdir_p(path.rsplit("/", 1)[0] or "/")
                g.write(path, data)
            config = "/Windows/System32/config"
            g.upload(str(system), f"{config}/SYSTEM")
            g.upload(str(software), f"{config}/SOFTWARE")
            for name, hive in empties.items():
                g.upload(str(hive), f"{config}/{name}")
            g.upload(str(bcd), "/Boot/BCD")
            g.umount_all()
    return out


def guest_facts(guest: WindowsGuest) -> dict[str, Any]:
    """What tests may assert about a guest (for ``images.GUESTS``)."""
    return {
        "os": "windows",
        "product_name": guest.product_name,
        "major": guest.major,
        "minor": guest.minor,
        "build": guest.build,
        "variant": guest.installation_type,
        "arch": guest.arch,
        "systemroot": "/Windows",
        "hostname": guest.hostname,
        "storage_services": list(guest.storage_services),
        "network_services": list(guest.network_services),
        "vmware_tools_guid": VMWARE_TOOLS_GUID if guest.vmware_tools else None,
        "rtc": "utc" if guest.rtc_utc else "localtime",
        "virtio_folder": guest.virtio_folder,
        "disk_signature": disk_signature(guest.name),
    }


def _register() -> None:
    from images import GUESTS, Recipe, module_source, register, virtio_win
    from images import regf as regf_module

    virtio_win.register_recipes()
    sources = (module_source(__name__), module_source(regf_module.__name__))
    for guest in WINDOWS_GUESTS.values():

        def build(out: Path, parents: Mapping[str, Path], guest: WindowsGuest = guest) -> None:
            build_windows_image(out, guest)

        register(
            Recipe(
                name=guest.name,
                ext="qcow2",
                build=build,
                sources=sources,
                params=asdict(guest),
                uses_ssh_keys=False,
                description=f"registry-level {guest.product_name} ({guest.major}.{guest.minor} "
                f"build {guest.build}) for conversion tests; does not boot",
            )
        )
        GUESTS[guest.name] = guest_facts(guest)


_register()
