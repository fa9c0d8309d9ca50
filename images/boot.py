"""Boot a test guest under QEMU and talk to it: serial console and SSH. For tests.

This is test tooling, not the product runtime (that is :mod:`p2v.vm`): a plain QEMU
process with the serial console written to a file, user networking with SSH forwarded
to a free loopback port, and the disk behind a throw-away qcow2 overlay so the cached
image is never written. Typical use::

    with images.boot.boot_guest(images.ensure("debian-physical-bios"), fmt="raw",
                                disk_bus="ide", mac=GUESTS[...]["mac"]) as vm:
        vm.wait_for_login(timeout=300)
        assert vm.ssh("hostname").stdout.strip() == "srv-physical"

Acceleration follows :func:`p2v.vm.accel.probe` (TCG where KVM does not work).
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko

from images.keys import known_hosts_line, test_ssh_key
from p2v.errors import MissingComponent, VmError
from p2v.vm.accel import probe

log = logging.getLogger("images.boot")

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
LOGIN_PROMPT = re.compile(r"\S+ login: ?")
DISK_BUSES = ("ide", "sata", "virtio", "virtio-scsi")


@dataclass
class CommandResult:
    rc: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _disk_args(path: Path, fmt: str, bus: str, machine: str, cache: str) -> list[str]:
    drive = f"file={path},format={fmt},if=none,id=disk0,cache={cache}"
    if bus == "ide":
        return ["-drive", drive, "-device", "ide-hd,drive=disk0,bus=ide.0"]
    if bus == "sata":
        if machine.startswith("q35"):
            return ["-drive", drive, "-device", "ide-hd,drive=disk0,bus=ide.0"]
        return ["-device", "ahci,id=ahci0", "-drive", drive, "-device", "ide-hd,drive=disk0,bus=ahci0.0"]
    if bus == "virtio":
        return ["-drive", drive, "-device", "virtio-blk-pci,drive=disk0"]
    if bus == "virtio-scsi":
        return ["-device", "virtio-scsi-pci,id=scsi0", "-drive", drive,
                "-device", "scsi-hd,drive=disk0,bus=scsi0.0"]  # fmt: skip
    raise ValueError(f"disk bus {bus!r}: use one of {', '.join(DISK_BUSES)}")


class RunningGuest:
    """A QEMU process booting a test guest; see :func:`boot_guest`."""

    def __init__(self, argv: list[str], workdir: Path, ssh_port: int | None) -> None:
        self.argv = argv
        self.workdir = workdir
        self.ssh_port = ssh_port
        self.console_log = workdir / "console.log"
        self.console_log.touch()
        self._stderr = open(workdir / "qemu.stderr", "w+")  # closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr)

    # -- console ---------------------------------------------------------------------------
    def console(self) -> str:
        """Everything the guest wrote to its serial console so far."""
        return self.console_log.read_bytes().decode("utf-8", "replace").replace("\r", "")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _qemu_failed(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().strip()[-2000:]

    def wait_for_console(self, patterns: str | re.Pattern[str] | Sequence[str | re.Pattern[str]],
                         timeout: float) -> tuple[str, float]:  # fmt: skip
        """Wait until one of `patterns` (substrings or compiled regexes) shows on the console.

        Returns (the text that matched, seconds since QEMU started). Raises VmError on
        timeout or if QEMU exits, with the console tail in the message.
        """
        pats = [patterns] if isinstance(patterns, str | re.Pattern) else list(patterns)
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            for pat in pats:
                if isinstance(pat, re.Pattern):
                    m = pat.search(text)
                    if m:
                        return m.group(0), self.elapsed()
                elif pat in text:
                    return pat, self.elapsed()
            if self.proc.poll() is not None:
                raise VmError(
                    f"QEMU exited with status {self.proc.returncode} before the console showed "
                    f"{pats!r}: {self._qemu_failed()}\nconsole tail:\n{text[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise VmError(f"console did not show {pats!r} within {timeout:.0f}s; tail:\n{text[-2000:]}")
            time.sleep(0.5)

    def wait_for_login(self, timeout: float = 300) -> float:
        """Wait for a getty ``<host> login:`` prompt; return seconds since QEMU started."""
        return self.wait_for_console(LOGIN_PROMPT, timeout)[1]

    # -- ssh -------------------------------------------------------------------------------
    def _client(self, timeout: float) -> paramiko.SSHClient:
        if self.ssh_port is None:
            raise VmError("this guest was booted without SSH forwarding (ssh=False)")
        known = self.workdir / "known_hosts"
        known.write_text(known_hosts_line("127.0.0.1", self.ssh_port))
        client = paramiko.SSHClient()
        client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key = paramiko.Ed25519Key.from_private_key_file(str(test_ssh_key()))
        client.connect("127.0.0.1", port=self.ssh_port, username="root", pkey=key,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                       allow_agent=False, look_for_keys=False)  # fmt: skip
        return client

    def wait_for_ssh(self, timeout: float = 300) -> float:
        """Wait until root can log in with the test key; return seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VmError(f"QEMU exited with status {self.proc.returncode}: {self._qemu_failed()}")
            try:
                self._client(timeout=10).close()
                return self.elapsed()
            except (OSError, paramiko.SSHException) as exc:
                last = exc
                time.sleep(2)
        raise VmError(f"SSH to 127.0.0.1:{self.ssh_port} did not work within {timeout:.0f}s: {last}")

    def ssh(self, command: str, timeout: float = 120) -> CommandResult:
        """Run `command` as root over SSH; the exit status is in the result, not raised."""
        try:
            client = self._client(timeout=30)
        except (OSError, paramiko.SSHException) as exc:
            raise VmError(f"SSH to 127.0.0.1:{self.ssh_port} failed: {exc}") from exc
        try:
            _, out, err = client.exec_command(command, timeout=timeout)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
            rc = out.channel.recv_exit_status()
            return CommandResult(rc, stdout, stderr)
        except (OSError, paramiko.SSHException) as exc:
            raise VmError(f"SSH command {command!r} failed: {exc}") from exc
        finally:
            client.close()

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self, timeout: float = 10) -> None:
        """Kill QEMU (the overlay is thrown away anyway) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._stderr.close()


@contextmanager
def boot_guest(
    disk: Path,
    *,
    fmt: str,
    machine: str = "pc",
    firmware: str = "bios",
    disk_bus: str = "ide",
    nic_model: str | None = "e1000",
    mac: str | None = None,
    ssh: bool = True,
    memory_mib: int = 1024,
    cpus: int = 1,
    overlay: bool = True,
    extra_args: Sequence[str] = (),
    keep_console: Path | None = None,
) -> Iterator[RunningGuest]:
    """Start QEMU on `disk` and yield the :class:`RunningGuest`; always stopped and cleaned up.

    `overlay=True` boots a temporary qcow2 overlay (the image is never written).
    `firmware="uefi"` uses OVMF (read-only code + a fresh copy of the variable store).
    `keep_console`: copy the console log there on exit (for debugging failed tests).
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise MissingComponent("qemu-system-x86_64 is not installed")
    verdict = probe()
    workdir = Path(tempfile.mkdtemp(prefix="p2v-guest-"))
    guest: RunningGuest | None = None
    try:
        path, path_fmt = Path(disk).resolve(), fmt
        if overlay:
            ov = workdir / "overlay.qcow2"
            res = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(path), str(ov)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                raise VmError(f"{disk}: cannot create an overlay: {res.stderr.strip()}")
            path, path_fmt = ov, "qcow2"
        argv = [qemu, "-name", "p2v-test-guest", "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", f"{machine},accel={verdict.accel}", "-cpu", verdict.cpu,
                "-m", str(memory_mib), "-smp", str(cpus),
                "-serial", f"file:{workdir / 'console.log'}"]  # fmt: skip
        if firmware == "uefi":
            vars_copy = workdir / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]  # fmt: skip
        elif firmware != "bios":
            raise ValueError(f"firmware {firmware!r}: use 'bios' or 'uefi'")
        # A throw-away overlay needs no flushes; a disk the caller keeps does.
        argv += _disk_args(path, path_fmt, disk_bus, machine, "unsafe" if overlay else "writeback")
        port = free_port() if ssh else None
        if nic_model:
            netdev = "user,id=net0" + (f",hostfwd=tcp:127.0.0.1:{port}-:22" if port else "")
            nic = f"{nic_model},netdev=net0" + (f",mac={mac}" if mac else "")
            argv += ["-netdev", netdev, "-device", nic]
        argv += list(extra_args)
        log.info("starting %s", " ".join(argv))
        guest = RunningGuest(argv, workdir, port if nic_model else None)
        yield guest
    finally:
        if guest is not None:
            guest.stop()
            if keep_console is not None:
                shutil.copyfile(guest.console_log, keep_console)
        shutil.rmtree(workdir, ignore_errors=True)
