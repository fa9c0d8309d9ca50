"""Run a VM spec under QEMU: :class:`VirtualMachine`.

``with VirtualMachine(spec, spec_dir) as vm:`` starts QEMU, and stops it and
removes its sockets and throw-away overlays when the block ends, even on
Ctrl-C. A VM that is not *detached* also dies with the Python process that
started it (``PR_SET_PDEATHSIG``), so a crash never leaves QEMU behind; a
detached one (``p2v vm start``, see :mod:`p2v.vm.detached`) is daemonized by
QEMU itself and outlives its starter by design.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from p2v.errors import MissingComponent, SourceNotFound, VmError
from p2v.vm.accel import AccelVerdict, probe, qemu_binary
from p2v.vm.cmdline import RunFiles, RunOverrides, build_command, run_files
from p2v.vm.console import ConsoleLog, tail_file
from p2v.vm.firmware import find_ovmf
from p2v.vm.process import QemuProcess, StopResult
from p2v.vm.spec import VmSpec

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT_S = 60.0
PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_PRCTL = _LIBC.prctl
_LAUNCHER: ThreadPoolExecutor | None = None
_LAUNCHER_LOCK = threading.Lock()


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def make_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or accept it when it is ours; refuse a foreign or linked one."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.getuid():
        raise VmError(f"{path}: run directory is a link or belongs to another user; remove it")


def remove_run_files(files: RunFiles, *, overlays: bool) -> None:
    for p in [*files.sockets(), files.pidfile]:
        p.unlink(missing_ok=True)
    if overlays:
        for p in files.run_dir.glob("overlay-*.qcow2"):
            p.unlink(missing_ok=True)
    if files.socket_dir != files.run_dir:
        shutil.rmtree(files.socket_dir, ignore_errors=True)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            process_group=0,  # Ctrl-C in the terminal reaches us, not QEMU: we stop it in order
            preexec_fn=_die_with_parent(os.getpid()),
        )


def _spawn_from_launcher(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so fork from one
    # thread that lives as long as the process, not from a short-lived worker.
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None:
            _LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2v-qemu-launcher")
    return _LAUNCHER.submit(_spawn, cmd, log_path).result()


def create_overlay(backing: Path, backing_format: str, overlay: Path) -> None:
    """A qcow2 overlay over ``backing`` (which is never written)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise MissingComponent("qemu-img not found on PATH", hint="apt-get install qemu-utils")
    proc = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing.absolute()),
         str(overlay)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise VmError(f"{backing}: cannot create a snapshot overlay: {proc.stderr.strip()}")


class VirtualMachine:
    """One QEMU process running ``spec``; see the module docstring.

    ``run_dir`` holds the console log, sockets, per-VM UEFI variables and
    overlays; by default a temporary folder removed at shutdown (the console
    text stays readable through :meth:`console_text`).
    """

    def __init__(
        self,
        spec: VmSpec,
        spec_dir: Path,
        *,
        run_dir: Path | None = None,
        overrides: RunOverrides | None = None,
        accel: AccelVerdict | None = None,
        name: str | None = None,
        detached: bool = False,
        qemu: str | None = None,
        launch_timeout: float = LAUNCH_TIMEOUT_S,
        shutdown_timeout: float = 60.0,
    ) -> None:
        self.name = name or spec.name
        self.spec = spec if self.name == spec.name else spec.model_copy(update={"name": self.name})
        self.spec_dir = spec_dir
        self.overrides = overrides or RunOverrides()
        self.detached = detached
        self.launch_timeout = launch_timeout
        self.shutdown_timeout = shutdown_timeout
        self.log = log.getChild(self.name)
        self._accel = accel
        self._qemu = qemu
        self._run_dir_given = run_dir
        self._own_run_dir = run_dir is None
        self._files: RunFiles | None = None
        self._process: QemuProcess | None = None
        self._console: ConsoleLog | None = None
        self._state = VmState.CREATED
        self.command: list[str] = []
        self.ssh_port: int | None = None

    # -- properties --------------------------------------------------------------
    @property
    def state(self) -> VmState:
        return self._state

    @property
    def accel(self) -> AccelVerdict:
        if self._accel is None:
            self._accel = probe()
        return self._accel

    @property
    def files(self) -> RunFiles:
        if self._files is None:
            raise VmError(f"VM {self.name}: not launched yet, it has no run directory")
        return self._files

    @property
    def run_dir(self) -> Path:
        return self.files.run_dir

    @property
    def console_log(self) -> Path:
        return self.files.console_log

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _require(self, *states: VmState, action: str) -> None:
        if self._state not in states:
            raise VmError(f"VM {self.name}: cannot {action} in state {self._state.value}")

    # -- launch ------------------------------------------------------------------
    def launch(self) -> None:
        """Start QEMU and wait until QMP answers. On failure nothing is left running."""
        self._require(VmState.CREATED, action="launch")
        try:
            self._prepare()
            self._start()
        except BaseException:
            self._state = VmState.FAILED
            if self._process is not None:
                with contextlib.suppress(VmError):
                    self._process.stop(timeout=0, hard=True)
            self._cleanup()
            raise
        self._state = VmState.RUNNING
        self.log.info("running: pid %s, accel %s, ssh port %s", self.pid, self.accel.accel, self.ssh_port)

    def _prepare(self) -> None:
        for path in self.spec.disk_paths(self.spec_dir):
            if not path.exists():
                raise SourceNotFound(f"VM {self.name}: disk {path} not found")
        if self._qemu is None:
            self._qemu = qemu_binary()
            if self._qemu is None:
                raise MissingComponent(
                    "qemu-system-x86_64 not found on PATH", hint="apt-get install qemu-system-x86"
                )
        if self._run_dir_given is None:
            run_dir = Path(tempfile.mkdtemp(prefix=f"p2v-vm-{self.name}-"))
        else:
            run_dir = self._run_dir_given
            make_private_dir(run_dir)
        self._files = files = run_files(run_dir)
        remove_run_files(files, overlays=self.overrides.snapshot)  # leftovers of an earlier run
        if files.socket_dir != files.run_dir:
            make_private_dir(files.socket_dir)
        if self.spec.firmware == "uefi" and not files.vars_file.exists():
            shutil.copyfile(find_ovmf().vars_template, files.vars_file)
        if self.overrides.snapshot:
            paths = self.spec.disk_paths(self.spec_dir)
            for i, (disk, path) in enumerate(zip(self.spec.disks, paths, strict=True)):
                create_overlay(path, disk.format, files.overlay(i))
        self._console = ConsoleLog(files.console_log)
        self._console.read_new()  # an existing log (reused run dir): wait only for new output

    def _start(self) -> None:
        files = self.files
        auto_port = self.overrides.ssh_port is None and bool(self.spec.nics)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_tcp_port() if auto_port else self.overrides.ssh_port
            self.ssh_port = port if self.spec.nics else None
            assert self._qemu is not None
            self.command = build_command(
                self.spec, self.spec_dir, files.run_dir, accel=self.accel,
                overrides=replace(self.overrides, ssh_port=self.ssh_port), qemu=self._qemu,
            )  # fmt: skip
            if self.detached:
                self.command.append("-daemonize")
            self.log.debug("command: %s", self.command)
            log_start = files.qemu_log.stat().st_size if files.qemu_log.exists() else 0
            try:
                self._spawn_and_connect()
                return
            except VmError:
                qemu_said = self._qemu_log_since(log_start)
                if auto_port and attempt < PORT_ATTEMPTS and "forwarding" in qemu_said.lower():
                    self.log.info("ssh port %s was taken, retrying with another", port)
                    self._process = None
                    continue
                raise

    def _qemu_log_since(self, offset: int) -> str:
        try:
            with self.files.qemu_log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def _failure(self, what: str, log_start: int) -> VmError:
        said = self._qemu_log_since(log_start)
        detail = said.splitlines()[-5:] if said else ["(QEMU printed nothing)"]
        return VmError(f"VM {self.name}: {what}: " + " | ".join(detail))

    def _spawn_and_connect(self) -> None:
        files = self.files
        log_start = files.qemu_log.stat().st_size if files.qemu_log.exists() else 0
        if self.detached:
            try:
                with files.qemu_log.open("ab") as out:
                    done = subprocess.run(
                        self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        start_new_session=True, timeout=self.launch_timeout, check=False,
                    )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                what = f"QEMU did not finish starting within {self.launch_timeout:.0f}s"
                raise self._failure(what, log_start) from exc
            if done.returncode != 0:
                raise self._failure(f"QEMU failed to start (exit status {done.returncode})", log_start)
            try:
                pid = int(files.pidfile.read_text().strip())
            except (OSError, ValueError) as exc:
                raise self._failure(f"QEMU started but wrote no pid to {files.pidfile}", log_start) from exc
            self._process = QemuProcess(self.name, pid, files.qmp_socket, logger=self.log)
        else:
            popen = _spawn_from_launcher(self.command, files.qemu_log)
            self._process = QemuProcess(self.name, popen.pid, files.qmp_socket, popen=popen, logger=self.log)
        deadline = time.monotonic() + self.launch_timeout
        while True:
            if not self._process.alive():
                code = self._process.exit_code
                raise self._failure(f"QEMU exited during start-up (status {code})", log_start)
            if files.qmp_socket.exists():
                try:
                    self._process.connect(timeout=5.0)
                    break
                except VmError:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise self._failure(f"QMP did not answer within {self.launch_timeout:.0f}s", log_start)
            time.sleep(0.05)
        self._process.qmp("query-status")
        if self.detached:
            self._process.disconnect()  # leave the monitor free for `p2v vm stop` & co.

    # -- running -----------------------------------------------------------------
    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its result; :class:`VmError` on failure."""
        self._require(VmState.RUNNING, action=f"run QMP command {command!r}")
        assert self._process is not None
        try:
            return self._process.qmp(command, arguments or None)
        finally:
            if self.detached:
                self._process.disconnect()

    def is_running(self) -> bool:
        return self._state == VmState.RUNNING and self._process is not None and self._process.alive()

    def console_text(self) -> str:
        """Everything the guest printed on its serial console so far (also after shutdown)."""
        if self._console is None:
            return ""
        self._console.read_new()
        return self._console.text

    def wait_for_console(self, regex: str | re.Pattern[str], timeout: float) -> str:
        """Wait until the console shows ``regex`` (searched after the previous match); return the match.

        Raises :class:`VmError` with the last console lines on timeout or when QEMU exits first.
        """
        self._require(VmState.RUNNING, action="wait for the console")
        assert self._console is not None and self._process is not None
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        while True:
            alive = self._process.alive()
            self._console.read_new()
            m = self._console.search(pattern)
            if m:
                return m.group(0)
            if not alive:
                self._state = VmState.FAILED
                raise VmError(
                    f"VM {self.name}: QEMU exited (status {self._process.exit_code}) before the console "
                    f"showed /{pattern.pattern}/; last console lines:\n{self._console.tail()}"
                )
            if time.monotonic() >= deadline:
                raise VmError(
                    f"VM {self.name}: console did not show /{pattern.pattern}/ within {timeout:.0f}s; "
                    f"last console lines:\n{self._console.tail()}"
                )
            time.sleep(0.2)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit on its own (guest powered off); return its exit status when known."""
        self._require(VmState.RUNNING, VmState.FAILED, action="wait")
        assert self._process is not None
        if not self._process.wait_exit(timeout):
            raise VmError(f"VM {self.name}: still running after {timeout}s")
        self._finish()
        return self._process.exit_code

    # -- stopping ----------------------------------------------------------------
    def shutdown(self, timeout: float = 60.0, hard: bool = False) -> StopResult:
        """Stop the VM (power button, then QMP quit, then signals) and always clean up.

        ``hard`` skips the power button. Calling it on a VM that is not running is a no-op.
        """
        if self._state is not VmState.RUNNING or self._process is None:
            if self._state is VmState.FAILED:
                self._finish()
            code = self._process.exit_code if self._process else None
            return StopResult(self.name, "not-running", 0.0, code)
        try:
            result = self._process.stop(timeout=timeout, hard=hard)
        finally:
            self._finish()
        self.log.info("stopped by %s in %.1fs", result.method, result.seconds)
        if not self._own_run_dir:
            result.console_log = str(self.files.console_log)
        return result

    def _finish(self) -> None:
        if self._state is VmState.RUNNING:
            self._state = VmState.STOPPED
        if self._process is not None:
            self._process.disconnect()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._files is None:
            return
        if self._process is not None and self._process.alive():
            return  # never pull files from under a running QEMU (detached launch that succeeded)
        if self._console is not None:
            self._console.read_new()
        remove_run_files(self._files, overlays=self.overrides.snapshot)
        if self._own_run_dir:
            shutil.rmtree(self._files.run_dir, ignore_errors=True)

    def console_tail(self, lines: int = 20) -> str:
        if self._console is not None:
            self._console.read_new()
            return self._console.tail(lines)
        return tail_file(self.files.console_log, lines) if self._files else ""

    # -- context manager ---------------------------------------------------------
    def __enter__(self) -> VirtualMachine:
        self.launch()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.shutdown(timeout=self.shutdown_timeout)
        else:  # an error or Ctrl-C: do not wait for the guest
            self.shutdown(timeout=0, hard=True)
