"""Disaster failover of a two-machine plan, data written at DR, then fallback to production.

Production is two QEMU test disks (qcow2 overlays on the "physical" guest image): db survives
the disaster unchanged, web's disk is written to after the failover (split-brain). Asserted:
- the disaster failover refuses while production "answers" (the files exist) unless fenced;
- fallback refuses web's split-brain with the divergence size (SplitBrain, exit 17) while db's
  delta is sent: at most 1.2x the bytes allocated in db's DR overlay (conversion edits and
  runtime writes);
- with --discard-production-changes the fallback completes, production boots on IDE/e1000,
  its checks pass, and db holds the file written before the disaster and the one written at DR;
- the next sync of db moves only what production changed after fallback (no reseed), and
  its points verify.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import images
from p2v.disks.guestfs import open_guestfs
from p2v.errors import UsageError
from p2v.orchestration.failover import start_failover
from p2v.orchestration.fallback import start_fallback
from p2v.orchestration.plan import parse_plan
from p2v.protection.service import ProtectOptions, protect_add, sync, verify
from p2v.site import Site
from p2v.vm import detached
from tests.guestssh import ssh_run
from tests.vm.test_convert_linux import G1

pytestmark = pytest.mark.vm

PLAN = """
version: 1
name: shop
machines:
  db:
    memory: 768M
    network: {address: 192.168.50.10/24}
    checks:
      - ssh: {command: "test -f /root/before.txt", timeout: 600}
  web:
    memory: 768M
    network: {address: 192.168.50.20/24}
    checks:
      - ssh: {command: "timeout 5 bash -c '</dev/tcp/192.168.50.10/22'", timeout: 600}
groups:
  - name: databases
    machines: [db]
  - name: apps
    machines: [web]
"""


def write_file(disk: Path, path: str, text: str) -> None:
    with open_guestfs([(disk, "qcow2")], readonly=False) as g:
        g.mount("/dev/sda1", "/")
        g.write(path, text.encode())
        g.sync()


def qemus(prefix: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", prefix], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "qemu-system" in line]


def test_disaster_failover_then_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    key = images.test_ssh_key()
    prod = {}
    for name in ("db", "web"):
        prod[name] = tmp_path / f"prod-{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(images.ensure(G1)), "-F", "raw",
                        str(prod[name])], check=True)  # fmt: skip
    write_file(prod["db"], "/root/before.txt", "written before the disaster\n")
    root = tmp_path / "site"
    for name in ("db", "web"):
        protect_add(root, name, [str(prod[name])], ProtectOptions())
    plan = parse_plan(PLAN, "shop.yaml")
    site = Site.open(root)
    try:
        with pytest.raises(UsageError, match="production still answers"):
            start_failover(site, plan, None, planned=False, identity=key)
        run = start_failover(site, plan, None, planned=False, confirm_fenced=True, identity=key)
        steps = {s.key: s for s in run.steps}
        assert run.state == "succeeded", {k: (s.state, s.error) for k, s in steps.items()}
        assert steps["boot:web"].started_at >= steps["check:db"].finished_at
        db_port = int(steps["boot:db"].detail["ports"]["22"])
        rc, _, err = ssh_run(db_port, "echo written at DR > /root/during.txt && sync")
        assert rc == 0, err
        # production's web disk changes on its own after the failover: split-brain
        write_file(prod["web"], "/root/production-kept-running.txt", "x" * 300_000)

        fb = start_fallback(site, plan, None, [f"db={prod['db']}", f"web={prod['web']}"], identity=key,
                            boot_production=True)  # fmt: skip
        fsteps = {s.key: s for s in fb.steps}
        assert fb.state == "failed"
        assert fsteps["precheck:web"].state == "failed" and fsteps["stop-dr:web"].started_at is None
        error = fsteps["precheck:web"].error or ""
        assert "was changed after failover" in error and re.search(r"\d+ bytes in \d+ blocks", error), error
        assert len(qemus(f"failover{run.id}-")) == 2  # refused before DR stopped serving

        fb2 = start_fallback(site, plan, None, [f"db={prod['db']}", f"web={prod['web']}"], identity=key,
                             boot_production=True, discard_production_changes=True)  # fmt: skip
        f2 = {s.key: s for s in fb2.steps}
        assert fb2.state == "succeeded", {k: (s.state, s.error) for k, s in f2.items()}
        assert f2["boot-prod:web"].started_at >= f2["check-prod:db"].finished_at
        back = f2["sync-back:db"]
        sent, changed = back.detail["bytes_sent"], back.detail["bytes_allocated_at_dr"]
        print(f"\ndb sync-back: sent {sent} B for {changed} B allocated at DR ({sent / max(changed, 1):.3f}x)")
        assert back.detail["target_state"] == ["equal"]
        assert 0 < sent <= 1.2 * changed
        assert f2["sync-back:web"].detail["target_state"] == ["diverged"]
        assert qemus(f"failover{run.id}-") == []  # the DR VMs are gone
        prod_port = int(f2["boot-prod:db"].detail["ports"]["22"])
        rc, out, err = ssh_run(prod_port, "cat /root/before.txt /root/during.txt; "
                               "cat /sys/class/net/eth0/device/uevent; readlink -f /sys/block/sda")  # fmt: skip
        assert rc == 0, err
        assert "written before the disaster" in out and "written at DR" in out
        assert "e1000" in out and "ata" in out  # original-class hardware: e1000 NIC, IDE/ATA disk
        for name in ("db", "web"):
            detached.stop_vm(f"fallback{fb2.id}-{name}", timeout=120)

        # re-protected without a reseed: the next sync moves only what production changed since
        res = sync(root, "db")
        size = 3 * 1024**3
        print(f"sync after fallback: wrote {res['bytes_written']} B")
        assert res["bytes_written"] < 0.02 * size
        ver = verify(root, "db", all_points=True)
        assert ver["ok"] and len(ver["points"]) >= 3
    finally:
        for info in detached.list_vms(query_qmp=False):
            detached.stop_vm(info.name, timeout=10, force=True)
        assert qemus("failover") == [] and qemus("fallback") == []
