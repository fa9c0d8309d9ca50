"""The ssh health check against a real OpenSSH server on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from p2v.orchestration.checks import CheckTarget, run_check
from p2v.orchestration.checks_model import SshCheck
from tests.sshd import LoopbackSshd, sshd_fixture  # noqa: F401


def target(sshd: LoopbackSshd, *, known_hosts: Path | None) -> CheckTarget:
    # the plan says guest port 22; the "VM" answers on the sshd's port
    return CheckTarget("db1", ports={22: sshd.port}, ssh_identity=sshd.client_key, known_hosts=known_hosts)


def test_ssh_command_exit_and_output(sshd: LoopbackSshd) -> None:
    t = target(sshd, known_hosts=sshd.known_hosts)
    check = SshCheck(command="echo db-ready; echo warn >&2", user=sshd.user, expect_output=r"^db-ready$",
                     timeout=8, interval=0.5)  # fmt: skip
    res = run_check(check, t)
    assert res.ok and res.attempts == 1, res.message
    assert "(guest port 22)" in res.message and "stdout matches" in res.message


def test_ssh_wrong_exit_status_shows_stderr(sshd: LoopbackSshd) -> None:
    t = target(sshd, known_hosts=sshd.known_hosts)
    res = run_check(SshCheck(command="echo 'replica not in sync' >&2; exit 3", user=sshd.user, timeout=8,
                             interval=0.5), t)  # fmt: skip
    assert not res.ok and "exit 3 (expected 0): replica not in sync" in res.message and res.attempts >= 2
    res = run_check(SshCheck(command="exit 3", user=sshd.user, expect_exit=3, timeout=8, interval=0.5), t)
    assert res.ok, res.message


def test_ssh_output_mismatch(sshd: LoopbackSshd) -> None:
    t = target(sshd, known_hosts=sshd.known_hosts)
    res = run_check(SshCheck(command="echo degraded", user=sshd.user, expect_output="^healthy$", timeout=8,
                             interval=0.5), t)  # fmt: skip
    assert not res.ok and "does not match /^healthy$/" in res.message and "degraded" in res.message


def test_ssh_without_known_hosts_accepts_the_vms_key(sshd: LoopbackSshd) -> None:
    """A DR VM presents its source's host key: with known_hosts None the check accepts it."""
    res = run_check(SshCheck(command="true", user=sshd.user, timeout=8, interval=0.5),
                    target(sshd, known_hosts=None))  # fmt: skip
    assert res.ok, res.message


def test_ssh_with_known_hosts_refuses_a_changed_key(sshd: LoopbackSshd) -> None:
    sshd.rotate_host_key()
    res = run_check(SshCheck(command="true", user=sshd.user, timeout=4, interval=0.5),
                    target(sshd, known_hosts=sshd.known_hosts))  # fmt: skip
    assert not res.ok and "host key" in res.message


def test_ssh_down_and_wrong_key(sshd: LoopbackSshd, tmp_path: Path) -> None:
    check = SshCheck(command="true", user=sshd.user, timeout=4, interval=0.5)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    bad = CheckTarget("db1", ports={22: sshd.port}, ssh_identity=stranger, known_hosts=sshd.known_hosts)
    res = run_check(check, bad)
    assert not res.ok and "authentication failed (identity" in res.message
    sshd.stop()
    res = run_check(check, target(sshd, known_hosts=sshd.known_hosts))
    assert not res.ok and "connection refused" in res.message
