"""OVF descriptors (DMTF Open Virtualization Format, as VMware/VirtualBox export them).

``parse_ovf`` turns descriptor XML into an :class:`OvfDescriptor` (pure, no I/O).
The package rules that need no I/O (manifest lines, href containment, image
format choice) are here too; reading packages (manifest hashing, safe
extraction, disk checks) is :mod:`p2v.sources.ova`, which ``open_ovf`` uses
for an unpacked OVF folder.

The XML is parsed with defusedxml and any DTD is refused: an OVF never needs
one, and a DTD is how entity bombs and external-entity reads get in.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as DET

from p2v.errors import InvalidInput, UnsafeInput
from p2v.sources import vmdk
from p2v.sources.model import SourceMachine

MAX_OVF_BYTES = 16 << 20
MANIFEST_ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}

# CIM ResourceType values used in VirtualHardwareSection items
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC, RT_FLOPPY, RT_CD, RT_DVD, RT_DISK, RT_STORAGE = (
    3, 4, 5, 6, 10, 14, 15, 16, 17, 20,
)
BUS_ORDER = {"scsi": 0, "sata": 1, "ide": 2, "nvme": 3}

_MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
_HOST_RESOURCE = re.compile(r"^\s*(?:ovf:)?/?(disk|file)/(.+?)\s*$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_UNITS = re.compile(r"^\s*bytes?\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.IGNORECASE)
_WORD_UNITS = {"bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30,
               "terabytes": 1 << 40}
_SCSI_MODELS = {"lsilogicsas": "lsisas1068", "virtualscsi": "pvscsi", "lsilogic": "lsilogic",
                "buslogic": "buslogic"}
_NIC_MODELS = {"pcnet32": "pcnet", "vmxnet3": "vmxnet3", "vmxnet2": "vmxnet2", "vmxnet": "vmxnet",
               "e1000": "e1000", "e1000e": "e1000e", "virtio": "virtio"}


@dataclass
class OvfFile:
    id: str
    href: str
    size: int | None = None
    compression: str | None = None  # "gzip" or None
    chunk_size: int | None = None


@dataclass
class OvfDisk:
    disk_id: str | None
    href: str | None  # the file holding the disk (None: a blank disk to create)
    format: str | None  # qemu format name from ovf:format (vmdk, qcow2, vpc, ...), None if unsaid
    format_uri: str | None = None
    capacity: int | None = None  # bytes
    bus: str | None = None  # scsi | sata | ide | nvme
    controller: str | None = None  # lsilogic, lsisas1068, pvscsi, buslogic, ahci, piix4, nvme
    controller_address: int | None = None
    unit: int | None = None  # AddressOnParent
    order: int = 0
    label: str | None = None  # the item's ElementName ("Hard disk 1")
    file: OvfFile | None = None


@dataclass
class OvfNic:
    mac: str | None
    model: str | None
    network: str | None
    label: str | None = None


@dataclass
class OvfDescriptor:
    origin: str
    name: str | None
    cpus: int | None
    memory_mib: int | None
    firmware: str | None  # bios | uefi | None (unknown)
    disks: list[OvfDisk]
    nics: list[OvfNic]
    files: list[OvfFile]
    secure_boot: bool = False
    os_description: str | None = None
    os_type: str | None = None  # vmw:osType, e.g. windows7Server64Guest
    removable: list[str] = field(default_factory=list)  # bus of each CD/DVD drive
    notes: list[str] = field(default_factory=list)


# --- XML helpers (namespace-agnostic: OVF 1.x, 2.x and vendor prefixes all use the same local names)


def _local(tag: object) -> str:
    return str(tag).rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    found = _children(el, name)
    return found[0] if found else None


def _text(el: ET.Element, name: str) -> str | None:
    c = _child(el, name)
    if c is None or c.text is None:
        return None
    return c.text.strip() or None


def _int(value: str | None, *, what: str, origin: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError as exc:
        raise InvalidInput(f"{origin}: {what} {value!r} is not a number") from exc


def _maybe_int(value: str | None) -> int | None:
    """A number where one is usual but not essential (bus addresses): None when it is not one."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def unit_multiplier(units: str | None, *, default: int, origin: str) -> int:
    """Bytes per unit for an OVF allocation-units string ("byte * 2^20", "MegaBytes")."""
    if not units:
        return default
    m = _UNITS.match(units)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    word = _WORD_UNITS.get(units.strip().lower())
    if word:
        return word
    raise InvalidInput(f"{origin}: unknown allocation units {units!r}")


def format_from_uri(uri: str | None) -> str | None:
    """qemu format name for an OVF ``ovf:format`` URI, None when it names none we know."""
    if not uri:
        return None
    low = uri.lower()
    if "vmdk" in low:
        return "vmdk"
    if "qcow" in low:
        return "qcow2"
    if "vhdx" in low:
        return "vhdx"
    if "vhd" in low or "bb676673" in low:  # the VHD specification's Microsoft page
        return "vpc"
    if low.endswith(("#raw", "/raw")):
        return "raw"
    return None


# --- parsing ----------------------------------------------------------------------------------------


def _parse_xml(xml_bytes: bytes, origin: str) -> ET.Element:
    if len(xml_bytes) > MAX_OVF_BYTES:
        raise UnsafeInput(f"{origin}: OVF descriptor is {len(xml_bytes)} bytes; refusing (limit 16 MiB)")
    try:
        root: ET.Element = DET.fromstring(xml_bytes, forbid_dtd=True)
    except defusedxml.DefusedXmlException as exc:
        raise UnsafeInput(
            f"{origin}: XML declares a DTD or entities ({exc}); refusing it (entity bomb / external entity)"
        ) from exc
    except ET.ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        raise InvalidInput(f"{origin}: malformed XML at line {line}, column {column}: {exc}") from exc
    return root


def _default_configuration(envelope: ET.Element) -> str | None:
    for section in envelope.iter():
        if _local(section.tag) != "DeploymentOptionSection":
            continue
        configs = _children(section, "Configuration")
        for c in configs:
            if (_attr(c, "default") or "").lower() == "true":
                return _attr(c, "id")
        return _attr(configs[0], "id") if configs else None
    return None


@dataclass
class _Item:
    fields: dict[str, str]  # child local name -> text (the first of each)

    def get(self, name: str) -> str | None:
        return self.fields.get(name)

    def int(self, name: str, origin: str) -> int | None:
        return _int(self.get(name), what=name, origin=origin)


def _items(section: ET.Element, configuration: str | None) -> list[_Item]:
    items: list[_Item] = []
    for el in section:
        if _local(el.tag) not in {"Item", "StorageItem", "EthernetPortItem"}:
            continue
        wanted = _attr(el, "configuration")
        if wanted and configuration and configuration not in wanted.split():
            continue
        fields: dict[str, str] = {}
        for c in el:
            name = _local(c.tag)
            if name not in fields and c.text and c.text.strip():
                fields[name] = c.text.strip()
        items.append(_Item(fields))
    return items


def _section_config(section: ET.Element) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in section:
        if _local(c.tag) in {"Config", "ExtraConfig"}:
            key = _attr(c, "key")
            if key:
                out[key.lower()] = _attr(c, "value") or ""
    return out


def _controller(item: _Item, rtype: int) -> tuple[str, str | None]:
    sub = (item.get("ResourceSubType") or "").strip()
    low = sub.lower()
    if rtype == RT_IDE:
        return "ide", (low or None)
    if rtype == RT_SCSI:
        return "scsi", _SCSI_MODELS.get(low, low or None)
    if "nvme" in low:
        return "nvme", "nvme"
    return "sata", "ahci"


def parse_ovf(xml_bytes: bytes, *, origin: str) -> OvfDescriptor:
    """Parse an OVF descriptor.

    Raises UnsafeInput when the XML carries a DTD/entity declaration (or is larger
    than 16 MiB), InvalidInput when it is malformed (with the parser's line and
    column) or is not a single-machine OVF envelope.
    """
    root = _parse_xml(xml_bytes, origin)
    if _local(root.tag) != "Envelope":
        raise InvalidInput(f"{origin}: not an OVF descriptor (root element is {_local(root.tag)!r})")
    notes: list[str] = []

    files: dict[str, OvfFile] = {}
    for refs in _children(root, "References"):
        for file_el in _children(refs, "File"):
            fid, href = _attr(file_el, "id"), _attr(file_el, "href")
            if not fid or not href:
                raise InvalidInput(f"{origin}: a <File> reference lacks ovf:id or ovf:href")
            files[fid] = OvfFile(
                id=fid,
                href=href,
                size=_int(_attr(file_el, "size"), what="ovf:size", origin=origin),
                compression=(_attr(file_el, "compression") or None),
                chunk_size=_int(_attr(file_el, "chunkSize"), what="ovf:chunkSize", origin=origin),
            )

    disk_defs: dict[str, OvfDisk] = {}
    for section in (s for s in root.iter() if _local(s.tag) == "DiskSection"):
        for disk_el in _children(section, "Disk"):
            disk_id = _attr(disk_el, "diskId")
            fref = _attr(disk_el, "fileRef")
            cap_raw = _attr(disk_el, "capacity")
            capacity = None
            if cap_raw and cap_raw.strip().isdigit():
                mult = unit_multiplier(_attr(disk_el, "capacityAllocationUnits"), default=1, origin=origin)
                capacity = int(cap_raw) * mult
            uri = _attr(disk_el, "format")
            ofile = files.get(fref) if fref else None
            if fref and ofile is None:
                raise InvalidInput(f"{origin}: disk {disk_id!r} refers to unknown file id {fref!r}")
            disk_defs[disk_id or f"#{len(disk_defs)}"] = OvfDisk(
                disk_id=disk_id,
                href=ofile.href if ofile else None,
                format=format_from_uri(uri),
                format_uri=uri,
                capacity=capacity,
                file=ofile,
            )

    systems = [s for s in root.iter() if _local(s.tag) == "VirtualSystem"]
    if not systems:
        raise InvalidInput(f"{origin}: OVF describes no <VirtualSystem>")
    if len(systems) > 1:
        raise InvalidInput(
            f"{origin}: OVF describes {len(systems)} virtual machines; p2v converts one machine per OVF"
        )
    system = systems[0]
    name = _text(system, "Name") or _attr(system, "id")
    os_description = os_type = None
    for ossec in _children(system, "OperatingSystemSection"):
        os_description = _text(ossec, "Description")
        os_type = _attr(ossec, "osType")

    hw_sections = _children(system, "VirtualHardwareSection")
    if not hw_sections:
        raise InvalidInput(f"{origin}: virtual system {name!r} has no <VirtualHardwareSection>")
    hw = hw_sections[0]
    config_id = _default_configuration(root)
    items = _items(hw, config_id)
    hw_config = _section_config(hw)
    system_el = _child(hw, "System")
    system_type = (_text(system_el, "VirtualSystemType") or "") if system_el is not None else ""
    vmware = system_type.lower().startswith("vmx-") or b"www.vmware.com/schema/ovf" in xml_bytes

    cpus = memory_mib = None
    controllers: dict[str, tuple[str, str | None, int | None]] = {}
    disk_items: list[_Item] = []
    nic_items: list[_Item] = []
    removable: list[str] = []
    for item in items:
        rtype = item.int("ResourceType", origin)
        if rtype == RT_CPU:
            cpus = item.int("VirtualQuantity", origin)
        elif rtype == RT_MEMORY:
            qty = item.int("VirtualQuantity", origin)
            if qty is not None:
                mult = unit_multiplier(item.get("AllocationUnits"), default=1 << 20, origin=origin)
                memory_mib = qty * mult // (1 << 20)
        elif rtype in (RT_IDE, RT_SCSI, RT_STORAGE):
            iid = item.get("InstanceID")
            if iid:
                bus, model = _controller(item, rtype)
                controllers[iid] = (bus, model, _maybe_int(item.get("Address")))
        elif rtype == RT_DISK:
            disk_items.append(item)
        elif rtype in (RT_CD, RT_DVD):
            removable.append(item.get("Parent") or "")
        elif rtype == RT_NIC:
            nic_items.append(item)

    disks: list[OvfDisk] = []
    used: set[str] = set()
    for item in disk_items:
        host = item.get("HostResource") or ""
        m = _HOST_RESOURCE.match(host)
        kind, ref = (m.group(1), m.group(2)) if m else ("", "")
        if kind == "file" and ref in files:
            disk = OvfDisk(disk_id=None, href=files[ref].href, format=None, file=files[ref])
        elif kind == "disk" and ref in disk_defs:
            used.add(ref)
            disk = replace(disk_defs[ref])
        else:
            raise InvalidInput(
                f"{origin}: disk item {item.get('ElementName')!r} refers to {host!r}, "
                "which is neither a disk nor a file of this OVF"
            )
        parent = controllers.get(item.get("Parent") or "")
        if parent:
            disk.bus, disk.controller, disk.controller_address = parent
        disk.unit = _maybe_int(item.get("AddressOnParent"))
        disk.label = item.get("ElementName")
        disks.append(disk)
    for key, ddef in disk_defs.items():
        if key not in used:
            notes.append(f"disk {ddef.disk_id!r} is not attached to any controller; added last")
            disks.append(replace(ddef))

    def sort_key(pair: tuple[int, OvfDisk]) -> tuple[int, int, int, int]:
        pos, d = pair
        return (BUS_ORDER.get(d.bus or "", 9), d.controller_address or 0, d.unit or 0, pos)

    disks = [d for _, d in sorted(enumerate(disks), key=sort_key)]
    for i, sorted_disk in enumerate(disks):
        sorted_disk.order = i

    nics = []
    for item in nic_items:
        mac = item.get("Address")
        mac = mac.lower().replace("-", ":") if mac and _MAC.match(mac) else None
        sub = (item.get("ResourceSubType") or "").strip().lower()
        nics.append(
            OvfNic(
                mac=mac,
                model=_NIC_MODELS.get(sub, sub or None),
                network=item.get("Connection"),
                label=item.get("ElementName"),
            )
        )

    fw_value = hw_config.get("firmware", "").lower()
    if fw_value == "efi":
        firmware: str | None = "uefi"
    elif fw_value == "bios" or (not fw_value and vmware):
        firmware = "bios"  # VMware's default when the key is absent
    else:
        firmware = None
    secure = hw_config.get("uefi.secureboot.enabled", hw_config.get("bootoptions.efisecurebootenabled", ""))

    return OvfDescriptor(
        origin=origin,
        name=name,
        cpus=cpus,
        memory_mib=memory_mib,
        firmware=firmware,
        disks=disks,
        nics=nics,
        files=list(files.values()),
        secure_boot=secure.lower() == "true",
        os_description=os_description,
        os_type=os_type,
        removable=[controllers.get(p, ("unknown", None, None))[0] for p in removable],
        notes=notes,
    )


# --- package rules that need no I/O (shared with ova.py) -------------------------------------------


@dataclass
class ManifestEntry:
    algorithm: str  # hashlib name: sha1 | sha256 | sha512
    name: str  # as written in the manifest, relative to the manifest's folder
    digest: str  # lower-case hex


def parse_manifest(text: str, *, origin: str) -> list[ManifestEntry]:
    """Parse an OVF manifest (``SHA256(disk1.vmdk)= 0123...`` lines)."""
    entries: list[ManifestEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _MANIFEST_LINE.match(line)
        if not m:
            raise InvalidInput(f"{origin}: line {lineno} is not a manifest line: {line[:80]!r}")
        algo = MANIFEST_ALGORITHMS[m.group(1).upper()]
        digest = m.group(3).lower()
        if len(digest) != hashlib.new(algo).digest_size * 2:
            raise InvalidInput(f"{origin}: line {lineno}: {m.group(1)} digest has the wrong length")
        entries.append(ManifestEntry(algo, m.group(2).strip(), digest))
    return entries


def normalize_href(href: str, *, base: str, origin: str) -> str:
    """Member path (posix, relative) of ``href`` seen from folder ``base``; refuses escapes."""
    if "://" in href or href.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", href):
        raise UnsafeInput(f"{origin}: file reference {href!r} is not a relative path inside the package")
    parts = href.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeInput(f"{origin}: file reference {href!r} climbs out of the package ('..')")
    joined = posixpath.normpath(posixpath.join(base, *parts))
    if joined in ("", ".") or joined.startswith(("../", "/")):
        raise UnsafeInput(f"{origin}: file reference {href!r} does not name a file inside the package")
    return joined


def detect_format(head: bytes) -> str | None:
    """Image format from the first bytes of a file; None when there is no known magic."""
    if head[:4] in (vmdk.SPARSE_MAGIC, vmdk.COWD_MAGIC) or vmdk.looks_like_descriptor(head):
        return "vmdk"
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vpc"
    return None


def is_gzip(head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b"


def choose_format(detected: str | None, hint: str | None, *, label: str) -> str:
    """The format to hand qemu: what the bytes say, cross-checked against what the OVF says."""
    if detected and hint and detected != hint:
        raise InvalidInput(f"{label}: the OVF says {hint} but the file is {detected}")
    if hint in ("vmdk", "qcow2", "vhdx") and not detected:
        raise InvalidInput(f"{label}: the OVF says {hint} but the file has no {hint} header")
    return detected or hint or "raw"


def open_ovf(path: Path, *, workdir: Path | None = None, verify_manifest: bool = True) -> SourceMachine:
    """Open an unpacked OVF: the descriptor with its disk files beside it.

    Verifies the ``.mf`` manifest beside the descriptor when there is one, checks
    each disk file, and decompresses gzip-compressed disks into a private folder
    under ``workdir`` (the system temp dir if None), removed by ``close()``.
    Raises SourceNotFound, InvalidInput (malformed OVF, missing disk, corrupt
    image), UnsafeInput (DTD, path escape, decompression bomb), ChecksumMismatch,
    OutputError. The package rules (manifest, extraction) live in
    :mod:`p2v.sources.ova`, shared with packed OVAs.
    """
    from p2v.sources.ova import open_unpacked  # ova imports this module: resolve at call time

    return open_unpacked(Path(path), workdir=workdir, verify_manifest=verify_manifest)
