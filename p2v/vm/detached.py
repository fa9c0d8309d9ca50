"""VMs that run in the background, found again by name (``p2v vm start|stop|list|console``).

Each lives in ``state_dir()/vms/<name>/`` with an ``info.json`` (see
:class:`VmInfo`), the console log, the QMP/console/agent sockets, and the
overlays of a ``--snapshot`` run. QEMU daemonizes itself, so it outlives the
command that started it. A pid alone is not trusted: a VM counts as running
only when that pid's command line still names this VM's QMP socket.

When a VM is stopped its run directory is removed, after its console log is
kept as ``state_dir()/logs/<name>.console.log`` (evidence of the last run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from p2v.errors import UsageError, VmError
from p2v.paths import state_dir
from p2v.vm.accel import AccelVerdict
from p2v.vm.cmdline import RunOverrides, run_files
from p2v.vm.console import attach, follow
from p2v.vm.process import QemuProcess, StopResult, pid_cmdline, pid_running
from p2v.vm.qmp import QmpConnection
from p2v.vm.runtime import VirtualMachine, remove_run_files
from p2v.vm.spec import VmSpec

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LOGIN_PROMPT = r"login:\s*$"


@dataclass
class VmInfo:
    """What ``info.json`` records about a detached VM; ``state``/``status`` are filled by :func:`list_vms`."""

    name: str
    pid: int
    spec_path: str
    run_dir: str
    ssh_port: int | None
    qmp_socket: str
    console_socket: str
    guest_agent_socket: str
    console_log: str
    started_at: str
    accel: dict[str, Any]
    snapshot: bool = False
    command: list[str] = field(default_factory=list)
    state: str = "running"  # "running" or "dead"
    status: str | None = None  # QEMU's run state from QMP (running, paused, ...) when it answered

    @property
    def ssh_command(self) -> str | None:
        return f"ssh -p {self.ssh_port} root@127.0.0.1" if self.ssh_port else None

    @property
    def accel_summary(self) -> str:
        try:
            return AccelVerdict(**self.accel).summary
        except TypeError:
            return str(self.accel.get("accel", "?"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ssh_command"] = self.ssh_command
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def vms_dir() -> Path:
    d = state_dir() / "vms"
    d.mkdir(parents=True, exist_ok=True)
    return d


def saved_console_log(name: str) -> Path:
    """Where the console log of ``name``'s last stopped run is kept."""
    return state_dir() / "logs" / f"{name}.console.log"


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(
            f"bad VM name {name!r}: use letters, digits, '.', '_' or '-' (at most 63, not leading)"
        )
    return name


@contextlib.contextmanager
def _name_lock(name: str) -> Iterator[None]:
    """Serialize start/stop of one name across processes."""
    with (vms_dir() / f".{name}.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_info(run_dir: Path) -> VmInfo | None:
    try:
        return VmInfo.from_dict(json.loads((run_dir / "info.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_info(info: VmInfo) -> None:
    path = Path(info.run_dir) / "info.json"
    tmp = path.with_name("info.json.tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    tmp.replace(path)


def _is_our_qemu(pid: int, qmp_socket: Path) -> bool:
    return pid_running(pid) and any(str(qmp_socket) in arg for arg in pid_cmdline(pid))


def _running_pid(run_dir: Path) -> int | None:
    """The pid of the QEMU running from ``run_dir`` (by info.json or QEMU's pidfile), else None."""
    files = run_files(run_dir)
    candidates: list[int] = []
    info = _read_info(run_dir)
    if info is not None:
        candidates.append(info.pid)
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int(files.pidfile.read_text().strip()))
    for pid in candidates:
        if _is_our_qemu(pid, files.qmp_socket):
            return pid
    return None


def _keep_console_log(run_dir: Path, name: str) -> Path | None:
    """Copy the console log of ``run_dir`` to the saved logs; None when there is none."""
    log_file = run_files(run_dir).console_log
    if not log_file.exists():
        return None
    kept = saved_console_log(name)
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log_file, kept)
    return kept


def _remove_run_dir(run_dir: Path) -> None:
    remove_run_files(run_files(run_dir), overlays=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def start_vm(
    spec_path: Path,
    *,
    name: str | None = None,
    overrides: RunOverrides | None = None,
    wait_for: str | None = None,
    wait_timeout: float = 300.0,
    accel: AccelVerdict | None = None,
) -> VmInfo:
    """Start the VM of ``spec_path`` in the background and return its :class:`VmInfo`.

    ``wait_for`` is a console regex to wait for (e.g. :data:`LOGIN_PROMPT`)
    for up to ``wait_timeout`` seconds; on timeout the VM is left running for
    inspection and :class:`VmError` says so. Refuses (``VmError``) when a VM of
    that name is running; a dead VM's leftover run directory is removed first.
    """
    spec = VmSpec.load(spec_path)
    name = _check_name(name or spec.name)
    spec_path = spec_path.absolute()
    with _name_lock(name):
        run_dir = vms_dir() / name
        pid = _running_pid(run_dir)
        if pid is not None:
            raise VmError(
                f"VM {name} is already running (pid {pid})",
                hint=f"stop it with `p2v vm stop {name}` or start another copy with --name",
            )
        if run_dir.exists():
            kept = _keep_console_log(run_dir, name)
            log.info("removing the run directory of dead VM %s%s", name, f" (console log kept: {kept})" if kept else "")
            _remove_run_dir(run_dir)
        vm = VirtualMachine(
            spec,
            spec_path.parent,
            run_dir=run_dir,
            overrides=overrides,
            accel=accel,
            name=name,
            detached=True,
        )
        vm.launch()
        files = vm.files
        info = VmInfo(
            name=name,
            pid=vm.pid or 0,
            spec_path=str(spec_path),
            run_dir=str(files.run_dir),
            ssh_port=vm.ssh_port,
            qmp_socket=str(files.qmp_socket),
            console_socket=str(files.console_socket),
            guest_agent_socket=str(files.guest_agent_socket),
            console_log=str(files.console_log),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            accel=asdict(vm.accel),
            snapshot=vm.overrides.snapshot,
            command=vm.command,
        )
        _write_info(info)
    if wait_for:
        try:
            vm.wait_for_console(wait_for, wait_timeout)
        except VmError as exc:
            raise VmError(
                exc.message, hint=f"the VM is left running: `p2v vm console {name}` or `p2v vm stop {name}`"
            ) from exc
    return info


def get_vm(name: str) -> VmInfo:
    """The running VM ``name``; :class:`VmError` when there is none."""
    _check_name(name)
    run_dir = vms_dir() / name
    info = _read_info(run_dir)
    if info is None or _running_pid(run_dir) is None:
        raise VmError(f"no running VM named {name}", hint="`p2v vm list` shows the VMs started here")
    return info


def stop_vm(name: str, timeout: float = 60.0, force: bool = False) -> StopResult:
    """Stop VM ``name`` (power button, then quit, then kill; ``force`` skips the power button).

    The run directory is removed and the console log kept (``StopResult.console_log``).
    A VM that already died is just cleaned up (method ``not-running``).
    """
    _check_name(name)
    run_dir = vms_dir() / name
    with _name_lock(name):
        info = _read_info(run_dir)
        if info is None and not run_dir.exists():
            raise VmError(f"no VM named {name}", hint="`p2v vm list` shows the VMs started here")
        pid = _running_pid(run_dir)
        if pid is None:
            result = StopResult(name, "not-running", 0.0)
        else:
            proc = QemuProcess(name, pid, run_files(run_dir).qmp_socket, logger=log.getChild(name))
            result = proc.stop(timeout=timeout, hard=force)
        kept = _keep_console_log(run_dir, name)
        if kept is not None:
            result.console_log = str(kept)
        _remove_run_dir(run_dir)
    return result


def _qmp_status(info: VmInfo, timeout: float = 3.0) -> str | None:
    conn = QmpConnection(Path(info.qmp_socket), vm_name=info.name, timeout=timeout)
    try:
        conn.connect(timeout)
        status = conn.execute("query-status")
        return str(status.get("status")) if isinstance(status, dict) else None
    except VmError as exc:
        log.info("%s", exc.message)
        return None
    finally:
        conn.close()


def list_vms(query_qmp: bool = True) -> list[VmInfo]:
    """All VMs with a run directory here, each with ``state`` (running/dead) and QMP ``status``."""
    found: list[VmInfo] = []
    for run_dir in sorted(p for p in vms_dir().iterdir() if p.is_dir()):
        info = _read_info(run_dir)
        if info is None:
            continue
        if _running_pid(run_dir) is None:
            info.state, info.status = "dead", None
        else:
            info.state = "running"
            info.status = _qmp_status(info) if query_qmp else None
        found.append(info)
    return found


def attach_console(name: str, *, stdin_fd: int = 0, stdout_fd: int = 1) -> str:
    """Attach the terminal to VM ``name``'s serial console until Ctrl-]; see :func:`p2v.vm.console.attach`."""
    info = get_vm(name)
    return attach(Path(info.console_socket), stdin_fd=stdin_fd, stdout_fd=stdout_fd, vm_name=name)


def console_log_path(name: str) -> Path:
    """The console log of the running VM ``name``, else the one kept from its last run."""
    _check_name(name)
    info = _read_info(vms_dir() / name)
    if info is not None and Path(info.console_log).exists():
        return Path(info.console_log)
    kept = saved_console_log(name)
    if kept.exists():
        return kept
    raise VmError(f"no console log for VM {name}", hint="`p2v vm list` shows the VMs started here")


def follow_console(name: str, from_start: bool = True) -> Iterator[str]:
    """Yield the console log of ``name`` as it grows, until the VM stops."""
    path = console_log_path(name)
    run_dir = vms_dir() / name
    if not path.is_relative_to(run_dir):
        yield from follow(path, from_start=from_start, keep_going=lambda: False)
        return
    yield from follow(path, from_start=from_start, keep_going=lambda: _running_pid(run_dir) is not None)
