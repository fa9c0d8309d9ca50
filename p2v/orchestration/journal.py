"""The run journal: drills, failovers and fallbacks as rows of the site catalog.

A *run* (table ``runs``) holds the plan it executes, its options, its state and the pid of the
orchestrator process executing it. Its *steps* (``run_steps``) are journaled one transition at a
time, each committed before the step's action starts and after it returns, so a ``kill -9`` at any
instant leaves a journal that :func:`p2v.orchestration.executor.resume` can continue.
``run_events`` is the audit trail (every transition, approval, abort request and ``ctx.log``).

Run states: ``pending`` (created, never executed), ``running``, ``waiting-approval``,
``succeeded``, ``failed``, ``aborted``; ``interrupted`` is never stored: it is derived on read for
a run stored as ``running``/``waiting-approval`` whose orchestrator process is gone.

Step states: ``pending``, ``running``, ``succeeded``, ``failed``, ``skipped``, ``continued``
(failed under ``on_failure: continue``, or failed under ``approval`` and then approved),
``waiting-approval``, ``aborted``.

Approvals and abort requests are written by other processes (``p2v run approve`` / ``abort``)
and read by the orchestrator, which polls. They live in the run's ``summary`` JSON under
``"control"`` (no dedicated column yet): ``{"abort": {"by", "at"}, "approvals": {KEY: {"by", "at"}}}``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.errors import Busy, SiteError, UsageError
from p2v.site.catalog import Catalog
from p2v.site.site import Site

RUN_STATES = ("pending", "running", "waiting-approval", "succeeded", "failed", "aborted", "interrupted")
STEP_STATES = ("pending", "running", "succeeded", "failed", "skipped", "continued", "waiting-approval", "aborted")
FINISHED_RUN_STATES = frozenset({"succeeded", "aborted"})
"""Runs that cannot be resumed."""
DONE_STEP_STATES = frozenset({"succeeded", "continued", "skipped"})
"""Steps a resume does not run again."""
TERMINAL_STEP_STATES = frozenset({"succeeded", "continued", "skipped", "failed", "aborted"})
_LIVE_STATES = ("running", "waiting-approval")


@dataclass(frozen=True)
class StepRecord:
    """One journaled step. Times are UNIX epoch seconds (``None`` until it happens)."""

    key: str
    ord: int
    kind: str
    machine: str | None
    group: str | None
    state: str
    started_at: float | None
    finished_at: float | None
    attempts: int
    detail: dict[str, Any]
    error: str | None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "ord": self.ord, "kind": self.kind, "machine": self.machine, "group": self.group,
            "state": self.state, "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_s": self.duration_s, "attempts": self.attempts, "detail": self.detail, "error": self.error,
        }  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """One run with its steps (in plan order). ``state`` is the derived state (may be ``interrupted``);
    ``stored_state`` is what the catalog holds."""

    id: int
    kind: str
    plan_name: str
    plan_path: str | None
    plan: dict[str, Any]
    options: dict[str, Any]
    state: str
    stored_state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    error: str | None
    summary: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)

    def step(self, key: str) -> StepRecord:
        for s in self.steps:
            if s.key == key:
                return s
        raise UsageError(f"run {self.id} has no step {key!r}", hint=f"its steps: {', '.join(self.step_keys) or 'none'}")

    @property
    def step_keys(self) -> list[str]:
        return [s.key for s in self.steps]

    @property
    def control(self) -> dict[str, Any]:
        ctl = self.summary.get("control")
        return ctl if isinstance(ctl, dict) else {}

    @property
    def abort_requested(self) -> bool:
        return bool(self.control.get("abort"))

    @property
    def approvals(self) -> dict[str, Any]:
        appr = self.control.get("approvals")
        return appr if isinstance(appr, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "plan_name": self.plan_name, "plan_path": self.plan_path,
            "state": self.state, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "pid": self.pid, "error": self.error, "options": self.options,
            "summary": {k: v for k, v in self.summary.items() if k != "orchestrator"},
            "steps": [s.to_dict() for s in self.steps],
        }  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One ``run_events`` row, as passed to an executor's ``on_event`` callback."""

    run_id: int
    at: float
    step: str | None
    event: str
    detail: dict[str, Any]


# -- process liveness ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, kernel start time) of ``pid`` from /proc/PID/stat; None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """What :func:`pid_alive` later compares: the pid and its start time (guards against pid reuse)."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return {"pid": pid, "start": stat[1] if stat else None}


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """True while process ``pid`` runs (a zombie counts as dead) and, when ``start`` is known, is
    the process that was recorded (same kernel start time)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, now = stat
    if state in ("Z", "X"):
        return False
    return start is None or now == start


# -- the journal over one catalog connection ------------------------------------------------------


def _loads(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, default=str, sort_keys=True)


class RunJournal:
    """Journal reads and writes over one catalog connection, serialised by a lock so the
    executor's worker threads can checkpoint and log while the main thread polls."""

    def __init__(self, catalog: Catalog, *, owned: bool = False) -> None:
        self.catalog = catalog
        self.lock = threading.RLock()
        self._owned = owned

    @classmethod
    def private(cls, site: Site) -> RunJournal:
        """A journal on its own connection to ``site``'s catalog (the executor uses one, so the
        actions it runs may use ``site.catalog`` without sharing transactions with it)."""
        return cls(Catalog.open(site.catalog.path), owned=True)

    def close(self) -> None:
        if self._owned:
            self.catalog.close()

    @contextmanager
    def write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self.lock, self.catalog.transaction(doing) as db:
            yield db

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.catalog.query(sql, params, doing="reading the run journal")

    # -- runs ------------------------------------------------------------------------------

    def create_run(self, kind: str, plan_name: str, plan: dict[str, Any], options: dict[str, Any],
                   plan_path: str | Path | None = None) -> int:  # fmt: skip
        with self.write(f"recording a new {kind} run of plan {plan_name}") as db:
            cur = db.execute(
                "INSERT INTO runs (kind, plan_name, plan_path, plan, options, state, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (kind, plan_name, str(plan_path) if plan_path is not None else None, _dumps(plan), _dumps(options),
                 time.time()),
            )  # fmt: skip
            run_id = int(cur.lastrowid or 0)
            self._event(db, run_id, None, "run-created", {"kind": kind, "plan": plan_name})
        return run_id

    def _run_row(self, run_id: int) -> sqlite3.Row:
        rows = self.query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise SiteError(f"no run {run_id} at this site", hint="`p2v run list` shows the runs")
        return rows[0]

    def get_run(self, run_id: int) -> RunRecord:
        with self.lock:
            row = self._run_row(run_id)
            steps = self.query("SELECT * FROM run_steps WHERE run_id = ? ORDER BY ord, key", (run_id,))
        return _record(row, [_step(s) for s in steps])

    def list_runs(self, limit: int | None = 20) -> list[RunRecord]:
        with self.lock:
            rows = self.query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (-1 if limit is None else int(limit),))
            out = []
            for row in rows:
                steps = self.query("SELECT * FROM run_steps WHERE run_id = ? ORDER BY ord, key", (row["id"],))
                out.append(_record(row, [_step(s) for s in steps]))
        return out

    def update_control(self, run_id: int, change: Callable[[dict[str, Any]], None], doing: str,
                       event: tuple[str | None, str, dict[str, Any]] | None = None) -> RunRecord:  # fmt: skip
        """Read-modify-write the run's ``summary["control"]`` in one transaction."""
        with self.write(doing) as db:
            row = db.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise SiteError(f"no run {run_id} at this site", hint="`p2v run list` shows the runs")
            summary = _loads(row["summary"])
            control = summary.setdefault("control", {})
            change(control)
            db.execute("UPDATE runs SET summary = ? WHERE id = ?", (_dumps(summary), run_id))
            if event is not None:
                self._event(db, run_id, event[0], event[1], event[2])
        return self.get_run(run_id)

    def update_summary(self, db: sqlite3.Connection, run_id: int, values: dict[str, Any]) -> None:
        """Merge ``values`` into the run's summary (inside the caller's transaction)."""
        row = db.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()
        summary = _loads(row["summary"] if row else None)
        summary.update(values)
        db.execute("UPDATE runs SET summary = ? WHERE id = ?", (_dumps(summary), run_id))

    # -- steps -----------------------------------------------------------------------------

    def set_step(self, db: sqlite3.Connection, run_id: int, key: str, **values: Any) -> None:
        """Update columns of one step (``detail`` given as a dict), inside the caller's transaction."""
        if "detail" in values:
            values["detail"] = _dumps(values["detail"])
        cols = ", ".join(f"{c} = ?" for c in values)
        db.execute(f"UPDATE run_steps SET {cols} WHERE run_id = ? AND key = ?",  # noqa: S608 - column names are ours
                   (*values.values(), run_id, key))  # fmt: skip

    def step_detail(self, run_id: int, key: str) -> dict[str, Any]:
        rows = self.query("SELECT detail FROM run_steps WHERE run_id = ? AND key = ?", (run_id, key))
        if not rows:
            raise UsageError(f"run {run_id} has no step {key!r}")
        return _loads(rows[0]["detail"])

    def checkpoint(self, run_id: int, key: str, detail: dict[str, Any]) -> dict[str, Any]:
        """Merge ``detail`` into the step's stored detail now, in its own transaction; returns the merge."""
        with self.write(f"checkpointing step {key} of run {run_id}") as db:
            row = db.execute("SELECT detail FROM run_steps WHERE run_id = ? AND key = ?", (run_id, key)).fetchone()
            merged = {**_loads(row["detail"] if row else None), **detail}
            self.set_step(db, run_id, key, detail=merged)
        return merged

    # -- events ----------------------------------------------------------------------------

    @staticmethod
    def _event(db: sqlite3.Connection, run_id: int, step: str | None, event: str, detail: dict[str, Any],
               at: float | None = None) -> Event:  # fmt: skip
        at = time.time() if at is None else at
        db.execute("INSERT INTO run_events (run_id, at, step, event, detail) VALUES (?, ?, ?, ?, ?)",
                   (run_id, at, step, event, _dumps(detail)))  # fmt: skip
        return Event(run_id, at, step, event, detail)

    def add_event(self, db: sqlite3.Connection, run_id: int, step: str | None, event: str,
                  detail: dict[str, Any] | None = None, at: float | None = None) -> Event:  # fmt: skip
        return self._event(db, run_id, step, event, detail or {}, at)

    def events(self, run_id: int) -> list[Event]:
        rows = self.query("SELECT * FROM run_events WHERE run_id = ? ORDER BY id", (run_id,))
        return [Event(run_id, float(r["at"]), r["step"], r["event"], _loads(r["detail"])) for r in rows]


def _step(row: sqlite3.Row) -> StepRecord:
    return StepRecord(key=row["key"], ord=int(row["ord"]), kind=row["kind"], machine=row["machine"], group=row["grp"],
                      state=row["state"], started_at=row["started_at"], finished_at=row["finished_at"],
                      attempts=int(row["attempts"]), detail=_loads(row["detail"]), error=row["error"])  # fmt: skip


def _record(row: sqlite3.Row, steps: list[StepRecord]) -> RunRecord:
    summary = _loads(row["summary"])
    stored = row["state"]
    state = stored
    orch = summary.get("orchestrator") if isinstance(summary.get("orchestrator"), dict) else {}
    if stored in _LIVE_STATES and row["pid"] is not None and not pid_alive(row["pid"], (orch or {}).get("start")):
        state = "interrupted"
    started = summary.get("started_at")
    return RunRecord(id=int(row["id"]), kind=row["kind"], plan_name=row["plan_name"], plan_path=row["plan_path"],
                     plan=_loads(row["plan"]), options=_loads(row["options"]), state=state, stored_state=stored,
                     created_at=float(row["created_at"]), started_at=float(started) if started is not None else None,
                     finished_at=row["finished_at"], pid=row["pid"], error=row["error"], summary=summary,
                     steps=steps)  # fmt: skip


# -- the public functions over a Site --------------------------------------------------------------


def create_run(site: Site, kind: str, plan_name: str, plan: dict[str, Any], options: dict[str, Any],
               plan_path: str | Path | None = None) -> int:  # fmt: skip
    """Record a new run (state ``pending``, no steps yet: the executor adds them) and return its id."""
    return RunJournal(site.catalog).create_run(kind, plan_name, plan, options, plan_path)


def get_run(site: Site, run_id: int) -> RunRecord:
    """The run with its steps. SiteError when there is no such run."""
    return RunJournal(site.catalog).get_run(run_id)


def list_runs(site: Site, limit: int | None = 20) -> list[RunRecord]:
    """The newest ``limit`` runs (all with ``None``), newest first, steps included."""
    return RunJournal(site.catalog).list_runs(limit)


def run_events(site: Site, run_id: int) -> list[Event]:
    """The run's audit trail in order."""
    journal = RunJournal(site.catalog)
    journal.get_run(run_id)
    return journal.events(run_id)


def run_plan(site: Site, run_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan (as stored when the run was created) and the options of run ``run_id``."""
    run = get_run(site, run_id)
    return run.plan, run.options


def _actor(by: str | None) -> str:
    if by:
        return by
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER") or f"uid {os.getuid()}"


def request_abort(site: Site, run_id: int, by: str | None = None) -> RunRecord:
    """Ask the run to stop: its orchestrator starts no new step, lets running ones finish, runs the
    cleanup (``always``) steps and ends the run ``aborted``. If no orchestrator is alive the request
    is recorded and acted on by the next ``resume`` (which then runs only the cleanup steps).
    UsageError when the run has already finished."""
    run = get_run(site, run_id)
    if run.state in ("succeeded", "failed", "aborted"):
        raise UsageError(f"run {run_id} has already finished ({run.state}): there is nothing to abort")
    who = _actor(by)

    def change(control: dict[str, Any]) -> None:
        control.setdefault("abort", {"by": who, "at": time.time()})

    return RunJournal(site.catalog).update_control(run_id, change, f"requesting the abort of run {run_id}",
                                                   (None, "abort-requested", {"by": who}))  # fmt: skip


def approve(site: Site, run_id: int, step_key: str | None = None, by: str | None = None) -> list[str]:
    """Approve a manual gate (a step of kind ``approval``) or a step that failed under
    ``on_failure: approval`` — approving a failed step means *continue*: it is recorded as
    ``continued`` and its dependents run. With ``step_key`` None every step now waiting for approval
    is approved. A gate not reached yet may be approved in advance by naming it.
    Returns the approved keys. UsageError when nothing matches or the run has finished."""
    run = get_run(site, run_id)
    if run.state in ("succeeded", "failed", "aborted"):
        raise UsageError(f"run {run_id} has already finished ({run.state}): there is nothing to approve")
    if step_key is None:
        keys = [s.key for s in run.steps if s.state == "waiting-approval"]
        if not keys:
            raise UsageError(f"run {run_id} has no step waiting for approval (state {run.state})",
                             hint="name a gate not reached yet with --step KEY to approve it in advance")  # fmt: skip
    else:
        step = run.step(step_key)
        if step.state != "waiting-approval" and not (step.kind == "approval" and step.state in ("pending", "running")):
            raise UsageError(f"step {step_key} of run {run_id} is {step.state}: only a step waiting for approval "
                             f"or an approval gate not yet passed can be approved")  # fmt: skip
        keys = [step_key]
    who = _actor(by)
    now = time.time()

    def change(control: dict[str, Any]) -> None:
        approvals = control.setdefault("approvals", {})
        for k in keys:
            approvals.setdefault(k, {"by": who, "at": now})

    journal = RunJournal(site.catalog)
    journal.update_control(run_id, change, f"approving steps of run {run_id}",
                           (keys[0] if len(keys) == 1 else None, "approved", {"by": who, "steps": keys}))  # fmt: skip
    return keys


def close_aborted(site: Site, run_id: int) -> RunRecord:
    """End a run that no orchestrator executes as ``aborted`` without running any step (for a run
    whose kind has no step builder). Busy when a live process executes it."""
    journal = RunJournal(site.catalog)
    run = journal.get_run(run_id)
    orch = run.summary.get("orchestrator") or {}
    if run.pid is not None and pid_alive(run.pid, orch.get("start")):
        raise Busy(f"run {run_id} is being executed by process {run.pid}: it will abort by itself")
    if run.stored_state in ("succeeded", "failed", "aborted"):
        return run
    now = time.time()
    with journal.write(f"aborting run {run_id}") as db:
        for s in run.steps:
            if s.state not in TERMINAL_STEP_STATES:
                journal.set_step(db, run_id, s.key, state="aborted", error="not finished: run aborted",
                                 finished_at=s.finished_at or (now if s.started_at else None))  # fmt: skip
        db.execute("UPDATE runs SET state = 'aborted', pid = NULL, error = ?, finished_at = ? WHERE id = ?",
                   (f"aborted by {(run.control.get('abort') or {}).get('by') or _actor(None)} "
                    "(no orchestrator was running)", now, run_id))  # fmt: skip
        journal.add_event(db, run_id, None, "run-aborted", {"orchestrator": None})
    return journal.get_run(run_id)
