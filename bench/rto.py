"""Benchmark: orchestration overhead of a two-machine recovery plan (db, then web after db).

In one run, on recovery points of the "physical" test guest protected as image files:

1. each machine **alone**, without the orchestrator: conversion of its point on an overlay
   (``prepare_recovery_vm``), then boot until its health check (SSH ``true``) passes;
2. the **plan**: a drill of both (``start_drill``), RTO = run start -> web's check passed.

The critical path is web after db: ``sum(conversion + boot-to-check)`` over both machines.
Overhead = (plan RTO - critical path) / critical path; target <= 10 %. The drill converts web
while db boots, so its RTO can be below the sum; on this 2-core host the overlap also slows
both (TCG boot and the conversion appliance share the CPUs). Writes bench/results/rto.json.

    .venv/bin/python bench/rto.py [--out bench/results/rto.json] [--work /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import images  # noqa: E402
from p2v.orchestration.checks import CheckTarget, run_checks  # noqa: E402
from p2v.orchestration.checks_model import SshCheck  # noqa: E402
from p2v.orchestration.drill import start_drill  # noqa: E402
from p2v.orchestration.plan import parse_plan  # noqa: E402
from p2v.orchestration.report import build_report  # noqa: E402
from p2v.protection.service import ProtectOptions, protect_add  # noqa: E402
from p2v.recovery.drvm import RecoverySettings, boot_recovery_vm, discard_recovery_vm, prepare_recovery_vm  # noqa: E402
from p2v.site import Site  # noqa: E402
from p2v.vm.cmdline import RunOverrides  # noqa: E402
from p2v.vm.drillnet import DrillNetwork, segment_mac  # noqa: E402
from p2v.vm.spec import VmSpec  # noqa: E402

TARGET = 0.10
GUEST = "debian-physical-bios"
PLAN = """
version: 1
name: rto-bench
machines:
  db: {memory: 768M, checks: [{ssh: {command: "true", timeout: 900}}]}
  web: {memory: 768M, checks: [{ssh: {command: "true", timeout: 900}}]}
groups:
  - {name: databases, machines: [db]}
  - {name: apps, machines: [web]}
"""


def alone(site: Site, machine: str, work: Path, key: Path) -> dict[str, float]:
    """Conversion + boot-to-check of one machine with no orchestrator around it."""
    t0 = time.monotonic()
    rvm = prepare_recovery_vm(site, machine, None, work / machine,
                              RecoverySettings(vm_name=f"rto-alone-{machine}", memory_mib=768, drill=True))  # fmt: skip
    conv = time.monotonic() - t0
    spec = VmSpec.load(Path(rvm.spec_path))
    net = DrillNetwork(f"rto-alone-{machine}")
    args, ports = net.nic_args(machine, spec.nics[0].mac, segment_mac("rto-alone", machine), [])
    try:
        t1 = time.monotonic()
        booted = boot_recovery_vm(rvm, overrides=RunOverrides(nic_args=tuple(args)), detached=False)
        res = run_checks([SshCheck(command="true", timeout=900)],
                         CheckTarget(machine=machine, ports=ports, ssh_identity=key))  # fmt: skip
        b2c = time.monotonic() - t1
        assert res and res[-1].ok, res
        booted.stop(timeout=5, hard=True)
    finally:
        discard_recovery_vm(rvm, hard=True)
    return {"conversion_s": round(conv, 2), "boot_to_check_s": round(b2c, 2), "total_s": round(conv + b2c, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rto.json")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="p2v-bench-rto-", dir=a.work))
    os.environ["P2V_STATE"] = str(work / "state")
    key = images.test_ssh_key()
    try:
        image = str(images.ensure(GUEST))
        root = work / "site"
        for m in ("db", "web"):
            protect_add(root, m, [image], ProtectOptions())
        site = Site.open(root)
        result: dict[str, Any] = {"benchmark": "rto", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                           "load_at_start": list(os.getloadavg())}}  # fmt: skip
        machines = {m: alone(site, m, work / "alone", key) for m in ("db", "web")}
        result["alone"] = machines
        critical = sum(v["total_s"] for v in machines.values())
        run = start_drill(site, parse_plan(PLAN, "rto-bench.yaml"), None, identity=key)
        rep = build_report(site, run.id)
        assert run.state == "succeeded", run.error
        rto = float(rep["rto_s"])
        steps = {s["key"]: round(s["end_s"] - s["start_s"], 2) for s in rep["steps"] if s.get("end_s") is not None}
        result["plan"] = {"run": run.id, "rto_s": round(rto, 2), "steps_s": steps}
        result["critical_path_s"] = round(critical, 2)
        result["overhead_s"] = round(rto - critical, 2)
        result["overhead_ratio"] = round((rto - critical) / critical, 4)
        result["target_ratio"] = TARGET
        result["met"] = result["overhead_ratio"] <= TARGET
        result["load_at_end"] = list(os.getloadavg())
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"critical path {critical:.1f}s (db {machines['db']['total_s']}s + web {machines['web']['total_s']}s); "
              f"plan RTO {rto:.1f}s; overhead {result['overhead_ratio'] * 100:+.1f}% (target <= {TARGET:.0%})")
        print(f"wrote {a.out}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
