"""The site catalog: one SQLite file (WAL, foreign keys, busy timeout) with ordered migrations.

The schema version lives in the ``schema_version`` table. :data:`MIGRATIONS` is the ordered list;
migration *n* takes the catalog from version n-1 to n inside its own transaction, so a crash
mid-migration leaves the previous version intact. A catalog written by a newer p2v is refused.

Per-machine summary columns (newest point, chain depth, bytes, last result) are kept up to date
in the same transaction that changes points, so :meth:`Catalog.status_rows` reads one row per
machine and never scans points.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p2v.errors import Busy, OutputError, SiteError

BUSY_TIMEOUT_MS = 30_000


def _v1(db: sqlite3.Connection) -> None:
    for sql in (
        """CREATE TABLE machines (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            policy TEXT NOT NULL,
            last_sync_at REAL,
            last_result TEXT,
            last_error TEXT,
            newest_seq INTEGER,
            newest_point_at REAL,
            chain_depth INTEGER NOT NULL DEFAULT 0,
            point_count INTEGER NOT NULL DEFAULT 0,
            total_bytes INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE disks (
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            source_url TEXT NOT NULL,
            size INTEGER NOT NULL,
            source_state TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (machine_id, idx))""",
        """CREATE TABLE points (
            id INTEGER PRIMARY KEY,
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            created_at REAL NOT NULL,
            committed_at REAL NOT NULL,
            consistency TEXT NOT NULL,
            mode TEXT NOT NULL,
            wall_s REAL NOT NULL DEFAULT 0,
            bytes_read INTEGER NOT NULL DEFAULT 0,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            bytes_written INTEGER NOT NULL DEFAULT 0,
            layer_bytes INTEGER NOT NULL DEFAULT 0,
            meta TEXT NOT NULL DEFAULT '{}',
            UNIQUE (machine_id, seq))""",
        """CREATE TABLE point_layers (
            point_id INTEGER NOT NULL REFERENCES points(id) ON DELETE CASCADE,
            disk INTEGER NOT NULL,
            layer TEXT NOT NULL,
            map TEXT NOT NULL,
            layer_bytes INTEGER NOT NULL DEFAULT 0,
            counters TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (point_id, disk))""",
    ):
        db.execute(sql)


def _v2(db: sqlite3.Connection) -> None:
    """Retention journal, expiring points, running-sync marker, RPO column for status."""
    for sql in (
        "ALTER TABLE machines ADD COLUMN rpo_seconds INTEGER",
        "ALTER TABLE machines ADD COLUMN running_pid INTEGER",
        "ALTER TABLE machines ADD COLUMN last_sync_started_at REAL",
        "ALTER TABLE points ADD COLUMN expired_at REAL",
        """CREATE TABLE retention_journal (
            machine_id INTEGER PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
            victim_seq INTEGER NOT NULL,
            successor_seq INTEGER NOT NULL,
            stage TEXT NOT NULL,
            started_at REAL NOT NULL)""",
        "UPDATE machines SET rpo_seconds = json_extract(policy, '$.rpo_seconds')",
    ):
        db.execute(sql)


def _v3(db: sqlite3.Connection) -> None:
    """Orchestration: runs (drill/failover/fallback), their journaled steps and events, point pins."""
    for sql in (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            plan_name TEXT NOT NULL,
            plan_path TEXT,
            plan TEXT NOT NULL,
            options TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            finished_at REAL,
            pid INTEGER,
            error TEXT,
            summary TEXT NOT NULL DEFAULT '{}')""",
        """CREATE TABLE run_steps (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            ord INTEGER NOT NULL,
            kind TEXT NOT NULL,
            machine TEXT,
            grp TEXT,
            state TEXT NOT NULL,
            started_at REAL,
            finished_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            detail TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            PRIMARY KEY (run_id, key))""",
        """CREATE TABLE run_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            step TEXT,
            event TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}')""",
        "CREATE INDEX run_events_run ON run_events(run_id, id)",
        """CREATE TABLE point_pins (
            point_id INTEGER NOT NULL REFERENCES points(id) ON DELETE CASCADE,
            holder TEXT NOT NULL,
            pinned_at REAL NOT NULL,
            pid INTEGER,
            PRIMARY KEY (point_id, holder))""",
    ):
        db.execute(sql)


MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_v1, _v2, _v3)
"""Migration i (1-based) takes the schema from version i-1 to i. Append only; never edit one."""
LATEST = len(MIGRATIONS)


def db_error(exc: sqlite3.Error, path: Path, doing: str) -> Exception:
    """Our error for a SQLite failure while ``doing`` something with the catalog at ``path``."""
    text = str(exc)
    low = text.lower()
    if "full" in low or "no space" in low:
        return OutputError(f"no space left on the DR site at {path.parent} ({doing}: {text})",
                           hint="free space on the site's filesystem; earlier recovery points are intact")  # fmt: skip
    if "locked" in low or "busy" in low:
        return Busy(f"catalog {path} is locked by another p2v process ({doing}); try again later")
    if "not a database" in low or "malformed" in low or "corrupt" in low:
        return SiteError(f"catalog {path} is damaged ({text})", hint="restore it from a backup of the site")
    return SiteError(f"catalog {path}: {doing} failed: {text}")


class Catalog:
    """An open catalog. Use :meth:`transaction` for every write; reads may run outside one."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self.db = db

    @classmethod
    def open(cls, path: Path, *, target: int = LATEST) -> Catalog:
        """Open (creating if needed) and migrate up to ``target`` (tests pass a lower one)."""
        try:
            db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)  # fmt: skip
        except sqlite3.Error as exc:
            raise db_error(exc, path, "opening") from exc
        db.row_factory = sqlite3.Row
        cat = cls(path, db)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            cat._migrate(target)
        except sqlite3.Error as exc:
            db.close()
            raise db_error(exc, path, "opening") from exc
        except BaseException:
            db.close()
            raise
        return cat

    def close(self) -> None:
        self.db.close()

    def version(self) -> int:
        has = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not has:
            return 0
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, target: int) -> None:
        current = self.version()
        if current > LATEST:
            raise SiteError(
                f"catalog {self.path} has schema version {current}, but this p2v knows only up to {LATEST}",
                hint="it was written by a newer p2v: upgrade p2v to use this site",
            )
        while current < target:  # only a catalog that needs it takes the write lock
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                current = self.version()  # another process may have migrated meanwhile
                if current < target:
                    MIGRATIONS[current](self.db)
                    current += 1
                    self.db.execute("DELETE FROM schema_version")
                    self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (current,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self, doing: str = "writing") -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolls back on any exception. SQLite errors become ours."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise db_error(exc, self.path, doing) from exc
        try:
            yield self.db
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise db_error(exc, self.path, doing) from exc
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def query(self, sql: str, params: Sequence[Any] = (), doing: str = "reading") -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise db_error(exc, self.path, doing) from exc

    # -- machines ------------------------------------------------------------------------

    def machine_row(self, name: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM machines WHERE name = ?", (name,))
        return rows[0] if rows else None

    def machine_names(self) -> list[str]:
        return [r["name"] for r in self.query("SELECT name FROM machines ORDER BY name")]

    def disk_rows(self, machine_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM disks WHERE machine_id = ? ORDER BY idx", (machine_id,))

    def insert_machine(self, db: sqlite3.Connection, name: str, policy: dict[str, Any],
                       disks: Sequence[tuple[str, int]], now: float) -> int:  # fmt: skip
        cur = db.execute(
            "INSERT INTO machines (name, created_at, policy, rpo_seconds) VALUES (?, ?, ?, ?)",
            (name, now, json.dumps(policy, sort_keys=True), policy.get("rpo_seconds")),
        )
        machine_id = int(cur.lastrowid or 0)
        db.executemany(
            "INSERT INTO disks (machine_id, idx, source_url, size) VALUES (?, ?, ?, ?)",
            [(machine_id, i, url, size) for i, (url, size) in enumerate(disks)],
        )
        return machine_id

    def status_rows(self) -> list[sqlite3.Row]:
        return self.query(
            "SELECT name, newest_seq, newest_point_at, rpo_seconds, last_result, last_error, last_sync_at,"
            " running_pid, chain_depth, point_count, total_bytes FROM machines ORDER BY name",
            doing="reading status",
        )

    # -- points --------------------------------------------------------------------------

    def point_rows(self, machine_id: int, *, include_expired: bool = False) -> list[sqlite3.Row]:
        where = "" if include_expired else " AND expired_at IS NULL"
        return self.query(f"SELECT * FROM points WHERE machine_id = ?{where} ORDER BY seq", (machine_id,))  # noqa: S608

    def layer_rows(self, point_id: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM point_layers WHERE point_id = ? ORDER BY disk", (point_id,))

    def referenced_files(self, machine_id: int) -> set[tuple[int, str]]:
        """(disk, file name) of every layer and map any point row (expired ones too) refers to."""
        rows = self.query(
            "SELECT l.disk, l.layer, l.map FROM point_layers l JOIN points p ON p.id = l.point_id"
            " WHERE p.machine_id = ?",
            (machine_id,),
        )
        return {(r["disk"], r["layer"]) for r in rows} | {(r["disk"], r["map"]) for r in rows}

    def insert_point(
        self,
        db: sqlite3.Connection,
        machine_id: int,
        *,
        seq: int,
        created_at: float,
        committed_at: float,
        consistency: str,
        mode: str,
        wall_s: float,
        layers: Sequence[tuple[int, str, str, int, dict[str, Any]]],
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Insert a committed point with its layers ``(disk, layer, map, layer_bytes, counters)``
        and bring the machine's summary up to date, in the caller's transaction (no scans)."""
        totals = {k: sum(int(c.get(k, 0) or 0) for *_, c in layers) for k in ("bytes_read", "bytes_sent",
                                                                             "bytes_written")}  # fmt: skip
        layer_bytes = sum(lb for _, _, _, lb, _ in layers)
        cur = db.execute(
            "INSERT INTO points (machine_id, seq, created_at, committed_at, consistency, mode, wall_s, bytes_read,"
            " bytes_sent, bytes_written, layer_bytes, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (machine_id, seq, created_at, committed_at, consistency, mode, wall_s, totals["bytes_read"],
             totals["bytes_sent"], totals["bytes_written"], layer_bytes, json.dumps(meta or {}, default=str)),
        )  # fmt: skip
        point_id = int(cur.lastrowid or 0)
        db.executemany(
            "INSERT INTO point_layers (point_id, disk, layer, map, layer_bytes, counters) VALUES (?, ?, ?, ?, ?, ?)",
            [(point_id, d, lay, mp, lb, json.dumps(c, default=str)) for d, lay, mp, lb, c in layers],
        )
        db.execute(
            "UPDATE machines SET newest_seq = ?, newest_point_at = ?, chain_depth = chain_depth + 1,"
            " point_count = point_count + 1, total_bytes = total_bytes + ?, last_result = 'ok', last_error = NULL,"
            " last_sync_at = ?, running_pid = NULL WHERE id = ?",
            (seq, created_at, layer_bytes, committed_at, machine_id),
        )
        return point_id

    def refresh_summary(self, db: sqlite3.Connection, machine_id: int) -> None:
        """Recompute one machine's point summary from its points (after retention).

        Expired points whose layer is still in the chain (a merge in progress) count in the
        chain depth and the bytes on disk, not in the point count."""
        row = db.execute(
            "SELECT count(*), max(seq) FROM points WHERE machine_id = ? AND expired_at IS NULL", (machine_id,)
        ).fetchone()
        count, newest = int(row[0]), row[1]
        depth, total = db.execute(
            "SELECT count(*), coalesce(sum(layer_bytes), 0) FROM points WHERE machine_id = ?", (machine_id,)
        ).fetchone()
        newest_at = None
        if newest is not None:
            newest_at = db.execute(
                "SELECT created_at FROM points WHERE machine_id = ? AND seq = ?", (machine_id, newest)
            ).fetchone()[0]
        db.execute(
            "UPDATE machines SET point_count = ?, newest_seq = ?, newest_point_at = ?, chain_depth = ?,"
            " total_bytes = ? WHERE id = ?",
            (count, newest, newest_at, int(depth), int(total), machine_id),
        )

    def set_sync_state(self, db: sqlite3.Connection, machine_id: int, result: str, *,
                       error: str | None = None, pid: int | None = None) -> None:  # fmt: skip
        now = time.time()
        if result == "running":
            db.execute(
                "UPDATE machines SET last_result = 'running', running_pid = ?, last_sync_started_at = ?"
                " WHERE id = ?",
                (pid, now, machine_id),
            )
        else:
            db.execute(
                "UPDATE machines SET last_result = ?, last_error = ?, last_sync_at = ?, running_pid = NULL"
                " WHERE id = ?",
                (result, error, now, machine_id),
            )

    # -- retention journal ---------------------------------------------------------------

    def journal_row(self, machine_id: int) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM retention_journal WHERE machine_id = ?", (machine_id,))
        return rows[0] if rows else None
