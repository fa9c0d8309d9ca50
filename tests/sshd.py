"""A real OpenSSH server on 127.0.0.1 (or ::1) for tests (no mocks of SSH).

Use the ``sshd`` fixture (import it into a test module with
``from tests.sshd import sshd_fixture  # noqa: F401`` and take ``sshd: LoopbackSshd``
as a test argument) or the :func:`loopback_sshd` context manager.

The server runs ``/usr/sbin/sshd -D -e`` with its own host key,
an ``AuthorizedKeysFile`` holding a generated client key and a pid file, all
inside a temporary directory; it logs in as the user running the tests (root in
CI). :meth:`LoopbackSshd.rotate_host_key` restarts it with a new host key so a
test can see a changed-key refusal; :meth:`LoopbackSshd.stop` kills it (a test
can drop the connection mid-transfer that way).
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


class LoopbackSshd:
    """One sshd process serving ``host``:``port`` (loopback), configured under ``workdir``."""

    def __init__(self, workdir: Path, *, extra_config: str = "", host: str = "127.0.0.1") -> None:
        self.host = host  # "::1" for IPv6
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = _free_port(self.host)
        self.host_key = workdir / "ssh_host_ed25519_key"
        self.client_key = workdir / "client_ed25519"
        self.authorized_keys = workdir / "authorized_keys"
        self.known_hosts = workdir / "known_hosts"
        self.config = workdir / "sshd_config"
        self.pid_file = workdir / "sshd.pid"
        self.log_file = workdir / "sshd.log"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        _keygen(self.client_key, "p2v-test-client")
        shutil.copyfile(self.client_key.with_suffix(".pub"), self.authorized_keys)
        self._new_host_key()
        self._trusted_key = ""
        self.trust_current_key()

    # -- keys -------------------------------------------------------------

    def _new_host_key(self) -> None:
        for p in (self.host_key, self.host_key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        _keygen(self.host_key, "p2v-test-host")

    def trust_current_key(self) -> None:
        """(Re)write ``known_hosts`` with the current host key."""
        self._trusted_key = self.host_public_key()
        self._write_known_hosts()

    def _write_known_hosts(self) -> None:
        self.known_hosts.write_text(f"{self.host_entry} {self._trusted_key}\n")

    def host_public_key(self) -> str:
        """``"ssh-ed25519 AAAA..."``: the key type and base64 of the current host key."""
        parts = self.host_key.with_suffix(".pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def host_fingerprint(self) -> str:
        """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
        out = subprocess.run(
            [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(self.host_key.with_suffix(".pub"))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]

    @property
    def host_entry(self) -> str:
        """The known_hosts host field: ``[127.0.0.1]:PORT``."""
        return f"[{self.host}]:{self.port}"

    def session_args(self) -> dict[str, object]:
        """Keyword arguments for ``p2v.sources.ssh.SshSession`` that reach this server."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity": self.client_key,
            "known_hosts": self.known_hosts,
        }

    def url(self, device: str | Path) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}{device}"

    # -- process ----------------------------------------------------------

    def _write_config(self) -> None:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PermitRootLogin yes",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel INFO",
            "MaxStartups 50",
            "Subsystem sftp internal-sftp",
            self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            raise RuntimeError("sshd already running")
        if os.geteuid() == 0:
            # privilege separation directory; Debian creates it from a unit file we do not run
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for _attempt in range(3):
            self._write_config()
            log = self.log_file.open("ab")
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
            log.close()
            if self._wait_ready(timeout):
                return
            self._reap()
            self.port = _free_port(self.host)  # port race with another process: try a new one
            self._write_known_hosts()
        raise RuntimeError(f"sshd did not start; log:\n{self.log_file.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(8).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        """Stop the listener and kill the per-connection sshd processes it forked.

        SIGTERM to the listener leaves established sessions running, so they are
        killed by parent pid: the client sees its connection drop.
        """
        if self.proc is None:
            return
        children = _children_of(self.proc.pid)
        self._reap()
        for pid in children:
            _kill_tree(pid)

    def rotate_host_key(self) -> None:
        """Restart with a brand-new host key; ``known_hosts`` keeps the old one (now stale)."""
        self.stop()
        old = self.host_public_key()
        self._new_host_key()
        assert self.host_public_key() != old
        self.start()

    def restart(self) -> None:
        self.stop()
        self.start()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a killed pytest leaves no sshd)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _children_of(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # field 4 (after the parenthesised comm, which may contain spaces) is the ppid
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _kill_tree(pid: int) -> None:
    for child in _children_of(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    # sshd session processes are children of the listener we already reaped; they get
    # re-parented to init (or a subreaper), so do not wait for them here.


@contextmanager
def loopback_sshd(workdir: Path, *, extra_config: str = "", host: str = "127.0.0.1") -> Iterator[LoopbackSshd]:
    server = LoopbackSshd(workdir, extra_config=extra_config, host=host)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="sshd")
def sshd_fixture(tmp_path: Path) -> Iterator[LoopbackSshd]:
    """A running loopback sshd; ``sshd.known_hosts`` already trusts its host key."""
    if not Path(SSHD).exists():
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server)")
    with loopback_sshd(tmp_path / "sshd") as server:
        yield server
