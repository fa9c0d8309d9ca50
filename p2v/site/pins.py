"""Point pins: a recovery point in use by a DR VM or a run, which retention must not merge away.

A drill or a failover boots a qcow2 overlay whose backing file is the layer of one recovery
point. Retention merges the oldest layers (``qemu-img commit`` into ``base.qcow2``, then the
successor's file is deleted), which would change or remove what that overlay reads. So while
a machine has an *active* pin on any of its points, :meth:`p2v.site.site.Site.apply_retention`
merges nothing and says so (:class:`RetentionOutcome` ``deferred``).

A pin is a row of ``point_pins``: (point, holder, pinned_at, pid). ``holder`` names who holds
it (``run:<id>:<machine>``, ``vm:<name>``); pinning again with the same holder replaces the
pid. With a pid, the pin lasts as long as that process lives: a pin whose pid is dead is
*stale*, ignored and removed by the next reader. With ``pid=None`` it lasts until
:func:`unpin` (a failover VM's overlay is the live disk: its backing must stay for good).

Races with retention are closed from both sides, each in one catalog transaction: a pin is
refused on a point that retention already expired or is merging into (its layer file is about
to change name), and retention checks the pins again right after it marks a victim, undoing
that mark if a pin arrived in between.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from p2v.errors import Busy, SiteError, UsageError
from p2v.site.model import RetentionResult
from p2v.vm.process import pid_alive

if TYPE_CHECKING:
    from p2v.site.site import Site

HOLDER_MAX = 200


@dataclass(frozen=True)
class Pin:
    machine: str
    seq: int
    holder: str
    pinned_at: float
    pid: int | None  # None: held until unpinned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        owner = f" (pid {self.pid})" if self.pid is not None else ""
        return f"point {self.seq} pinned by {self.holder}{owner}"


@dataclass
class RetentionOutcome(RetentionResult):
    """:class:`RetentionResult` plus why merges were put off (``"deferred: point 3 pinned by run:7:db"``)."""

    deferred: list[str] = field(default_factory=list)


def _machine_id(site: Site, machine: str) -> int:
    row = site.catalog.machine_row(machine)
    if row is None:
        site.machine(machine)  # raises UnknownMachine naming the known machines
        raise SiteError(f"no protected machine called {machine!r} at {site.root}")  # pragma: no cover
    return int(row["id"])


def _check_holder(holder: str) -> str:
    if not holder or len(holder) > HOLDER_MAX or not holder.isprintable():
        raise UsageError(f"pin holder {holder!r}: give 1-{HOLDER_MAX} printable characters (e.g. run:7:db)")
    return holder


def pin_point(site: Site, machine: str, seq: int, holder: str, pid: int | None) -> None:
    """Pin point ``seq`` of ``machine`` for ``holder`` (replacing that holder's earlier pin of it).

    Raises UnknownMachine, SiteError when the point does not exist or retention already expired
    it, Busy when retention is merging an older point into it right now (its layer file is about
    to be replaced: try again in a moment), UsageError for a bad holder or pid."""
    _check_holder(holder)
    if pid is not None and pid <= 0:
        raise UsageError(f"pin of {machine} point {seq}: pid {pid} is not a process id")
    mid = _machine_id(site, machine)
    with site.catalog.transaction(f"pinning point {seq} of {machine}") as db:
        row = db.execute("SELECT id, expired_at FROM points WHERE machine_id = ? AND seq = ?", (mid, seq)).fetchone()
        if row is None or row["expired_at"] is not None:
            live = [r[0] for r in db.execute(
                "SELECT seq FROM points WHERE machine_id = ? AND expired_at IS NULL ORDER BY seq", (mid,))]  # fmt: skip
            merged = row is not None or (live and seq < live[0])
            why = "was merged away by retention" if merged else "does not exist"
            raise SiteError(f"machine {machine}: point {seq} {why}; it cannot be pinned",
                            hint="its points are: " + (", ".join(map(str, live)) or "none"))  # fmt: skip
        journal = db.execute("SELECT victim_seq, successor_seq FROM retention_journal WHERE machine_id = ?",
                             (mid,)).fetchone()  # fmt: skip
        if journal is not None and int(journal["successor_seq"]) == seq:
            raise Busy(f"machine {machine}: retention is merging point {journal['victim_seq']} into point {seq} "
                       "right now; try again when it finishes (`p2v retention` completes it)")  # fmt: skip
        db.execute(
            "INSERT INTO point_pins (point_id, holder, pinned_at, pid) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (point_id, holder) DO UPDATE SET pinned_at = excluded.pinned_at, pid = excluded.pid",
            (int(row["id"]), holder, time.time(), pid),
        )


def unpin(site: Site, machine: str, holder: str) -> int:
    """Remove every pin ``holder`` has on ``machine``'s points. Returns how many went (0 is fine)."""
    mid = _machine_id(site, machine)
    with site.catalog.transaction(f"unpinning {machine}") as db:
        cur = db.execute(
            "DELETE FROM point_pins WHERE holder = ? AND point_id IN (SELECT id FROM points WHERE machine_id = ?)",
            (holder, mid),
        )
        return int(cur.rowcount)


def release_pins(site: Site, holder_prefix: str) -> int:
    """Remove the pins of every holder starting with ``holder_prefix`` on every machine
    (``"run:7:"`` releases all of run 7's pins). Returns how many went."""
    if not holder_prefix:
        raise UsageError("release_pins needs a holder prefix (an empty one would release every pin)")
    escaped = holder_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    with site.catalog.transaction("releasing pins") as db:
        cur = db.execute("DELETE FROM point_pins WHERE holder LIKE ? ESCAPE '\\'", (escaped + "%",))
        return int(cur.rowcount)


def active_pins(site: Site, machine: str, *, prune: bool = True) -> list[Pin]:
    """The pins on ``machine``'s points whose holder is still there, oldest point first.

    Stale pins (their pid is dead) are left out and, with ``prune``, deleted."""
    mid = _machine_id(site, machine)
    rows = site.catalog.query(
        "SELECT p.seq, k.point_id, k.holder, k.pinned_at, k.pid FROM point_pins k JOIN points p ON p.id = k.point_id"
        " WHERE p.machine_id = ? ORDER BY p.seq, k.holder",
        (mid,),
        doing="reading pins",
    )
    live: list[Pin] = []
    stale: list[tuple[int, str, int]] = []
    for r in rows:
        pid = r["pid"]
        if pid is not None and not pid_alive(int(pid)):
            stale.append((int(r["point_id"]), str(r["holder"]), int(pid)))
            continue
        live.append(Pin(machine=machine, seq=int(r["seq"]), holder=str(r["holder"]), pinned_at=float(r["pinned_at"]),
                        pid=None if pid is None else int(pid)))  # fmt: skip
    if prune and stale:
        with site.catalog.transaction(f"removing stale pins of {machine}") as db:
            db.executemany("DELETE FROM point_pins WHERE point_id = ? AND holder = ? AND pid = ?", stale)
    return live


def deferral(pins: list[Pin]) -> list[str]:
    """What a retention report says for these pins: ``deferred: point N pinned by HOLDER``."""
    return [f"deferred: point {p.seq} pinned by {p.holder}" for p in pins]


def undo_expiry(site: Site, machine: str, victim: int) -> bool:
    """Take back a retention merge that was only *started* (victim marked expired, journal at
    stage ``commit``, no file touched yet). Returns False when it went further (then it must
    be finished, not undone). The caller holds the machine lock."""
    mid = _machine_id(site, machine)
    with site.catalog.transaction(f"putting off the merge of point {victim} of {machine}") as db:
        row = db.execute("SELECT victim_seq, stage FROM retention_journal WHERE machine_id = ?", (mid,)).fetchone()
        if row is None or int(row["victim_seq"]) != victim or row["stage"] != "commit":
            return False
        db.execute("UPDATE points SET expired_at = NULL WHERE machine_id = ? AND seq = ?", (mid, victim))
        db.execute("DELETE FROM retention_journal WHERE machine_id = ?", (mid,))
        site.catalog.refresh_summary(db, mid)
    return True
