"""The HTML run report: one self-contained page (no scripts, no external resources) with an
inline SVG Gantt chart of the steps. Every text that comes from the journal is XML-escaped."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from p2v.site.units import format_size

STATE_COLOURS = {
    "succeeded": "#2e9d4f", "continued": "#d9a400", "failed": "#d03b3b", "aborted": "#7a4fb5",
    "skipped": "#b8b8b8", "waiting-approval": "#3b7dd0", "running": "#5fb0e6", "pending": "#e2e2e2",
}  # fmt: skip
ROW_H = 22
LABEL_W = 230
CHART_W = 720
TOP = 28


def _e(value: Any) -> str:
    return escape("-" if value is None else str(value), quote=True)


def _s(value: float | None) -> str:
    from p2v.orchestration.report import fmt_s

    return fmt_s(value)


def _tick_step(span: float) -> float:
    """A round tick interval giving about 6-10 ticks over ``span`` seconds."""
    raw = max(span, 1e-3) / 8
    mag = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * mag:
            return float(mult * mag)
    return float(10 * mag)


def gantt_svg(report: dict[str, Any]) -> str:
    """One bar per step on a time axis (seconds from the run start), coloured by state."""
    steps = report["steps"]
    span = max([s["end_s"] or s["start_s"] or 0.0 for s in steps] + [report["run"]["duration_s"] or 0.0, 1e-3])
    scale = CHART_W / span
    height = TOP + ROW_H * len(steps) + 30
    width = LABEL_W + CHART_W + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="gantt" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="step timeline">']  # fmt: skip
    tick = _tick_step(span)
    t = 0.0
    while t <= span + 1e-9:
        x = LABEL_W + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{height - 24}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP - 10}" font-size="10" text-anchor="middle">{_e(_s(t))}</text>')
        t += tick
    rto = report.get("rto_s")
    marks = [("RTO", rto, "#d03b3b"), ("target", report.get("rto_target_s"), "#888")]
    for label, at, colour in marks:
        if isinstance(at, int | float) and 0 <= at <= span:
            x = LABEL_W + at * scale
            out.append(f'<line x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{height - 24}" stroke="{colour}" '
                       f'stroke-dasharray="4 3"><title>{_e(label)} {_e(_s(at))}</title></line>')  # fmt: skip
            out.append(f'<text x="{x + 3:.1f}" y="{height - 12}" font-size="10" fill="{colour}">'
                       f'{_e(label)} {_e(_s(at))}</text>')  # fmt: skip
    for i, s in enumerate(steps):
        y = TOP + i * ROW_H
        out.append(f'<text x="{LABEL_W - 8}" y="{y + 15}" font-size="12" text-anchor="end">{_e(s["key"])}</text>')
        if s["start_s"] is None:
            continue
        end = s["end_s"] if s["end_s"] is not None else span
        x = LABEL_W + s["start_s"] * scale
        w = max(2.0, (end - s["start_s"]) * scale)
        colour = STATE_COLOURS.get(s["state"], "#999")
        tip = f'{s["key"]} ({s["kind"]}): {s["state"]}, {_s(s["start_s"])} -> {_s(s["end_s"])}'
        if s["error"]:
            tip += f" — {s['error']}"
        out.append(f'<rect class="bar state-{_e(s["state"])}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" '
                   f'height="{ROW_H - 6}" fill="{colour}" rx="2"><title>{_e(tip)}</title></rect>')  # fmt: skip
        out.append(f'<text x="{x + w + 4:.1f}" y="{y + 15}" font-size="10" fill="#444">'
                   f'{_e(_s(s["duration_s"]))}</text>')  # fmt: skip
    out.append("</svg>")
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}th{background:#f3f3f3}
.state-failed{color:#d03b3b}.ok{color:#2e9d4f}.bad{color:#d03b3b;font-weight:bold}
.legend span{display:inline-block;margin-right:1em;font-size:12px}.legend i{display:inline-block;width:12px;
height:12px;margin-right:4px;vertical-align:middle}"""


def render_html(report: dict[str, Any]) -> str:
    run = report["run"]
    title = f"{run['kind']} run {run['id']}: plan {run['plan']}"
    met = report["rto_met"]
    verdict = "" if met is None else ('<span class="ok">met</span>' if met else '<span class="bad">missed</span>')
    summary = _table(["", ""], [
        ["State", run["state"] + (f": {run['error']}" if run["error"] else "")],
        ["Started", run["started"]], ["Finished", run["finished"]], ["Duration", _s(run["duration_s"])],
        ["RTO achieved", _s(report["rto_s"]) + (f" (step {report['rto_step']})" if report["rto_step"] else "")],
        ["RTO target", _s(report["rto_target_s"])],
        ["Bytes sent", format_size(report["bytes"]["bytes_sent"])],
        ["Bytes read", format_size(report["bytes"]["bytes_read"])],
        ["Checks", f"{report['checks_passed']} passed, {report['checks_failed']} failed"],
    ])  # fmt: skip
    parts = [f"<h1>{_e(title)}</h1>", summary]
    if verdict:
        parts.append(f"<p>RTO target {verdict}.</p>")
    legend = "".join(f'<span><i style="background:{c}"></i>{_e(s)}</span>' for s, c in STATE_COLOURS.items())
    parts += ["<h2>Timeline</h2>", f'<div class="legend">{legend}</div>', gantt_svg(report)]
    if report["machines"]:
        mrows = [[n, _s(m["rto_s"]), _s(m["rpo_s"]), m["point"]["seq"] if m["point"] else None,
                  format_size(m["bytes_sent"]), format_size(m["bytes_read"])] for n, m in report["machines"].items()]
        parts += ["<h2>Machines</h2>", _table(["machine", "RTO", "RPO", "point", "sent", "read"], mrows)]
    if report["checks"]:
        rows = [[c["step"], r.get("check"), "ok" if r.get("ok") else "FAILED", r.get("seconds"), r.get("attempts"),
                 r.get("message")] for c in report["checks"] for r in c["results"]]  # fmt: skip
        rows += [[c["step"], None, c["state"], None, None, None] for c in report["checks"] if not c["results"]]
        parts += ["<h2>Health checks</h2>", _table(["step", "check", "result", "seconds", "attempts", "message"], rows)]
    parts += ["<h2>Steps</h2>", _table(
        ["step", "kind", "machine", "group", "state", "start", "end", "duration", "attempts", "error"],
        [[s["key"], s["kind"], s["machine"], s["group"], s["state"], _s(s["start_s"]), _s(s["end_s"]),
          _s(s["duration_s"]), s["attempts"], s["error"]] for s in report["steps"]])]  # fmt: skip
    if report["events"]:
        parts += ["<h2>Events</h2>", _table(["at", "step", "event", "detail"], [
            [_s(e["at_s"]), e["step"], e["event"], ", ".join(f"{k}={v}" for k, v in e["detail"].items())]
            for e in report["events"]])]  # fmt: skip
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip
