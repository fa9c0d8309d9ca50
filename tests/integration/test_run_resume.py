"""Kill -9 the orchestrator (a real process) at two different steps, then resume in-process:
every effect happened exactly once, finished steps did not run again, and the steps left running
were run again with ``resumed=True`` and used their checkpoint not to redo their effect.

The driver process imports :func:`build_steps` from this module, so it and the in-process resume
run the same step definitions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from p2v.orchestration import journal
from p2v.orchestration.executor import StepContext, StepDef, resume
from p2v.site.site import Site

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
from pathlib import Path
from p2v.site.site import Site
from p2v.orchestration.executor import execute
from tests.integration.test_run_resume import build_steps
site_dir, run_id, effects, hold = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
with Site.open(Path(site_dir)) as site:
    try:
        run = execute(site, run_id, build_steps(effects, hold), parallel=2, poll_s=0.1)
    except KeyboardInterrupt:
        sys.exit(130)
print(run.state)
"""


def build_steps(effects: Path, hold: str | None = None) -> list[StepDef]:
    """A small failover: prepare, then db and web tiers (boot, check), plus a parallel sync.
    Each step appends its key to ``effects`` once; boots checkpoint that they did it (like a boot
    step recording the QEMU pid) and, when resumed, check the checkpoint instead of acting again.
    The step named ``hold`` then blocks (until cancelled), so a test can kill the process there."""

    def effect(ctx: StepContext) -> None:
        with effects.open("a") as f:
            f.write(f"{ctx.key}\n")
            f.flush()
            os.fsync(f.fileno())

    def plain(ctx: StepContext) -> dict[str, Any]:
        effect(ctx)
        time.sleep(0.1)
        return {"bytes_sent": 100}

    def once(ctx: StepContext) -> dict[str, Any]:
        if ctx.resumed and ctx.previous.get("started"):
            ctx.log("already-started", pid=ctx.previous.get("pid"))
        else:
            effect(ctx)
            ctx.checkpoint({"started": True, "pid": os.getpid()})
        if ctx.key == hold:
            ctx.wait(120)
        return {"resumed": ctx.resumed}

    return [
        StepDef("prepare", "prepare", plain),
        StepDef("boot:db", "boot", once, after=("prepare",), machine="db", group="data"),
        StepDef("check:db", "check", plain, after=("boot:db",), machine="db", group="data"),
        StepDef("sync:files", "sync", plain, after=("prepare",)),
        StepDef("boot:web", "boot", once, after=("check:db",), machine="web", group="apps"),
        StepDef("check:web", "check", plain, after=("boot:web",), machine="web", group="apps"),
    ]


def start_driver(site_dir: Path, run_id: int, effects: Path, hold: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(site_dir), str(run_id), str(effects), hold],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def wait_for(site_dir: Path, run_id: int, key: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Until step ``key`` is running and has checkpointed (its effect is done) and no other step runs
    (a step without a checkpoint that is left running is run again by design)."""
    deadline = time.monotonic() + timeout
    with Site.open(site_dir) as site:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"driver exited early ({proc.returncode}): {err}")
            run = journal.get_run(site, run_id)
            others_busy = any(s.state == "running" for s in run.steps if s.key != key)
            if run.steps and run.step(key).state == "running" and run.step(key).detail.get("started") \
                    and not others_busy:
                return
            time.sleep(0.05)
    raise AssertionError(f"step {key} never reached its checkpoint")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)  # reaped: its pid is dead, not a zombie
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_at_two_steps_then_resume(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    effects = tmp_path / "effects.txt"
    with Site.open(site_dir) as site:
        run_id = journal.create_run(site, "failover", "two-tier", {"rto_target": 600}, {"mode": "planned"})

    first = start_driver(site_dir, run_id, effects, hold="boot:db")
    wait_for(site_dir, run_id, "boot:db", first)
    kill9(first)
    with Site.open(site_dir) as site:
        run = journal.get_run(site, run_id)
        assert run.state == "interrupted" and run.pid == first.pid
        assert run.step("prepare").state == "succeeded" and run.step("boot:db").state == "running"

    second = start_driver(site_dir, run_id, effects, hold="boot:web")
    wait_for(site_dir, run_id, "boot:web", second)
    kill9(second)
    with Site.open(site_dir) as site:
        run = journal.get_run(site, run_id)
        assert run.state == "interrupted" and run.pid == second.pid
        assert {s.key: s.state for s in run.steps} == {
            "prepare": "succeeded", "boot:db": "succeeded", "check:db": "succeeded", "sync:files": "succeeded",
            "boot:web": "running", "check:web": "pending"}  # fmt: skip
        assert run.step("boot:db").detail["resumed"] is True

        run = resume(site, run_id, build_steps(effects), poll_s=0.1)
        assert run.state == "succeeded", run.error
        events = journal.run_events(site, run_id)

    lines = effects.read_text().splitlines()
    assert Counter(lines) == Counter(["prepare", "boot:db", "check:db", "sync:files", "boot:web", "check:web"]), lines
    attempts = {s.key: s.attempts for s in run.steps}
    assert attempts == {"prepare": 1, "boot:db": 2, "check:db": 1, "sync:files": 1, "boot:web": 2, "check:web": 1}
    skipped_effect = sorted(e.step or "" for e in events if e.event == "already-started")
    assert skipped_effect == ["boot:db", "boot:web"]
    assert run.step("boot:web").detail == {"started": True, "pid": second.pid, "resumed": True}
    resumes = [e for e in events if e.event == "run-resumed"]
    assert [e.detail["steps_left_running"] for e in resumes] == [["boot:db"], ["boot:web"]]
