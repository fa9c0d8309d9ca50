"""Make the filesystems of a live (fuzzy) copy consistent before converting it.

A block copy of a mounted, running system catches each block at a different moment:
metadata written during the copy (journal, bitmaps, directories) may not match. The
copy lives in the conversion overlay, so repairing it never touches the source. ext2/3/4
get ``e2fsck -fy`` (journal replayed first); XFS is mounted and unmounted to replay its
log, then ``xfs_repair``. Other filesystems are reported, not touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from p2v.errors import ConversionError

EXT = ("ext2", "ext3", "ext4")


@dataclass
class FsckResult:
    device: str
    fstype: str
    action: str  # "clean", "repaired", "skipped"
    detail: str = ""


def _ext_state(g: Any, dev: str) -> str:
    try:
        info = g.tune2fs_l(dev)
    except RuntimeError:
        return "unknown"
    state = str(info.get("Filesystem state", "unknown"))
    if "needs_recovery" in str(info.get("Filesystem features", "")):
        state += " (journal needs recovery)"
    return state


def repair_filesystems(g: Any, *, what: str) -> tuple[list[FsckResult], float]:
    """Check and repair every filesystem on the launched, writable handle ``g``."""
    t0 = time.monotonic()
    results: list[FsckResult] = []
    for dev, fstype in sorted(g.list_filesystems().items()):
        if fstype in EXT:
            before = _ext_state(g, dev)
            try:
                g.e2fsck(dev, correct=False, forceall=True)
            except RuntimeError as exc:
                raise ConversionError(
                    f"{what}: {dev} ({fstype}) of the live copy cannot be repaired: {str(exc).strip()[-200:]}"
                ) from exc
            action = "clean" if before == "clean" else "repaired"
            results.append(FsckResult(dev, fstype, action, f"was {before}"))
        elif fstype == "xfs":
            try:
                g.mount(dev, "/")
                g.umount("/")
                rc = g.xfs_repair(dev)
            except RuntimeError as exc:
                raise ConversionError(f"{what}: {dev} (xfs) of the live copy cannot be repaired: {exc}") from exc
            results.append(FsckResult(dev, fstype, "repaired" if rc else "clean"))
        elif fstype not in ("swap", "unknown", "crypto_LUKS"):
            results.append(FsckResult(dev, fstype, "skipped", "no offline check for this filesystem type"))
    return results, time.monotonic() - t0
