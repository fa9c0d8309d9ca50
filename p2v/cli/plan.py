"""``p2v plan validate|show|graph``: check a recovery plan file, list its ordered steps, draw
its dependency graph (text, JSON or SVG). Over :mod:`p2v.orchestration.plan`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import typer

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console
from p2v.errors import InvalidInput, OutputError, SiteError
from p2v.orchestration.checks_model import check_label
from p2v.orchestration.plan import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY,
    PlanNode,
    RecoveryPlan,
    ValidationReport,
    graph_dict,
    graph_svg,
    graph_text,
    load_plan,
    local_host,
    plan_levels,
    validate_plan,
)
from p2v.site.site import CATALOG_NAME, Site, default_site_path
from p2v.site.units import format_duration, format_size

SITE_OPTION = typer.Option(
    None, "--site", envvar="P2V_SITE",
    help="DR site directory to check the plan against (default ./p2v-site when it exists; env P2V_SITE).",
)  # fmt: skip
PLAN_ARGUMENT = typer.Argument(
    ..., metavar="PLAN", help="Recovery plan file (YAML, version 1; see docs/recovery-plans.md)."
)

plan_app = typer.Typer(
    help="Recovery plans: validate a plan file, show its ordered steps, draw its dependency graph.",
    no_args_is_help=True,
)


def _print(text: str) -> None:
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _validate(plan: RecoveryPlan, site_dir: Path | None) -> ValidationReport:
    """Against the given site (which must exist), else ./p2v-site if it exists, else this host."""
    root = site_dir if site_dir is not None else default_site_path()
    if not (root / CATALOG_NAME).is_file():
        if site_dir is not None:
            raise SiteError(f"no DR site at {root} (no {CATALOG_NAME} there)",
                            hint="give the folder of an existing site, or leave --site out")  # fmt: skip
        report = validate_plan(plan, None, [local_host()])
        report.warnings.insert(0, f"no DR site at {root}: the protected machines and their recovery points "
                                  "were not checked (give --site)")  # fmt: skip
        return report
    with Site.open(root) as site:
        return validate_plan(plan, site, None)


@plan_app.command("validate", help="Check a plan: schema, references, cycles, group membership, the protected "
                  "machines at the site and DR capacity. Lists every problem; exit 0 when valid (warnings "
                  "are printed), 4 when not.")  # fmt: skip
@handle_errors
def validate_cmd(plan_file: Path = PLAN_ARGUMENT, site: Path = SITE_OPTION, json_output: bool = JSON_OPTION) -> None:
    plan = load_plan(plan_file)
    report = _validate(plan, site)
    if json_output:
        emit_json({"file": str(plan_file), **report.to_dict()})
        if not report.ok:
            raise typer.Exit(InvalidInput.exit_code)
        return
    for w in report.warnings:
        err_console.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)
    for e in report.errors:
        _print(f"error: {e}")
    if not report.ok:
        raise InvalidInput(f"{plan_file}: plan {plan.name} has {len(report.errors)} problem(s); see above")
    t = report.totals
    _print(f"plan {plan.name} is valid: {t['machines']} machines, {t['steps']} steps in {t.get('levels', '?')} "
           f"levels, {t['cpus']} CPUs and {format_size(t['memory'])} at DR"
           + (f" (site capacity {t['host_cpus']} CPUs, {format_size(t['host_memory'])})" if "host_cpus" in t else "")
           + (f"; {len(report.warnings)} warning(s)" if report.warnings else ""))  # fmt: skip


def _check_text(check: Any) -> str:
    return f"{check_label(check)} (timeout {format_duration(check.timeout)})"


def _step_dict(plan: RecoveryPlan, node: PlanNode) -> dict[str, Any]:
    out = node.to_dict()
    if node.machine is not None:
        m = plan.machines[node.machine]
        out["vm"] = {"cpus": m.cpus or DEFAULT_CPUS, "memory": m.memory or DEFAULT_MEMORY,
                     "network": m.network.model_dump(mode="json"), "cpus_default": m.cpus is None,
                     "memory_default": m.memory is None}  # fmt: skip
    return out


def _step_lines(plan: RecoveryPlan, node: PlanNode, names: dict[str, str]) -> list[str]:
    after = f" · after {', '.join(names[k] for k in node.after)}" if node.after else ""
    timeout = f" · timeout {format_duration(node.timeout)}" if node.timeout else ""
    policy = f" · on failure {node.on_failure}"
    if node.machine is None:
        what = f"shell {node.name}: {' '.join(node.command)}" if node.kind == "shell" else \
            f"approval {node.name}: {node.message}"  # fmt: skip
        return [f"  {what}", f"      {after[3:] or 'no dependency'}{timeout}{policy}"]
    m = plan.machines[node.machine]
    cpus = f"{m.cpus or DEFAULT_CPUS} CPUs" + ("" if m.cpus else " (default)")
    mem = format_size(m.memory or DEFAULT_MEMORY) + ("" if m.memory else " (default)")
    net = f"segment {m.network.segment}"
    if m.network.address:
        net += f", address {m.network.address}" + (f" via {m.network.gateway}" if m.network.gateway else "")
    protected = f" (protected {m.protected})" if m.protected != node.name else ""
    boot = f" · boot timeout {format_duration(node.timeout)}" if node.timeout else ""
    lines = [f"  machine {node.name}{protected} [group {node.group}]: {cpus}, {mem}, {net}",
             f"      {after[3:] or 'no dependency'}{boot}{policy}"]  # fmt: skip
    checks = ", ".join(_check_text(c) for c in node.checks) or "none (up when the VM runs)"
    lines.append(f"      checks: {checks}")
    return lines


@plan_app.command("show", help="The plan's steps in order: levels of steps that may run in parallel, each "
                  "with its dependencies, VM settings, checks, timeouts and on-failure policy.")  # fmt: skip
@handle_errors
def show_cmd(plan_file: Path = PLAN_ARGUMENT, json_output: bool = JSON_OPTION) -> None:
    plan = load_plan(plan_file)
    levels = plan_levels(plan)
    if json_output:
        emit_json({"file": str(plan_file), "plan": plan.to_dict(),
                   "levels": [[_step_dict(plan, n) for n in lv] for lv in levels]})  # fmt: skip
        return
    names = {n.key: n.name for lv in levels for n in lv}
    head = f"plan {plan.name}: {len(plan.machines)} machines, {len(names)} steps in {len(levels)} levels"
    if plan.rto_target:
        head += f"; RTO target {format_duration(plan.rto_target)}"
    lines = [head] + ([plan.description.strip()] if plan.description else [])
    for i, lv in enumerate(levels, 1):
        lines.append(f"level {i}:")
        for n in lv:
            lines += _step_lines(plan, n, names)
    _print("\n".join(lines))


def _write_atomically(path: Path, text: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


@plan_app.command("graph", help="The dependency graph: levels and edges as text on stdout; --svg also writes "
                  "a self-contained SVG picture (one column per level).")  # fmt: skip
@handle_errors
def graph_cmd(
    plan_file: Path = PLAN_ARGUMENT,
    svg: Path = typer.Option(None, "--svg", help="Write the graph as SVG to this file (replaced if it exists)."),
    json_output: bool = JSON_OPTION,
) -> None:
    plan = load_plan(plan_file)
    text = graph_text(plan)  # validates the graph first: a broken plan writes no SVG
    if svg is not None:
        _write_atomically(svg, graph_svg(plan))
    if json_output:
        emit_json({"file": str(plan_file), **graph_dict(plan), "svg": str(svg) if svg is not None else None})
        return
    _print(text.rstrip("\n"))
    if svg is not None:
        err_console.print(f"wrote {svg}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
