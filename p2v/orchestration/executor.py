"""The run executor: runs a DAG of step definitions, journaling every transition, and resumes.

It is generic: a step is a key, a kind, its dependencies and an *action* (a callable taking a
:class:`StepContext` and returning a JSON-able ``detail`` dict). The modes (drill, failover,
fallback) build the :class:`StepDef` list from a plan; this module knows nothing about QEMU.

Rules, in the order they matter:

* A step starts when every step in its ``after`` ended ``succeeded`` or ``continued``; up to
  ``parallel`` actions run at once (threads), ready steps start in list order.
* Every transition is committed before the action starts and right after it returns, so a
  ``kill -9`` leaves a journal :func:`resume` can continue: steps ``succeeded``/``continued``/
  ``skipped`` are not run again; a step left ``running`` runs again with ``ctx.resumed = True``
  (its action must look at the world, and at ``ctx.previous``, before acting again). A
  ``succeeded`` step whose ``still_valid`` gives a reason (its VM died meanwhile) runs again too,
  with its succeeded same-machine dependents (event ``step-invalidated``).
* ``on_failure``: ``abort`` — no new step starts, running ones finish, the ``always`` steps run,
  the run ends ``failed``, steps not started become ``skipped``; ``continue`` — the step is
  ``continued`` and its dependents run; ``approval`` — the step waits (``waiting-approval``) until
  ``p2v run approve`` (then it counts as ``continued``) or ``p2v run abort``.
* An ``approval`` step (a manual gate) waits the same way before its action runs. With
  ``wait_approvals=False`` :func:`execute` returns as soon as only approvals are left, the run
  in ``waiting-approval``; ``resume`` continues after the approval.
* Abort request (another process), Ctrl-C or SIGTERM: ``ctx.cancelled()`` turns true, no new
  step starts, running ones finish, the ``always`` steps (cleanup) run, the run ends ``aborted``
  and steps never started are ``aborted``. After a Ctrl-C/SIGTERM, ``KeyboardInterrupt`` is raised
  once the cleanup is done (a second Ctrl-C stops at once, leaving a resumable journal).
* ``always`` steps run whatever happened, once every step in their ``after`` has ended (any way).
* A step that outlives its ``timeout`` is told to stop (``ctx.cancelled()``) and ends ``failed``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from p2v.errors import Busy, P2VError, UsageError
from p2v.orchestration.journal import (
    DONE_STEP_STATES,
    FINISHED_RUN_STATES,
    TERMINAL_STEP_STATES,
    Event,
    RunJournal,
    RunRecord,
    pid_alive,
    process_identity,
)
from p2v.site.site import Site

log = logging.getLogger(__name__)

ON_FAILURE = ("abort", "continue", "approval")
POLL_S = 0.5


class StepFailure(P2VError):
    """A step's action failed. Actions may raise it to fail with ``detail`` kept in the journal
    (e.g. the results of the health checks that did not pass)."""

    exit_code = 16

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.detail = detail or {}


@dataclass(frozen=True)
class StepDef:
    """One step of a run. ``key`` is unique in the run and stable across resumes."""

    key: str
    kind: str
    action: Callable[[StepContext], dict[str, Any]]
    after: tuple[str, ...] = ()
    machine: str | None = None
    group: str | None = None
    on_failure: str = "abort"
    always: bool = False
    approval: str | None = None
    timeout: float | None = None
    # On resume, asked about this step when it had succeeded: why its outcome no longer holds
    # (e.g. the VM it started has died since), or None. A reason makes it run again, together
    # with the succeeded steps of the same machine that come right after it (its checks).
    still_valid: Callable[[dict[str, Any]], str | None] | None = None


def no_action(ctx: StepContext) -> dict[str, Any]:
    """An action that does nothing (approval gates usually have no work of their own)."""
    return {}


@dataclass
class StepContext:
    """What an action gets. ``previous`` is the detail checkpointed by an earlier attempt;
    ``resumed`` is True when an orchestrator that died had started this step."""

    run_id: int
    key: str
    resumed: bool
    previous: dict[str, Any]
    attempt: int
    deadline: float | None  # time.monotonic() after which the step has timed out
    _execution: _Execution = field(repr=False)
    _stop: threading.Event = field(repr=False)

    def detail_of(self, key: str) -> dict[str, Any]:
        """The journaled detail of step ``key`` of this run (e.g. what a prepare step recorded)."""
        return self._execution.journal.step_detail(self.run_id, key)

    def checkpoint(self, detail: dict[str, Any]) -> None:
        """Persist ``detail`` (merged into the step's detail) now, in its own transaction."""
        self.previous = self._execution.journal.checkpoint(self.run_id, self.key, detail)

    def cancelled(self) -> bool:
        """True when the run is being aborted (request, Ctrl-C, SIGTERM) or this step timed out.
        Cleanup (``always``) steps see only their own timeout."""
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (early) when :meth:`cancelled`."""
        return self._stop.wait(max(0.0, seconds))

    def remaining(self) -> float | None:
        """Seconds left before the step's timeout (None: no timeout)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def log(self, event: str, **detail: Any) -> None:
        """Add an event (``run_events`` row) for this step."""
        self._execution.event(self.key, event, detail)


StepBuilder = Callable[[Site, int, dict[str, Any], dict[str, Any]], list[StepDef]]
STEP_BUILDERS: dict[str, StepBuilder] = {}
"""Run kind (``drill``, ``failover``, ``fallback``...) -> the function that rebuilds a run's steps
from its stored plan and options; modes register here so ``p2v run resume`` can continue them."""


def register_step_builder(kind: str, builder: StepBuilder) -> None:
    STEP_BUILDERS[kind] = builder


def check_steps(steps: list[StepDef]) -> None:
    """UsageError when keys repeat, ``after`` names an unknown step, a policy is unknown or the
    dependencies form a cycle."""
    keys: dict[str, StepDef] = {}
    for s in steps:
        if s.key in keys:
            raise UsageError(f"step key {s.key!r} appears twice in the run")
        if s.on_failure not in ON_FAILURE:
            raise UsageError(f"step {s.key}: on_failure {s.on_failure!r} is not one of {', '.join(ON_FAILURE)}")
        keys[s.key] = s
    for s in steps:
        for dep in s.after:
            if dep not in keys:
                raise UsageError(f"step {s.key} runs after {dep!r}, which is not a step of the run")
    indeg = {s.key: len(set(s.after)) for s in steps}
    users: dict[str, list[str]] = {s.key: [] for s in steps}
    for s in steps:
        for dep in set(s.after):
            users[dep].append(s.key)
    ready = [k for k, n in indeg.items() if n == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if seen != len(steps):
        loop = sorted(k for k, n in indeg.items() if n > 0)
        raise UsageError(f"the steps' dependencies form a cycle among: {', '.join(loop)}")


class _Execution:
    """One execution of a run by this process (see the module docstring for the rules)."""

    def __init__(self, site: Site, run_id: int, steps: list[StepDef], *, parallel: int, wait_approvals: bool,
                 on_event: Callable[[Event], None] | None, poll_s: float) -> None:  # fmt: skip
        check_steps(steps)
        if parallel < 1:
            raise UsageError(f"parallel must be at least 1 (got {parallel})")
        self.site = site
        self.run_id = run_id
        self.defs = {s.key: s for s in steps}
        self.order = {s.key: i for i, s in enumerate(steps)}
        self.parallel = parallel
        self.wait_approvals = wait_approvals
        self.on_event = on_event
        self.poll_s = poll_s
        self.journal = RunJournal.private(site)
        self.mu = threading.RLock()  # in-memory state below
        self.state: dict[str, str] = {}
        self.resumed: set[str] = set()
        self.failure: str | None = None
        self.abort_by: str | None = None
        self.signalled: str | None = None
        self.stop_all = threading.Event()  # set on abort: ctx.cancelled() of non-always steps
        self.stops: dict[str, threading.Event] = {}
        self.deadlines: dict[str, float] = {}
        self.timed_out: set[str] = set()
        self.waiting_since: dict[str, float] = {}
        self.futures: dict[Future[None], str] = {}
        self.emit_lock = threading.Lock()
        self.forced = False
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"run{run_id}")

    # -- events ---------------------------------------------------------------------------

    def event(self, step: str | None, name: str, detail: dict[str, Any] | None = None) -> None:
        with self.journal.write(f"logging event {name} of run {self.run_id}") as db:
            ev = self.journal.add_event(db, self.run_id, step, name, detail)
        self.emit([ev])

    def emit(self, events: list[Event]) -> None:
        if self.on_event is None:
            return
        with self.emit_lock:
            for ev in events:
                try:
                    self.on_event(ev)
                except Exception:  # a display callback must not break the run
                    log.exception("on_event callback failed for %s", ev.event)

    def transition(self, key: str, state: str, event: str, info: dict[str, Any] | None = None,
                   **columns: Any) -> None:  # fmt: skip
        """Commit ``key`` -> ``state`` (plus columns) and its event, then update memory."""
        with self.mu:  # lock order: self.mu, then the journal's lock
            waiting = any(st == "waiting-approval" for st in {**self.state, key: state}.values())
            with self.journal.write(f"recording step {key} of run {self.run_id} as {state}") as db:
                self.journal.set_step(db, self.run_id, key, state=state, **columns)
                ev = self.journal.add_event(db, self.run_id, key, event, info)
                db.execute("UPDATE runs SET state = ? WHERE id = ? AND state IN ('running', 'waiting-approval')",
                           ("waiting-approval" if waiting else "running", self.run_id))  # fmt: skip
            self.state[key] = state
        self.emit([ev])

    # -- claiming the run -----------------------------------------------------------------

    def claim(self) -> None:
        me = process_identity()
        events: list[Event] = []
        with self.journal.write(f"starting run {self.run_id}") as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (self.run_id,)).fetchone()
            if row is None:
                raise UsageError(f"no run {self.run_id} at this site", hint="`p2v run list` shows the runs")
            rec = self.journal.get_run(self.run_id)
            if rec.stored_state in FINISHED_RUN_STATES:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.finished_at or rec.created_at))
                raise UsageError(f"run {self.run_id} already {rec.stored_state} at {when}: it cannot be resumed",
                                 hint="start a new run of the plan instead")  # fmt: skip
            orch = rec.summary.get("orchestrator") or {}
            if rec.pid is not None and pid_alive(rec.pid, orch.get("start")):
                raise Busy(f"run {self.run_id} is being executed by process {rec.pid} (state {rec.state})",
                           hint=f"wait for it, or `p2v run abort {self.run_id}`")  # fmt: skip
            self._sync_steps(db, rec)
            resumed = rec.started_at is not None
            retry = rec.stored_state == "failed"
            for s in rec.steps:
                if retry and (s.state in ("failed", "skipped", "aborted")
                              or (self.defs[s.key].always and s.state in TERMINAL_STEP_STATES)):  # fmt: skip
                    self.journal.set_step(db, self.run_id, s.key, state="pending", error=None, started_at=None,
                                          finished_at=None)  # fmt: skip
            if resumed:
                events += self._revalidate(db)
            steps = {s.key: s for s in self.journal.get_run(self.run_id).steps}
            for key in self.defs:
                st = steps[key].state
                if st == "running":  # its orchestrator died: run it again, resumed
                    self.resumed.add(key)
                    st = "pending"
                self.state[key] = st
                if st == "failed" and not self.defs[key].always:
                    self.failure = self.failure or f"step {key} failed: {steps[key].error}"
            if rec.abort_requested:
                self.abort_by = str(rec.control["abort"].get("by") or "request")
            self.journal.update_summary(db, self.run_id, {
                "orchestrator": me, "started_at": rec.started_at or time.time(),
                "cleanup_steps": [k for k, s in self.defs.items() if s.always]})  # fmt: skip
            db.execute("UPDATE runs SET state = 'running', pid = ?, finished_at = NULL, error = NULL WHERE id = ?",
                       (me["pid"], self.run_id))  # fmt: skip
            name = "run-resumed" if resumed else "run-started"
            events.append(self.journal.add_event(db, self.run_id, None, name, {
                "pid": me["pid"], "retry_failed": retry, "steps_left_running": sorted(self.resumed)}))  # fmt: skip
        self.emit(events)

    def _revalidate(self, db: Any) -> list[Event]:
        """Succeeded steps whose outcome is gone (``StepDef.still_valid``) become pending again."""
        events: list[Event] = []
        steps = {s.key: s for s in self.journal.get_run(self.run_id).steps}
        for key, d in self.defs.items():
            if d.still_valid is None or steps[key].state != "succeeded":
                continue
            why = d.still_valid(steps[key].detail)
            if not why:
                continue
            again = [key] + [k for k, o in self.defs.items() if key in o.after and o.machine == d.machine
                             and steps[k].state == "succeeded"]  # fmt: skip
            for k in again:
                self.journal.set_step(db, self.run_id, k, state="pending", error=None, started_at=None,
                                      finished_at=None)  # fmt: skip
                events.append(self.journal.add_event(db, self.run_id, k, "step-invalidated", {
                    "reason": why if k == key else f"{key} runs again: {why}"}))  # fmt: skip
        return events

    def _sync_steps(self, db: Any, rec: RunRecord) -> None:
        have = set(rec.step_keys)
        want = set(self.defs)
        if have and have != want:
            extra, missing = sorted(want - have), sorted(have - want)
            raise UsageError(f"run {self.run_id}: the steps given do not match the journal (new: {extra or 'none'}, "
                             f"missing: {missing or 'none'}); the plan or the options changed since the run started",
                             hint="resume with the plan and options the run was created with")  # fmt: skip
        if not have:
            for key, s in self.defs.items():
                db.execute("INSERT INTO run_steps (run_id, key, ord, kind, machine, grp, state) "
                           "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                           (self.run_id, key, self.order[key], s.kind, s.machine, s.group))  # fmt: skip

    # -- the loop -------------------------------------------------------------------------

    def stopping(self) -> bool:
        return self.failure is not None or self.abort_by is not None

    def running(self) -> list[str]:
        return list(self.futures.values())

    def poll_control(self) -> None:
        rec = self.journal.get_run(self.run_id)
        if rec.abort_requested and self.abort_by is None:
            self.begin_abort(str(rec.control["abort"].get("by") or "request"))
        with self.mu:
            waiting = [k for k, st in self.state.items() if st == "waiting-approval"]
        if not waiting:
            return
        if self.stopping():
            for key in waiting:
                new = "aborted" if self.defs[key].kind == "approval" else "failed"
                cols: dict[str, Any] = {"finished_at": time.time(), "error": "not approved"} if new == "aborted" else {}
                self.transition(key, new, f"step-{new}", {"reason": "run stopped while waiting for approval"}, **cols)
            return
        steps = {s.key: s for s in rec.steps}
        for key in waiting:
            granted = rec.approvals.get(key)
            step = steps[key]
            gate = self.defs[key]
            if not granted and gate.kind == "approval" and gate.timeout and step.started_at \
                    and time.time() > step.started_at + gate.timeout:
                self.fail(gate, f"not approved within {gate.timeout:g}s", step.detail, {})
                continue
            if not granted:
                continue
            if self.defs[key].kind == "approval":
                self.start(key, approved=granted)
            elif float(granted.get("at", 0)) >= (step.finished_at or 0):
                self.transition(key, "continued", "step-continued", {"approved_by": granted.get("by")},
                                detail={**step.detail, "approved_by": granted.get("by"),
                                        "approved_at": granted.get("at")})  # fmt: skip

    def begin_abort(self, by: str) -> None:
        self.abort_by = by
        self.stop_all.set()
        for key, ev in self.stops.items():
            if not self.defs[key].always:
                ev.set()
        self.event(None, "abort-noticed", {"by": by, "running": sorted(self.running())})

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for key in self.running():
            deadline = self.deadlines.get(key)
            if deadline is not None and now > deadline and key not in self.timed_out:
                self.timed_out.add(key)
                self.stops[key].set()
                self.event(key, "step-timeout", {"timeout_s": self.defs[key].timeout})

    def ready(self) -> list[str]:
        """Pending steps that may start now, in list order; marks steps that can never run."""
        out = []
        with self.mu:
            pending = sorted((k for k, st in self.state.items() if st == "pending"), key=self.order.__getitem__)
            states = dict(self.state)
        for key in pending:
            s = self.defs[key]
            deps = [states[d] for d in s.after]
            if s.always:
                if all(d in TERMINAL_STEP_STATES for d in deps):
                    out.append(key)
                continue
            if self.abort_by is not None:
                self.transition(key, "aborted", "step-aborted", {"by": self.abort_by},
                                error=f"not started: run aborted by {self.abort_by}")  # fmt: skip
            elif any(d in ("failed", "skipped", "aborted") for d in deps):
                bad = [d for d in s.after if states[d] in ("failed", "skipped", "aborted")]
                self.transition(key, "skipped", "step-skipped", {"because": bad},
                                error=f"skipped: {', '.join(bad)} did not succeed")  # fmt: skip
            elif self.failure is not None:
                self.transition(key, "skipped", "step-skipped", {"because": self.failure},
                                error=f"not started: {self.failure}")  # fmt: skip
            elif all(d in ("succeeded", "continued") for d in deps):
                out.append(key)
        return out

    def start(self, key: str, approved: dict[str, Any] | None = None) -> None:
        s = self.defs[key]
        rec = self.journal.get_run(self.run_id)
        step = rec.step(key)
        if s.kind == "approval" and approved is None:
            approved = rec.approvals.get(key)
            if approved is None:
                if step.state != "waiting-approval":
                    self.transition(key, "waiting-approval", "step-waiting-approval",
                                    {"question": s.approval or key}, started_at=time.time(),
                                    detail={**step.detail, "question": s.approval or key})  # fmt: skip
                return
        resumed = key in self.resumed
        previous = dict(step.detail)
        if approved is not None:
            previous.update(question=s.approval or key, approved_by=approved.get("by"), approved_at=approved.get("at"))
        started = step.started_at if s.kind == "approval" and step.started_at else time.time()
        self.transition(key, "running", "step-started", {"attempt": step.attempts + 1, "resumed": resumed},
                        started_at=started, finished_at=None, error=None, attempts=step.attempts + 1,
                        detail=previous)  # fmt: skip
        stop = threading.Event()
        if self.abort_by is not None and not s.always:
            stop.set()
        self.stops[key] = stop
        deadline = time.monotonic() + s.timeout if s.timeout else None
        if deadline is not None:
            self.deadlines[key] = deadline
        ctx = StepContext(run_id=self.run_id, key=key, resumed=resumed, previous=previous,
                          attempt=step.attempts + 1, deadline=deadline, _execution=self, _stop=stop)  # fmt: skip
        with self.mu:
            self.futures[self.pool.submit(self.run_action, s, ctx)] = key

    def run_action(self, s: StepDef, ctx: StepContext) -> None:
        """Worker thread: run the action, then commit its outcome at once."""
        t0 = time.monotonic()
        error: str | None = None
        extra: dict[str, Any] = {}
        try:
            result = s.action(ctx)
            if not isinstance(result, dict):
                raise StepFailure(f"step {s.key}: the action returned {type(result).__name__}, not a dict")
            extra = result
        except StepFailure as exc:
            error, extra = exc.message, exc.detail
        except P2VError as exc:
            error = exc.message
        except Exception as exc:
            log.exception("step %s of run %s failed", s.key, self.run_id)
            error = f"{type(exc).__name__}: {exc}"
        if s.key in self.timed_out:
            error = f"timed out after {s.timeout:g}s" + (f" ({error})" if error else "")
        detail = {**ctx.previous, **extra}
        took = {"seconds": round(time.monotonic() - t0, 3)}
        if error is None:
            self.transition(s.key, "succeeded", "step-succeeded", took, finished_at=time.time(), detail=detail)
        else:
            self.fail(s, error, detail, took)

    def fail(self, s: StepDef, error: str, detail: dict[str, Any], took: dict[str, Any]) -> None:
        """Record the failure of ``s`` as its on_failure policy says."""
        now = time.time()
        if s.on_failure == "continue":
            self.transition(s.key, "continued", "step-continued", {**took, "error": error},
                            finished_at=now, detail=detail, error=error)  # fmt: skip
        elif s.on_failure == "approval" and s.kind != "approval" and not self.stopping():
            self.transition(s.key, "waiting-approval", "step-waiting-approval", {**took, "error": error},
                            finished_at=now, detail=detail, error=error)  # fmt: skip
        else:
            with self.mu:
                if self.failure is None:
                    self.failure = f"step {s.key} failed: {error}"
            self.transition(s.key, "failed", "step-failed", {**took, "error": error},
                            finished_at=now, detail=detail, error=error)  # fmt: skip

    def collect(self) -> None:
        with self.mu:
            futures = list(self.futures)
        if not futures:
            return
        done, _ = wait(futures, timeout=self.poll_s, return_when=FIRST_COMPLETED)
        with self.mu:
            for fut in done:
                self.futures.pop(fut, None)
                fut.result()  # run_action catches everything; a journal error surfaces here

    def loop(self) -> bool:
        """Run until nothing can start; False when the run is left waiting for approvals."""
        next_poll = 0.0
        while True:
            if self.signalled and self.abort_by is None:
                self.mark_interrupt()
            if time.monotonic() >= next_poll:
                self.poll_control()
                next_poll = time.monotonic() + self.poll_s
            self.check_timeouts()
            for key in self.ready():
                if len(self.futures) >= self.parallel:
                    break
                self.start(key)
            if self.futures:
                self.collect()
                continue
            if self.waiting():
                self.poll_control()  # an approval or an abort may have arrived
                next_poll = time.monotonic() + self.poll_s
            if self.futures or self.ready():
                continue
            if not self.waiting():
                return True
            if not self.wait_approvals:
                return False
            time.sleep(self.poll_s)

    def waiting(self) -> list[str]:
        with self.mu:
            return [k for k, st in self.state.items() if st == "waiting-approval"]

    def mark_interrupt(self) -> None:
        who = f"signal {self.signalled}"

        def change(control: dict[str, Any]) -> None:
            control.setdefault("abort", {"by": who, "at": time.time()})

        self.journal.update_control(self.run_id, change, f"recording the interruption of run {self.run_id}",
                                    (None, "abort-requested", {"by": who}))  # fmt: skip
        self.begin_abort(who)

    def finish(self, completed: bool) -> RunRecord:
        with self.mu:
            states = dict(self.state)
        counts: dict[str, int] = {}
        for st in states.values():
            counts[st] = counts.get(st, 0) + 1
        if not completed:
            run_state, error = "waiting-approval", None
            waiting = sorted(k for k, st in states.items() if st == "waiting-approval")
            detail: dict[str, Any] = {"waiting": waiting}
        elif self.abort_by is not None:
            run_state, error, detail = "aborted", f"aborted by {self.abort_by}", {}
        elif self.failure is not None or any(st == "failed" for st in states.values()):
            run_state, error, detail = "failed", self.failure or "a step failed", {}
        elif any(st not in DONE_STEP_STATES for st in states.values()):
            stuck = sorted(k for k, st in states.items() if st not in DONE_STEP_STATES)
            run_state, error, detail = "failed", f"steps never ran: {', '.join(stuck)}", {}
        else:
            run_state, error, detail = "succeeded", None, {}
        with self.journal.write(f"finishing run {self.run_id}") as db:
            db.execute("UPDATE runs SET state = ?, pid = NULL, error = ?, finished_at = ? WHERE id = ?",
                       (run_state, error, time.time() if completed else None, self.run_id))  # fmt: skip
            self.journal.update_summary(db, self.run_id, {"steps": counts})
            ev = self.journal.add_event(db, self.run_id, None, f"run-{run_state}", {**detail, "error": error})
        self.emit([ev])
        return self.journal.get_run(self.run_id)

    # -- entry ----------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled:  # second signal: stop now, the journal stays resumable
            self.forced = True
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name
        self.stop_all.set()

    def run(self) -> RunRecord:
        try:
            self.claim()
        except BaseException:
            self.pool.shutdown(wait=False)
            self.journal.close()
            raise
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[int(sig)] = signal.signal(sig, self.on_signal)
        try:
            try:
                completed = self.loop()
            except KeyboardInterrupt:
                if self.forced:
                    raise
                if self.signalled is None:
                    self.signalled = "SIGINT"
                self.mark_interrupt()
                completed = self.loop()
            record = self.finish(completed)
        finally:
            for signum, old in handlers.items():
                signal.signal(signum, old)
            self.pool.shutdown(wait=not self.forced, cancel_futures=True)
            self.journal.close()
        if self.signalled:
            raise KeyboardInterrupt
        return record


def execute(site: Site, run_id: int, steps: list[StepDef], *, parallel: int = 4, wait_approvals: bool = True,
            on_event: Callable[[Event], None] | None = None, poll_s: float = POLL_S) -> RunRecord:  # fmt: skip
    """Execute (or continue) run ``run_id`` with ``steps``; returns the run as it ended
    (``succeeded``, ``failed``, ``aborted``, or ``waiting-approval`` with ``wait_approvals=False``).

    Raises Busy when a live process executes the run, UsageError when the run has finished
    (succeeded/aborted) or ``steps`` do not match its journal, KeyboardInterrupt after cleanup
    when interrupted by Ctrl-C/SIGTERM. ``on_event`` gets every journal event (from any thread,
    one at a time). A run that ended ``failed`` is retried by executing it again: its failed,
    skipped and aborted steps run again, and so do its ``always`` steps."""
    return _Execution(site, run_id, steps, parallel=parallel, wait_approvals=wait_approvals, on_event=on_event,
                      poll_s=poll_s).run()  # fmt: skip


def resume(site: Site, run_id: int, steps: list[StepDef] | None = None, *, parallel: int = 4,
           wait_approvals: bool = True, on_event: Callable[[Event], None] | None = None,
           poll_s: float = POLL_S) -> RunRecord:  # fmt: skip
    """Continue run ``run_id`` where it stopped. Without ``steps`` they are rebuilt by the
    :data:`STEP_BUILDERS` entry of the run's kind from its stored plan and options (UsageError
    when no mode registered one). Refuses finished runs (``succeeded``, ``aborted``)."""
    journal = RunJournal(site.catalog)
    run = journal.get_run(run_id)
    if run.stored_state in FINISHED_RUN_STATES:
        raise UsageError(f"run {run_id} already {run.stored_state}: there is nothing to resume",
                         hint="start a new run of the plan instead")  # fmt: skip
    if steps is None:
        builder = STEP_BUILDERS.get(run.kind)
        if builder is None:
            known = ", ".join(sorted(STEP_BUILDERS)) or "none"
            raise UsageError(f"run {run_id} is a {run.kind!r} run and no mode can rebuild its steps "
                             f"(kinds that can be resumed: {known})")  # fmt: skip
        steps = builder(site, run_id, run.plan, run.options)
    return execute(site, run_id, steps, parallel=parallel, wait_approvals=wait_approvals, on_event=on_event,
                   poll_s=poll_s)  # fmt: skip

