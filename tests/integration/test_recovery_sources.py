"""Is a production source up, and stopping it: a real sshd on loopback, a real QEMU with a QMP
socket, image files. (Powering off over SSH is exercised on a guest in tests/vm/test_recovery_vm.py:
never against this host's own sshd.)"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2v.errors import UsageError
from p2v.recovery.sources import source_reachable, stop_source
from p2v.vm.qmp import QmpConnection
from tests.sshd import LoopbackSshd
from tests.sshd import sshd_fixture as sshd_fixture


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_tcp() -> Iterator[int]:
    """A TCP port that accepts and then says nothing (like a forwarder whose far end is gone)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_ssh_source_is_up_only_when_it_sends_an_ssh_banner(sshd: LoopbackSshd, silent_tcp: int) -> None:
    assert source_reachable(sshd.url("/dev/sda"), timeout=5) is True
    assert source_reachable(f"ssh://root@127.0.0.1:{closed_port()}/dev/sda", timeout=2) is False
    t0 = time.monotonic()
    assert source_reachable(f"ssh://root@127.0.0.1:{silent_tcp}/dev/sda", timeout=1.5) is False
    assert time.monotonic() - t0 < 5, "a silent port must not hang the probe past its timeout"


def test_stopping_an_ssh_source_that_is_down_is_a_no_op() -> None:
    out = stop_source(f"ssh://root@127.0.0.1:{closed_port()}/dev/sda", timeout=5)
    assert (out.kind, out.method) == ("ssh", "already-stopped")


def test_image_file_sources(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    assert source_reachable(str(img)) is False
    img.write_bytes(b"\0" * 4096)
    assert source_reachable(str(img)) is True
    out = stop_source(str(img))
    assert (out.kind, out.method) == ("file", "nothing-to-stop")
    assert img.exists()
    with pytest.raises(UsageError):
        source_reachable("nfs://server/disk.img")


@pytest.fixture
def qemu_source(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A QEMU with no guest OS and its CPUs stopped (-S): it never reacts to the power button."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"qemu://{sock}?node=disk0", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_qemu_source_up_while_its_qmp_socket_accepts_then_stopped_by_quit(
    qemu_source: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, proc = qemu_source
    assert source_reachable(url) is True
    with QmpConnection(Path(url[len("qemu://") :].split("?")[0]), vm_name="other-client"):
        # another client (a running sync) holds the monitor: the process is still up
        assert source_reachable(url, timeout=2) is True
    out = stop_source(url, timeout=3)
    assert (out.kind, out.method) == ("qemu", "quit"), out
    assert 3 <= out.seconds < 20
    assert proc.wait(timeout=10) == 0
    assert source_reachable(url) is False
    again = stop_source(url, timeout=3)
    assert again.method == "already-stopped" and again.seconds < 3
