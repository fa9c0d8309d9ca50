"""The machine-level actions of a run: prepare a recovery VM, boot it, run its checks, hooks.

Drill and failover build their step lists from these (:mod:`p2v.orchestration.drill`).
Every action is idempotent, because a resumed run repeats the step an orchestrator died
in: prepare reuses a finished preparation, boot returns the VM already running under its
name (never a second QEMU), checks simply run again.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2v.errors import P2VError, UsageError, VmError
from p2v.orchestration.checks import CheckTarget, run_checks
from p2v.orchestration.checks_model import HttpCheck, SshCheck, TcpCheck
from p2v.orchestration.executor import StepContext, StepFailure
from p2v.orchestration.plan import PlanNode, RecoveryPlan
from p2v.recovery.drvm import (
    RecoverySettings,
    boot_recovery_vm,
    discard_recovery_vm,
    load_recovery_vm,
    prepare_recovery_vm,
)
from p2v.site import pins
from p2v.site.site import Site
from p2v.vm import detached as vm_detached
from p2v.vm.cmdline import RunOverrides
from p2v.vm.drillnet import DrillNetwork, guest_nic_name, segment_config_files, segment_mac, usernet_reader
from p2v.vm.qmp import QmpConnection
from p2v.vm.spec import VmSpec

log = logging.getLogger(__name__)

HOOK_TIMEOUT_S = 600.0
OUTPUT_TAIL = 2000
GONE_POLL_S = 2.0  # how often checks that wait look whether the VM still runs


@dataclass(frozen=True)
class RunContext:
    """What every action of one run needs; rebuilt identically on resume from the journal."""

    site_root: Path
    run_id: int
    kind: str  # drill | failover
    plan: RecoveryPlan
    plan_dir: Path
    options: dict[str, Any]

    @property
    def workdir(self) -> Path:
        return self.site_root / "runs" / f"run-{self.run_id:06d}"

    @property
    def drill(self) -> bool:
        return self.kind == "drill"

    def vm_name(self, machine: str) -> str:
        return f"{self.kind}{self.run_id}-{machine}"

    def holder(self, machine: str) -> str:
        return f"run:{self.run_id}:{machine}"

    def site(self) -> Site:
        return Site.open(self.site_root)


def choose_point(site: Site, protected: str, wanted: str | None) -> int:
    """The seq of ``protected``'s point named by ``wanted``: ``latest``/None, a seq (``7`` or
    ``#7``), or a time (ISO 8601; the newest point captured at or before it)."""
    points = site.points(protected)
    if not points:
        raise UsageError(f"machine {protected} has no recovery point yet: run `p2v sync {protected}` first")
    if wanted in (None, "", "latest"):
        return points[-1].seq
    text = wanted.lstrip("#")
    if text.isdigit():
        seq = int(text)
        if seq not in {p.seq for p in points}:
            have = ", ".join(str(p.seq) for p in points)
            raise UsageError(f"machine {protected} has no point {seq} (points: {have})")
        return seq
    try:
        when = dt.datetime.fromisoformat(wanted)
    except ValueError:
        raise UsageError(f"--point {wanted!r}: use latest, a point number, or a time like 2026-11-21T14:00") from None
    if when.tzinfo is None:
        when = when.astimezone()
    limit = when.timestamp()
    older = [p for p in points if p.created_at <= limit]
    if not older:
        oldest = dt.datetime.fromtimestamp(points[0].created_at).isoformat(timespec="seconds")
        raise UsageError(f"machine {protected} has no point captured at or before {wanted} (oldest: {oldest})")
    return older[-1].seq


def _forward_ports(node: PlanNode) -> list[int]:
    return sorted({c.port for c in node.checks if isinstance(c, TcpCheck | SshCheck | HttpCheck)})


# -- prepare -----------------------------------------------------------------------------------


def prepare(rc: RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """Overlay on the chosen point, converted in place; the point is pinned for the run."""
    assert node.machine is not None and node.protected is not None
    pm = rc.plan.machines[node.machine]
    with rc.site() as site:
        seq = ctx.previous.get("seq") or choose_point(site, node.protected, rc.options.get("point"))
        ctx.checkpoint({"seq": seq})
        extra: dict[str, str] = {}
        if pm.network.address:
            mac1 = segment_mac(f"{rc.run_id}:{pm.network.segment}", node.machine)
            extra = segment_config_files("", guest_nic_name(), mac1, pm.network.address, pm.network.gateway)
        settings = RecoverySettings(
            vm_name=rc.vm_name(node.machine), cpus=pm.cpus, memory_mib=(pm.memory >> 20) if pm.memory else None,
            extra_files=extra, drill=rc.drill, pin_holder=rc.holder(node.machine),
        )  # fmt: skip
        t = time.monotonic()
        rvm = prepare_recovery_vm(site, node.protected, seq, rc.workdir, settings,
                                  on_step=lambda s: ctx.log("prepare", step=s))  # fmt: skip
    point = dict(rvm.point)
    point.pop("layers", None)
    return {"seq": seq, "point": point, "vm": rvm.vm_name, "seconds": round(time.monotonic() - t, 2),
            "conversion": {"timings": rvm.conversion.get("timings", {}),
                           "bytes_allocated": rvm.conversion.get("bytes_allocated", 0)}}  # fmt: skip


# -- boot --------------------------------------------------------------------------------------


def boot(rc: RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """Start the prepared VM (detached: it outlives the orchestrator; resume finds it)."""
    assert node.machine is not None
    pm = rc.plan.machines[node.machine]
    rvm = load_recovery_vm(rc.workdir, rc.vm_name(node.machine))
    if rvm is None:
        raise StepFailure(f"machine {node.machine}: its prepared recovery VM is missing from {rc.workdir}",
                          hint="the run's work folder was removed; start a new run")  # fmt: skip
    spec = VmSpec.load(Path(rvm.spec_path))
    net = DrillNetwork(f"{rc.run_id}:{pm.network.segment}")
    mac1 = segment_mac(f"{rc.run_id}:{pm.network.segment}", node.machine)
    ports: dict[int, int] = {int(k): int(v) for k, v in ctx.previous.get("ports", {}).items()}
    if ports:  # resumed: the VM may still run with these ports; if it is gone, boot it with them again
        args = _args_with_ports(net, node.machine, spec.nics[0].mac, mac1, ports)
    else:
        args, ports = net.nic_args(node.machine, spec.nics[0].mac, mac1, _forward_ports(node))
        ctx.checkpoint({"ports": {str(k): v for k, v in ports.items()}})
    if not rc.drill:  # failover: the management NIC is not cut off (user networking, outbound allowed)
        args = [a.replace(",restrict=on", "") for a in args]
    overrides = RunOverrides(nic_args=tuple(args))
    booted = boot_recovery_vm(rvm, overrides=overrides, detached=True)
    detail = {"vm": booted.name, "pid": booted.pid, "resumed": booted.resumed, "console_log": booted.console_log,
              "agent_socket": booted.agent_socket, "qmp_socket": booted.qmp_socket,
              "ports": {str(k): v for k, v in ports.items()}, "ssh_port": booted.ssh_port,
              "point": {k: v for k, v in rvm.point.items() if k != "layers"}}  # fmt: skip
    ctx.checkpoint(detail)
    return detail


def vm_gone(detail: dict[str, Any]) -> str | None:
    """Why the VM a boot step started (its ``detail``) no longer runs; None while it does.

    Used on resume (``StepDef.still_valid``: a dead VM is booted again) and while checks wait
    (a VM that died fails its checks at once instead of after their timeout)."""
    name = detail.get("vm")
    if not name:
        return None
    try:
        vm_detached.get_vm(str(name))
        return None
    except VmError:
        pass
    last = ""
    try:
        lines = Path(detail["console_log"]).read_text(errors="replace").strip().splitlines()
        last = f"; the last console line: {lines[-1].strip()[:200]!r}" if lines else "; its console log is empty"
    except (KeyError, OSError):
        pass
    return f"VM {name} (QEMU pid {detail.get('pid')}) is no longer running{last}"


class _VmWatch:
    """``cancelled`` for the checks: true once the step is cancelled or the VM has died."""

    def __init__(self, ctx: StepContext, boot_detail: dict[str, Any]) -> None:
        self._ctx, self._boot = ctx, boot_detail
        self._next = 0.0
        self.gone: str | None = None

    def __call__(self) -> bool:
        if self.gone is None and time.monotonic() >= self._next:
            self._next = time.monotonic() + GONE_POLL_S
            self.gone = vm_gone(self._boot)
        return self.gone is not None or self._ctx.cancelled()


def _args_with_ports(net: DrillNetwork, machine: str, mac0: str, mac1: str, ports: dict[int, int]) -> list[str]:
    """The same NIC arguments as the first attempt, reusing its host ports."""
    args, _ = net.nic_args(machine, mac0, mac1, [p for p in ports if p != 22], host_ports=ports)
    return args


# -- checks ------------------------------------------------------------------------------------


def check(rc: RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """Run the machine's health checks in order; the first failure fails the step."""
    assert node.machine is not None
    b = ctx.detail_of(f"boot:{node.machine}")
    identity = rc.options.get("identity")
    qmp_sock = Path(b["qmp_socket"]) if b.get("qmp_socket") else None
    conn: QmpConnection | None = None
    usernet = None
    if qmp_sock is not None:
        conn = QmpConnection(qmp_sock, vm_name=b["vm"])
        try:
            conn.connect()
            c = conn
            usernet = usernet_reader(lambda cmd, **a: c.execute(cmd, a))
        except VmError as exc:
            log.info("%s: no QMP for usernet states: %s", b["vm"], exc.message)
            conn = None
    target = CheckTarget(
        machine=node.machine, ports={int(k): int(v) for k, v in b.get("ports", {}).items()},
        console_log=Path(b["console_log"]) if b.get("console_log") else None,
        agent_socket=Path(b["agent_socket"]) if b.get("agent_socket") else None,
        ssh_identity=Path(identity) if identity else None, usernet=usernet,
    )  # fmt: skip
    t0 = time.monotonic()
    watch = _VmWatch(ctx, b)
    try:
        results = run_checks(node.checks, target, cancelled=watch)
    finally:
        if conn is not None:
            conn.close()
    detail = {"results": [r.to_dict() for r in results], "seconds": round(time.monotonic() - t0, 2),
              "passed_at": time.time()}  # fmt: skip
    if watch.gone:
        raise StepFailure(f"machine {node.machine}: {watch.gone}", detail=detail,
                          hint=f"`p2v run resume {rc.run_id}` boots it again and repeats its checks")  # fmt: skip
    failed = [r for r in results if not r.ok]
    if failed:
        raise StepFailure(f"machine {node.machine}: check {failed[0].check} failed: {failed[0].message}",
                          detail=detail)  # fmt: skip
    return detail


# -- hooks -------------------------------------------------------------------------------------


def hook(rc: RunContext, node: PlanNode, ctx: StepContext) -> dict[str, Any]:
    """Run a shell hook on the DR host (argument list, no shell) from the plan's folder."""
    env_run = {"P2V_RUN": str(rc.run_id), "P2V_PLAN": rc.plan.name, "P2V_SITE": str(rc.site_root)}
    import os

    timeout = float(node.timeout or HOOK_TIMEOUT_S)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(list(node.command), cwd=rc.plan_dir, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env_run}, check=False)  # fmt: skip
    except FileNotFoundError as exc:
        raise StepFailure(f"hook {node.name}: command not found: {node.command[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise StepFailure(f"hook {node.name}: still running after {timeout:.0f}s: killed") from exc
    detail = {"exit": proc.returncode, "seconds": round(time.monotonic() - t0, 2),
              "stdout": proc.stdout[-OUTPUT_TAIL:], "stderr": proc.stderr[-OUTPUT_TAIL:]}  # fmt: skip
    if proc.returncode != 0:
        raise StepFailure(f"hook {node.name}: {' '.join(node.command)} exited {proc.returncode}: "
                          f"{proc.stderr.strip()[-300:]}", detail=detail)  # fmt: skip
    return detail


# -- teardown ----------------------------------------------------------------------------------


def teardown(rc: RunContext, machines: list[str], ctx: StepContext) -> dict[str, Any]:
    """Stop every VM of the run, remove its overlays and work folder, release its pins."""
    removed: list[str] = []
    errors: list[str] = []
    for m in machines:
        rvm = load_recovery_vm(rc.workdir, rc.vm_name(m))
        if rvm is None:
            continue
        try:
            removed += discard_recovery_vm(rvm, hard=True)
        except P2VError as exc:
            errors.append(f"{m}: {exc.message}")
    shutil.rmtree(rc.workdir, ignore_errors=True)
    with rc.site() as site:
        released = pins.release_pins(site, f"run:{rc.run_id}:")
    if errors:
        raise StepFailure("cleanup incomplete: " + "; ".join(errors), detail={"removed": removed})
    return {"removed": len(removed), "pins_released": released, "workdir_removed": not rc.workdir.exists()}
