"""Load drivers/linux.yaml (what virtio needs per initramfs tool, guest tools to disable)."""

from __future__ import annotations

import functools

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from p2v.errors import MissingComponent
from p2v.paths import drivers_dir


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InitramfsTool(_M):
    detect: list[str]
    image: str | None = None
    images: list[str] = []
    modules_file: str | None = None
    conf_file: str | None = None
    sysconfig_file: str | None = None
    rebuild: list[str]

    def image_candidates(self, kver: str) -> list[str]:
        pats = ([self.image] if self.image else []) + self.images
        return [p.format(kver=kver) for p in pats]


class GuestTools(_M):
    files: list[str]
    units: list[str]


class LinuxCatalog(_M):
    virtio_modules: list[str]
    min_kernel: str
    tools: dict[str, InitramfsTool]
    guest_tools: dict[str, GuestTools]


@functools.cache
def linux_catalog() -> LinuxCatalog:
    path = drivers_dir() / "linux.yaml"
    try:
        data = yaml.safe_load(path.read_text())
        return LinuxCatalog.model_validate(data)
    except FileNotFoundError as exc:
        raise MissingComponent(f"{path}: driver catalog missing") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise MissingComponent(f"{path}: invalid driver catalog: {exc}") from exc
