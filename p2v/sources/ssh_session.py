"""An authenticated SSH connection to a source host (paramiko), and remote commands on it.

Trust is explicit: only p2v's known_hosts file is loaded and unknown hosts are
rejected (:class:`~p2v.errors.UnknownHostKey`, with the fingerprint and the
``p2v trust`` command to run); a key that differs from the recorded one raises
:class:`~p2v.errors.ChangedHostKey`.

Re-keying: paramiko starts a key re-exchange by itself after 512 MiB, and if the
server closes a channel while that exchange is in flight paramiko's transport
thread blocks forever sending its reply (paramiko issue #822: long transfers stall
at ~512 MiB). We move paramiko's own trigger far away and re-key ourselves at safe
points instead: after a channel is closed, once both sides have processed the
close (a global-request round trip proves it), when enough bytes went by.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, NoReturn

import paramiko

from p2v.errors import ChangedHostKey, RemoteError, UnknownHostKey, UsageError
from p2v.sources.ssh_trust import (
    DEFAULT_PORT,
    HostKeyInfo,
    default_known_hosts,
    host_label,
)

log = logging.getLogger(__name__)

# Fastest first on x86 with AES-NI (measured on loopback: aes128-gcm ~1.7x aes128-ctr+hmac).
CIPHER_PREFERENCE = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
REKEY_AFTER_BYTES = 512 << 20  # what paramiko itself would use, but done at safe points
PARAMIKO_REKEY_BACKSTOP = 1 << 36  # paramiko's own trigger, out of reach of one channel
REKEY_TIMEOUT = 60.0
STDERR_TAIL_BYTES = 64 << 10


class CommandResult(NamedTuple):
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace").strip()


class _RejectUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy that says which host, which key, and how to trust it."""

    def __init__(self, host: str, port: int, known_hosts: Path, explicit_file: bool) -> None:
        self.host, self.port, self.known_hosts, self.explicit_file = host, port, known_hosts, explicit_file

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> NoReturn:
        info = HostKeyInfo.from_pkey(self.host, self.port, key)
        extra = f" --known-hosts {shlex.quote(str(self.known_hosts))}" if self.explicit_file else ""
        raise UnknownHostKey(
            f"{info.label} is not a trusted SSH host: it offers {info.key_type} key {info.fingerprint}; "
            f"check that fingerprint with the host's owner, then run: p2v trust{extra} {info.label}",
            hint=f"p2v connects only to hosts recorded in {self.known_hosts} (by `p2v trust`)",
        )


def _fast_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    available = set(options.ciphers)
    first = [c for c in CIPHER_PREFERENCE if c in available]
    options.ciphers = tuple(first + [c for c in options.ciphers if c not in first])
    # see the module docstring: we re-key ourselves between channels
    transport.packetizer.REKEY_BYTES = PARAMIKO_REKEY_BACKSTOP
    transport.packetizer.REKEY_PACKETS = PARAMIKO_REKEY_BACKSTOP
    return transport


def resolve_identity(identity: Path | str | None) -> Path | None:
    """``identity``, else ``$P2V_SSH_IDENTITY``, else None (agent and default keys)."""
    chosen = identity if identity else os.environ.get("P2V_SSH_IDENTITY") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise UsageError(f"SSH identity file {path}: no such file")
    return path


class SshSession:
    """One authenticated SSH connection; use as a context manager.

    ``run()`` executes one command (argument list, quoted for the remote shell);
    ``start()`` starts one whose stdout the caller streams (see :class:`RemoteProcess`).
    """

    def __init__(
        self,
        host: str,
        *,
        port: int = DEFAULT_PORT,
        user: str = "root",
        identity: Path | str | None = None,
        known_hosts: Path | str | None = None,
        connect_timeout: float = 20.0,
        keepalive_interval: int = 15,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.identity = resolve_identity(identity)
        self.known_hosts = Path(known_hosts) if known_hosts else default_known_hosts()
        self._explicit_known_hosts = known_hosts is not None
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.label = f"{user}@{host_label(host, port)}"
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._open_channels = 0
        self._bytes_since_rekey = 0
        self.rekeys = 0
        self._python3: str | bool | None = False  # False: not probed yet

    # -- connection -------------------------------------------------------

    def __enter__(self) -> SshSession:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        if self._client is None or (transport := self._client.get_transport()) is None:
            raise RemoteError(f"{self.label}: not connected")
        return transport

    def connect(self) -> None:
        if self._client is not None:
            return
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            try:
                client.load_host_keys(str(self.known_hosts))
            except OSError as exc:
                raise UsageError(f"known_hosts file {self.known_hosts}: cannot read it: {exc}") from exc
        client.set_missing_host_key_policy(
            _RejectUnknownHost(self.host, self.port, self.known_hosts, self._explicit_known_hosts)
        )
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                key_filename=str(self.identity) if self.identity else None,
                allow_agent=self.identity is None,
                look_for_keys=self.identity is None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                transport_factory=_fast_transport,
            )
        except BaseException as exc:
            client.close()
            ours = self._connect_error(exc)
            if ours is exc:
                raise
            raise ours from exc
        self._client = client
        self.transport.set_keepalive(self.keepalive_interval)
        log.debug("%s: connected, cipher %s", self.label, getattr(self.transport, "remote_cipher", "?"))

    def _connect_error(self, exc: BaseException) -> BaseException:
        where = host_label(self.host, self.port)
        if isinstance(exc, UnknownHostKey | UsageError | KeyboardInterrupt):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            offered = HostKeyInfo.from_pkey(self.host, self.port, exc.key)
            expected = HostKeyInfo.from_pkey(self.host, self.port, exc.expected_key)
            return ChangedHostKey(
                f"{where}: the SSH host key changed: {self.known_hosts} has {expected.key_type} "
                f"{expected.fingerprint}, the host offers {offered.key_type} {offered.fingerprint}",
                hint=(
                    "this happens after a reinstall, or when someone intercepts the connection; "
                    f"if the change is expected, run: p2v trust --replace{self._known_hosts_option()} {where}"
                ),
            )
        if isinstance(exc, paramiko.PasswordRequiredException):
            return RemoteError(
                f"{self.label}: identity file {self.identity} is encrypted",
                hint="load it into ssh-agent (ssh-add) and do not pass --identity",
            )
        if isinstance(exc, paramiko.AuthenticationException):
            how = f"identity {self.identity}" if self.identity else "ssh-agent and default keys"
            return RemoteError(
                f"{self.label}: authentication failed ({how}): {exc}",
                hint="pass --identity FILE (or set P2V_SSH_IDENTITY) with a key the host accepts",
            )
        if isinstance(exc, socket.timeout | TimeoutError):
            return RemoteError(f"{where}: connection timed out after {self.connect_timeout:g} s")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            return RemoteError(f"{where}: cannot connect: connection refused")
        if isinstance(exc, socket.gaierror):
            return RemoteError(f"{where}: cannot resolve host name: {exc.strerror}")
        if isinstance(exc, OSError):
            return RemoteError(f"{where}: cannot connect: {exc.strerror or exc}")
        if isinstance(exc, paramiko.SSHException | EOFError):
            return RemoteError(f"{where}: SSH handshake failed: {str(exc) or type(exc).__name__}")
        return exc

    def _known_hosts_option(self) -> str:
        return f" --known-hosts {shlex.quote(str(self.known_hosts))}" if self._explicit_known_hosts else ""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def is_alive(self) -> bool:
        return self._client is not None and self.transport.is_active()

    # -- commands ---------------------------------------------------------

    def start(self, argv: list[str], *, read_timeout: float = 60.0, name: str | None = None) -> RemoteProcess:
        """Start ``argv`` on the host; the caller reads its stdout and must close it.

        ``name`` is how errors refer to the command (default: the command line).
        """
        command = shlex.join(argv)
        try:
            channel = self.transport.open_session(timeout=self.connect_timeout)
            channel.settimeout(read_timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteError(f"{self.label}: cannot start {argv[0]!r}: {str(exc) or type(exc).__name__}") from exc
        with self._lock:
            self._open_channels += 1
        return RemoteProcess(self, channel, argv, read_timeout, name=name)

    def run(
        self, argv: list[str], timeout: float = 60.0, *, check: bool = True, input: bytes | None = None
    ) -> CommandResult:
        """Run ``argv`` to completion; stdout and stderr are read concurrently.

        With ``check`` a non-zero exit status raises :class:`RemoteError` carrying the
        command and the tail of its stderr. ``timeout`` bounds the whole command.
        """
        deadline = time.monotonic() + timeout
        with self.start(argv, read_timeout=timeout) as proc:
            if input:
                proc.send(input)
            proc.shutdown_write()
            chunks: list[bytes] = []
            while data := proc.read(1 << 20, deadline=deadline):
                chunks.append(data)
            rc = proc.wait(max(0.0, deadline - time.monotonic()))
            result = CommandResult(rc, b"".join(chunks), proc.stderr_bytes())
        if check and rc != 0:
            raise RemoteError(
                f"{self.label}: `{shlex.join(argv)[:200]}` failed with exit status {rc}: "
                f"{result.stderr_text[-2000:] or '(no stderr)'}"
            )
        return result

    def python3_version(self) -> str | None:
        """``"3.11"`` when the host has a python3 >= 3.5 on PATH, else None (cached)."""
        if self._python3 is False:
            probe = "import sys; sys.stdout.write('%d.%d' % sys.version_info[:2])"
            script = f"command -v python3 >/dev/null 2>&1 || exit 127; exec python3 -c {shlex.quote(probe)}"
            res = self.run(["sh", "-c", script], timeout=30, check=False)
            version = res.text.strip()
            ok = res.rc == 0 and version.count(".") == 1
            self._python3 = version if ok and tuple(map(int, version.split("."))) >= (3, 5) else None
        return self._python3 if isinstance(self._python3, str) else None

    # -- re-keying --------------------------------------------------------

    def _account(self, nbytes: int) -> None:
        self._bytes_since_rekey += nbytes

    def _channel_closed(self) -> None:
        with self._lock:
            self._open_channels -= 1
            due = self._open_channels == 0 and self._bytes_since_rekey >= REKEY_AFTER_BYTES
        if due and self.is_alive():
            self.rekey()

    def rekey(self) -> None:
        """Renegotiate keys now; call only while no channel is open (see the module doc)."""
        transport = self.transport
        # paramiko waits for these replies without a time limit: drop the connection
        # if the server does not answer, which makes both calls return
        watchdog = threading.Timer(REKEY_TIMEOUT, transport.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            # the server's channel CLOSE (if any) and our reply are processed before this returns
            transport.global_request("keepalive@openssh.com", wait=True)
            transport.renegotiate_keys()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise RemoteError(f"{self.label}: key re-exchange failed: {str(exc) or type(exc).__name__}") from exc
        finally:
            watchdog.cancel()
        if not transport.is_active():
            raise RemoteError(f"{self.label}: no answer to the key re-exchange in {REKEY_TIMEOUT:g} s")
        self._bytes_since_rekey = 0
        self.rekeys += 1
        log.debug("%s: re-keyed (%d so far)", self.label, self.rekeys)


class RemoteProcess:
    """A command running on the host: stdout is read by the caller, stderr by a thread."""

    def __init__(
        self,
        session: SshSession,
        channel: paramiko.Channel,
        argv: list[str],
        timeout: float,
        *,
        name: str | None = None,
    ) -> None:
        self.session = session
        self.channel = channel
        self.argv = argv
        self.timeout = timeout
        self.name = name or f"`{shlex.join(argv)[:120]}`"
        self._stderr = bytearray()
        self._closed = False
        self._drain = threading.Thread(target=self._drain_stderr, name="p2v-ssh-stderr", daemon=True)
        self._drain.start()

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def what(self) -> str:
        return f"{self.session.label}: {self.name}"

    def _drain_stderr(self) -> None:
        while True:
            try:
                data = self.channel.recv_stderr(65536)
            except TimeoutError:
                if self.channel.closed:
                    return
                continue
            except (OSError, EOFError, paramiko.SSHException):
                return
            if not data:
                return
            self.session._account(len(data))
            self._stderr += data
            if len(self._stderr) > 4 * STDERR_TAIL_BYTES:
                del self._stderr[:-STDERR_TAIL_BYTES]

    def stderr_bytes(self) -> bytes:
        self._drain.join(timeout=5)
        return bytes(self._stderr)

    def stderr_tail(self, limit: int = 2000) -> str:
        text = self.stderr_bytes().decode("utf-8", errors="replace").strip()
        return text[-limit:]

    def send(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.what}: sending input failed: {str(exc) or type(exc).__name__}") from exc
        self.session._account(len(data))

    def shutdown_write(self) -> None:
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def read(self, size: int, *, deadline: float | None = None) -> bytes:
        """Up to ``size`` bytes of stdout; ``b""`` at end of stream.

        Raises :class:`RemoteError` when nothing arrives for ``timeout`` seconds, when
        ``deadline`` passes, or when the connection is lost.
        """
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteError(f"{self.what}: timed out after {self.timeout:g} s")
            self.channel.settimeout(min(self.timeout, remaining))
        try:
            data = self.channel.recv(size)
        except TimeoutError as exc:
            raise RemoteError(f"{self.what}: no output for {self.timeout:g} s (stalled?)") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.what}: connection lost: {str(exc) or type(exc).__name__}") from exc
        if not data and not self.session.transport.is_active():
            raise RemoteError(f"{self.what}: connection lost")
        self.session._account(len(data))
        return data

    def read_exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer only at end of stream."""
        first = self.read(size)
        if len(first) == size or not first:
            return first
        buf = bytearray(first)
        while len(buf) < size:
            data = self.read(size - len(buf))
            if not data:
                break
            buf += data
        return bytes(buf)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status; RemoteError when the connection dropped before one came."""
        limit = self.timeout if timeout is None else timeout
        if not self.channel.status_event.wait(limit):
            raise RemoteError(f"{self.what}: no exit status after {limit:g} s")
        status = self.channel.exit_status
        if status == -1:
            raise RemoteError(f"{self.what}: ended without an exit status (connection lost or killed)")
        return int(status)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        self._drain.join(timeout=5)
        self.session._channel_closed()
