"""The DR site: catalog (SQLite, migrations), recovery-point chains, locks, retention, status."""

from p2v.site.model import (
    DiskRecord,
    DiskSpec,
    MachineRecord,
    MachineStatus,
    PointLayer,
    ProtectionPolicy,
    RecoveryPoint,
    RetentionResult,
)
from p2v.site.points import PartialLayer, PointTransaction
from p2v.site.site import MachineLock, Site, default_site_path
from p2v.site.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "DiskRecord",
    "DiskSpec",
    "MachineLock",
    "MachineRecord",
    "MachineStatus",
    "PartialLayer",
    "PointLayer",
    "PointTransaction",
    "ProtectionPolicy",
    "RecoveryPoint",
    "RetentionResult",
    "Site",
    "default_site_path",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]
