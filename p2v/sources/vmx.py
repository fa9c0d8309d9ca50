"""VMware ``.vmx`` machine configurations.

The format is ``key = "value"`` lines; keys are case-insensitive, values are
quoted with ``|XX`` hex escapes (``|22`` is a double quote, ``|7C`` a bar).
``parse_vmx`` is pure; ``open_vmx`` resolves each disk beside the ``.vmx``,
checks it with :func:`p2v.sources.vmdk.validate_vmdk`, and returns a
:class:`SourceMachine`.

Devices: disks are ``scsiN:M`` / ``sataN:M`` / ``ideN:M`` / ``nvmeN:M`` with
``.present = "TRUE"`` (VMware treats a missing ``present`` as FALSE);
CD-ROMs (``deviceType`` ``cdrom-*`` / ``atapi-cdrom``) and absent devices are
skipped. NICs are ``ethernetN`` with ``addressType`` static → ``address``,
generated/vpx → ``generatedAddress``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from p2v.errors import InvalidInput, SourceNotFound, UnsafeInput
from p2v.sources.model import SourceMachine, SourceNic
from p2v.sources.vmdk import validate_vmdk

MAX_VMX_BYTES = 4 << 20
BUS_ORDER = ("scsi", "sata", "ide", "nvme")
SCSI_MODELS = {"lsilogic", "lsisas1068", "pvscsi", "buslogic"}

_LINE = re.compile(r"^\s*([^=\s]+)\s*=\s*(.*?)\s*$")
_DISK_KEY = re.compile(r"^(scsi|sata|ide|nvme)(\d+):(\d+)\.filename$")
_NIC_KEY = re.compile(r"^ethernet(\d+)\.present$")
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
_TRUE = {"true", "yes", "1", "on"}


@dataclass
class VmxDisk:
    bus: str  # scsi | sata | ide | nvme
    controller_index: int
    unit: int
    filename: str  # as written in the .vmx, relative to its folder
    controller_model: str | None = None  # lsilogic, lsisas1068, pvscsi, buslogic; ahci; nvme
    device_type: str | None = None
    mode: str | None = None  # persistent, independent-nonpersistent, ...

    @property
    def slot(self) -> str:
        return f"{self.bus}{self.controller_index}:{self.unit}"


@dataclass
class VmxNic:
    index: int
    mac: str | None
    model: str | None  # e1000, e1000e, vmxnet3, vlance, ...
    network: str | None  # networkName (port group); None when the .vmx names none
    connection_type: str | None = None  # bridged | nat | hostonly | custom (Workstation)
    address_type: str | None = None  # static | generated | vpx


@dataclass
class VmxDescriptor:
    origin: str
    name: str | None
    cpus: int
    memory_mib: int | None
    firmware: str  # bios | uefi
    disks: list[VmxDisk]
    nics: list[VmxNic]
    guest_os: str | None = None
    secure_boot: bool = False
    cores_per_socket: int | None = None
    removable: list[str] = field(default_factory=list)  # slots of CD-ROMs ("ide1:0")
    notes: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # every key, lower-cased


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)


def parse_vmx_values(text: str, *, origin: str) -> dict[str, str]:
    """Key/value pairs of a .vmx file, keys lower-cased, values unquoted and unescaped."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise InvalidInput(f"{origin}: line {lineno} is not 'key = value': {line[:80]!r}")
        key, value = m.group(1).lower(), m.group(2)
        if value.startswith('"'):
            end = value.find('"', 1)
            if end < 0:
                raise InvalidInput(f"{origin}: line {lineno}: unterminated quoted value for {key!r}")
            rest = value[end + 1 :].strip()
            if rest and not rest.startswith("#"):
                raise InvalidInput(f"{origin}: line {lineno}: text after the quoted value of {key!r}")
            value = value[1:end]
        else:
            value = value.split("#", 1)[0].strip()
        values[key] = _unescape(value)
    return values


def _flag(values: dict[str, str], key: str, default: bool = False) -> bool:
    v = values.get(key)
    return default if v is None else v.strip().lower() in _TRUE


def _int(values: dict[str, str], key: str, origin: str) -> int | None:
    v = values.get(key)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v.strip())
    except ValueError as exc:
        raise InvalidInput(f"{origin}: {key} = {v!r} is not a number") from exc


def _mac(value: str | None) -> str | None:
    if value and _MAC.match(value.strip()):
        return value.strip().lower().replace("-", ":")
    return None


def parse_vmx(text: str, *, origin: str) -> VmxDescriptor:
    """Parse .vmx text. Raises InvalidInput naming ``origin`` and the line when it is malformed."""
    values = parse_vmx_values(text, origin=origin)
    notes: list[str] = []
    disks: list[VmxDisk] = []
    removable: list[str] = []
    for key, filename in values.items():
        m = _DISK_KEY.match(key)
        if not m:
            continue
        bus, ctl, unit = m.group(1), int(m.group(2)), int(m.group(3))
        dev = f"{bus}{ctl}:{unit}"
        if not _flag(values, f"{dev}.present") or not _flag(values, f"{bus}{ctl}.present", default=True):
            continue
        dtype = (values.get(f"{dev}.devicetype") or "").lower()
        if "cdrom" in dtype or filename.lower().endswith(".iso"):
            removable.append(dev)
            continue
        if dtype in {"scsi-passthru", "floppy"} or dtype.startswith("atapi"):
            notes.append(f"{dev}: {dtype} device skipped (not a disk file)")
            continue
        if not filename:
            notes.append(f"{dev}: disk without a file name skipped")
            continue
        if bus == "scsi":
            model = (values.get(f"scsi{ctl}.virtualdev") or "").lower() or None
            if model and model not in SCSI_MODELS:
                notes.append(f"scsi{ctl}: unknown SCSI controller model {model!r}")
        else:
            model = {"sata": "ahci", "nvme": "nvme", "ide": None}[bus]
        disks.append(VmxDisk(bus, ctl, unit, filename, model, dtype or None, values.get(f"{dev}.mode")))
    disks.sort(key=lambda d: (BUS_ORDER.index(d.bus), d.controller_index, d.unit))
    removable.sort()

    nics: list[VmxNic] = []
    for key in values:
        m = _NIC_KEY.match(key)
        if not m or not _flag(values, key):
            continue
        n = int(m.group(1))
        prefix = f"ethernet{n}."
        atype = (values.get(prefix + "addresstype") or "").lower() or None
        if atype == "static":
            mac = _mac(values.get(prefix + "address"))
        else:
            mac = _mac(values.get(prefix + "generatedaddress")) or _mac(values.get(prefix + "address"))
        nics.append(
            VmxNic(
                index=n,
                mac=mac,
                model=(values.get(prefix + "virtualdev") or "").lower() or None,
                network=values.get(prefix + "networkname") or None,
                connection_type=(values.get(prefix + "connectiontype") or "").lower() or None,
                address_type=atype,
            )
        )
    nics.sort(key=lambda x: x.index)

    firmware = "uefi" if values.get("firmware", "").lower() == "efi" else "bios"
    memory = _int(values, "memsize", origin)
    return VmxDescriptor(
        origin=origin,
        name=values.get("displayname") or None,
        cpus=_int(values, "numvcpus", origin) or 1,  # VMware's default is one vCPU
        memory_mib=memory,
        firmware=firmware,
        disks=disks,
        nics=nics,
        guest_os=values.get("guestos") or None,
        secure_boot=_flag(values, "uefi.secureboot.enabled"),
        cores_per_socket=_int(values, "cpuid.corespersocket", origin),
        removable=removable,
        notes=notes,
        values=values,
    )


def _decode(raw: bytes, origin: str) -> str:
    m = re.search(rb'(?im)^\s*\.encoding\s*=\s*"([^"]+)"', raw[:4096])
    encoding = m.group(1).decode("ascii", "replace") if m else "utf-8"
    try:
        return raw.decode(encoding).removeprefix("\ufeff")
    except LookupError as exc:
        raise InvalidInput(f"{origin}: unknown .encoding {encoding!r}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{origin}: not valid {encoding} text at byte {exc.start}") from exc


def open_vmx(path: Path) -> SourceMachine:
    """Open a VMware VM from its .vmx; every disk must sit in (or under) the .vmx's folder.

    Raises SourceNotFound (the .vmx or a disk is missing), UnsafeInput (a disk path
    escapes the folder), InvalidInput (malformed .vmx, corrupt or truncated VMDK).
    """
    path = Path(path)
    origin = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_VMX_BYTES:
            raise InvalidInput(f"{origin}: {size} bytes is too big for a .vmx file (limit 4 MiB)")
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{origin}: .vmx file not found") from exc
    except OSError as exc:
        raise SourceNotFound(f"{origin}: cannot read: {exc.strerror}") from exc
    desc = parse_vmx(_decode(raw, origin), origin=origin)
    folder = path.absolute().parent
    root = folder.resolve()
    disks = []
    for d in desc.disks:
        name = Path(d.filename)
        target = name if name.is_absolute() else folder / name
        if not target.resolve().is_relative_to(root):
            raise UnsafeInput(
                f"{origin}: disk {d.slot} file {d.filename!r} lies outside the VM folder {folder}; refusing",
                hint="copy the disk into the VM folder and use a relative fileName",
            )
        if not target.is_file():
            raise SourceNotFound(f"{origin}: disk {d.slot} file {d.filename!r} not found in {folder}")
        disk = validate_vmdk(target)
        disk.bus = d.bus
        disk.controller = d.controller_model
        disk.label = d.slot
        disks.append(disk)
    if not disks:
        raise InvalidInput(f"{origin}: the VM has no present hard disk")
    notes = list(desc.notes)
    if desc.secure_boot:
        notes.append("source VM has UEFI Secure Boot enabled")
    return SourceMachine(
        kind="vmx",
        name=desc.name or path.stem,
        disks=disks,
        cpus=desc.cpus,
        memory_mib=desc.memory_mib,
        firmware=desc.firmware,
        nics=[SourceNic(mac=n.mac, model=n.model, network=n.network) for n in desc.nics],
        description=f"VMware guestOS {desc.guest_os}" if desc.guest_os else "",
        notes=notes,
        origin=path,
    )
