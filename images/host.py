"""Build-host plumbing for the recipes: running tools, scratch folders, chroot mounts.

Everything here is careful about one danger: a scratch tree with /dev, /proc or /sys
bind-mounted into it must never be deleted recursively. :func:`remove_tree` refuses
to delete a tree that still has anything mounted under it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from p2v.errors import MissingComponent

log = logging.getLogger("images")

# PATH for commands run inside a Debian chroot (the host's PATH may lack /usr/sbin).
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandFailed(RuntimeError):
    """A build command exited non-zero; the message carries its stderr tail."""


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    input_text: str | None = None,
) -> str:
    """Run `argv`, return stdout; raise :class:`CommandFailed` with stderr on failure."""
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        raise MissingComponent(f"{argv[0]}: not installed on this host (needed to build test images)")
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            input=input_text,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{' '.join(argv)}: timed out after {timeout}s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise CommandFailed(f"{' '.join(argv)}: exit status {proc.returncode}: {tail}")
    return proc.stdout


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    root = os.path.realpath(path)
    found: list[Path] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == root or mnt.startswith(root + "/"):
                found.append(Path(mnt))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """``rm -rf path`` unless something is still mounted below it (then unmount first)."""
    for mnt in mounts_under(path):
        subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True, check=False)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"{path}: refusing to delete, still mounted: {', '.join(map(str, left))}")
    shutil.rmtree(path, ignore_errors=False)


@contextmanager
def scratch_dir(label: str) -> Iterator[Path]:
    """A temporary folder in the cache file system, removed (safely) afterwards."""
    from images.cache import cache_root

    work = cache_root() / ".work"
    work.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{label}-{os.getpid()}-", dir=work))
    try:
        yield path
    finally:
        remove_tree(path)


@contextmanager
def chroot_mounts(root: Path) -> Iterator[Path]:
    """Bind /dev, /dev/pts, /proc, /sys into `root`; always unmounted on exit."""
    mounted: list[Path] = []
    try:
        for fs, args in (
            ("proc", ["-t", "proc", "proc"]),
            ("sys", ["-t", "sysfs", "sysfs"]),
            ("dev", ["--bind", "/dev"]),
            ("dev/pts", ["--bind", "/dev/pts"]),
        ):
            target = root / fs
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *args, str(target)])
            mounted.append(target)
        yield root
    finally:
        for target in reversed(mounted):
            res = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "--lazy", str(target)], capture_output=True, check=False)


def in_chroot(
    root: Path, argv: Sequence[str], *, timeout: float | None = 600, input_text: str | None = None
) -> str:
    """Run `argv` inside `root` (which must be under :func:`chroot_mounts`)."""
    env = {
        "PATH": CHROOT_PATH,
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
    }
    return run(["chroot", str(root), *argv], env=env, timeout=timeout, input_text=input_text)


def write_file(root: Path, rel: str, text: str, mode: int = 0o644) -> Path:
    """Write `text` to `root/rel` (creating folders), replacing a symlink if one is there."""
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)
    return path
