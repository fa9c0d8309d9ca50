"""`p2v fallback`: send what changed at DR back to production, switch back, re-protect.

It continues a failover run (the newest succeeded failover of the plan, or ``--run``). Steps,
per machine ``M``:

- ``stop-dr:M`` in reverse plan order: the DR VM is shut down (power button, then quit).
- ``sync-back:M``: each disk of the DR VM (overlay on the point it started from) is made equal
  on the target (:func:`p2v.recovery.fallback_sync.fallback_disk`): a blank target gets a full
  copy, a target equal to the point gets only what DR changed (found from the overlay's
  allocation), a target that changed on its own is split-brain (refused unless
  ``--discard-production-changes``). Every written block is verified.
- ``reprotect:M``: a new recovery point equal to production now is added to M's chain from
  the DR overlay, and M's source becomes the target, so the next sync moves only what
  production changes afterwards (no reseed).
- ``boot-prod:M`` / ``check-prod:M`` (image-file targets, ``--boot-production``): production
  boots in plan order on its original-class hardware (IDE disk, e1000 NIC) and its checks run.
- ``discard-dr:M``: the DR VM's overlays and the failover's pins are removed.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from p2v.errors import P2VError, UsageError
from p2v.orchestration import recovery_steps as rs
from p2v.orchestration.executor import StepContext, StepDef, StepFailure, execute, register_step_builder
from p2v.orchestration.failover import KIND as FAILOVER
from p2v.orchestration.failover import ssh_options
from p2v.orchestration.journal import RunRecord, create_run, get_run, list_runs
from p2v.orchestration.plan import PlanNode, RecoveryPlan, plan_nodes
from p2v.protection.sources import source_kind
from p2v.recovery.drvm import discard_recovery_vm, load_recovery_vm, stop_recovery_vm
from p2v.site import pins
from p2v.site.site import Site
from p2v.vm.cmdline import RunOverrides
from p2v.vm.drillnet import DrillNetwork, segment_mac
from p2v.vm.spec import DiskSpec, NicSpec, VmSpec

KIND = "fallback"


def _failover_context(site: Site, options: dict[str, Any], plan: RecoveryPlan) -> rs.RunContext:
    run = get_run(site, int(options["failover_run"]))
    return rs.RunContext(site.root, run.id, FAILOVER, plan, Path(options.get("plan_dir", ".")), run.options)


def _dr_vm(frc: rs.RunContext, machine: str) -> Any:
    rvm = load_recovery_vm(frc.workdir, frc.vm_name(machine))
    if rvm is None:
        raise StepFailure(f"machine {machine}: the DR VM of failover run {frc.run_id} is gone from {frc.workdir}",
                          hint="was this failover already fallen back?")  # fmt: skip
    return rvm


def _precheck(rc: rs.RunContext, frc: rs.RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """Refuse a split-brain while DR still serves: scan each target against the point."""
    from p2v.recovery.fallback_sync import classify_target, split_brain_error
    from p2v.replication.model import HashMap

    assert node.machine is not None and node.protected is not None
    rvm = _dr_vm(frc, node.machine)
    seq = int(rvm.point["seq"])
    disks = []
    discard = bool(rc.options.get("discard_production_changes"))
    with rc.site() as site:
        for i, url in enumerate(rc.options["targets"][node.machine]):
            ts = classify_target(site, node.protected, seq, i, url, ssh_options=ssh_options(rc.options))
            disks.append({"disk": i, "target": url, **ts.__dict__})
            if ts.state == "diverged" and not discard and not ts.journaled:
                bs = HashMap.load(site.point_map(node.protected, seq, i)).block_size
                err = split_brain_error(node.protected, i, url, seq, ts, bs)
                raise StepFailure(err.message, detail={"disks": disks, "error": "SplitBrain"}, hint=err.hint)
    return {"point": {"seq": seq}, "disks": disks}


def _stop_dr(frc: rs.RunContext, machine: str, ctx: StepContext) -> dict[str, Any]:
    rvm = _dr_vm(frc, machine)
    res = stop_recovery_vm(rvm.vm_name, timeout=120.0)
    return {"vm": rvm.vm_name, "stop": res.to_dict()}


def _sync_back(rc: rs.RunContext, frc: rs.RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    from p2v.recovery.fallback_sync import fallback_disk

    assert node.machine is not None and node.protected is not None
    rvm = _dr_vm(frc, node.machine)
    targets = rc.options["targets"][node.machine]
    seq = int(rvm.point["seq"])
    disks: list[dict[str, Any]] = []
    with rc.site() as site:
        for i, (overlay, url) in enumerate(zip(rvm.overlays, targets, strict=True)):
            res = fallback_disk(site, node.protected, seq, i, Path(overlay), url,
                                discard_production_changes=bool(rc.options.get("discard_production_changes")),
                                ssh_options=ssh_options(rc.options))  # fmt: skip
            disks.append(res.to_dict())
    return {"point": {"seq": seq}, "disks": disks,
            "bytes_sent": sum(int(d.get("bytes_sent", 0)) for d in disks),
            "bytes_changed_at_dr": sum(int(d.get("bytes_changed_at_dr", 0)) for d in disks),
            "bytes_allocated_at_dr": sum(int(d.get("bytes_allocated_at_dr", 0)) for d in disks),
            "target_state": sorted({d["target_state"] for d in disks})}  # fmt: skip


def _reprotect(rc: rs.RunContext, frc: rs.RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    from p2v.recovery.fallback_reprotect import reprotect_from_dr

    assert node.machine is not None and node.protected is not None
    if ctx.previous.get("seq"):
        return dict(ctx.previous)
    rvm = _dr_vm(frc, node.machine)
    with rc.site() as site:
        point = reprotect_from_dr(site, node.protected, int(rvm.point["seq"]), [Path(p) for p in rvm.overlays],
                                  target_urls=list(rc.options["targets"][node.machine]),
                                  ssh_options=ssh_options(rc.options))  # fmt: skip
    detail = {"seq": point.seq, "bytes_written": point.bytes_written}
    ctx.checkpoint(detail)
    return detail


def _prod_spec(rc: rs.RunContext, frc: rs.RunContext, node: PlanNode) -> tuple[Path, VmSpec]:
    """Production as the original-class hardware: IDE disks on the target files, e1000 NIC
    with the MAC the converted guest pins its interface name to."""
    assert node.machine is not None
    rvm = _dr_vm(frc, node.machine)
    dr = VmSpec.load(Path(rvm.spec_path))
    from p2v.disks.formats import detect_format

    disks = [DiskSpec(path=str(Path(u).resolve()), format="qcow2" if detect_format(Path(u)) == "qcow2" else "raw",
                      bus="ide") for u in rc.options["targets"][node.machine]]  # fmt: skip
    spec = dr.model_copy(update={"name": f"prod-{node.machine}", "disks": disks, "machine": "pc",
                                 "nics": [NicSpec(mac=n.mac, model="e1000") for n in dr.nics]})  # fmt: skip
    path = rc.workdir / f"prod-{node.machine}.vm.json"
    rc.workdir.mkdir(parents=True, exist_ok=True)
    spec.save(path)
    return path, spec


def _boot_prod(rc: rs.RunContext, frc: rs.RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    from p2v.vm import detached

    assert node.machine is not None
    pm = rc.plan.machines[node.machine]
    name = f"fallback{rc.run_id}-{node.machine}"
    try:
        info = detached.get_vm(name)
        return {**ctx.previous, "vm": name, "pid": info.pid, "resumed": True}
    except P2VError:
        pass
    path, spec = _prod_spec(rc, frc, node)
    net = DrillNetwork(f"{rc.run_id}:{pm.network.segment}")
    args, ports = net.nic_args(node.machine, spec.nics[0].mac, segment_mac(f"{rc.run_id}:{pm.network.segment}",
                               node.machine), rs._forward_ports(node), model="e1000")  # fmt: skip
    args = [a.replace(",restrict=on", "") for a in args]
    ctx.checkpoint({"ports": {str(k): v for k, v in ports.items()}})
    info = detached.start_vm(path, name=name, overrides=RunOverrides(nic_args=tuple(args)))
    return {"vm": name, "pid": info.pid, "console_log": str(info.console_log), "agent_socket": info.guest_agent_socket,
            "qmp_socket": info.qmp_socket, "ports": {str(k): v for k, v in ports.items()},
            "disk_bus": "ide", "nic_model": "e1000", "started_at": time.time()}  # fmt: skip


def _discard_dr(frc: rs.RunContext, machine: str, ctx: StepContext) -> dict[str, Any]:
    rvm = load_recovery_vm(frc.workdir, frc.vm_name(machine))
    removed = discard_recovery_vm(rvm, hard=True) if rvm is not None else []
    with frc.site() as site:
        released = pins.release_pins(site, frc.holder(machine))
    return {"removed": len(removed), "pins_released": released}


def build_steps(site: Site, run_id: int, plan_dict: dict[str, Any], options: dict[str, Any]) -> list[StepDef]:
    plan = RecoveryPlan.model_validate(plan_dict)
    rc = rs.RunContext(site.root, run_id, KIND, plan, Path(options.get("plan_dir", ".")), options)
    frc = _failover_context(site, options, plan)
    nodes = plan_nodes(plan)
    machines = [n for n in nodes if n.kind == "machine"]
    steps: list[StepDef] = []
    prechecks = []
    for n in machines:
        assert n.machine is not None
        steps.append(StepDef(f"precheck:{n.machine}", "precheck", partial(_precheck, rc, frc, n), machine=n.machine))
        prechecks.append(f"precheck:{n.machine}")
    previous: str | None = None
    for n in reversed(machines):
        assert n.machine is not None
        key = f"stop-dr:{n.machine}"
        steps.append(StepDef(key, "stop-dr", partial(_stop_dr, frc, n.machine),
                             (previous,) if previous else tuple(prechecks), machine=n.machine))  # fmt: skip
        previous = key
    boot_prod = bool(options.get("boot_production"))
    previous_sync: tuple[str, ...] = ()
    for n in machines:  # one sync-back after the other, in plan order
        assert n.machine is not None
        m = n.machine
        steps.append(StepDef(f"sync-back:{m}", "sync", partial(_sync_back, rc, frc, n),
                             (f"stop-dr:{m}", *previous_sync), machine=m))  # fmt: skip
        previous_sync = (f"sync-back:{m}",)
        steps.append(StepDef(f"reprotect:{m}", "reprotect", partial(_reprotect, rc, frc, n), (f"sync-back:{m}",),
                             machine=m))  # fmt: skip
        last = f"reprotect:{m}"
        if boot_prod:
            deps = tuple(f"check-prod:{d}" for d in _machines_before(n, nodes))
            steps.append(StepDef(f"boot-prod:{m}", "boot", partial(_boot_prod, rc, frc, n), (last, *deps), machine=m,
                                 still_valid=rs.vm_gone))  # fmt: skip
            steps.append(StepDef(f"check-prod:{m}", "check", partial(_check_prod, rc, n), (f"boot-prod:{m}",),
                                 machine=m, on_failure=n.on_failure))  # fmt: skip
        done = (last, f"boot-prod:{m}") if boot_prod else (last,)  # production's spec comes from the DR VM's
        steps.append(StepDef(f"discard-dr:{m}", "teardown", partial(_discard_dr, frc, m), done, machine=m))
    return steps


def _machines_before(node: PlanNode, nodes: list[PlanNode]) -> list[str]:
    """The machines ``node`` waits for in the plan, also through hooks and approval gates (production
    is booted in the plan's order; the hooks and gates themselves belong to the failover)."""
    by_key = {n.key: n for n in nodes}
    seen: set[str] = set()
    out: list[str] = []
    todo = list(node.after)
    while todo:
        key = todo.pop(0)
        if key in seen:
            continue
        seen.add(key)
        dep = by_key[key]
        if dep.kind == "machine" and dep.machine:
            out.append(dep.machine)
        else:
            todo.extend(dep.after)
    return out


def _check_prod(rc: rs.RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """The machine's checks against production (reuses the DR check runner on boot-prod's detail)."""
    assert node.machine is not None
    shadow = _Shadow(ctx, f"boot-prod:{node.machine}")
    return rs.check(rc, node, shadow)  # type: ignore[arg-type]


class _Shadow:
    """A StepContext whose ``detail_of("boot:M")`` answers with another step's detail."""

    def __init__(self, ctx: StepContext, boot_key: str) -> None:
        self._ctx = ctx
        self._boot_key = boot_key

    def detail_of(self, key: str) -> dict[str, Any]:
        return self._ctx.detail_of(self._boot_key if key.startswith("boot:") else key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def parse_targets(items: list[str], plan: RecoveryPlan) -> dict[str, list[str]]:
    """``MACHINE=TARGET`` items (repeat a machine for its next disk) -> machine -> targets."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise UsageError(f"--target {item!r}: use MACHINE=TARGET (ssh://user@host/dev/sdX or an image file)")
        if name not in plan.machines:
            raise UsageError(f"--target {item!r}: plan {plan.name} has no machine {name!r} "
                             f"(machines: {', '.join(plan.machines)})")  # fmt: skip
        source_kind(url)  # raises UsageError for a malformed URL
        out.setdefault(name, []).append(url if url.startswith("ssh://") else str(Path(url).resolve()))
    missing = [m for m in plan.machines if m not in out]
    if missing:
        raise UsageError(f"no --target for {', '.join(missing)}: every machine of the plan needs its production disks")
    return out


def newest_failover(site: Site, plan: RecoveryPlan) -> int:
    for run in list_runs(site, limit=None):
        if run.kind == FAILOVER and run.plan_name == plan.name and run.state == "succeeded":
            return run.id
    raise UsageError(f"plan {plan.name} has no succeeded failover run to fall back from",
                     hint="see `p2v run list`; pass --run RUN to choose one")  # fmt: skip


def start_fallback(site: Site, plan: RecoveryPlan, plan_path: Path | None, targets: list[str], *,
                   failover_run: int | None = None, discard_production_changes: bool = False,
                   boot_production: bool = False, identity: Path | None = None, known_hosts: Path | None = None,
                   parallel: int = 4, on_event: Any = None) -> RunRecord:  # fmt: skip
    parsed = parse_targets(targets, plan)
    fid = failover_run or newest_failover(site, plan)
    frun = get_run(site, fid)
    if frun.kind != FAILOVER:
        raise UsageError(f"run {fid} is a {frun.kind} run, not a failover")
    if boot_production and any(source_kind(u) != "file" for us in parsed.values() for u in us):
        raise UsageError("--boot-production boots image-file targets only (QEMU test production)")
    options = {"mode": KIND, "failover_run": fid, "targets": parsed,
               "discard_production_changes": discard_production_changes, "boot_production": boot_production,
               "identity": str(identity) if identity else None,
               "known_hosts": str(known_hosts) if known_hosts else None,
               "plan_dir": str((plan_path.parent if plan_path else Path.cwd()).resolve())}  # fmt: skip
    run_id = create_run(site, KIND, plan.name, plan.to_dict(), options, str(plan_path) if plan_path else None)
    steps = build_steps(site, run_id, plan.to_dict(), options)
    return execute(site, run_id, steps, parallel=parallel, on_event=on_event)


register_step_builder(KIND, build_steps)
