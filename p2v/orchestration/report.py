"""Run reports: the evidence of a drill, failover or fallback, built from the journal alone.

:func:`build_report` returns a JSON-able dict (stable keys, the contract of
``p2v report --format json``); :func:`render_markdown` and :func:`render_html` (in
:mod:`p2v.orchestration.report_html`) render it. Every time in the report is a journal timestamp
or a difference of two, relative to the run's start (``summary.started_at``, the first time an
orchestrator picked the run up; ``created_at`` for a run never executed).

* ``rto_s``: run start -> end of the last ``check`` step that succeeded (or, with no passing
  check, of the last non-cleanup step that ended succeeded/continued). Per machine: run start ->
  end of its last passing check (or its last step).
* ``rpo_s`` per machine: run start - ``created_at`` of the recovery point its steps recorded in
  their detail (``"point": {"seq", "created_at"}``); the oldest when several are recorded.
* ``bytes``: the sums of every step detail's ``bytes_sent`` and ``bytes_read``.
* ``checks``: the ``results`` list of each ``check`` step's detail.
"""

from __future__ import annotations

import time
from typing import Any

from p2v.errors import UsageError
from p2v.orchestration.journal import RunJournal, RunRecord, StepRecord
from p2v.site.site import Site
from p2v.site.units import format_duration, format_size, parse_duration

REPORT_VERSION = 1
COUNTERS = ("bytes_sent", "bytes_read")


def _rel(at: float | None, t0: float) -> float | None:
    return None if at is None else round(at - t0, 3)


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}" + time.strftime(
        "%z", time.localtime(at))  # fmt: skip


def _target_s(plan: dict[str, Any]) -> float | None:
    raw = plan.get("rto_target")
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw)
    try:
        return float(parse_duration(str(raw), what="rto_target"))
    except UsageError:
        return None


def _counter(detail: dict[str, Any], name: str) -> int:
    value = detail.get(name)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _point(detail: dict[str, Any]) -> dict[str, Any] | None:
    pt = detail.get("point")
    if isinstance(pt, dict) and isinstance(pt.get("created_at"), int | float):
        return pt
    return None


def _is_cleanup(step: StepRecord, cleanup: set[str]) -> bool:
    return step.key in cleanup or step.kind == "teardown"


def _ready_at(steps: list[StepRecord], cleanup: set[str]) -> tuple[float | None, str | None]:
    """(finish time, step key) that marks the service as back: the last passing check, else the
    last non-cleanup step that ended well."""
    checks = [s for s in steps if s.kind == "check" and s.state == "succeeded" and s.finished_at is not None]
    if not checks:
        checks = [s for s in steps if not _is_cleanup(s, cleanup) and s.state in ("succeeded", "continued")
                  and s.finished_at is not None]  # fmt: skip
    if not checks:
        return None, None
    last = max(checks, key=lambda s: s.finished_at or 0.0)
    return last.finished_at, last.key


def build_report(site: Site, run_id: int, *, cleanup_keys: set[str] | None = None) -> dict[str, Any]:
    """The report of run ``run_id`` (SiteError when there is no such run). ``cleanup_keys`` names
    the teardown steps when their kind is not ``teardown`` (they do not count towards RTO)."""
    journal = RunJournal(site.catalog)
    run = journal.get_run(run_id)
    return report_of(run, journal.events(run_id), cleanup_keys=cleanup_keys)


def report_of(run: RunRecord, events: list[Any], *, cleanup_keys: set[str] | None = None) -> dict[str, Any]:
    cleanup = set(cleanup_keys or ()) | set(run.summary.get("cleanup_steps") or ())
    t0 = run.started_at if run.started_at is not None else run.created_at
    ends = [s.finished_at for s in run.steps if s.finished_at is not None]
    last_end = run.finished_at if run.finished_at is not None else (max(ends) if ends else None)
    timeline = []
    for s in run.steps:
        timeline.append({
            "key": s.key, "kind": s.kind, "machine": s.machine, "group": s.group, "state": s.state,
            "start_s": _rel(s.started_at, t0), "end_s": _rel(s.finished_at, t0),
            "duration_s": None if s.duration_s is None else round(s.duration_s, 3),
            "started_at": s.started_at, "finished_at": s.finished_at, "attempts": s.attempts,
            "error": s.error, "detail": s.detail,
        })  # fmt: skip
    ready, ready_key = _ready_at(run.steps, cleanup)
    target = _target_s(run.plan)
    rto = None if ready is None else round(ready - t0, 3)
    machines: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(s.machine for s in run.steps if s.machine):
        mine = [s for s in run.steps if s.machine == name]
        m_ready, m_key = _ready_at(mine, cleanup)
        points = [p for p in (_point(s.detail) for s in mine) if p is not None]
        oldest = min(points, key=lambda p: float(p["created_at"])) if points else None
        machines[name] = {
            "rto_s": None if m_ready is None else round(m_ready - t0, 3), "ready_step": m_key,
            "rpo_s": None if oldest is None else round(t0 - float(oldest["created_at"]), 3),
            "point": oldest,
            "bytes_sent": sum(_counter(s.detail, "bytes_sent") for s in mine),
            "bytes_read": sum(_counter(s.detail, "bytes_read") for s in mine),
            "steps": {st: sum(1 for s in mine if s.state == st) for st in dict.fromkeys(s.state for s in mine)},
        }  # fmt: skip
    checks = []
    for s in run.steps:
        if s.kind != "check":
            continue
        results = s.detail.get("results")
        results = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
        checks.append({"step": s.key, "machine": s.machine, "state": s.state, "results": results,
                       "passed": sum(1 for r in results if r.get("ok")),
                       "failed": sum(1 for r in results if not r.get("ok"))})  # fmt: skip
    counts: dict[str, int] = {}
    for s in run.steps:
        counts[s.state] = counts.get(s.state, 0) + 1
    return {
        "report_version": REPORT_VERSION,
        "run": {
            "id": run.id, "kind": run.kind, "plan": run.plan_name, "plan_path": run.plan_path, "state": run.state,
            "error": run.error, "options": run.options, "created_at": run.created_at, "started_at": t0,
            "finished_at": run.finished_at, "started": _iso(t0), "finished": _iso(run.finished_at),
            "duration_s": None if last_end is None else round(last_end - t0, 3),
        },
        "rto_s": rto, "rto_step": ready_key, "rto_target_s": target,
        "rto_met": None if target is None or rto is None else rto <= target,
        "machines": machines,
        "bytes": {c: sum(_counter(s.detail, c) for s in run.steps) for c in COUNTERS},
        "checks": checks,
        "checks_passed": sum(c["passed"] for c in checks), "checks_failed": sum(c["failed"] for c in checks),
        "step_states": counts,
        "steps": timeline,
        "events": [{"at_s": _rel(e.at, t0), "step": e.step, "event": e.event, "detail": e.detail} for e in events
                   if e.event not in ("step-started", "step-succeeded")],
    }  # fmt: skip


# -- Markdown -------------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    """Seconds for people: ``12.3s`` below a minute, else ``4m05s`` style; ``-`` for none."""
    if value is None:
        return "-"
    return f"{value:.1f}s" if abs(value) < 60 else format_duration(value)


def _md_cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: summary, per-machine RTO/RPO, checks, step timeline, notable events."""
    run = report["run"]
    out = [f"# {run['kind'].capitalize()} run {run['id']}: plan {_md_cell(run['plan'])}", ""]
    target = report["rto_target_s"]
    verdict = "" if report["rto_met"] is None else (" (met)" if report["rto_met"] else " (**missed**)")
    rows = [
        ("State", run["state"] + (f": {run['error']}" if run["error"] else "")),
        ("Started", run["started"]), ("Finished", run["finished"] or "-"), ("Duration", fmt_s(run["duration_s"])),
        ("RTO achieved", fmt_s(report["rto_s"]) + (f" at step {report['rto_step']}" if report["rto_step"] else "")),
        ("RTO target", fmt_s(target) + verdict),
        ("Bytes sent", format_size(report["bytes"]["bytes_sent"])),
        ("Bytes read", format_size(report["bytes"]["bytes_read"])),
        ("Checks", f"{report['checks_passed']} passed, {report['checks_failed']} failed"),
    ]  # fmt: skip
    out += ["| | |", "|---|---|", *(f"| {k} | {_md_cell(v)} |" for k, v in rows), ""]
    if report["machines"]:
        out += ["## Machines", "", "| machine | RTO | RPO | point | sent | read |", "|---|---|---|---|---|---|"]
        for name, m in report["machines"].items():
            point = m["point"]["seq"] if m["point"] else None
            out.append(f"| {_md_cell(name)} | {fmt_s(m['rto_s'])} | {fmt_s(m['rpo_s'])} | {_md_cell(point)} | "
                       f"{format_size(m['bytes_sent'])} | {format_size(m['bytes_read'])} |")  # fmt: skip
        out.append("")
    if report["checks"]:
        out += ["## Health checks", "", "| step | check | result | time | attempts | message |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for c in report["checks"]:
            if not c["results"]:
                out.append(f"| {_md_cell(c['step'])} | - | {c['state']} | - | - | - |")
            for r in c["results"]:
                secs = r.get("seconds")
                out.append(f"| {_md_cell(c['step'])} | {_md_cell(r.get('check'))} | "
                           f"{'ok' if r.get('ok') else 'FAILED'} | "
                           f"{fmt_s(float(secs)) if isinstance(secs, int | float) else '-'} | "
                           f"{_md_cell(r.get('attempts'))} | {_md_cell(r.get('message'))} |")  # fmt: skip
        out.append("")
    out += ["## Timeline", "", "| step | kind | machine | state | start | end | duration | note |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in report["steps"]:
        out.append(f"| {_md_cell(s['key'])} | {_md_cell(s['kind'])} | {_md_cell(s['machine'])} | {s['state']} | "
                   f"{fmt_s(s['start_s'])} | {fmt_s(s['end_s'])} | {fmt_s(s['duration_s'])} | "
                   f"{_md_cell(s['error'])} |")  # fmt: skip
    notable = [e for e in report["events"] if e["event"] not in ("run-created",)]
    if notable:
        out += ["", "## Events", ""]
        for e in notable:
            who = f" {_md_cell(e['step'])}" if e["step"] else ""
            extra = ", ".join(f"{k}={v}" for k, v in e["detail"].items() if v not in (None, [], {}))
            out.append(f"- {fmt_s(e['at_s'])} {e['event']}{who}" + (f" ({_md_cell(extra)})" if extra else ""))
    return "\n".join(out) + "\n"


def render_html(report: dict[str, Any]) -> str:
    """Self-contained HTML with an inline SVG Gantt chart (see :mod:`p2v.orchestration.report_html`)."""
    from p2v.orchestration.report_html import render_html as _render

    return _render(report)
