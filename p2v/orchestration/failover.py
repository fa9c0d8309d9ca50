"""`p2v failover`: bring a plan's machines up at the DR site, in order, and leave them running.

``--planned`` (production still alive): per machine in *reverse* plan order (web before db) a
final sync makes a last recovery point and the source is then stopped (SSH ``poweroff``, QMP
powerdown for QEMU sources); then every machine boots at DR in plan order from that point.
Writes made on a source between its final sync's capture and its stop are not in the point:
stop the application first (e.g. a shell step of another plan) when that matters.

``--disaster`` (production gone): refused while any source still answers, unless the user
confirms it is fenced; boots the newest (or the chosen) points.

The DR VMs are detached QEMU processes named ``failover<RUN>-<machine>`` on overlays in
``<site>/runs/run-<RUN>/``; they keep running after the command returns, and ``p2v fallback``
later finds them through this run's journal. Nothing is written into the recovery-point chains.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from p2v.errors import P2VError, UsageError
from p2v.orchestration import recovery_steps as rs
from p2v.orchestration.drill import machine_steps
from p2v.orchestration.executor import StepContext, StepDef, execute, register_step_builder
from p2v.orchestration.journal import RunRecord, create_run
from p2v.orchestration.plan import RecoveryPlan, plan_nodes, validate_plan
from p2v.protection.sources import SshOptions
from p2v.site.site import Site

KIND = "failover"


def ssh_options(options: dict[str, Any]) -> SshOptions:
    return SshOptions(identity=Path(options["identity"]) if options.get("identity") else None,
                      known_hosts=Path(options["known_hosts"]) if options.get("known_hosts") else None)  # fmt: skip


def _final_sync(rc: rs.RunContext, protected: str, ctx: StepContext) -> dict[str, Any]:
    from p2v.protection.service import sync

    if ctx.previous.get("point"):  # the sync committed before the orchestrator died
        return dict(ctx.previous)
    res = sync(rc.site_root, protected, ssh=ssh_options(rc.options))
    detail = {"point": res["seq"], "bytes_sent": res.get("bytes_sent", 0), "bytes_read": res.get("bytes_read", 0),
              "consistency": res.get("consistency")}  # fmt: skip
    ctx.checkpoint(detail)
    return detail


def _stop_source(rc: rs.RunContext, protected: str, ctx: StepContext) -> dict[str, Any]:
    from p2v.recovery.sources import stop_source

    with rc.site() as site:
        urls = [d.url for d in site.machine(protected).disks]
    done: list[dict[str, Any]] = []
    for url in dict.fromkeys(urls):  # one stop per source, even with several disks
        done.append(stop_source(url, ssh_options=ssh_options(rc.options)).to_dict())
    return {"stopped": done}


def build_steps(site: Site, run_id: int, plan_dict: dict[str, Any], options: dict[str, Any]) -> list[StepDef]:
    plan = RecoveryPlan.model_validate(plan_dict)
    rc = rs.RunContext(site.root, run_id, KIND, plan, Path(options.get("plan_dir", ".")), options)
    nodes = plan_nodes(plan)
    if not options.get("planned"):
        return machine_steps(rc, nodes, teardown=False)
    steps: list[StepDef] = []
    previous: str | None = None
    machines = [n for n in nodes if n.kind == "machine"]
    for n in reversed(machines):  # web's source stops before db's
        assert n.machine is not None and n.protected is not None
        sync_key, stop_key = f"final-sync:{n.machine}", f"stop-source:{n.machine}"
        steps.append(StepDef(sync_key, "sync", partial(_final_sync, rc, n.protected), (previous,) if previous else (),
                             machine=n.machine))  # fmt: skip
        steps.append(StepDef(stop_key, "stop-source", partial(_stop_source, rc, n.protected), (sync_key,),
                             machine=n.machine))  # fmt: skip
        previous = stop_key
    return steps + machine_steps(rc, nodes, teardown=False, first_after=(previous,) if previous else ())


def check_fenced(site: Site, plan: RecoveryPlan, options: dict[str, Any]) -> list[str]:
    """Sources of the plan's machines that still answer (a disaster failover refuses them)."""
    from p2v.recovery.sources import source_reachable

    alive = []
    for pm in plan.machines.values():
        for d in site.machine(pm.protected).disks:
            try:
                if source_reachable(d.url, timeout=5.0, ssh_options=ssh_options(options)):
                    alive.append(d.url)
            except P2VError:
                continue
    return sorted(set(alive))


def start_failover(site: Site, plan: RecoveryPlan, plan_path: Path | None, *, planned: bool,
                   point: str | None = None, confirm_fenced: bool = False, identity: Path | None = None,
                   known_hosts: Path | None = None, parallel: int = 4, wait_approvals: bool = True,
                   on_event: Any = None) -> RunRecord:  # fmt: skip
    from p2v.errors import InvalidInput

    report = validate_plan(plan, site)
    if not report.ok:
        raise InvalidInput(f"plan {plan.name}: " + "; ".join(report.errors))
    if planned and point not in (None, "latest"):
        raise UsageError("--point applies to --disaster only: a planned failover uses the final sync's point")
    options = {"mode": KIND, "planned": planned, "point": point or "latest",
               "identity": str(identity) if identity else None,
               "known_hosts": str(known_hosts) if known_hosts else None,
               "plan_dir": str((plan_path.parent if plan_path else Path.cwd()).resolve())}  # fmt: skip
    if not planned and not confirm_fenced:
        alive = check_fenced(site, plan, options)
        if alive:
            raise UsageError(f"production still answers: {', '.join(alive)}; a disaster failover would run two "
                             "copies of these machines",
                             hint="stop or isolate production and retry, pass --confirm-fenced if it is fenced, "
                                  "or use --planned")  # fmt: skip
    options["confirm_fenced"] = confirm_fenced
    run_id = create_run(site, KIND, plan.name, plan.to_dict(), options, str(plan_path) if plan_path else None)
    steps = build_steps(site, run_id, plan.to_dict(), options)
    return execute(site, run_id, steps, parallel=parallel, wait_approvals=wait_approvals, on_event=on_event)


register_step_builder(KIND, build_steps)
