"""Drills of a two-machine plan (db, then web) on recovery points of the "physical" test guest.

A drill converts each point on a throw-away overlay, boots it on the run's isolated network
(management NIC: user-mode restrict=on; segment NIC: the plan's addresses), runs the checks in
plan order, then removes everything. Asserted from the outside: start order from the journal,
the chain byte-identical before/after, no QEMU and no overlay left, no pin left, web reaches db
on the segment but neither the DR host (slirp's 10.0.2.2 nor its own address) nor the outside.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import images
from p2v.errors import P2VError
from p2v.orchestration.drill import start_drill
from p2v.orchestration.executor import resume
from p2v.orchestration.journal import approve, get_run, request_abort
from p2v.orchestration.plan import parse_plan
from p2v.orchestration.report import build_report
from p2v.protection.service import ProtectOptions, protect_add
from p2v.site import Site
from p2v.site.pins import active_pins
from tests.vm.test_convert_linux import G1

pytestmark = pytest.mark.vm

PLAN = """
version: 1
name: shop
machines:
  db:
    memory: 768M
    network: {{address: 192.168.50.10/24}}
    on_failure: {db_policy}
    checks:
      - ssh: {{command: "ip -4 addr show drnet0 | grep -q 192.168.50.10", timeout: 600, name: db-up}}
{db_extra}
  web:
    memory: 768M
    network: {{address: 192.168.50.20/24}}
    checks:
      - ssh: {{command: "timeout 5 bash -c '</dev/tcp/192.168.50.10/22'", timeout: 600, name: db-on-segment}}
      - ssh: {{command: "{isolated}", timeout: 60, name: isolated}}
groups:
  - name: databases
    machines: [db]
  - name: apps
    machines: [web]
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def chain_hashes(site: Site, names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        for p in site.points(n):
            for f in (site.point_image(n, p.seq), site.point_map(n, p.seq)):
                out[str(f)] = sha256(f)
    for n in names:
        base = site.disk_dir(n, 0) / "base.qcow2"
        if base.exists():
            out[str(base)] = sha256(base)
    return out


def run_qemus(run_id: int) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"drill{run_id}-"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "qemu-system" in line]


def host_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
            addr: str = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP service on every host address: a drill VM must not be able to reach it."""
    srv = socket.create_server(("0.0.0.0", 0))
    srv.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("drill") / "site"
    image = str(images.ensure(G1))
    for name in ("db", "web"):
        protect_add(root, name, [image], ProtectOptions())
    return root


def plan_for(port: int, *, db_extra: str = "", db_policy: str = "abort") -> str:
    targets = ["10.0.2.2", "1.1.1.1"] + ([a] if (a := host_address()) else [])
    probes = " && ".join(f"! timeout 5 bash -c '</dev/tcp/{t}/{port}'" for t in targets)
    return PLAN.format(db_extra=db_extra, db_policy=db_policy, isolated=probes)


def test_drill_boots_in_order_isolated_and_leaves_nothing(
    site_root: Path, listener: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    plan = parse_plan(plan_for(listener), "shop.yaml")
    site = Site.open(site_root)
    before = chain_hashes(site, ["db", "web"])
    run = start_drill(site, plan, None, identity=images.test_ssh_key())
    steps = {s.key: s for s in run.steps}
    assert run.state == "succeeded", {k: (s.state, s.error) for k, s in steps.items()}
    # order: web boots only after db's checks passed
    assert steps["boot:web"].started_at >= steps["check:db"].finished_at
    assert steps["teardown"].started_at >= steps["check:web"].finished_at
    web_checks = {r["check"]: r["ok"] for r in steps["check:web"].detail["results"]}
    assert web_checks == {"db-on-segment": True, "isolated": True}
    # nothing left: no QEMU, no overlay, no run folder, no pin; the chain is unchanged
    assert run_qemus(run.id) == []
    assert not (site_root / "runs" / f"run-{run.id:06d}").exists()
    assert list(site_root.rglob("drill*.qcow2")) == []
    assert active_pins(site, "db") == [] and active_pins(site, "web") == []
    assert chain_hashes(site, ["db", "web"]) == before
    # the report's timings are the journal's
    rep = build_report(site, run.id)
    t0 = run.created_at
    for s in rep["steps"]:
        j = steps[s["key"]]
        assert s["start_s"] == pytest.approx(j.started_at - t0, abs=0.01)
        assert s["end_s"] == pytest.approx(j.finished_at - t0, abs=0.01)
    assert rep["rto_s"] == pytest.approx(steps["check:web"].finished_at - t0, abs=0.01)
    print(f"\ndrill RTO {rep['rto_s']:.1f}s; steps: "
          + ", ".join(f"{k} {s.duration_s:.1f}s" for k, s in steps.items() if s.duration_s))  # fmt: skip


def test_failing_check_waits_for_approval_and_abort_stops_the_plan(site_root: Path, listener: int,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    failing = '      - ssh: {command: "test -e /no/such/file", timeout: 10, interval: 2, name: db-data}'
    plan = parse_plan(plan_for(listener, db_extra=failing, db_policy="approval"), "shop.yaml")
    site = Site.open(site_root)
    run = start_drill(site, plan, None, identity=images.test_ssh_key(), wait_approvals=False)
    steps = {s.key: s for s in run.steps}
    assert run.state == "waiting-approval", {k: (s.state, s.error) for k, s in steps.items()}
    assert steps["check:db"].state == "waiting-approval"
    assert steps["boot:web"].state == "pending" and steps["boot:web"].started_at is None
    request_abort(site, run.id)
    end = resume(site, run.id)
    steps = {s.key: s for s in end.steps}
    assert end.state == "aborted"
    assert steps["boot:web"].started_at is None  # web never started
    assert steps["teardown"].state == "succeeded"
    assert run_qemus(run.id) == [] and not (site_root / "runs" / f"run-{run.id:06d}").exists()
    assert get_run(site, run.id).state == "aborted"
    with pytest.raises(P2VError):
        approve(site, run.id)  # a finished run has nothing to approve
