"""A small synchronous QMP connection on top of ``qemu.qmp``'s asyncio client.

The runtime is synchronous; ``qemu.qmp.QMPClient`` is asyncio. Each connection
runs the client in its own private event loop (never the thread's global one,
so it cannot disturb callers that use asyncio themselves). Every ``qemu.qmp``
error, timeout and socket error becomes a :class:`~p2v.errors.VmError` that
names the VM and the command, with the cause kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from p2v.errors import VmError

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S = 30.0


class QmpConnection:
    """One QMP session over a QEMU unix socket (``with QmpConnection(...) as qmp:``)."""

    def __init__(
        self, socket_path: Path, *, vm_name: str, timeout: float = DEFAULT_COMMAND_TIMEOUT_S
    ) -> None:
        self.socket_path = socket_path
        self.vm_name = vm_name
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(vm_name)
        self._connected = False

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and negotiate capabilities; raise :class:`VmError` if QEMU does not answer."""
        try:
            self._run(self._client.connect(str(self.socket_path)), timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            self._reset()
            raise VmError(
                f"VM {self.vm_name}: cannot connect to its QMP socket {self.socket_path}: {_describe(exc)}"
            ) from exc
        self._connected = True

    def execute(
        self, command: str, arguments: dict[str, object] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        if not self._connected:
            raise VmError(f"VM {self.vm_name}: QMP command {command!r} sent on a closed connection")
        try:
            return self._run(self._client.execute(command, arguments), timeout or self.timeout)
        except ExecuteError as exc:
            raise VmError(f"VM {self.vm_name}: QMP command {command!r} failed: {exc}") from exc
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            raise VmError(f"VM {self.vm_name}: QMP command {command!r}: {_describe(exc)}") from exc

    def _reset(self) -> None:
        try:
            self._run(self._client.disconnect(), 5.0)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            log.debug("QMP disconnect from %s: %s", self.vm_name, _describe(exc))
        except Exception as exc:  # disconnect re-raises whatever ended the reader
            log.debug("QMP disconnect from %s: %r", self.vm_name, exc)

    def close(self) -> None:
        """Disconnect (errors from a QEMU that already exited are ignored) and close the loop."""
        if self._loop.is_closed():
            return
        self._reset()
        self._connected = False
        self._loop.close()

    def __enter__(self) -> QmpConnection:
        if not self._connected:
            self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    cause = exc.__cause__ or getattr(exc, "exc", None)
    text = str(exc) or exc.__class__.__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {cause}"
    return text
