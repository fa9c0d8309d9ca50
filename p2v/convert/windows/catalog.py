"""Load and query drivers/windows.yaml: Windows version -> virtio-win folders, and the drivers.

The YAML is validated on load; a bad catalog raises :class:`~p2v.errors.InvalidInput`
naming the file and the field (``drivers.viostor.pci_ids.0.device: ...``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2v.errors import DriversNotFound, InvalidInput, MissingComponent
from p2v.paths import drivers_dir

Variant = Literal["server", "client"]
HEX4 = r"^[0-9A-F]{4}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PciId(_Model):
    """One PCI hardware ID a driver serves."""

    vendor: str = Field(pattern=HEX4)
    device: str = Field(pattern=HEX4)
    subsys: str = Field(pattern=r"^[0-9A-F]{8}$")
    rev: str = Field(pattern=r"^[0-9A-F]{2}$")
    kind: Literal["legacy", "modern"] | None = None

    def hardware_ids(self) -> list[str]:
        """Windows hardware IDs, most specific first (``PCI\\VEN_1AF4&DEV_1001&SUBSYS_...&REV_00``)."""
        base = f"VEN_{self.vendor}&DEV_{self.device}"
        return [
            f"{base}&SUBSYS_{self.subsys}&REV_{self.rev}",
            f"{base}&SUBSYS_{self.subsys}",
            base,
        ]

    @property
    def full_id(self) -> str:
        return self.hardware_ids()[0]


class DriverSpec(_Model):
    description: str
    service: str
    inf: str
    sys: str | None
    class_: str = Field(alias="class")
    class_guid: str = Field(pattern=r"^\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}$")
    group: str | None = None
    boot_storage: bool = False
    required: bool = False
    warn_if_missing: bool = False
    inf_section: str | None = None
    provider: str = "Red Hat, Inc."
    service_parameters: dict[str, int] = {}
    pnp_interface: int | None = None
    extra_files: list[str] = []
    pci_ids: list[PciId] = Field(min_length=1)

    @model_validator(mode="after")
    def _boot_drivers_are_complete(self) -> DriverSpec:
        if self.boot_storage and (self.sys is None or self.inf_section is None or self.group is None):
            raise ValueError("a boot_storage driver needs sys, inf_section and group")
        if self.required and not self.boot_storage:
            raise ValueError("only boot_storage drivers can be required")
        return self

    @property
    def cat(self) -> str:
        return self.inf.rsplit(".", 1)[0] + ".cat"

    def own_files(self) -> list[str]:
        """The file names that make up this driver (to pick it out of a flattened folder)."""
        names = [self.inf, self.cat, *self.extra_files]
        if self.sys:
            names.append(self.sys)
        return names


class WindowsVersion(_Model):
    name: str
    major: int = Field(ge=4)
    minor: int = Field(ge=0)
    builds: tuple[int | None, int | None] = (None, None)
    variant: Variant
    arches: list[str] = Field(min_length=1)
    folders: list[str] = Field(min_length=1)

    def matches(self, major: int, minor: int, build: int | None, variant: str, arch: str) -> bool:
        if (self.major, self.minor, self.variant) != (major, minor, variant) or arch not in self.arches:
            return False
        lo, hi = self.builds
        if lo is None and hi is None:
            return True
        if build is None:
            return False
        return (lo is None or build >= lo) and (hi is None or build <= hi)


class GuestTool(_Model):
    display_names: list[str] = Field(min_length=1)


class OriginalServices(_Model):
    storage: list[str]
    network: list[str]


class WindowsCatalog(_Model):
    schema_: int = Field(alias="schema")
    layouts: list[str] = Field(min_length=1)
    arch_folders: dict[str, str]
    skip_extensions: list[str] = []
    versions: list[WindowsVersion] = Field(min_length=1)
    pnputil_modern_min_build: int
    drivers: dict[str, DriverSpec] = Field(min_length=1)
    original_services: OriginalServices
    guest_tools: dict[str, GuestTool] = {}

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported schema {v} (this p2v reads schema 1)")
        return v

    @field_validator("layouts")
    @classmethod
    def _layouts_have_placeholders(cls, v: list[str]) -> list[str]:
        for layout in v:
            if "{version}" not in layout or "{arch}" not in layout:
                raise ValueError(f"layout {layout!r} must contain {{version}} and {{arch}}")
        return v

    @model_validator(mode="after")
    def _one_required_boot_driver(self) -> WindowsCatalog:
        if not any(d.required for d in self.drivers.values()):
            raise ValueError("drivers: at least one driver must be required (the boot storage driver)")
        return self

    def boot_drivers(self) -> dict[str, DriverSpec]:
        return {k: d for k, d in self.drivers.items() if d.boot_storage}

    def find_version(
        self, *, major: int, minor: int, build: int | None, variant: str, arch: str
    ) -> WindowsVersion | None:
        for entry in self.versions:
            if entry.matches(major, minor, build, variant, arch):
                return entry
        return None

    def select_version(
        self,
        *,
        product: str,
        major: int,
        minor: int,
        build: int | None,
        variant: str,
        arch: str,
        source: str | None = None,
    ) -> WindowsVersion:
        """The catalog entry for this Windows, or :class:`DriversNotFound` naming it."""
        entry = self.find_version(major=major, minor=minor, build=build, variant=variant, arch=arch)
        if entry is not None:
            return entry
        build_text = "unknown" if build is None else str(build)
        what = f"{product} ({major}.{minor}, build {build_text}, {variant}, {arch})"
        where = f" in {source}" if source else ""
        reason = "no virtio-win driver folder is known for this version"
        if arch not in self.arch_folders:
            reason = f"virtio-win has no drivers for architecture {arch}"
        elif build is None and any((e.major, e.minor) == (major, minor) for e in self.versions):
            reason = "its build number is unknown, so the driver folder cannot be chosen"
        raise DriversNotFound(
            f"no virtio-win drivers for {what}{where}: {reason}",
            hint="use a virtio-win release that supports this Windows version, or upgrade the guest",
        )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_catalog(path: Path | str | None = None) -> WindowsCatalog:
    """Read and validate a Windows driver catalog (default ``drivers/windows.yaml``)."""
    file = Path(path) if path is not None else drivers_dir() / "windows.yaml"
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError as exc:
        raise MissingComponent(f"{file}: Windows driver catalog is missing") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return WindowsCatalog.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"{file}: invalid Windows driver catalog: {_describe(exc)}") from exc


@functools.cache
def windows_catalog() -> WindowsCatalog:
    """The default catalog, loaded once per process."""
    return load_catalog()
