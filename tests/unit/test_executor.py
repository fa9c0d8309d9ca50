"""The run executor over a real catalog (SQLite in tmp_path): order, parallelism, failure
policies, abort, cleanup steps, resume and the orchestrator-pid guard. Actions are plain Python."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2v.errors import Busy, UsageError
from p2v.orchestration import journal
from p2v.orchestration.executor import StepContext, StepDef, StepFailure, execute, resume
from p2v.site.site import Site

POLL = 0.1
Action = Callable[[StepContext], dict[str, Any]]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Site.open(tmp_path / "site") as s:
        yield s


class Calls:
    """Actions that count their calls and remember their contexts."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.ctx: dict[str, StepContext] = {}
        self.lock = threading.Lock()

    def act(self, sleep: float = 0.0, fail: str | None = None, **detail: Any) -> Action:
        def action(ctx: StepContext) -> dict[str, Any]:
            with self.lock:
                self.count[ctx.key] += 1
                self.ctx[ctx.key] = ctx
            time.sleep(sleep)
            if fail:
                raise StepFailure(fail, detail={"why": fail})
            return dict(detail)

        return action


def new_run(site: Site, kind: str = "drill") -> int:
    return journal.create_run(site, kind, "plan-a", {"name": "plan-a"}, {"point": "latest"}, "/plans/a.yaml")


def states(run: journal.RunRecord) -> dict[str, str]:
    return {s.key: s.state for s in run.steps}


def test_independent_steps_overlap_and_dependents_wait(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("boot:db", "boot", calls.act(0.4), machine="db"),
        StepDef("boot:web", "boot", calls.act(0.4), machine="web"),
        StepDef("check:all", "check", calls.act(), after=("boot:db", "boot:web")),
    ]
    run = execute(site, new_run(site), steps, parallel=4, poll_s=POLL)
    assert run.state == "succeeded" and run.pid is None
    db, web, chk = (run.step(k) for k in ("boot:db", "boot:web", "check:all"))
    assert db.started_at and web.started_at and db.finished_at and web.finished_at and chk.started_at
    assert db.started_at < web.finished_at and web.started_at < db.finished_at, "independent steps did not overlap"
    assert chk.started_at >= max(db.finished_at, web.finished_at)
    assert all(s.attempts == 1 for s in run.steps)
    assert run.finished_at is not None and run.finished_at >= chk.finished_at  # type: ignore[operator]


def test_parallel_one_runs_in_list_order(site: Site) -> None:
    calls = Calls()
    steps = [StepDef(k, "shell", calls.act(0.05)) for k in ("c", "a", "b")]
    run = execute(site, new_run(site), steps, parallel=1, poll_s=POLL)
    starts = sorted(run.steps, key=lambda s: s.started_at or 0)
    assert [s.key for s in starts] == ["c", "a", "b"]
    assert starts[0].finished_at <= starts[1].started_at  # type: ignore[operator]


def test_abort_policy_skips_the_rest_and_runs_cleanup(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("boot:db", "boot", calls.act(fail="no console output")),
        StepDef("check:db", "check", calls.act(), after=("boot:db",)),
        StepDef("boot:web", "boot", calls.act(), after=("check:db",)),
        StepDef("other", "shell", calls.act()),
        StepDef("teardown", "teardown", calls.act(), after=("boot:web", "other"), always=True),
    ]
    run = execute(site, new_run(site), steps, parallel=1, poll_s=POLL)
    assert run.state == "failed"
    assert "boot:db" in (run.error or "") and "no console output" in (run.error or "")
    assert states(run) == {"boot:db": "failed", "check:db": "skipped", "boot:web": "skipped", "other": "skipped",
                           "teardown": "succeeded"}  # fmt: skip
    assert calls.count == Counter({"boot:db": 1, "teardown": 1})
    assert run.step("boot:db").detail == {"why": "no console output"}
    assert "boot:db" in (run.step("check:db").error or "")


def test_continue_policy_lets_dependents_run(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("check:web", "check", calls.act(fail="http 500"), on_failure="continue"),
        StepDef("after", "shell", calls.act(), after=("check:web",)),
    ]
    run = execute(site, new_run(site), steps, poll_s=POLL)
    assert run.state == "succeeded"
    assert states(run) == {"check:web": "continued", "after": "succeeded"}
    assert run.step("check:web").error == "http 500"


def _approve_later(site: Site, run_id: int, delay: float, step: str | None = None) -> threading.Thread:
    path = site.root

    def go() -> None:
        time.sleep(delay)
        with Site.open(path) as other:
            journal.approve(other, run_id, step, by="tester")

    t = threading.Thread(target=go)
    t.start()
    return t


def test_failed_step_under_approval_waits_then_continues(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("check:db", "check", calls.act(fail="port 5432 closed"), on_failure="approval"),
        StepDef("boot:web", "boot", calls.act(), after=("check:db",)),
    ]
    run_id = new_run(site)
    t0 = time.monotonic()
    t = _approve_later(site, run_id, 1.0)
    run = execute(site, run_id, steps, poll_s=POLL)
    t.join()
    assert time.monotonic() - t0 >= 1.0
    assert run.state == "succeeded"
    assert states(run) == {"check:db": "continued", "boot:web": "succeeded"}
    assert run.step("check:db").detail["approved_by"] == "tester"
    assert run.step("boot:web").started_at >= run.step("check:db").finished_at + 0.9  # type: ignore[operator]
    assert calls.count["check:db"] == 1


def test_gate_waits_for_approval_from_another_connection(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("gate", "approval", calls.act(), approval="Start the web tier?"),
        StepDef("boot:web", "boot", calls.act(), after=("gate",)),
    ]
    run_id = new_run(site)
    t = _approve_later(site, run_id, 1.0, "gate")
    run = execute(site, run_id, steps, poll_s=POLL)
    t.join()
    assert states(run) == {"gate": "succeeded", "boot:web": "succeeded"}
    gate = run.step("gate")
    assert gate.detail["question"] == "Start the web tier?" and gate.detail["approved_by"] == "tester"
    assert gate.duration_s is not None and gate.duration_s >= 0.9


def test_no_wait_returns_waiting_then_resume_completes(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("boot:db", "boot", calls.act()),
        StepDef("gate", "approval", calls.act(), after=("boot:db",), approval="go?"),
        StepDef("boot:web", "boot", calls.act(), after=("gate",)),
    ]
    run_id = new_run(site)
    run = execute(site, run_id, steps, wait_approvals=False, poll_s=POLL)
    assert run.state == "waiting-approval" and run.pid is None
    assert states(run) == {"boot:db": "succeeded", "gate": "waiting-approval", "boot:web": "pending"}
    with pytest.raises(UsageError, match=r"boot:web .*pending"):
        journal.approve(site, run_id, "boot:web")
    assert journal.approve(site, run_id, None, by="ops") == ["gate"]
    run = resume(site, run_id, steps, wait_approvals=False, poll_s=POLL)
    assert run.state == "succeeded"
    assert calls.count == Counter({"boot:db": 1, "gate": 1, "boot:web": 1})
    with pytest.raises(UsageError, match="already succeeded"):
        resume(site, run_id, steps, poll_s=POLL)


def test_abort_request_from_another_connection(site: Site) -> None:
    seen: dict[str, bool] = {}

    def long_boot(ctx: StepContext) -> dict[str, Any]:
        seen["cancelled"] = ctx.wait(10)
        return {"stopped_early": seen["cancelled"]}

    calls = Calls()
    steps = [
        StepDef("boot:db", "boot", long_boot),
        StepDef("boot:web", "boot", calls.act(), after=("boot:db",)),
        StepDef("teardown", "teardown", calls.act(), after=("boot:web",), always=True),
    ]
    run_id = new_run(site)
    path = site.root

    def abort_later() -> None:
        time.sleep(0.8)
        with Site.open(path) as other:
            journal.request_abort(other, run_id, by="ops")

    t = threading.Thread(target=abort_later)
    t0 = time.monotonic()
    t.start()
    run = execute(site, run_id, steps, poll_s=POLL)
    t.join()
    assert time.monotonic() - t0 < 5, "the running step was not told to stop"
    assert seen["cancelled"] is True
    assert run.state == "aborted" and "ops" in (run.error or "")
    assert states(run) == {"boot:db": "succeeded", "boot:web": "aborted", "teardown": "succeeded"}
    assert calls.count == Counter({"teardown": 1})
    with pytest.raises(UsageError, match="already aborted"):
        resume(site, run_id, steps)


def test_dependents_are_skipped_transitively(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("a", "boot", calls.act(), ),
        StepDef("b", "check", calls.act(fail="bad"), after=("a",)),
        StepDef("c", "boot", calls.act(), after=("b",)),
        StepDef("d", "check", calls.act(), after=("c",)),
    ]
    run = execute(site, new_run(site), steps, poll_s=POLL)
    assert states(run) == {"a": "succeeded", "b": "failed", "c": "skipped", "d": "skipped"}
    assert calls.count == Counter({"a": 1, "b": 1})


def test_resume_of_failed_run_retries_only_what_did_not_finish(site: Site) -> None:
    calls = Calls()
    broken = {"on": True}

    def flaky(ctx: StepContext) -> dict[str, Any]:
        calls.count[ctx.key] += 1
        if broken["on"]:
            raise RuntimeError("disk not found")
        return {"ok": True}

    steps = [
        StepDef("a", "boot", calls.act()),
        StepDef("b", "check", flaky, after=("a",)),
        StepDef("c", "boot", calls.act(), after=("b",)),
        StepDef("t", "teardown", calls.act(), after=("c",), always=True),
    ]
    run_id = new_run(site)
    run = execute(site, run_id, steps, poll_s=POLL)
    assert run.state == "failed" and "RuntimeError: disk not found" in (run.error or "")
    broken["on"] = False
    run = resume(site, run_id, steps, poll_s=POLL)
    assert run.state == "succeeded"
    assert calls.count == Counter({"a": 1, "b": 2, "c": 1, "t": 2})
    assert run.step("b").attempts == 2


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _pretend_running(site: Site, run_id: int, pid: int, running: str, detail: str = "{}") -> None:
    summary = journal.get_run(site, run_id).summary | {"orchestrator": journal.process_identity(pid)}
    with site.catalog.transaction() as db:
        db.execute("UPDATE runs SET state = 'running', pid = ?, summary = ? WHERE id = ?",
                   (pid, json.dumps(summary), run_id))  # fmt: skip
        db.execute("UPDATE run_steps SET state = 'running', detail = ?, attempts = 1, started_at = ? "
                   "WHERE run_id = ? AND key = ?", (detail, time.time(), run_id, running))  # fmt: skip


def test_step_left_running_by_a_dead_orchestrator_is_resumed(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("gate", "approval", calls.act()),
        StepDef("boot:db", "boot", calls.act(), after=("gate",)),
        StepDef("check:db", "check", calls.act(), after=("boot:db",)),
    ]
    run_id = new_run(site)
    execute(site, run_id, steps, wait_approvals=False, poll_s=POLL)  # journals the steps, stops at the gate
    journal.approve(site, run_id, "gate")
    with site.catalog.transaction() as db:
        db.execute("UPDATE run_steps SET state = 'succeeded' WHERE run_id = ? AND key = 'gate'", (run_id,))
    _pretend_running(site, run_id, _dead_pid(), "boot:db", '{"pid": 4242}')
    assert journal.get_run(site, run_id).state == "interrupted"
    run = resume(site, run_id, steps, poll_s=POLL)
    assert run.state == "succeeded"
    assert calls.ctx["boot:db"].resumed is True and calls.ctx["boot:db"].previous == {"pid": 4242}
    assert calls.ctx["check:db"].resumed is False
    assert calls.count == Counter({"boot:db": 1, "check:db": 1})
    assert run.step("boot:db").attempts == 2 and run.step("boot:db").detail == {"pid": 4242}


def test_resume_runs_again_a_succeeded_step_whose_outcome_is_gone(site: Site) -> None:
    """A VM that died after its boot step succeeded: resume boots it again and repeats that
    machine's checks, but not another machine's steps nor the steps before it."""
    calls = Calls()
    alive = {"db": True, "web": True}

    def gone(machine: str) -> Callable[[dict[str, Any]], str | None]:
        return lambda detail: None if alive[machine] else f"VM {detail['vm']} is no longer running"

    steps = [
        StepDef("prepare:db", "prepare", calls.act()),
        StepDef("boot:db", "boot", calls.act(vm="dr-db"), after=("prepare:db",), machine="db", still_valid=gone("db")),
        StepDef("check:db", "check", calls.act(), after=("boot:db",), machine="db"),
        StepDef("boot:web", "boot", calls.act(vm="dr-web"), after=("check:db",), machine="web",
                still_valid=gone("web")),
        StepDef("check:web", "check", calls.act(), after=("boot:web",), machine="web"),
        StepDef("gate", "approval", calls.act(), after=("check:web",)),
    ]  # fmt: skip
    run_id = new_run(site)
    run = execute(site, run_id, steps, wait_approvals=False, poll_s=POLL)
    assert run.state == "waiting-approval"
    alive["db"] = False
    journal.approve(site, run_id, "gate")
    seen: list[journal.Event] = []
    run = resume(site, run_id, steps, poll_s=POLL, on_event=seen.append)
    assert run.state == "succeeded"
    assert calls.count == Counter({"prepare:db": 1, "boot:db": 2, "check:db": 2, "boot:web": 1, "check:web": 1,
                                   "gate": 1})  # fmt: skip
    invalidated = {e.step: e.detail["reason"] for e in seen if e.event == "step-invalidated"}
    assert invalidated == {"boot:db": "VM dr-db is no longer running",
                           "check:db": "boot:db runs again: VM dr-db is no longer running"}  # fmt: skip
    assert calls.ctx["boot:db"].previous == {"vm": "dr-db"}  # the new attempt sees what the first one recorded
    assert run.step("boot:db").attempts == 2


def test_live_orchestrator_makes_execute_busy(site: Site) -> None:
    calls = Calls()
    steps = [StepDef("a", "boot", calls.act())]
    run_id = new_run(site)
    execute(site, run_id, [StepDef("a", "boot", calls.act(fail="x"))], poll_s=POLL)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _pretend_running(site, run_id, sleeper.pid, "a")
        assert journal.get_run(site, run_id).state == "running"
        with pytest.raises(Busy, match=f"run {run_id} is being executed by process {sleeper.pid}"):
            execute(site, run_id, steps, poll_s=POLL)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert journal.get_run(site, run_id).state == "interrupted"
    assert execute(site, run_id, steps, poll_s=POLL).state == "succeeded"
    assert calls.count == Counter({"a": 2})  # the failed attempt, then the one after the busy orchestrator died


def test_resume_with_other_steps_is_refused(site: Site) -> None:
    calls = Calls()
    run_id = new_run(site)
    execute(site, run_id, [StepDef("gate", "approval", calls.act())], wait_approvals=False, poll_s=POLL)
    with pytest.raises(UsageError, match="do not match the journal"):
        resume(site, run_id, [StepDef("gate", "approval", calls.act()), StepDef("x", "boot", calls.act())])


def test_bad_step_lists_are_refused(site: Site) -> None:
    calls = Calls()
    run_id = new_run(site)
    with pytest.raises(UsageError, match="cycle"):
        execute(site, run_id, [StepDef("a", "boot", calls.act(), after=("b",)),
                               StepDef("b", "boot", calls.act(), after=("a",))])  # fmt: skip
    with pytest.raises(UsageError, match="'nope'"):
        execute(site, run_id, [StepDef("a", "boot", calls.act(), after=("nope",))])
    with pytest.raises(UsageError, match="on_failure 'retry'"):
        execute(site, run_id, [StepDef("a", "boot", calls.act(), on_failure="retry")])
    assert journal.get_run(site, run_id).state == "pending"


def test_timeout_fails_the_step(site: Site) -> None:
    def slow(ctx: StepContext) -> dict[str, Any]:
        ctx.wait(10)
        return {}

    t0 = time.monotonic()
    run = execute(site, new_run(site), [StepDef("boot", "boot", slow, timeout=0.3)], poll_s=POLL)
    assert time.monotonic() - t0 < 3
    assert run.state == "failed" and "timed out after 0.3s" in (run.step("boot").error or "")


def test_ctrl_c_runs_cleanup_marks_aborted_and_reraises(site: Site) -> None:
    calls = Calls()

    def interrupted(ctx: StepContext) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGINT)
        return {"cancelled": ctx.wait(5)}

    steps = [
        StepDef("boot:db", "boot", interrupted),
        StepDef("boot:web", "boot", calls.act(), after=("boot:db",)),
        StepDef("teardown", "teardown", calls.act(), after=("boot:web",), always=True),
    ]
    run_id = new_run(site)
    with pytest.raises(KeyboardInterrupt):
        execute(site, run_id, steps, poll_s=POLL)
    run = journal.get_run(site, run_id)
    assert run.state == "aborted" and "SIGINT" in (run.error or "")
    assert states(run) == {"boot:db": "succeeded", "boot:web": "aborted", "teardown": "succeeded"}
    assert run.step("boot:db").detail == {"cancelled": True}
    assert calls.count == Counter({"teardown": 1})


def test_checkpoint_detail_of_and_events(site: Site) -> None:
    def prepare(ctx: StepContext) -> dict[str, Any]:
        ctx.checkpoint({"overlay": "/site/drill/db.qcow2"})
        assert ctx.previous == {"overlay": "/site/drill/db.qcow2"}
        ctx.log("overlay-created", size=123)
        return {"point": {"seq": 3, "created_at": 1000.0}}

    def boot(ctx: StepContext) -> dict[str, Any]:
        return {"disk": ctx.detail_of("prepare:db")["overlay"]}

    seen: list[str] = []
    run_id = new_run(site)
    run = execute(site, run_id, [StepDef("prepare:db", "prepare", prepare),
                                 StepDef("boot:db", "boot", boot, after=("prepare:db",))],
                  poll_s=POLL, on_event=lambda e: seen.append(f"{e.event}:{e.step}"))  # fmt: skip
    assert run.step("prepare:db").detail == {"overlay": "/site/drill/db.qcow2",
                                             "point": {"seq": 3, "created_at": 1000.0}}
    assert run.step("boot:db").detail == {"disk": "/site/drill/db.qcow2"}
    events = journal.run_events(site, run_id)
    logged = [e for e in events if e.event == "overlay-created"]
    assert logged and logged[0].step == "prepare:db" and logged[0].detail == {"size": 123}
    assert seen[0] == "run-started:None" and seen[-1] == "run-succeeded:None"
    assert "overlay-created:prepare:db" in seen


def test_gate_not_approved_in_time_fails_the_run(site: Site) -> None:
    calls = Calls()
    steps = [
        StepDef("gate", "approval", calls.act(), approval="go?", timeout=0.5),
        StepDef("boot:web", "boot", calls.act(), after=("gate",)),
        StepDef("teardown", "teardown", calls.act(), after=("boot:web",), always=True),
    ]
    t0 = time.monotonic()
    run = execute(site, new_run(site), steps, poll_s=POLL)
    assert 0.5 <= time.monotonic() - t0 < 3
    assert run.state == "failed" and "not approved within 0.5s" in (run.error or "")
    assert states(run) == {"gate": "failed", "boot:web": "skipped", "teardown": "succeeded"}
    assert calls.count == Counter({"teardown": 1})
