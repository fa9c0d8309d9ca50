"""Production sources during failover: is a protected source still up, and stopping it.

Every kind a machine can be protected from is handled:

- ``ssh://USER@HOST[:PORT]/DEV`` (a physical server): *reachable* when the port answers with
  an SSH banner (a TCP forwarder whose far end is gone accepts, but sends no banner);
  *stopped* by ``systemctl poweroff`` (``poweroff`` without systemd) over SSH, then waiting
  until the banner stops. A non-root user runs it through ``sudo -n``.
- ``qemu:///PATH/qmp.sock?node=N`` (a drive of a running QEMU): *reachable* while the QMP
  socket accepts a connection (a connection queued behind another QMP client counts: the
  process is alive); *stopped* by QMP ``system_powerdown``, waiting for QEMU to exit (or, for a
  QEMU run with ``-no-shutdown``, for its status to become ``shutdown``: the guest is off and
  its drives can still be read for a final sync), then QMP ``quit`` at the timeout, then
  SIGTERM/SIGKILL of the socket's owner.
- an image file: reachable when it exists; nothing to stop.

Stopping is idempotent: a source that already does not answer is reported ``already-stopped``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2v.errors import RemoteError, VmError
from p2v.protection.sources import SshOptions, source_kind
from p2v.replication.qemu_live import parse_qemu_url
from p2v.sources.ssh import parse_ssh_url
from p2v.vm.process import pid_running
from p2v.vm.qmp import QmpConnection

log = logging.getLogger(__name__)

POLL_S = 1.0
QUIT_WAIT_S = 10.0
POWEROFF_SCRIPT = (
    'if [ "$(id -u)" = 0 ]; then run=""; else run="sudo -n"; fi; '
    "if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then "
    "exec $run systemctl --no-block poweroff; fi; "
    "( sleep 1; $run poweroff ) </dev/null >/dev/null 2>&1 &"
)


@dataclass
class StopOutcome:
    """How a source was stopped.

    ``method``: ``poweroff`` (SSH), ``powerdown`` (QMP, the guest shut down), ``quit`` / ``kill``
    (QEMU ended without the guest shutting down), ``already-stopped``, ``nothing-to-stop``
    (image file)."""

    url: str
    kind: str  # ssh | qemu | file
    method: str
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reachability ----------------------------------------------------------------------------


def _ssh_banner(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data and len(data) < 8192:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                chunk = s.recv(1024)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    # RFC 4253: the server may send other lines before "SSH-2.0-..."
    return any(line.startswith(b"SSH-") for line in data.split(b"\n"))


def _qmp_peer(sock_path: Path, timeout: float) -> int | None:
    """Connect to a QMP socket: the pid of the QEMU listening on it (0 when unknown), None when
    no process listens there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, _, _ = struct.unpack("3i", creds)
            return int(pid)
    except OSError:
        return None


def source_reachable(url: str, *, timeout: float = 5.0, ssh_options: SshOptions | None = None) -> bool:
    """True while the source of ``url`` answers (see the module docstring for each kind).

    Raises UsageError for a malformed URL. ``ssh_options`` is accepted for symmetry with
    :func:`stop_source` (a banner needs no key)."""
    kind = source_kind(url)
    if kind == "ssh":
        target = parse_ssh_url(url)
        return _ssh_banner(target.host, target.port, timeout)
    if kind == "qemu":
        sock, _ = parse_qemu_url(url)
        return _qmp_peer(sock, timeout) is not None
    return Path(url).exists()


# -- stopping --------------------------------------------------------------------------------


def stop_source(url: str, *, timeout: float = 120.0, ssh_options: SshOptions | None = None) -> StopOutcome:
    """Stop the production source of ``url`` so that it no longer changes (see the module
    docstring). Idempotent. Raises RemoteError (SSH: cannot log in, or it still answers after
    ``timeout``), HostKeyError, VmError (QEMU survived SIGKILL), UsageError (bad URL)."""
    kind = source_kind(url)
    t0 = time.monotonic()
    if kind == "ssh":
        method, detail = _stop_ssh(url, timeout, ssh_options or SshOptions())
    elif kind == "qemu":
        method, detail = _stop_qemu(url, timeout)
    else:
        method, detail = "nothing-to-stop", "an image file has nothing running"
    return StopOutcome(url=url, kind=kind, method=method, seconds=round(time.monotonic() - t0, 2), detail=detail)


def _stop_ssh(url: str, timeout: float, ssh: SshOptions) -> tuple[str, str]:
    target = parse_ssh_url(url)
    where = target.label
    if not _ssh_banner(target.host, target.port, min(timeout, 10.0)):
        return "already-stopped", f"{where} does not answer SSH"
    session = target.session(identity=ssh.identity, known_hosts=ssh.known_hosts)
    try:
        session.connect()
        res = session.run(["sh", "-c", POWEROFF_SCRIPT], timeout=30, check=False)
        if res.rc != 0:
            raise RemoteError(f"{where}: poweroff failed with exit status {res.rc}: "
                              f"{res.stderr_text[-500:] or '(no stderr)'}")  # fmt: skip
    except RemoteError as exc:
        if "exit status" in exc.message or _ssh_banner(target.host, target.port, 5.0):
            raise
        # the host went down while we talked to it (a poweroff of its own, or ours)
        log.info("%s: connection lost while powering off: %s", where, exc.message)
    finally:
        with contextlib.suppress(Exception):  # the far end may already be gone
            session.close()
    deadline = time.monotonic() + timeout
    while _ssh_banner(target.host, target.port, 3.0):
        if time.monotonic() > deadline:
            raise RemoteError(f"{where}: still answers SSH {timeout:.0f} s after poweroff",
                              hint="stop it by other means (power switch, hypervisor) or fence it")  # fmt: skip
        time.sleep(POLL_S)
    return "poweroff", f"{where} powered off; SSH stopped answering"


def _qmp_status(sock: Path, timeout: float) -> str | None:
    conn = QmpConnection(sock, vm_name=str(sock), timeout=timeout)
    try:
        conn.connect(timeout)
        status = conn.execute("query-status")
        return str(status.get("status")) if isinstance(status, dict) else None
    except VmError:
        return None
    finally:
        conn.close()


def _qmp_command(sock: Path, command: str, timeout: float = 5.0) -> str | None:
    """Run one QMP command; the error text when it could not be sent."""
    conn = QmpConnection(sock, vm_name=str(sock), timeout=timeout)
    try:
        conn.connect(timeout)
        conn.execute(command)
        return None
    except VmError as exc:
        return exc.message
    finally:
        conn.close()


def _gone(sock: Path, pid: int) -> bool:
    if pid > 0:
        return not pid_running(pid)
    return _qmp_peer(sock, 2.0) is None


def _stop_qemu(url: str, timeout: float) -> tuple[str, str]:
    sock, _ = parse_qemu_url(url)
    pid = _qmp_peer(sock, 5.0)
    if pid is None:
        return "already-stopped", f"no QEMU listens on {sock}"
    if _qmp_status(sock, 5.0) == "shutdown":
        return "already-stopped", "the guest is powered off (QEMU kept running, its drives readable)"
    said = _qmp_command(sock, "system_powerdown")
    if said is not None:
        log.info("%s: system_powerdown: %s", sock, said)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(sock, pid):
            return "powerdown", f"the guest shut down and QEMU (pid {pid}) exited"
        if _qmp_status(sock, 2.0) == "shutdown":
            return "powerdown", f"the guest shut down; QEMU (pid {pid}) kept running (-no-shutdown)"
        time.sleep(POLL_S)
    said = _qmp_command(sock, "quit")
    wait_until = time.monotonic() + QUIT_WAIT_S
    while time.monotonic() < wait_until:
        if _gone(sock, pid):
            return "quit", f"the guest did not shut down within {timeout:.0f} s: QEMU (pid {pid}) was quit"
        time.sleep(0.2)
    if pid <= 0:
        raise VmError(f"QEMU on {sock} did not quit ({said or 'no answer'}) and its pid is unknown",
                      hint="stop that QEMU by other means, or fence it")  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        wait_until = time.monotonic() + QUIT_WAIT_S
        while time.monotonic() < wait_until:
            if not pid_running(pid):
                return "kill", f"QEMU (pid {pid}) ignored powerdown and quit: sent {sig.name}"
            time.sleep(0.2)
    raise VmError(f"QEMU pid {pid} on {sock} survived SIGKILL")
