"""``p2v run ...`` and ``p2v report`` through a local Typer app (the lead wires them into main)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from p2v.cli import run as run_cli
from p2v.orchestration import executor, journal
from p2v.orchestration.executor import StepContext, StepDef
from p2v.site.site import Site

runner = CliRunner()
CALLS: Counter[str] = Counter()


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    run_cli.register(app)
    return app


def _count(ctx: StepContext) -> dict[str, Any]:
    CALLS[ctx.key] += 1
    return {"bytes_sent": 7}


def _fail(ctx: StepContext) -> dict[str, Any]:
    CALLS[ctx.key] += 1
    raise executor.StepFailure("port 80 closed")


def _build(site: Site, run_id: int, plan: dict[str, Any], options: dict[str, Any]) -> list[StepDef]:
    steps = [StepDef("boot:web", "boot", _count, machine="web"),
             StepDef("gate", "approval", executor.no_action, after=("boot:web",), approval="fail over?"),
             StepDef("check:web", "check", _fail if options.get("break") else _count, after=("gate",),
                     machine="web"),
             StepDef("teardown", "teardown", _count, after=("check:web",), always=True)]  # fmt: skip
    return steps


@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setitem(executor.STEP_BUILDERS, "unit-drill", _build)
    monkeypatch.setenv("P2V_SITE", str(tmp_path / "site"))
    CALLS.clear()
    yield tmp_path / "site"


def _start(site_dir: Path, options: dict[str, Any] | None = None, kind: str = "unit-drill") -> int:
    """A run stopped at its approval gate, as a mode's command would leave it with --no-wait."""
    with Site.open(site_dir) as site:
        run_id = journal.create_run(site, kind, "web-plan", {"rto_target": 60}, options or {})
        if kind in executor.STEP_BUILDERS:
            run = executor.execute(site, run_id, _build(site, run_id, {}, options or {}), wait_approvals=False,
                                   poll_s=0.1)  # fmt: skip
            assert run.state == "waiting-approval"
    return run_id


def test_list_show_approve_resume(site_dir: Path) -> None:
    app = _app()
    run_id = _start(site_dir)
    res = runner.invoke(app, ["run", "list", "--json"])
    assert res.exit_code == 0, res.output
    runs = json.loads(res.stdout)["runs"]
    assert [(r["id"], r["state"], r["steps"]) for r in runs] == [(run_id, "waiting-approval", 4)]
    res = runner.invoke(app, ["run", "show", str(run_id)])
    assert res.exit_code == 0 and "gate" in res.stdout and "waiting-approval" in res.stdout
    res = runner.invoke(app, ["run", "show", str(run_id), "--json"])
    gate = next(s for s in json.loads(res.stdout)["steps"] if s["key"] == "gate")
    assert gate["state"] == "waiting-approval" and gate["detail"]["question"] == "fail over?"
    res = runner.invoke(app, ["run", "approve", str(run_id), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["approved"] == ["gate"]
    res = runner.invoke(app, ["run", "resume", str(run_id), "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["state"] == "succeeded"
    assert {s["key"]: s["state"] for s in shown["steps"]} == {
        "boot:web": "succeeded", "gate": "succeeded", "check:web": "succeeded", "teardown": "succeeded"}  # fmt: skip
    assert CALLS == Counter({"boot:web": 1, "check:web": 1, "teardown": 1})
    res = runner.invoke(app, ["run", "resume", str(run_id)])
    assert res.exit_code == 2 and "already succeeded" in res.output


def test_failed_run_exits_16(site_dir: Path) -> None:
    app = _app()
    run_id = _start(site_dir, {"break": True})
    assert runner.invoke(app, ["run", "approve", str(run_id), "--step", "gate"]).exit_code == 0
    res = runner.invoke(app, ["run", "resume", str(run_id)])
    assert res.exit_code == 16, res.output
    assert f"run {run_id}" in res.output and "port 80 closed" in res.output
    res = runner.invoke(app, ["run", "show", str(run_id), "--json"])
    assert json.loads(res.stdout)["state"] == "failed"


def test_abort_without_orchestrator_runs_cleanup(site_dir: Path) -> None:
    app = _app()
    run_id = _start(site_dir)
    res = runner.invoke(app, ["run", "abort", str(run_id), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["state"] == "aborted"
    with Site.open(site_dir) as site:
        run = journal.get_run(site, run_id)
    assert {s.key: s.state for s in run.steps} == {
        "boot:web": "succeeded", "gate": "aborted", "check:web": "aborted", "teardown": "succeeded"}  # fmt: skip
    assert CALLS == Counter({"boot:web": 1, "teardown": 1})
    res = runner.invoke(app, ["run", "approve", str(run_id)])
    assert res.exit_code == 2 and "already finished" in res.output


def test_kind_without_builder(site_dir: Path) -> None:
    app = _app()
    run_id = _start(site_dir, kind="mystery")
    res = runner.invoke(app, ["run", "resume", str(run_id)])
    assert res.exit_code == 2 and "'mystery'" in res.output and "no mode can rebuild" in res.output
    res = runner.invoke(app, ["run", "abort", str(run_id)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "show", str(run_id), "--json"])
    assert json.loads(res.stdout)["state"] == "aborted"


def test_unknown_run_and_bad_format(site_dir: Path) -> None:
    app = _app()
    res = runner.invoke(app, ["run", "show", "99"])
    assert res.exit_code == 12 and "no run 99" in res.output
    run_id = _start(site_dir)
    res = runner.invoke(app, ["report", str(run_id), "--format", "pdf"])
    assert res.exit_code == 2 and "'pdf'" in res.output


def test_report_formats(site_dir: Path, tmp_path: Path) -> None:
    app = _app()
    run_id = _start(site_dir)
    runner.invoke(app, ["run", "approve", str(run_id)])
    assert runner.invoke(app, ["run", "resume", str(run_id)]).exit_code == 0
    res = runner.invoke(app, ["report", str(run_id), "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["run"]["id"] == run_id and rep["bytes"]["bytes_sent"] == 21 and rep["rto_target_s"] == 60
    res = runner.invoke(app, ["report", str(run_id), "--format", "md"])
    assert res.exit_code == 0 and "## Timeline" in res.stdout and "check:web" in res.stdout
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(run_id), "--format", "html", "--output", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<svg" in html and html.count('class="bar ') == 4
    assert time.time() - out.stat().st_mtime < 60
