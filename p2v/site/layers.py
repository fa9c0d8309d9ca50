"""Recovery-point layers on disk: qcow2 overlays made and merged with qemu-img, plus the
fsync/rename steps that make a layer durable, and the "no space left" reading of errors.

Layers use 128 KiB clusters with extended L2 entries: 32 subclusters of 4 KiB each, so a 4 KiB
write into an overlay allocates 4 KiB on the site's filesystem, not a whole cluster.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from p2v.errors import MissingComponent, OutputError, P2VError, SiteError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
BASE_LAYER = "base.qcow2"  # the oldest remaining point's layer: no backing file
BASE_MAP = "base.map"
LAYER_RE = r"(base|rp-\d{6,})\.(qcow2|map)"  # layer and map files the site owns
LAYER_OPTIONS = "cluster_size=128k,extended_l2=on"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")


def layer_stem(seq: int) -> str:
    """File stem of point ``seq``'s layer when it is not the oldest point: ``rp-000007``."""
    return f"rp-{seq:06d}"


def no_space_error(site: Path, detail: str) -> OutputError:
    return OutputError(
        f"no space left on the DR site at {site} ({detail})",
        hint="free space on the site's filesystem (p2v retention merges old points); earlier points are intact",
    )


def is_no_space(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) means the filesystem or the quota is full."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in NO_SPACE_ERRNOS:
            return True
        text = (cur.message if isinstance(cur, P2VError) else str(cur)).lower()
        if any(t in text for t in _NO_SPACE_TEXT) or "database or disk is full" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _qemu_img(args: Sequence[str], *, what: Path, site: Path, keep_fds: Sequence[int] = (),
              timeout: float = 24 * 3600) -> None:  # fmt: skip
    """Run qemu-img; ``keep_fds`` (the machine lock) stay open in the child so the lock is held
    as long as qemu-img writes, even if this process is killed."""
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout, check=False, pass_fds=tuple(keep_fds)
        )
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise SiteError(f"{what}: qemu-img {args[0]} did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        msg = "; ".join(ln.removeprefix("qemu-img: ") for ln in lines[-3:]) or f"exit status {proc.returncode}"
        if any(t in proc.stderr.lower() for t in _NO_SPACE_TEXT):
            raise no_space_error(site, f"qemu-img {args[0]} {what.name}: {msg}")
        raise SiteError(f"{what}: qemu-img {args[0]} failed: {msg}")


def create_layer(path: Path, size: int, backing: str | None, *, site: Path, keep_fds: Sequence[int] = ()) -> None:
    """A new empty qcow2 layer of ``size`` bytes; ``backing`` is a file name in the same folder."""
    args = ["create", "-q", "-f", "qcow2", "-o", LAYER_OPTIONS]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    args += [str(path), str(size)]
    _qemu_img(args, what=path, site=site, keep_fds=keep_fds, timeout=600)
    _dig_holes(path)


def _dig_holes(path: Path) -> None:
    """Free the all-zero parts of a new layer's metadata clusters (about 250 KiB a layer with
    128 KiB clusters). Holes read as zeros, so the image is unchanged; best effort."""
    try:
        subprocess.run(["fallocate", "--dig-holes", str(path)], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s: fallocate --dig-holes: %s", path, exc)


def commit_layer(path: Path, *, site: Path, keep_fds: Sequence[int] = ()) -> None:
    """Write ``path``'s data into its backing file. ``path`` stays as it is (``-d``): reads through
    ``path`` and its backing give the same bytes before, during and after."""
    _qemu_img(["commit", "-q", "-f", "qcow2", "-d", str(path)], what=path, site=site, keep_fds=keep_fds)


def rebase_layer(path: Path, backing: str, *, site: Path, keep_fds: Sequence[int] = ()) -> None:
    """Point ``path`` at another backing file without copying data (``rebase -u``): only correct
    when the new backing reads the same as the old chain, which the caller guarantees."""
    _qemu_img(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(path)],
              what=path, site=site, keep_fds=keep_fds, timeout=600)  # fmt: skip


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies on the filesystem (qcow2 layers are sparse)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` (atomic) and fsync their folder."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def remove_files(paths: Sequence[Path]) -> list[Path]:
    """Delete what exists of ``paths``; returns those removed. Folder fsynced once per folder."""
    removed: list[Path] = []
    for p in paths:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            continue
    for folder in {p.parent for p in removed}:
        fsync_dir(folder)
    return removed
