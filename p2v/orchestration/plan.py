"""Recovery plans: load a plan file, check it against the DR site, and order its steps.

This module is the public face; the pieces live beside it:
:mod:`~p2v.orchestration.plan_schema` (file format and models),
:mod:`~p2v.orchestration.plan_graph` (steps, dependency levels, text/SVG graph),
:mod:`~p2v.orchestration.plan_capacity` (site hosts and capacity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.errors import InvalidInput, UnknownMachine, UsageError
from p2v.orchestration.plan_capacity import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY,
    HOSTS_FILE,
    CapacityTotals,
    SiteHost,
    VmDemand,
    check_capacity,
    load_site_hosts,
    local_host,
)
from p2v.orchestration.plan_graph import (
    PlanNode,
    analyse,
    find_cycles,
    graph_dict,
    graph_svg,
    graph_text,
    node_key,
    plan_levels,
    plan_nodes,
    topological_order,
)
from p2v.orchestration.plan_schema import (
    PLAN_VERSION,
    GroupMachine,
    MachineNetwork,
    PlanGroup,
    PlanMachine,
    RecoveryPlan,
    parse_plan,
)
from p2v.site.site import Site

__all__ = [
    "DEFAULT_CPUS", "DEFAULT_MEMORY", "HOSTS_FILE", "PLAN_VERSION", "CapacityTotals", "GroupMachine",
    "MachineNetwork", "PlanGroup", "PlanMachine", "PlanNode", "RecoveryPlan", "SiteHost", "ValidationReport",
    "find_cycles", "graph_dict", "graph_svg", "graph_text", "load_plan", "load_site_hosts", "local_host",
    "machine_demands", "node_key", "parse_plan", "plan_levels", "plan_nodes", "topological_order", "validate_plan",
]  # fmt: skip


def load_plan(path: Path) -> RecoveryPlan:
    """Read and parse the plan file at ``path``. UsageError when it cannot be read, InvalidInput
    (naming the file, the YAML path and the problem) when it is not a valid plan."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"plan file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"plan file {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not UTF-8 text (byte {exc.start}): a plan is a YAML file") from None
    except OSError as exc:
        raise UsageError(f"plan file {path} cannot be read: {exc.strerror}") from exc
    return parse_plan(text, str(path))


def machine_demands(plan: RecoveryPlan) -> list[VmDemand]:
    """CPUs and memory each machine gets at DR: its overrides, else 2 CPUs and 2 GiB."""
    return [VmDemand(machine=name, cpus=m.cpus or DEFAULT_CPUS, memory=m.memory or DEFAULT_MEMORY)
            for name, m in plan.machines.items()]  # fmt: skip


@dataclass
class ValidationReport:
    """Every problem found (``errors``: the plan cannot run; ``warnings``: it can, but look)."""

    plan: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "ok": self.ok, "errors": list(self.errors), "warnings": list(self.warnings),
                "totals": dict(self.totals)}  # fmt: skip


def _network_problems(plan: RecoveryPlan) -> list[str]:
    errors = []
    used: dict[tuple[str, str], str] = {}
    for name, m in plan.machines.items():
        iface = m.network.interface
        if iface is None:
            continue
        slot = (m.network.segment, str(iface.ip))
        if slot in used:
            errors.append(f"machines.{name}.network.address: {iface.ip} on segment {m.network.segment} is "
                          f"already the address of machine {used[slot]}")  # fmt: skip
        else:
            used[slot] = name
    return errors


def _site_problems(plan: RecoveryPlan, site: Site) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for name, m in plan.machines.items():
        try:
            record = site.machine(m.protected)
        except UnknownMachine as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            errors.append(f"machines.{name}.protected: no protected machine called {m.protected!r} at the site "
                          f"{site.root}{hint}")  # fmt: skip
            continue
        if not record.point_count:
            warnings.append(f"machine {name}: the protected machine {m.protected} has no recovery point yet "
                            f"(run `p2v sync {m.protected}`)")  # fmt: skip
    return errors, warnings


def validate_plan(plan: RecoveryPlan, site: Site | None = None, hosts: list[SiteHost] | None = None
                  ) -> ValidationReport:  # fmt: skip
    """Check everything a run would trip on and collect all problems (never raises for them):
    references, cycles, group membership, duplicate names and addresses; with ``site``: protected
    machines exist (a machine with no recovery point yet is a warning); capacity against ``hosts``
    (default with a site: its ``hosts.yaml``, else this host, marked assumed; no site and no
    hosts: capacity is not checked, which is a warning)."""
    report = ValidationReport(plan=plan.name)
    found = analyse(plan)
    report.errors += found.errors
    report.warnings += found.warnings
    report.errors += _network_problems(plan)
    recovers: dict[str, str] = {}
    for name, m in plan.machines.items():
        if m.protected in recovers:
            report.errors.append(f"machines {recovers[m.protected]} and {name} both recover the protected machine "
                                 f"{m.protected}; a protected machine can be recovered once per plan")  # fmt: skip
        else:
            recovers[m.protected] = name
    if site is not None:
        errs, warns = _site_problems(plan, site)
        report.errors += errs
        report.warnings += warns
        if hosts is None:
            try:
                hosts = load_site_hosts(site.root)
            except InvalidInput as exc:
                report.errors.append(exc.message)
    demands = machine_demands(plan)
    report.totals = {"machines": len(demands), "cpus": sum(d.cpus for d in demands),
                     "memory": sum(d.memory for d in demands),
                     "steps": len(found.nodes)}  # fmt: skip
    if hosts is None:
        report.warnings.append("capacity was not checked: no DR site or host list was given")
    else:
        errs, warns, totals = check_capacity(demands, hosts)
        report.errors += errs
        report.warnings += warns
        report.totals.update(totals.to_dict())
        report.totals["host_list"] = [h.to_dict() for h in hosts]
        if totals.assumed:
            report.warnings.append(f"capacity is assumed from this host ({hosts[0].cpus} CPUs, "
                                   f"{hosts[0].memory >> 20} MiB): declare the DR hosts in "
                                   f"{'SITE/' if site is None else str(site.root) + '/'}{HOSTS_FILE}")  # fmt: skip
    if not found.errors:
        report.totals["levels"] = len(topological_order(found.nodes))
    return report
