"""kill -9 of `p2v failover` at two different steps, then `p2v run resume`: the run completes,
no finished step runs again, and no DR VM is started twice (one QEMU per VM, same pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import images
from p2v.orchestration.journal import get_run
from p2v.protection.service import ProtectOptions, protect_add
from p2v.site import Site
from p2v.vm import detached
from tests.vm.test_convert_linux import G1

pytestmark = pytest.mark.vm

PLAN = """
version: 1
name: shop
machines:
  db:
    memory: 768M
    checks:
      - ssh: {command: "true", timeout: 600}
  web:
    memory: 768M
    checks:
      - ssh: {command: "true", timeout: 600}
groups:
  - name: databases
    machines: [db]
  - name: apps
    machines: [web]
"""


def p2v(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "p2v", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def qemu_pids(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"-name {name} "], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_when(proc: subprocess.Popen[bytes], root: Path, run_id: int | None, step: str, timeout: float = 900) -> int:
    """kill -9 ``proc`` as soon as ``step`` of the run is running; returns the run id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"p2v ended (rc {proc.returncode}) before {step} started"
        with Site.open(root) as site:
            from p2v.orchestration.journal import list_runs

            runs = list_runs(site, 1)
            if runs and (run_id is None or runs[0].id == run_id):
                st = {s.key: s.state for s in runs[0].steps}
                if st.get(step) == "running":
                    os.kill(proc.pid, signal.SIGKILL)  # the orchestrator only, like `kill -9 PID`
                    proc.wait()
                    return runs[0].id
        time.sleep(0.5)
    raise AssertionError(f"{step} did not start within {timeout}s")


def test_failover_survives_two_kills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("P2V_SITE", str(tmp_path / "site"))
    env = dict(os.environ)
    root = tmp_path / "site"
    for name in ("db", "web"):
        protect_add(root, name, [str(images.ensure(G1))], ProtectOptions())
    plan = tmp_path / "shop.yaml"
    plan.write_text(PLAN)
    key = str(images.test_ssh_key())
    try:
        proc = p2v(["failover", str(plan), "--disaster", "--confirm-fenced", "-i", key], env)
        run_id = kill_when(proc, root, None, "check:db")  # kill 1: db booted, its checks running
        with Site.open(root) as site:
            first = {s.key: s for s in get_run(site, run_id).steps}
        db_pid = first["boot:db"].detail["pid"]
        assert first["boot:db"].state == "succeeded" and qemu_pids(f"failover{run_id}-db") == [db_pid]
        proc = p2v(["run", "resume", str(run_id)], env)
        kill_when(proc, root, run_id, "check:web")  # kill 2: web booted, its checks running
        with Site.open(root) as site:
            second = {s.key: s for s in get_run(site, run_id).steps}
        web_pid = second["boot:web"].detail["pid"]
        done = subprocess.run([sys.executable, "-m", "p2v", "run", "resume", str(run_id)], env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        with Site.open(root) as site:
            run = get_run(site, run_id)
        steps = {s.key: s for s in run.steps}
        assert run.state == "succeeded"
        # finished steps never ran again; the ones that were running ran once more
        assert steps["prepare:db"].attempts == 1 and steps["boot:db"].attempts == 1
        assert steps["boot:web"].attempts == 1
        assert steps["check:db"].attempts == 2 and steps["check:web"].attempts == 2
        # one QEMU per DR VM, the one started first
        assert qemu_pids(f"failover{run_id}-db") == [db_pid]
        assert qemu_pids(f"failover{run_id}-web") == [web_pid]
    finally:
        for info in detached.list_vms(query_qmp=False):
            detached.stop_vm(info.name, timeout=10, force=True)
