"""A DR VM whose QEMU dies while its checks wait (QEMU 7.2's TCG once segfaulted here during a
guest's PCI probe): the check step fails at once, naming the dead VM, instead of waiting out
its timeout on "connection refused"; `p2v run resume` boots the VM again and the run completes."""

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
from tests.vm.test_failover_resume import qemu_pids

pytestmark = pytest.mark.vm

PLAN = """
version: 1
name: one
machines:
  db:
    memory: 768M
    checks:
      - ssh: {command: "true", timeout: 600}
groups:
  - name: databases
    machines: [db]
"""


def test_dead_dr_vm_fails_its_check_at_once_and_resume_boots_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("P2V_SITE", str(tmp_path / "site"))
    env = dict(os.environ)
    root = tmp_path / "site"
    protect_add(root, "db", [str(images.ensure(G1))], ProtectOptions())
    plan = tmp_path / "one.yaml"
    plan.write_text(PLAN)
    key = str(images.test_ssh_key())
    try:
        proc = subprocess.Popen([sys.executable, "-m", "p2v", "failover", str(plan), "--disaster", "--confirm-fenced",
                                 "-i", key], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 900
        while True:  # wait for check:db to run, then kill the DR VM's QEMU (not the orchestrator)
            assert proc.poll() is None, f"p2v failover ended (rc {proc.returncode}): {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "check:db did not start within 900 s"
            with Site.open(root) as site:
                from p2v.orchestration.journal import list_runs

                runs = list_runs(site, 1)
                steps = {s.key: s for s in runs[0].steps} if runs else {}
            if steps.get("check:db") is not None and steps["check:db"].state == "running":
                break
            time.sleep(0.5)
        run_id = runs[0].id
        first_pid = steps["boot:db"].detail["pid"]
        assert qemu_pids(f"failover{run_id}-db") == [first_pid]
        killed_at = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
        assert proc.returncode == 16, err[-2000:]
        assert took < 60, f"the check noticed the dead VM only after {took:.0f}s"
        assert f"VM failover{run_id}-db (QEMU pid {first_pid}) is no longer running" in err
        with Site.open(root) as site:
            assert get_run(site, run_id).step("check:db").state == "failed"

        done = subprocess.run([sys.executable, "-m", "p2v", "run", "resume", str(run_id)], env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "step-invalidated boot:db" in done.stderr
        with Site.open(root) as site:
            run = get_run(site, run_id)
        assert run.state == "succeeded"
        assert run.step("boot:db").attempts == 2 and run.step("check:db").attempts == 2
        assert run.step("prepare:db").attempts == 1  # the prepared VM was reused, not converted again
        second_pid = run.step("boot:db").detail["pid"]
        assert second_pid != first_pid and qemu_pids(f"failover{run_id}-db") == [second_pid]
        assert run.step("boot:db").detail["ports"] == steps["boot:db"].detail["ports"]  # same forwarded ports
    finally:
        for info in detached.list_vms(query_qmp=False):
            detached.stop_vm(info.name, timeout=10, force=True)
