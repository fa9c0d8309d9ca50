"""The DR site: a folder with ``catalog.sqlite`` and one folder per protected machine.

```
SITE/catalog.sqlite
SITE/machines/NAME/lock                     flock target; holder "PID PURPOSE" written in it
SITE/machines/NAME/disk0/base.qcow2         layer of the oldest remaining point (no backing)
SITE/machines/NAME/disk0/base.map           its hash map
SITE/machines/NAME/disk0/rp-000002.qcow2    backed by the previous layer (relative name)
SITE/machines/NAME/disk0/rp-000002.map
SITE/machines/NAME/disk0/rp-000003.qcow2.partial, rp-000003.map.partial   while a sync runs
```

A point's disk image is the chain from ``base.qcow2`` up to that point's layer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from p2v.errors import Busy, OutputError, P2VError, SiteError, UnknownMachine, UsageError
from p2v.replication.model import HashMap
from p2v.site import layers
from p2v.site.catalog import Catalog
from p2v.site.model import (
    DiskRecord,
    DiskSpec,
    MachineRecord,
    MachineStatus,
    PointLayer,
    ProtectionPolicy,
    RecoveryPoint,
    RetentionResult,
    check_name,
)
from p2v.site.points import PartialLayer, PointTransaction
from p2v.site.retention import ChainMerge, select_expired

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.sqlite"
_REMOVING = ".removing-"


def default_site_path() -> Path:
    """``P2V_SITE`` if set, else ``./p2v-site``."""
    env = os.environ.get("P2V_SITE")
    return Path(env) if env else Path("p2v-site")


@dataclass
class MachineLock:
    machine: str
    path: Path
    fd: int  # kept open in qemu-img children so the lock outlives a killed p2v while they write
    purpose: str


class Site:
    """An open DR site. Open with :meth:`open`; close (or use ``with``) when done."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self._locks: dict[str, MachineLock] = {}

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | None = None) -> Site:
        """Open the site at ``path`` (default :func:`default_site_path`), creating the folder and
        the catalog on first use and migrating an older catalog. Finishes interrupted removals."""
        root = Path(path) if path is not None else default_site_path()
        try:
            (root / "machines").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in layers.NO_SPACE_ERRNOS:
                raise layers.no_space_error(root, "creating the site") from exc
            raise OutputError(f"DR site {root}: cannot create it: {exc.strerror}") from exc
        site = cls(root.absolute(), Catalog.open(root.absolute() / CATALOG_NAME))
        site._finish_removals()
        return site

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def machines_dir(self) -> Path:
        return self.root / "machines"

    def machine_dir(self, name: str) -> Path:
        return self.machines_dir / check_name(name)

    def disk_dir(self, name: str, disk: int) -> Path:
        return self.machine_dir(name) / f"disk{disk}"

    # -- machines ----------------------------------------------------------------------------

    def add_machine(self, name: str, disks: list[DiskSpec], policy: ProtectionPolicy) -> MachineRecord:
        """Register a machine to protect (no data copied yet: the first sync seeds it).

        Raises UsageError for a bad name or disk list, SiteError if the name is taken."""
        check_name(name)
        if not disks:
            raise UsageError(f"machine {name}: no source disks given")
        for i, d in enumerate(disks):
            if d.size <= 0:
                raise UsageError(f"machine {name}: disk {i} ({d.url}) has size {d.size}; it must be larger than zero")
        if self._removing(name):
            raise Busy(f"machine {name} is being removed; try again when `p2v protect remove` finishes")
        if self.catalog.machine_row(name) is not None:
            raise self._duplicate(name)
        try:
            for i in range(len(disks)):
                self.disk_dir(name, i).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in layers.NO_SPACE_ERRNOS:
                raise layers.no_space_error(self.root, f"adding machine {name}") from exc
            raise OutputError(f"DR site {self.root}: cannot create the folder of {name}: {exc.strerror}") from exc
        with self.catalog.transaction(f"adding machine {name}") as db:
            if db.execute("SELECT 1 FROM machines WHERE name = ?", (name,)).fetchone():
                raise self._duplicate(name)
            self.catalog.insert_machine(db, name, policy.to_dict(), [(d.url, d.size) for d in disks], time.time())
        return self.machine(name)

    def _duplicate(self, name: str) -> SiteError:
        return SiteError(f"machine {name} is already protected at {self.root}",
                         hint="pick another name, or `p2v protect remove` it first")  # fmt: skip

    def machine(self, name: str) -> MachineRecord:
        """The machine called ``name``; UnknownMachine (listing the known names) if none."""
        row = self._row(name)
        return self._record(row, self.catalog.disk_rows(row["id"]))

    def machines(self) -> list[MachineRecord]:
        rows = self.catalog.query("SELECT * FROM machines ORDER BY name")
        disks: dict[int, list[sqlite3.Row]] = {}
        for d in self.catalog.query("SELECT * FROM disks ORDER BY machine_id, idx"):
            disks.setdefault(d["machine_id"], []).append(d)
        return [self._record(r, disks.get(r["id"], [])) for r in rows]

    def update_policy(self, name: str, policy: ProtectionPolicy) -> MachineRecord:
        """Replace the policy. The block size cannot change once the machine has points."""
        row = self._row(name)
        old = ProtectionPolicy.from_dict(json.loads(row["policy"]))
        if policy.block_size != old.block_size and row["point_count"]:
            raise UsageError(f"machine {name}: the block size cannot change once it has recovery points "
                             f"({old.block_size} now)")  # fmt: skip
        with self.catalog.transaction(f"updating the policy of {name}") as db:
            db.execute("UPDATE machines SET policy = ?, rpo_seconds = ? WHERE id = ?",
                       (json.dumps(policy.to_dict(), sort_keys=True), policy.rpo_seconds, row["id"]))  # fmt: skip
        return self.machine(name)

    def remove_machine(self, name: str) -> None:
        """Delete a machine, its points and files. Takes the lock (Busy while a sync runs).

        The machine folder is first renamed to ``machines/.removing-ID-NAME`` (from then on the
        removal is decided), then the rows go in one transaction, then the files. A crash in
        between is finished by the next :meth:`open`; the machine is never left half there."""
        with self._locked(name, "protect remove"):
            row = self._row(name)
            trash = self.machines_dir / f"{_REMOVING}{row['id']}-{name}"
            if self.machine_dir(name).exists():
                os.replace(self.machine_dir(name), trash)
                layers.fsync_dir(self.machines_dir)
            with self.catalog.transaction(f"removing machine {name}") as db:
                db.execute("DELETE FROM machines WHERE id = ?", (row["id"],))
            shutil.rmtree(trash, ignore_errors=True)

    def _finish_removals(self) -> None:
        for entry in self.machines_dir.iterdir():
            m = re.fullmatch(re.escape(_REMOVING) + r"(\d+)-(.+)", entry.name)
            if not m:
                continue
            with self.catalog.transaction("finishing an interrupted removal") as db:
                db.execute("DELETE FROM machines WHERE id = ?", (int(m.group(1)),))
            shutil.rmtree(entry, ignore_errors=True)

    def _removing(self, name: str) -> bool:
        return any(self.machines_dir.glob(f"{_REMOVING}*-{name}"))

    def _row(self, name: str) -> sqlite3.Row:
        row = self.catalog.machine_row(name)
        if row is None:
            known = self.catalog.machine_names()
            listing = ", ".join(known[:20]) + (f" (and {len(known) - 20} more)" if len(known) > 20 else "")
            raise UnknownMachine(
                f"no protected machine called {name!r} at {self.root}",
                hint=f"known machines: {listing}" if known else "no machine is protected here yet: `p2v protect add`",
            )
        return row

    @staticmethod
    def _record(row: sqlite3.Row, disks: list[sqlite3.Row]) -> MachineRecord:
        result, error = _last_result(row)
        return MachineRecord(
            name=row["name"], created_at=row["created_at"],
            policy=ProtectionPolicy.from_dict(json.loads(row["policy"])),
            disks=[DiskRecord(index=d["idx"], url=d["source_url"], size=d["size"], state=json.loads(d["source_state"]))
                   for d in disks],
            last_sync_at=row["last_sync_at"], last_result=result, last_error=error,
            newest_seq=row["newest_seq"], newest_point_at=row["newest_point_at"], chain_depth=row["chain_depth"],
            point_count=row["point_count"], total_bytes=row["total_bytes"],
        )  # fmt: skip

    # -- locking -----------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str, purpose: str = "sync") -> Iterator[MachineLock]:
        """Hold machine ``name``'s lock (``flock`` on ``machines/NAME/lock``, never waits).

        Raises Busy naming the holder's pid when another process (or another ``lock()`` call)
        holds it, UnknownMachine if there is no such machine."""
        self._row(name)
        path = self.machine_dir(name) / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError as exc:
            if self._removing(name):
                raise Busy(f"machine {name} is being removed") from exc
            raise SiteError(f"machine {name}: its folder {path.parent} is missing",
                            hint="the site is damaged: remove the machine and protect it again") from exc  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SiteError(f"machine {name}: cannot lock {path}: {exc.strerror}") from exc
            if holder and holder[0].isdigit():
                doing = " ".join(holder[1:]) or "an operation"
                raise Busy(f"machine {name} is busy: pid {holder[0]} is running p2v {doing}") from None
            raise Busy(f"machine {name} is busy: another p2v process holds {path}") from None
        try:
            if self._removing(name):
                raise Busy(f"machine {name} is being removed")
            self._row(name)  # removed while we waited for the lock?
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        held = MachineLock(machine=name, path=path, fd=fd, purpose=purpose)
        self._locks[name] = held
        try:
            yield held
        finally:
            self._locks.pop(name, None)
            os.close(fd)  # closing the last descriptor releases the flock

    def holds_lock(self, name: str) -> bool:
        return name in self._locks

    @contextmanager
    def _locked(self, name: str, purpose: str) -> Iterator[MachineLock]:
        """The lock this Site already holds for ``name``, or take it for the block."""
        if name in self._locks:
            yield self._locks[name]
        else:
            with self.lock(name, purpose) as held:
                yield held

    # -- writing points ----------------------------------------------------------------------

    def begin_point(self, name: str) -> PointTransaction:
        """Start a recovery point; the caller must hold ``lock(name)``.

        First finishes an interrupted retention merge (if it cannot, e.g. because a drill holds
        the base open, the sync goes on and ``tx.warnings`` says so: the merge is safe to finish
        later) and removes leftovers of crashed syncs (``*.partial`` files, layer/map files no
        point refers to: listed in ``tx.cleaned``).
        Then creates per disk a partial qcow2 layer on top of the head layer (no backing on the
        first point) and loads the head point's map (zeros on seed). Raises OutputError when
        the site is full (after removing what it created)."""
        held = self._locks.get(name)
        if held is None:
            raise SiteError(f"machine {name}: begin_point needs the machine lock (use `with site.lock(name):`)")
        row = self._row(name)
        mid = int(row["id"])
        warnings: list[str] = []
        try:
            self._merge(row, held).finish()
        except P2VError as exc:  # e.g. a drill holds base.qcow2 open: the sync may still go on
            warnings.append(f"an interrupted retention merge could not be finished yet: {exc.message}")
            log.warning("machine %s: %s", name, warnings[-1])
        cleaned = self._sweep(name, mid)
        if cleaned:
            log.info("machine %s: removed leftovers of an interrupted sync: %s", name,
                     ", ".join(str(p.relative_to(self.root)) for p in cleaned))  # fmt: skip
        live = self.catalog.point_rows(mid)
        head = live[-1] if live else None
        head_layers = {r["disk"]: r for r in self.catalog.layer_rows(head["id"])} if head else {}
        seq = int(self.catalog.query("SELECT coalesce(max(seq), 0) FROM points WHERE machine_id = ?", (mid,))[0][0]) + 1
        stem = "base" if head is None else layers.layer_stem(seq)
        policy = ProtectionPolicy.from_dict(json.loads(row["policy"]))
        parts: list[PartialLayer] = []
        try:
            for d in self.catalog.disk_rows(mid):
                idx, size = int(d["idx"]), int(d["size"])
                folder = self.disk_dir(name, idx)
                folder.mkdir(exist_ok=True)
                backing: Path | None = None
                if head is None:
                    old_map = HashMap.zeros(size, policy.block_size)
                else:
                    backing = folder / head_layers[idx]["layer"]
                    old_map = HashMap.load(folder / head_layers[idx]["map"])
                    if (old_map.size, old_map.block_size) != (size, policy.block_size):
                        raise SiteError(
                            f"machine {name} disk {idx}: the map of point {head['seq']} does not match the disk "
                            f"({old_map.size} bytes in {old_map.block_size}-byte blocks)"
                        )
                part = PartialLayer(
                    index=idx, url=d["source_url"], size=size, partial_path=folder / f"{stem}.qcow2.partial",
                    final_path=folder / f"{stem}.qcow2", map_partial=folder / f"{stem}.map.partial",
                    map_path=folder / f"{stem}.map", backing=backing, old_map=old_map,
                    state=json.loads(d["source_state"]),
                )  # fmt: skip
                layers.create_layer(part.partial_path, size, backing.name if backing else None, site=self.root,
                                    keep_fds=(held.fd,))  # fmt: skip
                parts.append(part)
            with self.catalog.transaction(f"starting a sync of {name}") as db:
                self.catalog.set_sync_state(db, mid, "running", pid=os.getpid())
        except BaseException as exc:
            layers.remove_files([p.partial_path for p in parts])
            try:
                text = exc.message if isinstance(exc, P2VError) else (str(exc) or type(exc).__name__)
                with self.catalog.transaction("recording a failed sync") as db:
                    self.catalog.set_sync_state(db, mid, "failed", error=text)
            except P2VError as exc2:
                log.warning("machine %s: could not record the failed sync: %s", name, exc2.message)
            if layers.is_no_space(exc) or (isinstance(exc, OSError) and exc.errno in layers.NO_SPACE_ERRNOS):
                raise layers.no_space_error(self.root, f"starting point {seq} of {name}") from exc
            raise
        return PointTransaction(site_root=self.root, catalog=self.catalog, machine=name, machine_id=mid, seq=seq,
                                disks=parts, cleaned=cleaned, warnings=warnings)  # fmt: skip

    def _sweep(self, name: str, mid: int) -> list[Path]:
        refs = self.catalog.referenced_files(mid)
        doomed: list[Path] = []
        for d in self.catalog.disk_rows(mid):
            folder = self.disk_dir(name, int(d["idx"]))
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                n = entry.name
                if n.endswith(".partial") or (re.fullmatch(layers.LAYER_RE, n) and (d["idx"], n) not in refs):
                    doomed.append(entry)
        return layers.remove_files(doomed)

    # -- reading points ----------------------------------------------------------------------

    def points(self, name: str, now: float | None = None) -> list[RecoveryPoint]:
        """Every remaining recovery point of ``name``, oldest first."""
        row = self._row(name)
        now = time.time() if now is None else now
        by_point: dict[int, list[PointLayer]] = {}
        for r in self.catalog.query(
            "SELECT l.* FROM point_layers l JOIN points p ON p.id = l.point_id"
            " WHERE p.machine_id = ? AND p.expired_at IS NULL ORDER BY l.disk",
            (row["id"],),
        ):
            by_point.setdefault(r["point_id"], []).append(
                PointLayer(disk=r["disk"], layer=r["layer"], map=r["map"], layer_bytes=r["layer_bytes"],
                           counters=json.loads(r["counters"]))  # fmt: skip
            )
        return [
            RecoveryPoint(
                machine=name, seq=p["seq"], created_at=p["created_at"], committed_at=p["committed_at"],
                consistency=p["consistency"], mode=p["mode"], wall_s=p["wall_s"], bytes_read=p["bytes_read"],
                bytes_sent=p["bytes_sent"], bytes_written=p["bytes_written"], layer_bytes=p["layer_bytes"],
                layers=by_point.get(p["id"], []), meta=json.loads(p["meta"]), age_s=max(0.0, now - p["created_at"]),
            )  # fmt: skip
            for p in self.catalog.point_rows(row["id"])
        ]

    def point(self, name: str, seq: int | None = None, now: float | None = None) -> RecoveryPoint:
        """Point ``seq`` of ``name`` (the newest when None). SiteError if there is no such point."""
        pts = self.points(name, now)
        if not pts:
            raise SiteError(f"machine {name} has no recovery point yet", hint=f"run `p2v sync {name}`")
        if seq is None:
            return pts[-1]
        for p in pts:
            if p.seq == seq:
                return p
        raise SiteError(f"machine {name} has no recovery point {seq}",
                        hint="its points are: " + ", ".join(str(p.seq) for p in pts))  # fmt: skip

    def point_image(self, name: str, seq: int | None, disk: int = 0) -> Path:
        """The qcow2 layer at the top of point ``seq``'s chain for ``disk`` (open it read-only,
        ``-f qcow2``; its backing files resolve relative to its folder)."""
        return self.disk_dir(name, disk) / self._layer(name, seq, disk).layer

    def point_map(self, name: str, seq: int | None, disk: int = 0) -> Path:
        """The hash map file of point ``seq`` for ``disk`` (``HashMap.load`` it)."""
        return self.disk_dir(name, disk) / self._layer(name, seq, disk).map

    def _layer(self, name: str, seq: int | None, disk: int) -> PointLayer:
        p = self.point(name, seq)
        for layer in p.layers:
            if layer.disk == disk:
                return layer
        raise UsageError(f"machine {name} has no disk {disk} (it has disks 0..{len(p.layers) - 1})")

    # -- status ------------------------------------------------------------------------------

    def status(self, now: float | None = None) -> list[MachineStatus]:
        """One row per machine from one query over the machines table (no scan of points)."""
        now = time.time() if now is None else now
        out: list[MachineStatus] = []
        for r in self.catalog.status_rows():
            newest_at = r["newest_point_at"]
            age = None if newest_at is None else max(0.0, now - newest_at)
            rpo = r["rpo_seconds"]
            state = "never" if age is None else ("late" if rpo is not None and age > rpo else "ok")
            result, error = _last_result(r)
            out.append(MachineStatus(
                name=r["name"], state=state, newest_seq=r["newest_seq"], newest_point_at=newest_at, newest_age_s=age,
                rpo_seconds=rpo, last_result=result, last_error=error, last_sync_at=r["last_sync_at"],
                chain_depth=r["chain_depth"], point_count=r["point_count"], bytes_on_disk=r["total_bytes"],
            ))  # fmt: skip
        return out

    # -- retention ---------------------------------------------------------------------------

    def plan_retention(self, name: str, now: float | None = None) -> list[int]:
        """Seqs that :meth:`apply_retention` would remove now (read-only): none while a point of
        ``name`` is pinned (see :mod:`p2v.site.pins`)."""
        from p2v.site import pins

        row = self._row(name)
        if pins.active_pins(self, name, prune=False):
            return []
        policy = ProtectionPolicy.from_dict(json.loads(row["policy"]))
        pts = [(int(p["seq"]), float(p["created_at"])) for p in self.catalog.point_rows(row["id"])]
        return select_expired(pts, retain_count=policy.retain_count, retain_seconds=policy.retain_seconds,
                              now=time.time() if now is None else now)  # fmt: skip

    def apply_retention(self, name: str, now: float | None = None) -> RetentionResult:
        """Merge away the points the policy expires, oldest first (never the newest).

        Takes the machine lock itself (Busy if another process holds it; reuses it when this
        Site already holds it). First completes a merge an earlier run left half done. Every
        remaining point stays readable at every instant; a crash is finished by the next call.

        While any point of ``name`` is pinned (a drill or failover VM boots from it) nothing is
        merged, not even a half-done merge: the result (a :class:`p2v.site.pins.RetentionOutcome`)
        lists ``deferred: point N pinned by HOLDER`` and nothing is raised."""
        from p2v.site import pins

        t0 = time.monotonic()
        deferred: list[str] = []
        with self._locked(name, "retention") as held:
            row = self._row(name)
            merge = self._merge(row, held)
            bytes_before = int(row["total_bytes"])
            resumed = False
            expired: list[int] = []
            blockers = pins.active_pins(self, name)
            if blockers:
                deferred = pins.deferral(blockers)
            else:
                resumed = merge.finish() is not None
                bytes_before = int(self._row(name)["total_bytes"])
                while victims := self.plan_retention(name, now):
                    merge.start(victims[0])
                    blockers = pins.active_pins(self, name)  # pinned while we marked the victim?
                    if blockers and pins.undo_expiry(self, name, victims[0]):
                        deferred = pins.deferral(blockers)
                        break
                    merge.finish()
                    expired.append(victims[0])
            after = self._row(name)
            kept = [int(p["seq"]) for p in self.catalog.point_rows(after["id"])]
        for line in deferred:
            log.info("machine %s: retention %s", name, line)
        return pins.RetentionOutcome(machine=name, expired=expired, kept=kept, resumed=resumed,
                                     bytes_before=bytes_before, bytes_after=int(after["total_bytes"]),
                                     wall_s=time.monotonic() - t0, deferred=deferred)  # fmt: skip

    def _merge(self, row: sqlite3.Row, held: MachineLock) -> ChainMerge:
        name = row["name"]
        dirs = [self.disk_dir(name, int(d["idx"])) for d in self.catalog.disk_rows(row["id"])]
        return ChainMerge(self.catalog, int(row["id"]), name, dirs, site_root=self.root, keep_fds=(held.fd,))


def _last_result(row: sqlite3.Row) -> tuple[str | None, str | None]:
    """The machine's last sync result; a "running" sync whose process is gone reads as failed."""
    result, error, pid = row["last_result"], row["last_error"], row["running_pid"]
    if result == "running" and pid and not _alive(int(pid)):
        return "failed", f"interrupted: pid {pid} ended without finishing the sync"
    return result, error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
