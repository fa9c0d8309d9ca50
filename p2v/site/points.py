"""A recovery point being written: partial layers that become a point only on :meth:`commit`.

Commit order (each step durable before the next, so a crash at any instant leaves every
committed point readable and at most some orphan files for the next sync to remove):

1. each disk's new hash map -> ``LAYER.map.partial`` (written and fsynced),
2. each partial layer fsynced,
3. rename ``LAYER.qcow2.partial`` -> ``LAYER.qcow2``, then the map, then fsync the folder,
4. ONE catalog transaction: the point, its layers, the disks' source state, the machine summary.

Files renamed in step 3 but not recorded in step 4 are not referenced by the catalog, so the
next :meth:`p2v.site.site.Site.begin_point` removes them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2v.errors import P2VError, SiteError
from p2v.replication.model import HashMap, SyncResult
from p2v.site import layers
from p2v.site.catalog import Catalog
from p2v.site.model import PointLayer, RecoveryPoint

log = logging.getLogger(__name__)


@dataclass
class PartialLayer:
    """One disk's part of a point being written. The sync writes into ``partial_path``."""

    index: int
    url: str
    size: int
    partial_path: Path  # the qcow2 overlay to fill (backed by ``backing``)
    final_path: Path  # what it is renamed to on commit
    map_partial: Path
    map_path: Path
    backing: Path | None  # the head layer, None on the first point (seed)
    old_map: HashMap  # the head point's map (all zeros on seed)
    state: dict[str, Any]  # what the head point recorded for this source
    block_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.block_size = self.old_map.block_size


class PointTransaction:
    """Returned by ``Site.begin_point``; the caller holds the machine lock throughout.

    Use as a context manager: leaving the block without :meth:`commit` aborts (removing the
    partial files and recording the error as the machine's last result).
    """

    def __init__(self, *, site_root: Path, catalog: Catalog, machine: str, machine_id: int, seq: int,
                 disks: list[PartialLayer], cleaned: list[Path],
                 warnings: list[str] | None = None) -> None:  # fmt: skip
        self.site_root = site_root
        self.catalog = catalog
        self.machine = machine
        self.machine_id = machine_id
        self.seq = seq
        self.disks = disks
        self.cleaned = cleaned  # files the start of this transaction removed (crash leftovers)
        self.warnings = warnings or []  # things the caller should show (not errors)
        self.started_at = time.time()
        self.state = "open"  # "open" | "committed" | "aborted"

    @property
    def seed(self) -> bool:
        return all(d.backing is None for d in self.disks)

    def commit(self, results: list[SyncResult], consistency: str, meta: dict[str, Any] | None = None) -> RecoveryPoint:
        """Seal the partial layers as recovery point ``seq``.

        ``results[i]`` is disk i's answer; ``consistency`` e.g. "crash-consistent", "app-consistent",
        "fuzzy". ``meta`` is stored with the point; ``meta["captured_at"]`` (POSIX time the data was
        frozen) becomes the point's time (default: when ``begin_point`` ran), ``meta["wall_s"]``
        its duration (default: since ``begin_point``). Raises OutputError when the site is full
        (after removing this point's files); nothing is half-recorded.
        """
        if self.state != "open":
            raise SiteError(f"machine {self.machine}: point {self.seq} is already {self.state}")
        if len(results) != len(self.disks):
            raise SiteError(f"machine {self.machine}: {len(results)} sync results for {len(self.disks)} disks")
        for d, r in zip(self.disks, results, strict=True):
            if (r.hashmap.size, r.hashmap.block_size) != (d.size, d.block_size):
                raise SiteError(
                    f"machine {self.machine} disk {d.index}: the new hash map describes {r.hashmap.size} bytes in "
                    f"{r.hashmap.block_size}-byte blocks, the disk has {d.size} bytes in {d.block_size}-byte blocks"
                )
        meta = dict(meta or {})
        now = time.time()
        created_at = float(meta.get("captured_at", self.started_at))
        wall_s = float(meta.get("wall_s", now - self.started_at))
        modes = list(dict.fromkeys(r.counters.mode for r in results))
        point_layers: list[tuple[int, str, str, int, dict[str, Any]]] = []
        try:
            for d, r in zip(self.disks, results, strict=True):
                r.hashmap.save(d.map_partial)
            for d in self.disks:
                layers.fsync_file(d.partial_path)
            for d in self.disks:
                os.replace(d.partial_path, d.final_path)
                os.replace(d.map_partial, d.map_path)
            for folder in {d.final_path.parent for d in self.disks}:
                layers.fsync_dir(folder)
            for d, r in zip(self.disks, results, strict=True):
                point_layers.append((d.index, d.final_path.name, d.map_path.name,
                                     layers.allocated_bytes(d.final_path), r.counters.to_dict()))  # fmt: skip
            with self.catalog.transaction("committing a recovery point") as db:
                self.catalog.insert_point(
                    db, self.machine_id, seq=self.seq, created_at=created_at, committed_at=now,
                    consistency=consistency, mode="+".join(modes), wall_s=wall_s, layers=point_layers, meta=meta,
                )  # fmt: skip
                db.executemany(
                    "UPDATE disks SET source_state = ? WHERE machine_id = ? AND idx = ?",
                    [(json.dumps(r.state, default=str), self.machine_id, d.index)
                     for d, r in zip(self.disks, results, strict=True)],
                )  # fmt: skip
        except BaseException as exc:
            self._fail(exc, include_final=True)
            if layers.is_no_space(exc):
                raise layers.no_space_error(self.site_root, f"committing point {self.seq} of {self.machine}") from exc
            raise
        self.state = "committed"
        return RecoveryPoint(
            machine=self.machine, seq=self.seq, created_at=created_at, committed_at=now, consistency=consistency,
            mode="+".join(modes), wall_s=wall_s,
            bytes_read=sum(r.counters.bytes_read for r in results),
            bytes_sent=sum(r.counters.bytes_sent for r in results),
            bytes_written=sum(r.counters.bytes_written for r in results),
            layer_bytes=sum(pl[3] for pl in point_layers),
            layers=[PointLayer(disk=i, layer=lay, map=mp, layer_bytes=lb, counters=c)
                    for i, lay, mp, lb, c in point_layers],
            meta=meta, age_s=max(0.0, now - created_at),
        )  # fmt: skip

    def abort(self, error: str) -> list[Path]:
        """Remove the partial files and record ``error`` as the machine's last result.

        A no-op after commit or a previous abort. Returns the files removed."""
        if self.state != "open":
            return []
        return self._fail(error, include_final=False)

    def _fail(self, error: BaseException | str, *, include_final: bool) -> list[Path]:
        self.state = "aborted"
        paths = [p for d in self.disks for p in (d.partial_path, d.map_partial)]
        if include_final:  # renamed in this commit but not recorded: orphans
            paths += [p for d in self.disks for p in (d.final_path, d.map_path)]
        removed: list[Path] = []
        try:
            removed = layers.remove_files(paths)
        except OSError as exc:  # the next begin_point removes what is left
            log.warning("machine %s: could not remove partial files: %s", self.machine, exc)
        if isinstance(error, BaseException):
            text = error.message if isinstance(error, P2VError) else (str(error) or type(error).__name__)
        else:
            text = error
        try:
            with self.catalog.transaction("recording a failed sync") as db:
                self.catalog.set_sync_state(db, self.machine_id, "failed", error=text)
        except P2VError as exc:  # never hide the real error behind this one
            log.warning("machine %s: could not record the failed sync: %s", self.machine, exc.message)
        return removed

    def __enter__(self) -> PointTransaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self.state != "open":
            return
        if exc is not None:
            self._fail(exc, include_final=False)
        else:
            self.abort("the sync ended without committing a point")
