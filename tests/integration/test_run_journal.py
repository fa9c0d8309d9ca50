"""The journal shared by real processes: an orchestrator process owns its run (Busy for others),
obeys an abort or an approval given by another process (the `p2v run` CLI), and cleans up on
SIGTERM. The driver process imports :func:`build_steps` from this module."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from p2v.cli import run as run_cli
from p2v.errors import Busy
from p2v.orchestration import journal
from p2v.orchestration.executor import StepContext, StepDef, execute
from p2v.site.site import Site

ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
from pathlib import Path
from p2v.site.site import Site
from p2v.orchestration.executor import execute
from tests.integration.test_run_journal import build_steps
site_dir, run_id, effects, gate = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "gate"
with Site.open(Path(site_dir)) as site:
    try:
        run = execute(site, run_id, build_steps(effects, gate), poll_s=0.1)
    except KeyboardInterrupt:
        sys.exit(130)
print(run.state)
"""


def build_steps(effects: Path, gate: bool) -> list[StepDef]:
    """prepare -> [gate] -> boot:db (blocks until cancelled, unless there is a gate) -> check:db,
    and a teardown that always runs. Every action appends ``KEY:outcome`` to ``effects``."""

    def note(ctx: StepContext, what: str) -> None:
        with effects.open("a") as f:
            f.write(f"{ctx.key}:{what}\n")

    def plain(ctx: StepContext) -> dict[str, Any]:
        note(ctx, "done")
        return {}

    def boot(ctx: StepContext) -> dict[str, Any]:
        ctx.checkpoint({"started": True})
        cancelled = ctx.wait(0.1 if gate else 120)
        note(ctx, "cancelled" if cancelled else "done")
        return {"cancelled": cancelled}

    steps = [StepDef("prepare", "prepare", plain)]
    if gate:
        steps.append(StepDef("gate", "approval", plain, after=("prepare",), approval="boot the database?"))
    steps += [
        StepDef("boot:db", "boot", boot, after=(steps[-1].key,), machine="db"),
        StepDef("check:db", "check", plain, after=("boot:db",), machine="db"),
        StepDef("teardown", "teardown", plain, after=("check:db",), always=True),
    ]
    return steps


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    run_cli.register(app)
    return app


class Driver:
    def __init__(self, tmp_path: Path, gate: bool = False) -> None:
        self.site_dir = tmp_path / "site"
        self.effects = tmp_path / "effects.txt"
        with Site.open(self.site_dir) as site:
            self.run_id = journal.create_run(site, "drill", "db-only", {}, {})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(self.site_dir), str(self.run_id), str(self.effects),
             "gate" if gate else "-"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def wait_until(self, test: Callable[[journal.RunRecord], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with Site.open(self.site_dir) as site:
            while time.monotonic() < deadline:
                run = journal.get_run(site, self.run_id)
                if run.steps and test(run):
                    return
                if self.proc.poll() is not None:
                    raise AssertionError(f"driver exited ({self.proc.returncode}) before {what}: "
                                         f"{self.proc.stderr.read() if self.proc.stderr else ''}")  # fmt: skip
                time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def finish(self) -> tuple[int, str, journal.RunRecord]:
        out, err = self.proc.communicate(timeout=60)
        with Site.open(self.site_dir) as site:
            return self.proc.returncode, out + err, journal.get_run(site, self.run_id)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def driver_factory(tmp_path: Path) -> Any:
    made: list[Driver] = []

    def make(gate: bool = False) -> Driver:
        made.append(Driver(tmp_path, gate))
        return made[-1]

    yield make
    for d in made:
        d.kill()


def _booting(run: journal.RunRecord) -> bool:
    return run.step("boot:db").state == "running" and bool(run.step("boot:db").detail.get("started"))


def test_live_orchestrator_is_busy_and_obeys_cli_abort(driver_factory: Any) -> None:
    d = driver_factory()
    d.wait_until(_booting, "boot:db to start")
    with Site.open(d.site_dir) as site:
        with pytest.raises(Busy, match=f"run {d.run_id} is being executed by process {d.proc.pid}"):
            execute(site, d.run_id, build_steps(d.effects, False))
        assert journal.get_run(site, d.run_id).state == "running"
    res = CliRunner().invoke(_cli(), ["run", "abort", str(d.run_id), "--site", str(d.site_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert f'"orchestrator": {d.proc.pid}' in res.stdout
    rc, output, run = d.finish()
    assert rc == 0 and output.strip().endswith("aborted"), output
    assert run.state == "aborted" and run.pid is None
    assert {s.key: s.state for s in run.steps} == {
        "prepare": "succeeded", "boot:db": "succeeded", "check:db": "aborted", "teardown": "succeeded"}  # fmt: skip
    assert d.effects.read_text().splitlines() == ["prepare:done", "boot:db:cancelled", "teardown:done"]


def test_sigterm_runs_cleanup_and_ends_aborted(driver_factory: Any) -> None:
    d = driver_factory()
    d.wait_until(_booting, "boot:db to start")
    d.proc.send_signal(signal.SIGTERM)
    rc, output, run = d.finish()
    assert rc == 130, output
    assert run.state == "aborted" and "SIGTERM" in (run.error or "")
    assert {s.key: s.state for s in run.steps} == {
        "prepare": "succeeded", "boot:db": "succeeded", "check:db": "aborted", "teardown": "succeeded"}  # fmt: skip
    assert d.effects.read_text().splitlines() == ["prepare:done", "boot:db:cancelled", "teardown:done"]


def test_gate_approved_from_another_process(driver_factory: Any) -> None:
    d = driver_factory(gate=True)
    d.wait_until(lambda r: r.step("gate").state == "waiting-approval", "the gate")
    time.sleep(0.5)
    with Site.open(d.site_dir) as site:
        assert journal.get_run(site, d.run_id).state == "waiting-approval"
        assert d.effects.read_text().splitlines() == ["prepare:done"]  # nothing past the gate
    res = CliRunner().invoke(_cli(), ["run", "approve", str(d.run_id), "--step", "gate", "--by", "alice",
                                      "--site", str(d.site_dir)])  # fmt: skip
    assert res.exit_code == 0, res.output
    rc, output, run = d.finish()
    assert rc == 0 and output.strip().endswith("succeeded"), output
    gate = run.step("gate")
    assert gate.state == "succeeded" and gate.detail["approved_by"] == "alice"
    assert run.step("boot:db").started_at >= gate.finished_at
    assert d.effects.read_text().splitlines() == ["prepare:done", "gate:done", "boot:db:done", "check:db:done",
                                                  "teardown:done"]  # fmt: skip
