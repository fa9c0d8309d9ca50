"""What the DR site returns: machines, their disks and policy, recovery points, status rows.

Times are POSIX seconds (UTC); ``to_dict()`` gives the stable JSON shape (ISO 8601 times).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from p2v.errors import UsageError
from p2v.replication.model import DEFAULT_BLOCK, SUB_BLOCK

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
CONSISTENCY_MODES = ("auto", "lvm-snapshot", "freeze", "none")
MAX_BLOCK = 64 << 20


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid machine name, else raise :class:`UsageError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"machine name {name!r} is not valid",
            hint="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class ProtectionPolicy:
    """How a machine is protected. ``None`` means "no limit" / "not set".

    Retention keeps a point when it is among the newest ``retain_count`` OR younger than
    ``retain_seconds`` (with neither set, every point is kept); the newest point is always kept.
    """

    block_size: int = DEFAULT_BLOCK
    retain_count: int | None = None
    retain_seconds: int | None = None
    consistency: str = "auto"
    compress: bool = False
    bwlimit: int | None = None  # bytes per second
    rpo_seconds: int | None = None
    hooks: dict[str, Any] = field(default_factory=dict)  # e.g. {"pre": [...], "post": [...], "timeout_s": 300}

    def __post_init__(self) -> None:
        if self.block_size % SUB_BLOCK or not SUB_BLOCK <= self.block_size <= MAX_BLOCK:
            raise UsageError(
                f"block size {self.block_size} is not a multiple of {SUB_BLOCK} between 4K and 64M"
            )
        if self.retain_count is not None and self.retain_count < 1:
            raise UsageError(f"retain count {self.retain_count} must be at least 1 (the newest point is always kept)")
        for label, value in (("retain-for", self.retain_seconds), ("bwlimit", self.bwlimit),
                             ("RPO", self.rpo_seconds)):  # fmt: skip
            if value is not None and value <= 0:
                raise UsageError(f"{label} {value} must be larger than zero")
        if self.consistency not in CONSISTENCY_MODES:
            raise UsageError(
                f"consistency {self.consistency!r} is not one of: {', '.join(CONSISTENCY_MODES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProtectionPolicy:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class DiskSpec:
    """A source disk to protect: where it is read from and its size in bytes."""

    url: str
    size: int


@dataclass
class DiskRecord:
    index: int
    url: str
    size: int
    state: dict[str, Any]  # what the newest point recorded for this source (dirty bitmap, generation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MachineRecord:
    name: str
    created_at: float
    policy: ProtectionPolicy
    disks: list[DiskRecord]
    last_sync_at: float | None
    last_result: str | None  # "ok" | "failed" | "running" | None (never synced)
    last_error: str | None
    newest_seq: int | None
    newest_point_at: float | None
    chain_depth: int
    point_count: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        d["created_at"] = iso(self.created_at)
        d["last_sync_at"] = iso(self.last_sync_at)
        d["newest_point_at"] = iso(self.newest_point_at)
        return d


@dataclass
class PointLayer:
    """One disk's layer of a recovery point (file names are relative to the disk folder)."""

    disk: int
    layer: str  # e.g. "base.qcow2", "rp-000007.qcow2"
    map: str  # e.g. "base.map", "rp-000007.map"
    layer_bytes: int  # allocated on the site's filesystem
    counters: dict[str, Any]  # p2v.replication.model.SyncCounters.to_dict()


@dataclass
class RecoveryPoint:
    machine: str
    seq: int
    created_at: float  # when the data was captured (the sync's start unless the caller said)
    committed_at: float
    consistency: str  # "crash-consistent" | "app-consistent" | "fuzzy" | ...
    mode: str  # "seed" | "hash" | "stream" | "bitmap" (joined with "+" when disks differ)
    wall_s: float
    bytes_read: int
    bytes_sent: int
    bytes_written: int
    layer_bytes: int
    layers: list[PointLayer]
    meta: dict[str, Any]
    age_s: float  # now - created_at, when it was read

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = iso(self.created_at)
        d["committed_at"] = iso(self.committed_at)
        return d


@dataclass
class MachineStatus:
    name: str
    state: str  # "ok" (newest point within RPO, or no RPO set) | "late" | "never" (no point yet)
    newest_seq: int | None
    newest_point_at: float | None
    newest_age_s: float | None
    rpo_seconds: int | None
    last_result: str | None  # "ok" | "failed" | "running" | None
    last_error: str | None
    last_sync_at: float | None
    chain_depth: int
    point_count: int
    bytes_on_disk: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["newest_point_at"] = iso(self.newest_point_at)
        d["last_sync_at"] = iso(self.last_sync_at)
        return d


@dataclass
class RetentionResult:
    machine: str
    expired: list[int]  # seqs removed by this call, oldest first
    kept: list[int]  # seqs remaining
    resumed: bool  # a merge interrupted earlier was completed first
    bytes_before: int
    bytes_after: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
