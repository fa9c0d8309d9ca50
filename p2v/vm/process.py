"""Control of one running QEMU process: liveness, QMP, and the stop sequence.

Used both for a QEMU this Python process started (a :class:`subprocess.Popen`
child) and for a detached one found again from its pid and run directory.
Stopping goes from gentle to certain: ACPI power button (the guest shuts
down), then QMP ``quit``, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from p2v.errors import VmError
from p2v.vm.qmp import QmpConnection

StopMethod = Literal["powerdown", "quit", "kill", "not-running"]

QMP_STOP_TIMEOUT_S = 5.0  # for the powerdown and quit commands themselves
QUIT_WAIT_S = 10.0
TERM_WAIT_S = 5.0
KILL_WAIT_S = 10.0
_POLL_S = 0.1


@dataclass
class StopResult:
    """How a VM stopped: ``powerdown`` (the guest shut down), ``quit`` (QMP quit), ``kill`` (signal)."""

    name: str
    method: StopMethod
    seconds: float
    exit_code: int | None = None
    console_log: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has ended: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def pid_running(pid: int) -> bool:
    """:func:`pid_alive`, reaping ``pid`` first if it is our own child that has exited."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return pid_alive(pid)


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


class QemuProcess:
    """A QEMU process known by pid (and, when it is our child, by its Popen object)."""

    def __init__(
        self,
        name: str,
        pid: int,
        qmp_socket: Path,
        *,
        popen: subprocess.Popen[bytes] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.pid = pid
        self.qmp_socket = qmp_socket
        self.popen = popen
        self.log = logger or logging.getLogger(__name__).getChild(name)
        self._qmp: QmpConnection | None = None
        self._qmp_lock = threading.RLock()  # one QMP exchange at a time, whatever the thread
        self.exit_code: int | None = None

    # -- liveness --------------------------------------------------------------
    def alive(self) -> bool:
        if self.popen is not None:
            code = self.popen.poll()
            if code is not None:
                self.exit_code = code
                return False
            return True
        return pid_running(self.pid)

    def wait_exit(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: no limit) for the process to end; True when it has."""
        if self.popen is not None:
            try:
                self.exit_code = self.popen.wait(timeout=None if timeout is None else max(0.0, timeout))
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid_running(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return True

    # -- QMP -------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        if self._qmp is not None and self._qmp.connected:
            return
        conn = QmpConnection(self.qmp_socket, vm_name=self.name)
        try:
            conn.connect(timeout)
        except VmError:
            conn.close()
            raise
        self._qmp = conn

    def disconnect(self) -> None:
        with self._qmp_lock:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None

    def qmp(
        self, command: str, arguments: dict[str, object] | None = None, timeout: float | None = None
    ) -> Any:
        """Run a QMP command, connecting first when needed."""
        if not self.alive():
            raise VmError(f"VM {self.name}: QMP command {command!r}: QEMU (pid {self.pid}) is not running")
        with self._qmp_lock:
            self.connect(timeout if timeout is not None else 10.0)
            assert self._qmp is not None
            try:
                return self._qmp.execute(command, arguments, timeout)
            except VmError:
                self.disconnect()  # the session may be broken: the next command reconnects
                raise

    # -- stopping --------------------------------------------------------------
    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.popen is not None:
                self.popen.send_signal(sig)
            else:
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 60.0, hard: bool = False) -> StopResult:
        """Stop QEMU: power button (unless ``hard``), then QMP quit, then SIGTERM, then SIGKILL.

        The QMP connection is closed whatever happens. Raises :class:`VmError`
        only when even SIGKILL does not end the process.
        """
        t0 = time.monotonic()
        method: StopMethod | None = None
        try:
            if not self.alive():
                method = "not-running"
            if method is None and not hard:
                try:
                    self.qmp("system_powerdown", timeout=QMP_STOP_TIMEOUT_S)
                    self.log.info("sent ACPI power button, waiting up to %.0fs", timeout)
                    if self.wait_exit(timeout):
                        method = "powerdown"
                    else:
                        self.log.info("guest did not power off within %.0fs, sending quit", timeout)
                except VmError as exc:
                    self.log.info("powerdown failed: %s", exc.message)
            if method is None and self.alive():
                try:
                    self.qmp("quit", timeout=QMP_STOP_TIMEOUT_S)
                except VmError as exc:  # QEMU may hang up before it answers
                    self.log.debug("quit: %s", exc.message)
                if self.wait_exit(QUIT_WAIT_S):
                    method = "quit"
            elif method is None:
                method = "powerdown" if not hard else "quit"
        finally:
            self.disconnect()
            if method is None:
                method = self._kill()
        return StopResult(self.name, method, round(time.monotonic() - t0, 2), self.exit_code)

    def _kill(self) -> StopMethod:
        if not self.alive():
            return "quit"
        self.log.warning("QEMU pid %d still running, sending SIGTERM", self.pid)
        self._signal(signal.SIGTERM)
        if self.wait_exit(TERM_WAIT_S):
            return "kill"
        self.log.warning("QEMU pid %d ignored SIGTERM, sending SIGKILL", self.pid)
        self._signal(signal.SIGKILL)
        if not self.wait_exit(KILL_WAIT_S):
            raise VmError(f"VM {self.name}: QEMU pid {self.pid} survived SIGKILL (stuck in the kernel?)")
        return "kill"
