"""The serial console of a VM: the log QEMU writes, and attaching a terminal to it.

QEMU writes every byte the guest sends to its serial port into ``console.log``
(chardev ``logfile=``), whether or not anyone is attached to the console
socket, so reading the log never stalls the guest and never misses boot output.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import select
import socket
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2v.errors import VmError

DETACH_BYTE = 0x1D  # Ctrl-]
_CHUNK = 65536


class ConsoleLog:
    """Incremental reader of a console log, with a cursor for successive pattern waits.

    Text is decoded as UTF-8 (bad bytes replaced) and carriage returns are
    dropped, so ``^``/``$`` in MULTILINE patterns work on serial output.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.cursor = 0  # where the next search starts, an index into ``text``

    def read_new(self) -> str:
        """Append what QEMU wrote since the last call; return the new text."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self._offset += len(data)
        new = self._decoder.decode(data).replace("\r", "")
        self.text += new
        return new

    def search(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        """Search from the cursor; on a match, move the cursor past it."""
        m = pattern.search(self.text, self.cursor)
        if m:
            self.cursor = m.end()
        return m

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text.rstrip("\n").splitlines()[-lines:])


def tail_file(path: Path, lines: int = 20, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a console log (empty when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def follow(
    path: Path,
    *,
    from_start: bool = True,
    keep_going: Callable[[], bool] = lambda: True,
    poll_s: float = 0.25,
) -> Iterator[str]:
    """Yield text as it is appended to ``path`` (like ``tail -f``) while ``keep_going()`` is true.

    When ``keep_going()`` turns false, what was written in the meantime is
    yielded and the iteration ends.
    """
    reader = ConsoleLog(path)
    if not from_start:
        reader.read_new()
    while True:
        alive = keep_going()
        new = reader.read_new()
        if new:
            yield new
        if not alive:
            return
        if not new:
            time.sleep(poll_s)


def attach(
    socket_path: Path,
    *,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    detach_byte: int = DETACH_BYTE,
    vm_name: str = "",
) -> str:
    """Connect the terminal to the VM's serial console until Ctrl-] (or the VM goes away).

    A TTY on ``stdin_fd`` is put in raw mode (so Ctrl-C reaches the guest) and
    always restored. Returns why the session ended: ``"detached"``, ``"closed"``
    (QEMU closed the console) or ``"eof"`` (stdin ended). Raises :class:`VmError`
    when the console socket cannot be reached.
    """
    who = f"VM {vm_name}" if vm_name else str(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as exc:
        sock.close()
        raise VmError(f"{who}: cannot attach to the console socket {socket_path}: {exc.strerror}") from exc
    saved: list[Any] | None = None
    if os.isatty(stdin_fd):
        saved = termios.tcgetattr(stdin_fd)
        tty.setraw(stdin_fd)
    try:
        return _pump(sock, stdin_fd, stdout_fd, detach_byte)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pump(sock: socket.socket, stdin_fd: int, stdout_fd: int, detach_byte: int) -> str:
    sock_fd = sock.fileno()
    while True:
        readable, _, _ = select.select([sock_fd, stdin_fd], [], [])
        if sock_fd in readable:
            data = sock.recv(_CHUNK)
            if not data:
                return "closed"
            _write_all(stdout_fd, data)
        if stdin_fd in readable:
            data = os.read(stdin_fd, _CHUNK)
            if not data:
                return "eof"
            cut = data.find(bytes([detach_byte]))
            if cut >= 0:
                if cut:
                    sock.sendall(data[:cut])
                return "detached"
            sock.sendall(data)
