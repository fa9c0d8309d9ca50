"""The step graphs of drill, failover (planned/disaster) and fallback for a db -> web plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2v.errors import UsageError
from p2v.orchestration import drill, failover, fallback
from p2v.orchestration.executor import check_steps
from p2v.orchestration.journal import create_run
from p2v.orchestration.plan import parse_plan
from p2v.site import Site

PLAN = parse_plan(
    """
version: 1
name: shop
machines:
  db: {checks: [{tcp: {port: 5432}}]}
  web: {on_failure: approval, checks: [{http: {port: 80}}]}
groups:
  - {name: databases, machines: [db]}
  - {name: gate, approval: "db looks fine?"}
  - {name: apps, machines: [web]}
""",
    "shop.yaml",
)


def graph(steps: list) -> dict[str, tuple[str, ...]]:
    check_steps(steps)
    return {s.key: s.after for s in steps}


def test_drill_orders_boots_by_checks_and_always_tears_down(tmp_path: Path) -> None:
    site = Site.open(tmp_path / "site")
    steps = drill.build_steps(site, 1, PLAN.to_dict(), {"mode": "drill"})
    g = graph(steps)
    assert g["prepare:db"] == () and g["prepare:web"] == ("prepare:db",)  # conversions one after the other
    assert g["boot:db"] == ("prepare:db",)
    assert g["approval:gate"] == ("check:db",)
    assert g["boot:web"] == ("prepare:web", "approval:gate")  # web boots after the gate, i.e. after db's checks
    by_key = {s.key: s for s in steps}
    assert by_key["check:web"].on_failure == "approval" and by_key["approval:gate"].kind == "approval"
    assert by_key["teardown"].always and set(g["teardown"]) >= {"check:db", "check:web", "approval:gate"}


def test_planned_failover_syncs_and_stops_in_reverse_order_before_any_boot(tmp_path: Path) -> None:
    site = Site.open(tmp_path / "site")
    g = graph(failover.build_steps(site, 1, PLAN.to_dict(), {"planned": True}))
    assert g["final-sync:web"] == () and g["stop-source:web"] == ("final-sync:web",)
    assert g["final-sync:db"] == ("stop-source:web",) and g["stop-source:db"] == ("final-sync:db",)
    assert g["prepare:db"] == ("stop-source:db",)
    assert "teardown" not in g  # failover VMs keep running


def test_disaster_failover_has_no_source_steps(tmp_path: Path) -> None:
    site = Site.open(tmp_path / "site")
    g = graph(failover.build_steps(site, 1, PLAN.to_dict(), {"planned": False}))
    assert not any(k.startswith(("final-sync", "stop-source")) for k in g)
    assert g["boot:web"] == ("prepare:web", "approval:gate")


def test_fallback_prechecks_before_stopping_dr_and_boots_production_in_order(tmp_path: Path) -> None:
    site = Site.open(tmp_path / "site")
    fid = create_run(site, "failover", "shop", PLAN.to_dict(), {"planned": False})
    opts = {"failover_run": fid, "targets": {"db": ["/p/db.qcow2"], "web": ["/p/web.qcow2"]},
            "boot_production": True}  # fmt: skip
    g = graph(fallback.build_steps(site, 2, PLAN.to_dict(), opts))
    assert g["stop-dr:web"] == ("precheck:db", "precheck:web")  # split-brain refused while DR serves
    assert g["stop-dr:db"] == ("stop-dr:web",)
    assert g["sync-back:web"] == ("stop-dr:web", "sync-back:db")
    assert g["reprotect:db"] == ("sync-back:db",)
    assert g["boot-prod:db"] == ("reprotect:db",)
    assert g["boot-prod:web"] == ("reprotect:web", "check-prod:db")
    assert g["discard-dr:db"] == ("reprotect:db", "boot-prod:db")


def test_fallback_targets_are_checked() -> None:
    assert fallback.parse_targets(["db=ssh://root@h/dev/sda", "web=/x.img"], PLAN)["db"] == ["ssh://root@h/dev/sda"]
    with pytest.raises(UsageError, match="no --target for web"):
        fallback.parse_targets(["db=/x.img"], PLAN)
    with pytest.raises(UsageError, match="has no machine 'dbx'"):
        fallback.parse_targets(["dbx=/x.img", "web=/y"], PLAN)
    with pytest.raises(UsageError, match="MACHINE=TARGET"):
        fallback.parse_targets(["db"], PLAN)


def test_boot_steps_are_revalidated_and_a_dead_vm_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2v.orchestration.recovery_steps import vm_gone

    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    with Site.open(tmp_path / "site") as site:
        steps = drill.build_steps(site, 1, PLAN.to_dict(), {"mode": "drill"})
    boots = {s.key: s.still_valid for s in steps if s.kind == "boot"}
    assert boots and all(v is vm_gone for v in boots.values())
    assert all(s.still_valid is None for s in steps if s.kind != "boot")
    log = tmp_path / "console.log"
    log.write_text("SeaBIOS\n[    1.05] pci 0000:00:04.0: BAR 4\n")
    why = vm_gone({"vm": "drill1-db", "pid": 4242, "console_log": str(log)})
    assert why == ("VM drill1-db (QEMU pid 4242) is no longer running; "
                   "the last console line: '[    1.05] pci 0000:00:04.0: BAR 4'")
    assert vm_gone({}) is None  # a step detail without a VM (nothing to look at)
