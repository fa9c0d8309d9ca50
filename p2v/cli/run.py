"""``p2v run list|show|approve|abort|resume`` and ``p2v report``: runs (drills, failovers,
fallbacks) as journaled in the site catalog, over :mod:`p2v.orchestration.executor`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console
from p2v.errors import Interrupted, OutputError, RunFailed, UsageError
from p2v.orchestration import executor, journal, report
from p2v.orchestration.journal import Event, RunRecord
from p2v.site.site import Site

SITE_OPTION = typer.Option(
    None, "--site", envvar="P2V_SITE", help="DR site directory (default ./p2v-site; env P2V_SITE)."
)
RUN_ARG = typer.Argument(..., help="Run id (see `p2v run list`).", min=1)
FORMATS = ("json", "md", "html")

run_app = typer.Typer(help="Runs of recovery plans (drill, failover, fallback): list, show, approve, abort, "
                      "resume.", no_args_is_help=True)  # fmt: skip

STATE_STYLE = {"succeeded": "green", "continued": "yellow", "failed": "red", "aborted": "magenta",
               "interrupted": "red", "waiting-approval": "blue", "running": "cyan", "skipped": "dim"}  # fmt: skip


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def outcome(run: RunRecord) -> RunRecord:
    """The run, or the error its end state maps to: ``failed`` -> RunFailed (exit 16), ``aborted``
    -> Interrupted (exit 130). ``waiting-approval`` and ``succeeded`` return normally."""
    if run.state == "failed":
        raise RunFailed(f"run {run.id} ({run.kind} of plan {run.plan_name}) failed: {run.error}",
                                 hint=f"`p2v run show {run.id}` for the steps; fix the cause and "
                                      f"`p2v run resume {run.id}` to retry the failed steps")  # fmt: skip
    if run.state == "aborted":
        raise Interrupted(f"run {run.id} ({run.kind} of plan {run.plan_name}) was aborted: {run.error}")
    return run


SHOWN_EVENTS = frozenset({"step-started", "step-succeeded", "step-failed", "step-continued", "step-skipped",
                          "step-waiting-approval", "step-timeout", "step-invalidated", "abort-noticed"})


def print_event(ev: Event) -> None:
    """A one-line progress message on stderr for the events people want to see."""
    if ev.event in SHOWN_EVENTS or ev.event.startswith("run-"):
        extra = ev.detail.get("error") or ev.detail.get("question") or ev.detail.get("reason") or ""
        if ev.event == "step-waiting-approval":
            extra = f"{extra}  (approve: p2v run approve {ev.run_id} --step {ev.step})"
        err_console.print(f"[dim]{time.strftime('%H:%M:%S', time.localtime(ev.at))}[/] "
                          f"{escape(ev.event)} {escape(ev.step or '')} {escape(str(extra))}",
                          highlight=False, soft_wrap=True)  # fmt: skip


def _print_run(run: RunRecord) -> None:
    out_console.print(f"Run {run.id}: {run.kind} of plan [bold]{escape(run.plan_name)}[/] — {_state(run.state)}"
                      + (f" ({escape(run.error)})" if run.error else ""), highlight=False, soft_wrap=True)  # fmt: skip
    t0 = run.started_at or run.created_at
    table = Table("step", "kind", "machine", "state", "start", "duration", "attempts", "note")
    for s in run.steps:
        start = "-" if s.started_at is None else f"+{s.started_at - t0:.1f}s"
        dur = "-" if s.duration_s is None else f"{s.duration_s:.1f}s"
        note = s.error or (s.detail.get("question") if s.state == "waiting-approval" else "") or ""
        table.add_row(escape(s.key), s.kind, escape(s.machine or "-"), _state(s.state), start, dur, str(s.attempts),
                      escape(str(note)))  # fmt: skip
    out_console.print(table)


def _resume(site: Site, run_id: int, *, parallel: int, wait: bool, quiet: bool) -> RunRecord:
    return executor.resume(site, run_id, parallel=parallel, wait_approvals=wait,
                           on_event=None if quiet else print_event)  # fmt: skip


@run_app.command("list", help="The newest runs at the site, newest first.")
@handle_errors
def list_cmd(
    site: Path = SITE_OPTION,
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs."),
    json_output: bool = JSON_OPTION,
) -> None:
    with Site.open(site) as s:
        runs = journal.list_runs(s, limit)
    if json_output:
        emit_json({"runs": [{k: v for k, v in r.to_dict().items() if k != "steps"} | {
            "steps": len(r.steps)} for r in runs]})  # fmt: skip
        return
    table = Table("run", "kind", "plan", "state", "created", "finished", "steps")
    for r in runs:
        done = sum(1 for st in r.steps if st.state in journal.DONE_STEP_STATES)
        table.add_row(str(r.id), r.kind, escape(r.plan_name), _state(r.state), _when(r.created_at),
                      _when(r.finished_at), f"{done}/{len(r.steps)}")  # fmt: skip
    out_console.print(table)


@run_app.command("show", help="A run and its steps: states, start offsets and durations.")
@handle_errors
def show_cmd(run_id: int = RUN_ARG, site: Path = SITE_OPTION, json_output: bool = JSON_OPTION) -> None:
    with Site.open(site) as s:
        run = journal.get_run(s, run_id)
    if json_output:
        emit_json(run.to_dict())
        return
    _print_run(run)


@run_app.command("approve", help="Approve a manual gate, or a step that failed under on_failure: approval "
                 "(approving a failed step means continue). Without --step: every step waiting now.")  # fmt: skip
@handle_errors
def approve_cmd(
    run_id: int = RUN_ARG,
    step: str = typer.Option(None, "--step", help="The step key (a gate may be approved before it is reached)."),
    by: str = typer.Option(None, "--by", help="Who approves (default: the login name)."),
    site: Path = SITE_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    with Site.open(site) as s:
        keys = journal.approve(s, run_id, step, by)
        run = journal.get_run(s, run_id)
    if json_output:
        emit_json({"run": run_id, "approved": keys, "state": run.state})
        return
    out_console.print(f"Approved {', '.join(keys)} of run {run_id} (run {run.state})", highlight=False)
    if run.pid is None or run.state == "interrupted":
        out_console.print(f"No orchestrator is executing it: continue with `p2v run resume {run_id}`",
                          highlight=False)  # fmt: skip


@run_app.command("abort", help="Stop a run: no new step starts, running steps finish, cleanup steps run, the "
                 "run ends aborted. If no orchestrator is executing it, the cleanup runs here.")  # fmt: skip
@handle_errors
def abort_cmd(
    run_id: int = RUN_ARG,
    site: Path = SITE_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    with Site.open(site) as s:
        run = journal.request_abort(s, run_id)
        live = run.state in ("running", "waiting-approval") and run.pid is not None
        if not live:
            if run.kind in executor.STEP_BUILDERS:
                run = _resume(s, run_id, parallel=4, wait=False, quiet=json_output)
            else:
                run = journal.close_aborted(s, run_id)
    if json_output:
        emit_json({"run": run_id, "state": run.state, "orchestrator": run.pid if live else None})
        return
    if live:
        out_console.print(f"Abort requested: process {run.pid} is stopping run {run_id}", highlight=False)
    else:
        out_console.print(f"Run {run_id} {run.state}", highlight=False)


@run_app.command("resume", help="Continue a run where it stopped (orchestrator killed, waiting for approval, or "
                 "failed: failed steps are retried). Finished steps are not run again.")  # fmt: skip
@handle_errors
def resume_cmd(
    run_id: int = RUN_ARG,
    parallel: int = typer.Option(4, "--parallel", min=1, help="Steps run at once at most."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return when only approvals are left (exit 0)."),
    site: Path = SITE_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    with Site.open(site) as s:
        run = _resume(s, run_id, parallel=parallel, wait=not no_wait, quiet=json_output)
    if json_output:
        emit_json(run.to_dict())
    else:
        _print_run(run)
    outcome(run)


def write_report(rep: dict[str, Any], fmt: str, output: Path | None) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"report format {fmt!r} is not one of {', '.join(FORMATS)}")
    text = (json.dumps(rep, indent=2, default=str) + "\n" if fmt == "json" else
            report.render_markdown(rep) if fmt == "md" else report.render_html(rep))  # fmt: skip
    if output is not None:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the report to {output}: {exc.strerror}") from exc
    return text


def register(app: typer.Typer) -> None:
    app.add_typer(run_app, name="run")

    @app.command("report", help="The report of a run: timeline, RTO vs target, RPO per machine, bytes moved, "
                 "health checks. HTML has an SVG Gantt chart.")  # fmt: skip
    @handle_errors
    def report_cmd(
        run_id: int = RUN_ARG,
        fmt: str = typer.Option("md", "--format", "-f", help="json | md | html"),
        output: Path = typer.Option(None, "--output", "-o", help="Write to FILE instead of stdout."),
        site: Path = SITE_OPTION,
    ) -> None:
        if fmt not in FORMATS:
            raise UsageError(f"report format {fmt!r} is not one of {', '.join(FORMATS)}")
        with Site.open(site) as s:
            rep = report.build_report(s, run_id)
        text = write_report(rep, fmt, output)
        if output is None:
            typer.echo(text, nl=False)
        else:
            err_console.print(f"Report of run {run_id} written to {escape(str(output))}", highlight=False)
