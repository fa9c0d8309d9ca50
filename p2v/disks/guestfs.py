"""libguestfs handles as context managers, with our acceleration choice and error wrapping."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p2v.errors import ConversionError, MissingComponent
from p2v.vm.accel import probe

log = logging.getLogger(__name__)


def _new_handle() -> Any:
    try:
        import guestfs
    except ImportError as exc:  # pragma: no cover - environment problem
        raise MissingComponent(
            "python3-guestfs is not importable",
            hint="apt-get install python3-guestfs and build the venv with --system-site-packages",
        ) from exc
    return guestfs.GuestFS(python_return_dict=True)


@contextmanager
def open_guestfs(
    drives: Sequence[tuple[Path | str, str]],
    *,
    readonly: bool,
    memsize_mib: int = 1024,
    extra_ro: Sequence[tuple[Path | str, str]] = (),
) -> Iterator[Any]:
    """Launch an appliance over ``drives`` ([(path, format)]) and yield the handle.

    Writable handles are shut down (flushing the disks) before close; errors from
    libguestfs become :class:`ConversionError` naming the first drive.
    """
    g = _new_handle()
    verdict = probe()
    if not verdict.kvm_usable:
        g.set_backend_settings(["force_tcg"])
    g.set_smp(max(1, min(2, os.cpu_count() or 1)))
    g.set_memsize(memsize_mib)
    what = str(drives[0][0]) if drives else "(no drive)"
    try:
        for path, fmt in drives:
            g.add_drive_opts(str(path), format=fmt, readonly=readonly)
        for path, fmt in extra_ro:
            g.add_drive_opts(str(path), format=fmt, readonly=True)
        g.launch()
    except RuntimeError as exc:
        g.close()
        raise ConversionError(f"{what}: libguestfs could not open the disk: {exc}") from exc
    try:
        yield g
        if not readonly:
            try:
                g.shutdown()
            except RuntimeError as exc:
                raise ConversionError(f"{what}: flushing guest disk failed: {exc}") from exc
    finally:
        g.close()
