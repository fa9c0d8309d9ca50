"""DR-site capacity: the hosts a site declares in ``SITE/hosts.yaml`` and whether a plan's VMs fit.

```yaml
hosts:
  - {name: dr1, cpus: 16, memory: 64G}
  - {name: dr2, cpus: 8, memory: 32G}
```

Without the file, the site is this DR host alone (its CPU count and MemTotal), marked as assumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from p2v.errors import InvalidInput, UsageError
from p2v.orchestration.plan_schema import Name, read_yaml, validation_message
from p2v.site.units import format_size, parse_size

HOSTS_FILE = "hosts.yaml"
DEFAULT_CPUS = 2
DEFAULT_MEMORY = 2 << 30


@dataclass(frozen=True)
class SiteHost:
    """A DR host's capacity. ``assumed``: measured on this host because the site declares none."""

    name: str
    cpus: int
    memory: int  # bytes
    assumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VmDemand:
    """What one machine of a plan needs at DR."""

    machine: str
    cpus: int
    memory: int


@dataclass
class CapacityTotals:
    machines: int
    cpus: int
    memory: int
    hosts: int
    host_cpus: int
    host_memory: int
    assumed: bool  # the hosts were measured, not declared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_size(value, what="memory")
        except UsageError as exc:  # reported by pydantic with the YAML path
            raise ValueError(exc.message) from None
    return value


class _HostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    cpus: int = Field(ge=1, le=100_000)
    memory: Annotated[int, BeforeValidator(_size), Field(ge=1)]


class _HostsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: list[_HostEntry] = Field(min_length=1)


def local_host() -> SiteHost:
    """This machine as the only DR host: ``os.cpu_count()`` CPUs and MemTotal of /proc/meminfo."""
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        memory = 0
    if not memory:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
    return SiteHost(name=os.uname().nodename or "localhost", cpus=os.cpu_count() or 1, memory=memory, assumed=True)


def load_site_hosts(site_root: Path) -> list[SiteHost]:
    """The hosts ``site_root/hosts.yaml`` declares; without the file, :func:`local_host` (assumed).
    Raises InvalidInput naming the file and the YAML path when the file is malformed."""
    path = Path(site_root) / HOSTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [local_host()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read the site's host list: {exc}") from exc
    data = read_yaml(text, str(path), what="host list")
    try:
        parsed = _HostsFile.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(validation_message(str(path), exc),
                           hint="write `hosts: [{name: dr1, cpus: 16, memory: 64G}]`") from None  # fmt: skip
    seen: set[str] = set()
    for i, h in enumerate(parsed.hosts):
        if h.name in seen:
            raise InvalidInput(f"{path}: hosts[{i}].name: host {h.name} is declared twice")
        seen.add(h.name)
    return [SiteHost(name=h.name, cpus=h.cpus, memory=h.memory) for h in parsed.hosts]


def check_capacity(demands: Sequence[VmDemand], hosts: Sequence[SiteHost]) -> tuple[list[str], list[str],
                                                                                      CapacityTotals]:
    """Errors when the sum of CPUs or memory exceeds the hosts' sum, or when one VM fits on no
    single host; a warning when the VMs do not pack onto the hosts (first fit, largest first).
    Against assumed hosts (the site declares none) the shortfalls are warnings."""
    errors: list[str] = []
    warnings: list[str] = []
    totals = CapacityTotals(
        machines=len(demands), cpus=sum(d.cpus for d in demands), memory=sum(d.memory for d in demands),
        hosts=len(hosts), host_cpus=sum(h.cpus for h in hosts), host_memory=sum(h.memory for h in hosts),
        assumed=any(h.assumed for h in hosts),
    )  # fmt: skip
    names = ", ".join(f"{h.name} ({h.cpus} CPUs, {format_size(h.memory)})" for h in hosts)
    where = f"assumed from this host {names}: the site declares no {HOSTS_FILE}" if totals.assumed else \
        f"hosts {names}"  # fmt: skip
    if totals.cpus > totals.host_cpus:
        errors.append(f"capacity: the plan needs {totals.cpus} CPUs but the site has {totals.host_cpus} "
                      f"({where})")  # fmt: skip
    if totals.memory > totals.host_memory:
        errors.append(f"capacity: the plan needs {format_size(totals.memory)} of memory but the site has "
                      f"{format_size(totals.host_memory)} ({where})")  # fmt: skip
    for d in demands:
        if not any(h.cpus >= d.cpus and h.memory >= d.memory for h in hosts):
            errors.append(f"capacity: machine {d.machine} needs {d.cpus} CPUs and {format_size(d.memory)} "
                          f"but no single host has that much ({where})")  # fmt: skip
    short = bool(errors)
    if totals.assumed:  # the hosts were not declared: a shortfall is a warning, not a refusal
        warnings += errors
        errors = []
    if not short and hosts:
        free = {h.name: [h.cpus, h.memory] for h in hosts}
        unplaced = []
        for d in sorted(demands, key=lambda d: (d.memory, d.cpus), reverse=True):
            host = next((n for n, (c, m) in free.items() if c >= d.cpus and m >= d.memory), None)
            if host is None:
                unplaced.append(d.machine)
            else:
                free[host][0] -= d.cpus
                free[host][1] -= d.memory
        if unplaced:
            warnings.append(f"capacity: the totals fit but {', '.join(unplaced)} may not find room on any single "
                            f"host once the larger VMs are placed (first fit, largest first)")  # fmt: skip
    return errors, warnings, totals
