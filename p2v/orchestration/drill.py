"""`p2v drill`: boot a plan's recovery points on throw-away overlays in an isolated network.

Steps of a drill run, per machine ``M`` of the plan:

- ``prepare:M``: overlay on the chosen point + conversion in place (the point is pinned, so
  retention cannot merge it away while the drill runs). Preparations run one after the
  other in plan order: the next machine converts while the previous one boots.
- ``boot:M``: after ``prepare:M`` and after every step ``M`` depends on in the plan (for a
  machine dependency: its checks), the VM starts detached on the drill network.
- ``check:M``: the machine's health checks, with its ``on_failure`` policy.

Shell hooks and approval gates of the plan become ``hook:NAME`` / ``approval:NAME``.
``teardown`` always runs last (also after a failure, an abort or Ctrl-C): it stops every VM,
deletes the overlays and the run's folder and releases the pins. The chain is never written.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from p2v.orchestration import recovery_steps as rs
from p2v.orchestration.executor import StepDef, execute, no_action, register_step_builder
from p2v.orchestration.journal import RunRecord, create_run
from p2v.orchestration.plan import PlanNode, RecoveryPlan, plan_nodes, validate_plan
from p2v.site.site import Site

KIND = "drill"


def _dep_key(key: str) -> str:
    """What waiting for plan node ``key`` means in the run: a machine's checks have passed."""
    kind, _, name = key.partition(":")
    return f"check:{name}" if kind == "machine" else key


def build_steps(site: Site, run_id: int, plan_dict: dict[str, Any], options: dict[str, Any]) -> list[StepDef]:
    plan = RecoveryPlan.model_validate(plan_dict)
    rc = rs.RunContext(site.root, run_id, options.get("mode", KIND), plan, Path(options.get("plan_dir", ".")), options)
    return machine_steps(rc, plan_nodes(plan), teardown=True)


def machine_steps(rc: rs.RunContext, nodes: list[PlanNode], *, teardown: bool,
                  first_after: tuple[str, ...] = ()) -> list[StepDef]:  # fmt: skip
    """prepare/boot/check per machine, hook and approval steps, and (drill) the teardown.
    ``first_after``: steps every preparation waits for (failover: the final syncs)."""
    steps: list[StepDef] = []
    machines = [n for n in nodes if n.kind == "machine"]
    previous_prepare: str | None = None
    for n in nodes:
        after = tuple(_dep_key(k) for k in n.after)
        if n.kind == "machine":
            assert n.machine is not None
            m = n.machine
            prep_after = first_after + ((previous_prepare,) if previous_prepare else ())
            steps.append(StepDef(f"prepare:{m}", "prepare", partial(rs.prepare, rc, n), prep_after, machine=m,
                                 group=n.group, timeout=n.timeout and max(n.timeout, 1800)))  # fmt: skip
            previous_prepare = f"prepare:{m}"
            steps.append(StepDef(f"boot:{m}", "boot", partial(rs.boot, rc, n), (f"prepare:{m}", *after), machine=m,
                                 group=n.group, still_valid=rs.vm_gone))  # fmt: skip
            steps.append(StepDef(f"check:{m}", "check", partial(rs.check, rc, n), (f"boot:{m}",), machine=m,
                                 group=n.group, on_failure=n.on_failure))  # fmt: skip
        elif n.kind == "shell":
            steps.append(StepDef(n.key, "shell", partial(rs.hook, rc, n), after, group=n.group,
                                 on_failure=n.on_failure, timeout=n.timeout))  # fmt: skip
        else:
            steps.append(StepDef(n.key, "approval", no_action, after, group=n.group, on_failure=n.on_failure,
                                 approval=n.message or f"approve {n.name}"))  # fmt: skip
    if teardown:
        names = [n.machine for n in machines if n.machine]
        work = tuple(s.key for s in steps)
        steps.append(StepDef("teardown", "teardown", partial(rs.teardown, rc, names), work, always=True))
    return steps


def start_drill(site: Site, plan: RecoveryPlan, plan_path: Path | None, *, point: str | None = None,
                identity: Path | None = None, parallel: int = 4, wait_approvals: bool = True,
                on_event: Any = None) -> RunRecord:  # fmt: skip
    """Validate the plan against the site, create the run, execute it; returns the finished run."""
    from p2v.errors import InvalidInput

    report = validate_plan(plan, site)
    if not report.ok:
        raise InvalidInput(f"plan {plan.name}: " + "; ".join(report.errors))
    options = {"mode": KIND, "point": point or "latest", "identity": str(identity) if identity else None,
               "plan_dir": str((plan_path.parent if plan_path else Path.cwd()).resolve())}  # fmt: skip
    run_id = create_run(site, KIND, plan.name, plan.to_dict(), options, str(plan_path) if plan_path else None)
    steps = build_steps(site, run_id, plan.to_dict(), options)
    return execute(site, run_id, steps, parallel=parallel, wait_approvals=wait_approvals, on_event=on_event)


register_step_builder(KIND, build_steps)
