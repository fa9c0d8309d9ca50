"""The VM spec: what a converted machine needs to run, independent of QEMU flags.

``p2v convert`` writes one as ``NAME.vm.json``; ``p2v vm start`` turns it into a
QEMU command line (:mod:`p2v.vm.cmdline`); :mod:`p2v.vm.libvirt` renders it as
libvirt domain XML. Disk paths are stored relative to the spec file when they
sit beside it, so an output directory can be moved as a whole.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from p2v.errors import InvalidInput, SourceNotFound

SPEC_SCHEMA_VERSION = 1
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

DiskBus = Literal["virtio", "virtio-scsi", "sata", "ide", "scsi"]
NicModel = Literal["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"]
Firmware = Literal["bios", "uefi"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiskSpec(_Model):
    path: str
    format: Literal["qcow2", "raw"] = "qcow2"
    bus: DiskBus = "virtio"
    source: str | None = Field(default=None, description="where this disk came from")
    virtual_size: int | None = None


class NicSpec(_Model):
    mac: str
    model: NicModel = "virtio"
    network: str = "default"
    source_network: str | None = Field(default=None, description="network name at the source")
    guest_name: str | None = Field(default=None, description="interface name inside the guest")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        v = v.lower().replace("-", ":")
        if not MAC_RE.match(v):
            raise ValueError(f"not a MAC address: {v!r}")
        return v


class GuestInfo(_Model):
    type: str = "unknown"
    distro: str = "unknown"
    version: str = ""
    product: str = ""
    arch: str = "x86_64"


class VmSpec(_Model):
    schema_version: int = SPEC_SCHEMA_VERSION
    name: str
    cpus: int = Field(default=1, ge=1, le=512)
    memory_mib: int = Field(default=1024, ge=64)
    firmware: Firmware = "bios"
    machine: Literal["pc", "q35"] = "q35"
    rtc: Literal["utc", "localtime"] = "utc"
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    guest: GuestInfo = Field(default_factory=GuestInfo)
    source: str = ""
    notes: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", v):
            raise ValueError(
                f"bad VM name {v!r}: use letters, digits, '.', '_' or '-' (at most 63, not leading)"
            )
        return v

    # -- files -----------------------------------------------------------------
    def disk_paths(self, base: Path) -> list[Path]:
        """Absolute disk paths, resolving relative ones against ``base`` (the spec's folder)."""
        return [(base / d.path) if not Path(d.path).is_absolute() else Path(d.path) for d in self.disks]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VmSpec:
        try:
            raw = path.read_text()
        except FileNotFoundError as exc:
            raise SourceNotFound(f"{path}: VM spec not found") from exc
        except OSError as exc:
            raise SourceNotFound(f"{path}: cannot read VM spec: {exc.strerror}") from exc
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top)"
            raise InvalidInput(f"{path}: invalid VM spec at {where}: {first['msg']}") from exc


def mac_from_seed(seed: str) -> str:
    """A stable locally-administered MAC in QEMU's 52:54:00 range, derived from ``seed``."""
    import hashlib

    h = hashlib.sha256(seed.encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"
