"""SSH into a booted test guest (root, the test key, the guests' known host key)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

import images


def ssh_run(port: int, command: str, *, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``command`` as root on 127.0.0.1:port with the host key checked; (rc, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        known = Path(tmp) / "known_hosts"
        known.write_text(images.known_hosts_line("127.0.0.1", port))
        client = paramiko.SSHClient()
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = paramiko.Ed25519Key.from_private_key_file(str(images.test_ssh_key()))
        client.connect("127.0.0.1", port=port, username="root", pkey=key, timeout=30, banner_timeout=30,
                       auth_timeout=30, allow_agent=False, look_for_keys=False)  # fmt: skip
        try:
            _, out, err = client.exec_command(command, timeout=timeout)
            so = out.read().decode("utf-8", "replace")
            se = err.read().decode("utf-8", "replace")
            return out.channel.recv_exit_status(), so, se
        finally:
            client.close()


def wait_ssh(port: int, timeout: float = 240, console: Callable[[], str] | None = None) -> None:
    """Wait until root can log in; on timeout the error carries the console's last lines."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ssh_run(port, "true", timeout=20)
            return
        except (OSError, paramiko.SSHException) as exc:
            last = exc
            time.sleep(3)
    tail = ("\nconsole:\n" + console()[-3000:]) if console else ""
    raise AssertionError(f"SSH on 127.0.0.1:{port} did not answer within {timeout:.0f}s: {last}{tail}")
