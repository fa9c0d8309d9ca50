"""Retention: which points expire under a policy, and the merge that removes the oldest one.

Invariant: the oldest remaining point's layer is ``base.qcow2`` on every disk; every newer
point's layer is ``rp-NNNNNN.qcow2`` backed by the layer of the point before it.

Expiring the oldest point P1 (layer ``base``) while P2 (layer ``rp-2``) remains is a journaled
state machine (one ``retention_journal`` row per machine); each stage is idempotent, so a crash
anywhere is finished by the next call (``Site.apply_retention`` or ``Site.begin_point``):

``start``   catalog: P1 expired (no longer offered) + journal row, one transaction
``commit``  ``qemu-img commit -d rp-2``: rp-2's data into base; base+rp-2 reads the same throughout
``map``     base.map := rp-2.map (link or copy to ``base.map.partial``, rename)
``rebase``  ``qemu-img rebase -u -b base.qcow2`` of the layer above rp-2, if any (reads unchanged)
``switch``  catalog: P2's layers := base, P1's row deleted, one transaction
``delete``  rp-2.qcow2 and rp-2.map removed, journal row deleted

Every remaining point reads the same bytes before, during and after each stage.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from p2v.errors import SiteError
from p2v.site import layers
from p2v.site.catalog import Catalog
from p2v.site.layers import BASE_LAYER, BASE_MAP, layer_stem

STAGES = ("commit", "map", "rebase", "switch", "delete")

stage_hook: Callable[[str], None] | None = None
"""Tests only: called with ``"after-<stage>"`` once a stage's work is done, before the journal
advances (a test kills the process there to prove each stage can be redone)."""


def select_expired(points: Sequence[tuple[int, float]], *, retain_count: int | None,
                   retain_seconds: int | None, now: float) -> list[int]:  # fmt: skip
    """Seqs to expire, oldest first, from ``points`` = ``(seq, created_at)`` oldest first.

    A point is kept when it is among the newest ``retain_count`` or younger than
    ``retain_seconds``; the newest point is always kept; with neither limit set nothing expires.
    Only the oldest points can be merged away, so the answer is the run of not-kept points
    before the oldest kept one.
    """
    if not points or (retain_count is None and retain_seconds is None):
        return []
    keep = {points[-1][0]}
    if retain_count is not None:
        keep.update(seq for seq, _ in points[-retain_count:])
    if retain_seconds is not None:
        keep.update(seq for seq, created in points if now - created < retain_seconds)
    expired: list[int] = []
    for seq, _ in points:
        if seq in keep:
            break
        expired.append(seq)
    return expired


class ChainMerge:
    """Merges the oldest point of one machine into the next one (see the module docstring)."""

    def __init__(self, catalog: Catalog, machine_id: int, machine: str, disk_dirs: list[Path], *,
                 site_root: Path, keep_fds: Sequence[int] = ()) -> None:  # fmt: skip
        self.catalog = catalog
        self.machine_id = machine_id
        self.machine = machine
        self.disk_dirs = disk_dirs
        self.site_root = site_root
        self.keep_fds = keep_fds

    def start(self, victim_seq: int) -> None:
        """Stage ``start``: expire ``victim_seq`` (must be the oldest remaining point, not the newest)."""
        with self.catalog.transaction("starting a retention merge") as db:
            if db.execute("SELECT 1 FROM retention_journal WHERE machine_id = ?", (self.machine_id,)).fetchone():
                raise SiteError(f"machine {self.machine}: a retention merge is already in progress")
            live = [r[0] for r in db.execute(
                "SELECT seq FROM points WHERE machine_id = ? AND expired_at IS NULL ORDER BY seq",
                (self.machine_id,),
            )]  # fmt: skip
            if len(live) < 2 or live[0] != victim_seq:
                raise SiteError(
                    f"machine {self.machine}: point {victim_seq} cannot be merged away (points: {live}); "
                    "only the oldest point can, and never the newest"
                )
            db.execute("UPDATE points SET expired_at = ? WHERE machine_id = ? AND seq = ?",
                       (time.time(), self.machine_id, victim_seq))  # fmt: skip
            db.execute(
                "INSERT INTO retention_journal (machine_id, victim_seq, successor_seq, stage, started_at)"
                " VALUES (?, ?, ?, 'commit', ?)",
                (self.machine_id, victim_seq, live[1], time.time()),
            )
            self.catalog.refresh_summary(db, self.machine_id)
        _hook("after-start")

    def finish(self) -> int | None:
        """Run the pending merge to its end. Returns the expired seq, or None if none was pending."""
        row = self.catalog.journal_row(self.machine_id)
        if row is None:
            return None
        victim, successor = int(row["victim_seq"]), int(row["successor_seq"])
        stage = str(row["stage"])
        if stage not in STAGES:
            raise SiteError(f"machine {self.machine}: unknown retention stage {stage!r} in the catalog journal")
        for name in STAGES[STAGES.index(stage):]:
            try:
                getattr(self, f"_{name}")(victim, successor)
            except SiteError as exc:
                raise SiteError(
                    f"machine {self.machine}: merging point {victim} into point {successor} stopped at {name}: "
                    f"{exc.message}",
                    hint="every remaining point is intact; run retention again once nothing (a drill, a VM) "
                    "holds the images open",
                ) from exc
            _hook(f"after-{name}")
            if name == "delete":
                with self.catalog.transaction("finishing a retention merge") as db:
                    db.execute("DELETE FROM retention_journal WHERE machine_id = ?", (self.machine_id,))
            elif name != "switch":  # switch advances the journal in its own transaction
                self._advance(STAGES[STAGES.index(name) + 1])
        return victim

    # -- stages ------------------------------------------------------------------------------

    def _advance(self, stage: str) -> None:
        with self.catalog.transaction("recording retention progress") as db:
            db.execute("UPDATE retention_journal SET stage = ? WHERE machine_id = ?", (stage, self.machine_id))

    def _layers(self, seq: int) -> dict[int, tuple[str, str]]:
        rows = self.catalog.query(
            "SELECT l.disk, l.layer, l.map FROM point_layers l JOIN points p ON p.id = l.point_id"
            " WHERE p.machine_id = ? AND p.seq = ?",
            (self.machine_id, seq),
        )
        return {int(r["disk"]): (str(r["layer"]), str(r["map"])) for r in rows}

    def _above(self, successor: int) -> dict[int, tuple[str, str]]:
        rows = self.catalog.query(
            "SELECT min(seq) FROM points WHERE machine_id = ? AND seq > ?", (self.machine_id, successor)
        )
        nxt = rows[0][0] if rows else None
        return {} if nxt is None else self._layers(int(nxt))

    def _commit(self, victim: int, successor: int) -> None:
        for disk, (layer, _) in self._layers(successor).items():
            path = self.disk_dirs[disk] / layer
            if layer != BASE_LAYER and path.exists():
                layers.commit_layer(path, site=self.site_root, keep_fds=self.keep_fds)

    def _map(self, victim: int, successor: int) -> None:
        for disk, (layer, map_name) in self._layers(successor).items():
            folder = self.disk_dirs[disk]
            src = folder / map_name
            if layer == BASE_LAYER or not src.exists():
                continue
            partial = folder / (BASE_MAP + ".partial")
            partial.unlink(missing_ok=True)
            try:
                os.link(src, partial)
            except OSError:
                shutil.copyfile(src, partial)
                layers.fsync_file(partial)
            layers.replace_durably(partial, folder / BASE_MAP)

    def _rebase(self, victim: int, successor: int) -> None:
        for disk, (layer, _) in self._above(successor).items():
            path = self.disk_dirs[disk] / layer
            if layer != BASE_LAYER and path.exists():
                layers.rebase_layer(path, BASE_LAYER, site=self.site_root, keep_fds=self.keep_fds)

    def _switch(self, victim: int, successor: int) -> None:
        sizes = {disk: layers.allocated_bytes(self.disk_dirs[disk] / BASE_LAYER) for disk in self._layers(successor)}
        with self.catalog.transaction("switching layers after a retention merge") as db:
            point_id = db.execute(
                "SELECT id FROM points WHERE machine_id = ? AND seq = ?", (self.machine_id, successor)
            ).fetchone()[0]
            for disk, size in sizes.items():
                db.execute(
                    "UPDATE point_layers SET layer = ?, map = ?, layer_bytes = ? WHERE point_id = ? AND disk = ?",
                    (BASE_LAYER, BASE_MAP, size, point_id, disk),
                )
            db.execute(
                "UPDATE points SET layer_bytes = (SELECT coalesce(sum(layer_bytes), 0) FROM point_layers"
                " WHERE point_id = ?) WHERE id = ?",
                (point_id, point_id),
            )
            db.execute("DELETE FROM points WHERE machine_id = ? AND seq = ?", (self.machine_id, victim))
            db.execute("UPDATE retention_journal SET stage = 'delete' WHERE machine_id = ?", (self.machine_id,))
            self.catalog.refresh_summary(db, self.machine_id)

    def _delete(self, victim: int, successor: int) -> None:
        # After the switch the successor's old layer files are referenced by no point: find
        # them by name (rp-<successor>), since the catalog now says "base".
        stem = layer_stem(successor)
        layers.remove_files([folder / f"{stem}{ext}" for folder in self.disk_dirs for ext in (".qcow2", ".map")])


def _hook(stage: str) -> None:
    if stage_hook is not None:
        stage_hook(stage)
