"""Run a recovery plan's health checks against a booted VM.

:func:`run_check` retries one check (:mod:`p2v.orchestration.checks_model`) every
``interval`` seconds until it passes or ``timeout`` seconds have gone by, and returns
a :class:`CheckResult` whose message says what was seen last (connection refused,
HTTP 503, exit 1 and the end of stderr, pattern not found in N bytes of console...).
:func:`run_checks` runs a machine's checks in order and stops at the first failure.
A check never raises for what it observes: a broken check configuration (an agent
check without an agent socket, a script that cannot be split) is a failed result too.

How each kind decides:

- ``tcp``: connect to the guest port (through ``CheckTarget.ports``). Over QEMU
  user-mode networking a forwarded port is accepted by QEMU itself at once, even
  with no guest listening (see :mod:`p2v.vm.drillnet`), so the connection counts
  only when the guest side is proven: a banner arrives, or QEMU's ``info usernet``
  (``CheckTarget.usernet``) shows the guest side ``ESTABLISHED``. A connection the
  peer resets or closes at once (no listener in the guest) fails. Without
  ``usernet`` the check falls back to "stayed open for 0.5 s", which a guest that
  has not booted yet also passes: runners of user-mode VMs should give ``usernet``.
- ``ssh``: paramiko, public key (``ssh_identity``, else agent and default keys);
  ``known_hosts`` None accepts any host key: a DR VM presents its *source's* host
  key on a forwarded port, which no known_hosts records under 127.0.0.1:PORT, and
  the connection never leaves the DR host. The command's exit status must equal
  ``expect_exit`` and its stdout match ``expect_output``.
- ``http``: urllib with no proxies and no redirects followed (a redirect could
  point at production); the status must equal ``expect_status`` and the body
  match ``expect_text``.
- ``agent``: ``guest-sync-delimited`` with a random id, then ``guest-ping`` on the
  guest-agent socket.
- ``console``: the regex over the serial console log, read incrementally.
- ``script``: the argument list on the DR host with ``P2V_MACHINE``, ``P2V_HOST``
  and ``P2V_PORT_<guest port>`` (plus ``CheckTarget.env``) in its environment;
  exit 0 passes; killed (with its process group) when the check times out.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paramiko

from p2v.errors import P2VError
from p2v.orchestration.checks_model import (
    AgentCheck,
    ConsoleCheck,
    HttpCheck,
    ScriptCheck,
    SshCheck,
    TcpCheck,
    check_label,
)
from p2v.vm.console import ConsoleLog
from p2v.vm.drillnet import forward_states

log = logging.getLogger(__name__)
# A guest that is still booting makes paramiko's transport thread log a traceback per attempt
# ("Error reading SSH protocol banner"); the check reports the outcome itself.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

AnyCheck = TcpCheck | SshCheck | HttpCheck | AgentCheck | ConsoleCheck | ScriptCheck

TCP_CONNECT_S = 5.0
TCP_HOLD_S = 0.5  # without usernet: a connection that survives this long counts
TCP_GUEST_ANSWER_S = 3.0  # with usernet: how long the guest may take to answer slirp's SYN
HTTP_ATTEMPT_S = 15.0
SSH_ATTEMPT_S = 30.0
AGENT_ATTEMPT_S = 5.0
HTTP_BODY_LIMIT = 1 << 20
OUTPUT_LIMIT = 64 << 10
TAIL_CHARS = 400
CONSOLE_OVERLAP = 4096  # a match may start this far before the previous end of text
MIN_ATTEMPT_S = 2.0  # the last attempt gets at least this long, even past the timeout
_POLL_S = 0.1


@dataclass
class CheckTarget:
    """Where a machine's checks go.

    ``ports`` maps guest ports to host ports (a guest port missing from it is used
    as is, for VMs reached directly); ``usernet`` returns QEMU's ``info usernet``
    text for a VM on user-mode networking (:func:`p2v.vm.drillnet.usernet_reader`):
    with it, tcp checks see the guest side of forwarded connections, and a check
    on a guest port missing from ``ports`` fails instead of probing the DR host's
    own port. ``known_hosts`` None accepts any SSH host key (see the module doc).
    """

    machine: str
    host: str = "127.0.0.1"
    ports: dict[int, int] = field(default_factory=dict)
    console_log: Path | None = None
    agent_socket: Path | None = None
    ssh_identity: Path | None = None
    known_hosts: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    usernet: Callable[[], str] | None = None

    def host_port(self, guest_port: int) -> int:
        return self.ports.get(guest_port, guest_port)

    def where(self, guest_port: int) -> str:
        hp = self.host_port(guest_port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{hp}" + (f" (guest port {guest_port})" if hp != guest_port else "")

    def script_env(self) -> dict[str, str]:
        env = {"P2V_MACHINE": self.machine, "P2V_HOST": self.host}
        env.update({f"P2V_PORT_{gp}": str(hp) for gp, hp in sorted(self.ports.items())})
        env.update(self.env)
        return env


@dataclass(frozen=True)
class CheckResult:
    check: str
    kind: str
    ok: bool
    seconds: float
    attempts: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Probe(Protocol):
    def __call__(self, budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]: ...


class _ConfigError(Exception):
    """The check cannot run against this target at all (no retry helps)."""


def _tail(text: str | bytes | bytearray, limit: int = TAIL_CHARS) -> str:
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- tcp ------------------------------------------------------------------------------


def _tcp_probe(check: TcpCheck, target: CheckTarget) -> _Probe:
    forwarded = check.port in target.ports
    if target.usernet is not None and not forwarded:
        raise _ConfigError(f"guest port {check.port} is not forwarded to the host; add it to the VM's forwards")

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        where = target.where(check.port)
        hp = target.host_port(check.port)
        try:
            sock = socket.create_connection((target.host, hp), timeout=min(budget, TCP_CONNECT_S))
        except OSError as exc:
            return False, f"{where}: {_os_reason(exc)}"
        with sock:
            use_usernet = target.usernet is not None and forwarded
            wait = TCP_GUEST_ANSWER_S if use_usernet else TCP_HOLD_S
            end = time.monotonic() + min(wait, budget)
            states: list[str] = []
            while True:
                readable, _, _ = select.select([sock], [], [], _POLL_S)
                if readable:
                    try:
                        data = sock.recv(256)
                    except OSError as exc:
                        return False, f"{where}: {_os_reason(exc)} right after connecting (no listener in the guest?)"
                    if not data:
                        return False, f"{where}: connection closed at once (nothing listens on guest port {check.port})"
                    return True, f"{where}: open, banner {_tail(data, 40)!r}"
                if use_usernet:
                    assert target.usernet is not None
                    try:
                        states = forward_states(target.usernet(), hp, check.port)
                    except P2VError as exc:
                        return False, f"{where}: cannot read QEMU's user-mode network state: {exc.message}"
                    if "ESTABLISHED" in states and "SYN_SENT" not in states:
                        return True, f"{where}: open (the guest accepted the connection)"
                if time.monotonic() >= end or cancelled():
                    break
            if use_usernet:
                seen = ", ".join(states) or "no connection"
                return False, f"{where}: QEMU accepted, but the guest did not answer within {wait:g}s (slirp: {seen})"
            return True, f"{where}: open (connection held {wait:g}s)"

    return probe


# -- ssh ------------------------------------------------------------------------------


class _AcceptDrHostKey(paramiko.MissingHostKeyPolicy):
    """Accept the key a DR VM offers (it is its source's key; see the module doc), and log it."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.debug("ssh check: accepting %s key %s of %s", key.get_name(), key.fingerprint, hostname)


def _ssh_probe(check: SshCheck, target: CheckTarget) -> _Probe:
    if target.usernet is not None and check.port not in target.ports:
        raise _ConfigError(f"guest port {check.port} is not forwarded to the host; add it to the VM's forwards")
    if target.known_hosts is not None and not target.known_hosts.is_file():
        raise _ConfigError(f"known_hosts file {target.known_hosts} does not exist")
    if target.ssh_identity is not None and not target.ssh_identity.is_file():
        raise _ConfigError(f"SSH identity file {target.ssh_identity} does not exist")
    expect = re.compile(check.expect_output, re.MULTILINE) if check.expect_output else None

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        where = f"{check.user}@{target.where(check.port)}"
        limit = min(budget, SSH_ATTEMPT_S)
        end = time.monotonic() + limit
        client = paramiko.SSHClient()
        try:
            if target.known_hosts is not None:
                client.load_host_keys(str(target.known_hosts))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
            else:
                client.set_missing_host_key_policy(_AcceptDrHostKey())
            ident = target.ssh_identity
            client.connect(
                target.host, port=target.host_port(check.port), username=check.user,
                key_filename=str(ident) if ident else None, allow_agent=ident is None,
                look_for_keys=ident is None, timeout=limit, banner_timeout=limit, auth_timeout=limit,
            )  # fmt: skip
            transport = client.get_transport()
            assert transport is not None
            chan = transport.open_session(timeout=max(0.1, end - time.monotonic()))
            chan.exec_command(check.command)
            out, err = bytearray(), bytearray()
            while True:
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                del out[:-OUTPUT_LIMIT], err[:-OUTPUT_LIMIT]
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() >= end or cancelled():
                    return False, f"{where}: `{check.command}` still running after {limit:.1f}s: {_tail(err or out)}"
                select.select([chan], [], [], _POLL_S)
            rc = chan.recv_exit_status()
        except paramiko.BadHostKeyException as exc:
            return False, f"{where}: host key differs from {target.known_hosts}: {exc}"
        except paramiko.AuthenticationException as exc:
            how = f"identity {target.ssh_identity}" if target.ssh_identity else "agent and default keys"
            return False, f"{where}: authentication failed ({how}): {exc}"
        except paramiko.ssh_exception.NoValidConnectionsError:
            return False, f"{where}: connection refused"
        except (paramiko.SSHException, EOFError) as exc:
            return False, f"{where}: SSH failed: {str(exc) or type(exc).__name__}"
        except OSError as exc:
            return False, f"{where}: {_os_reason(exc)}"
        finally:
            client.close()
        if rc != check.expect_exit:
            return False, f"{where}: `{check.command}` exit {rc} (expected {check.expect_exit}): {_tail(err or out)}"
        stdout = bytes(out).decode("utf-8", errors="replace")
        if expect is not None and not expect.search(stdout):
            why = f"stdout does not match /{expect.pattern}/: {_tail(stdout)!r}"
            return False, f"{where}: `{check.command}` exit {rc} but {why}"
        matched = f", stdout matches /{expect.pattern}/" if expect else ""
        return True, f"{where}: `{check.command}` exit {rc}{matched}"

    return probe


# -- http -----------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx reaches the caller as an HTTPError with its status


def _http_probe(check: HttpCheck, target: CheckTarget) -> _Probe:
    if target.usernet is not None and check.port not in target.ports:
        raise _ConfigError(f"guest port {check.port} is not forwarded to the host; add it to the VM's forwards")
    expect = re.compile(check.expect_text, re.MULTILINE) if check.expect_text else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    host = f"[{target.host}]" if ":" in target.host else target.host
    path = check.path if check.path.startswith("/") else f"/{check.path}"
    url = f"http://{host}:{target.host_port(check.port)}{path}"

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        request = urllib.request.Request(url, headers={"User-Agent": "p2v-health-check"})
        try:
            with opener.open(request, timeout=min(budget, HTTP_ATTEMPT_S)) as resp:
                status, body = resp.status, resp.read(HTTP_BODY_LIMIT)
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                body = exc.read(HTTP_BODY_LIMIT)
            except (OSError, http.client.HTTPException):
                body = b""
        except urllib.error.URLError as exc:
            reason = exc.reason if isinstance(exc.reason, BaseException) else OSError(str(exc.reason))
            return False, f"{url}: {_os_reason(reason)}"
        except http.client.RemoteDisconnected:
            return False, f"{url}: connection closed without a response"
        except (OSError, http.client.HTTPException) as exc:
            return False, f"{url}: {_os_reason(exc)}"
        text = body.decode("utf-8", errors="replace")
        if status != check.expect_status:
            return False, f"{url}: HTTP {status} (expected {check.expect_status}): {_tail(text, 200)!r}"
        if expect is not None and not expect.search(text):
            return False, f"{url}: HTTP {status} but the body ({len(body)} bytes) does not match /{expect.pattern}/"
        return True, f"{url}: HTTP {status}" + (f", body matches /{expect.pattern}/" if expect else "")

    return probe


# -- agent ----------------------------------------------------------------------------


def _agent_exchange(sock: socket.socket, end: float) -> str | None:
    """Sync and ping on a connected agent socket; None when the agent answered, else why not."""
    sync_id = secrets.randbelow(1 << 31)
    request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
    sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
    buf = b""

    def read_more() -> bool:
        nonlocal buf
        left = end - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return False
        if not data:
            raise ConnectionResetError("the agent socket closed")
        buf += data
        return True

    synced = False
    while not synced:  # skip everything up to the 0xFF the agent sends before the sync reply
        while b"\xff" not in buf:
            if not read_more():
                return "no answer to guest-sync (is qemu-guest-agent installed and running in the guest?)"
        buf = buf.split(b"\xff")[-1]
        while b"\n" not in buf:
            if not read_more():
                return "incomplete answer to guest-sync"
        line, buf = buf.split(b"\n", 1)
        with contextlib.suppress(ValueError):
            synced = json.loads(line).get("return") == sync_id
    sock.sendall(json.dumps({"execute": "guest-ping"}).encode() + b"\n")
    while b"\n" not in buf:
        if not read_more():
            return "no answer to guest-ping"
    line = buf.split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError:
        return f"unreadable answer to guest-ping: {_tail(line, 100)!r}"
    if "return" in reply:
        return None
    return f"guest-ping failed: {_tail(json.dumps(reply.get('error', reply)), 200)}"


def _agent_probe(check: AgentCheck, target: CheckTarget) -> _Probe:
    if target.agent_socket is None:
        raise _ConfigError("this VM has no guest-agent channel")
    path = target.agent_socket

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        end = time.monotonic() + min(budget, AGENT_ATTEMPT_S)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(max(0.1, end - time.monotonic()))
                sock.connect(str(path))
                why = _agent_exchange(sock, end)
        except FileNotFoundError:
            return False, f"guest agent socket {path} does not exist (is the VM running?)"
        except OSError as exc:
            return False, f"guest agent socket {path}: {_os_reason(exc)}"
        if why:
            return False, f"guest agent: {why}"
        return True, "guest agent answered guest-ping"

    return probe


# -- console --------------------------------------------------------------------------


def _console_probe(check: ConsoleCheck, target: CheckTarget) -> _Probe:
    if target.console_log is None:
        raise _ConfigError("this VM has no console log")
    try:
        pattern = re.compile(check.pattern, re.MULTILINE)
    except re.error as exc:
        raise _ConfigError(f"pattern /{check.pattern}/ is not a valid regex: {exc}") from exc
    console = ConsoleLog(target.console_log)
    scanned = 0

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        nonlocal scanned
        console.read_new()
        start = max(0, scanned - CONSOLE_OVERLAP)
        m = pattern.search(console.text, start)
        scanned = len(console.text)
        if m:
            return True, f"console shows {_tail(m.group(0), 80)!r}"
        size = len(console.text.encode("utf-8", errors="replace"))
        return False, f"pattern /{pattern.pattern}/ not found in {size} bytes of console output"

    return probe


# -- script ---------------------------------------------------------------------------


def _script_probe(check: ScriptCheck, target: CheckTarget) -> _Probe:
    try:
        argv = shlex.split(check.run)
    except ValueError as exc:
        raise _ConfigError(f"cannot split the command line {check.run!r}: {exc}") from exc
    if not argv:
        raise _ConfigError("the command line is empty")
    env = {**os.environ, **target.script_env()}

    def probe(budget: float, cancelled: Callable[[], bool]) -> tuple[bool, str]:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip
        except FileNotFoundError:
            return False, f"{argv[0]}: command not found"
        except OSError as exc:
            return False, f"{argv[0]}: cannot run it: {_os_reason(exc)}"
        end = time.monotonic() + budget
        while True:
            try:
                out, _ = proc.communicate(timeout=min(0.5, max(0.01, end - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() < end and not cancelled():
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                why = "cancelled" if time.monotonic() < end else f"killed after {budget:.1f}s (check timeout)"
                return False, f"`{check.run}` {why}: {_tail(out) or '(no output)'}"
        if proc.returncode == 0:
            return True, f"`{check.run}` exit 0" + (f": {_tail(out, 120)}" if out.strip() else "")
        return False, f"`{check.run}` exit {proc.returncode}: {_tail(out) or '(no output)'}"

    return probe


# -- the runner -----------------------------------------------------------------------


def _probe_for(check: AnyCheck, target: CheckTarget) -> _Probe:
    if isinstance(check, TcpCheck):
        return _tcp_probe(check, target)
    if isinstance(check, SshCheck):
        return _ssh_probe(check, target)
    if isinstance(check, HttpCheck):
        return _http_probe(check, target)
    if isinstance(check, AgentCheck):
        return _agent_probe(check, target)
    if isinstance(check, ConsoleCheck):
        return _console_probe(check, target)
    return _script_probe(check, target)


def _sleep(seconds: float, cancelled: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0 and not cancelled():
        time.sleep(min(0.2, left))


def run_check(check: AnyCheck, target: CheckTarget, *, cancelled: Callable[[], bool] = lambda: False) -> CheckResult:
    """Retry ``check`` against ``target`` until it passes or its ``timeout`` ends; see the module doc."""
    label = check_label(check)
    t0 = time.monotonic()
    deadline = t0 + check.timeout

    def result(ok: bool, attempts: int, message: str) -> CheckResult:
        res = CheckResult(label, check.kind, ok, round(time.monotonic() - t0, 3), attempts, message)
        log.log(logging.INFO if ok else logging.WARNING, "%s: check %s %s: %s",
                target.machine, label, "passed" if ok else "failed", message)  # fmt: skip
        return res

    try:
        probe = _probe_for(check, target)
    except _ConfigError as exc:
        return result(False, 0, f"{target.machine}: {exc}")
    attempts, last = 0, "not tried"
    while True:
        if cancelled():
            return result(False, attempts, f"cancelled after {attempts} attempt(s); last: {last}")
        attempts += 1
        ok, last = probe(max(deadline - time.monotonic(), min(MIN_ATTEMPT_S, check.timeout)), cancelled)
        if ok:
            return result(True, attempts, last)
        now = time.monotonic()
        if now + check.interval >= deadline:
            break
        log.debug("%s: check %s attempt %d: %s", target.machine, label, attempts, last)
        _sleep(check.interval, cancelled)
    return result(False, attempts, f"not passed after {attempts} attempt(s) in {time.monotonic() - t0:.1f}s: {last}")


def run_checks(
    checks: Iterable[AnyCheck], target: CheckTarget, *, cancelled: Callable[[], bool] = lambda: False
) -> list[CheckResult]:
    """Run ``checks`` in order; stop after the first that fails (its result is the last one)."""
    results: list[CheckResult] = []
    for check in checks:
        res = run_check(check, target, cancelled=cancelled)
        results.append(res)
        if not res.ok:
            break
    return results
