"""Run reports built from a real journal: timings equal the journal's timestamps, RTO/RPO/bytes/
checks are computed as documented, Markdown and HTML render (HTML with a well-formed SVG Gantt
chart, everything escaped)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from defusedxml import ElementTree

from p2v.orchestration import journal
from p2v.orchestration.executor import StepContext, StepDef, StepFailure, execute
from p2v.orchestration.report import build_report, render_html, render_markdown
from p2v.site.site import Site

POINT_AGE = 3600.0


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Site.open(tmp_path / "site") as s:
        yield s


def _boot(machine: str, sent: int) -> Any:
    def action(ctx: StepContext) -> dict[str, Any]:
        time.sleep(0.2)
        return {"point": {"seq": 2, "created_at": time.time() - POINT_AGE}, "bytes_sent": sent, "bytes_read": 10}

    return action


def _check(ok: bool) -> Any:
    def action(ctx: StepContext) -> dict[str, Any]:
        time.sleep(0.1)
        results = [{"check": "tcp 22", "ok": True, "seconds": 0.1, "attempts": 1, "message": "open"},
                   {"check": "http /<health>", "ok": ok, "seconds": 0.05, "attempts": 3,
                    "message": "200" if ok else "got 500 & <b>bad</b>"}]  # fmt: skip
        if not ok:
            raise StepFailure("check http /<health> failed", detail={"results": results})
        return {"results": results}

    return action


def _run(site: Site, web_ok: bool = True) -> int:
    run_id = journal.create_run(site, "drill", "shop <prod>", {"name": "shop", "rto_target": "15m"}, {})
    steps = [
        StepDef("boot:db", "boot", _boot("db", 1000), machine="db", group="data"),
        StepDef("check:db", "check", _check(True), after=("boot:db",), machine="db", group="data"),
        StepDef("boot:web", "boot", _boot("web", 500), after=("check:db",), machine="web", group="apps"),
        StepDef("check:web", "check", _check(web_ok), after=("boot:web",), machine="web", group="apps",
                on_failure="continue"),
        StepDef("stop-all", "stop", lambda ctx: {"bytes_sent": 1}, after=("check:web",), always=True),
    ]  # fmt: skip
    execute(site, run_id, steps, poll_s=0.1)
    return run_id


def test_timings_equal_the_journal(site: Site) -> None:
    run_id = _run(site)
    rep = build_report(site, run_id)
    run = journal.get_run(site, run_id)
    t0 = run.started_at
    assert t0 is not None and rep["run"]["started_at"] == t0
    by_key = {s["key"]: s for s in rep["steps"]}
    assert list(by_key) == ["boot:db", "check:db", "boot:web", "check:web", "stop-all"]
    for s in run.steps:
        assert s.started_at is not None and s.finished_at is not None
        r = by_key[s.key]
        assert r["started_at"] == s.started_at and r["finished_at"] == s.finished_at
        assert r["start_s"] == pytest.approx(s.started_at - t0, abs=1e-3)
        assert r["end_s"] == pytest.approx(s.finished_at - t0, abs=1e-3)
        assert r["state"] == s.state
    # RTO: the last passing check (web's), not the cleanup step after it
    web = run.step("check:web")
    assert rep["rto_step"] == "check:web"
    assert rep["rto_s"] == pytest.approx(web.finished_at - t0, abs=1e-3)  # type: ignore[operator]
    assert rep["rto_s"] < by_key["stop-all"]["end_s"]
    assert rep["rto_target_s"] == 900 and rep["rto_met"] is True
    assert rep["machines"]["db"]["rto_s"] == pytest.approx(run.step("check:db").finished_at - t0, abs=1e-3)  # type: ignore[operator]
    assert rep["machines"]["db"]["rpo_s"] == pytest.approx(POINT_AGE, abs=2)
    assert rep["bytes"] == {"bytes_sent": 1501, "bytes_read": 20}
    assert rep["machines"]["web"]["bytes_sent"] == 500
    assert rep["checks_passed"] == 4 and rep["checks_failed"] == 0
    assert rep["run"]["duration_s"] == pytest.approx(run.finished_at - t0, abs=1e-3)  # type: ignore[operator]


def test_failed_check_counts_and_rto_uses_last_passing_check(site: Site) -> None:
    run_id = _run(site, web_ok=False)
    rep = build_report(site, run_id)
    assert rep["run"]["state"] == "succeeded"  # continue policy
    assert rep["rto_step"] == "check:db"
    assert rep["checks_passed"] == 3 and rep["checks_failed"] == 1
    web = next(c for c in rep["checks"] if c["step"] == "check:web")
    assert web["state"] == "continued" and web["results"][1]["attempts"] == 3


def test_markdown_lists_steps_checks_and_rto(site: Site) -> None:
    md = render_markdown(build_report(site, _run(site, web_ok=False)))
    assert md.startswith("# Drill run 1: plan shop <prod>")
    assert "| RTO target | 15m (met) |" in md
    for key in ("boot:db", "check:db", "boot:web", "check:web", "stop-all"):
        assert re.search(rf"^\| {re.escape(key)} \|", md, re.M), key
    assert "| check:web | http /<health> | FAILED |" in md
    assert "1.5K" in md  # bytes sent


def test_html_has_an_escaped_svg_gantt_chart(site: Site) -> None:
    rep = build_report(site, _run(site, web_ok=False))
    html = render_html(rep)
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "<b>bad</b>" not in html
    assert "shop &lt;prod&gt;" in html
    svg_text = html[html.index("<svg"):html.index("</svg>") + len("</svg>")]
    svg = ElementTree.fromstring(svg_text)
    bars = svg.findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) == len(rep["steps"])
    widths = {b.get("class"): float(b.get("width")) for b in bars}
    assert "bar state-continued" in widths and "bar state-succeeded" in widths
    # bar geometry follows the timeline: web's boot starts right of db's boot
    xs = [float(b.get("x")) for b in bars]
    assert xs[0] < xs[2] < xs[4]
