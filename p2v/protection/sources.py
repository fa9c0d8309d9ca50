"""Open the sources of a protected machine for one sync: SSH devices (one session per host,
read through a consistent view), live QEMU drives, and image files."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from p2v.errors import SourceNotFound, UsageError
from p2v.replication.consistency import ConsistentView, Hooks
from p2v.replication.model import DiskSource
from p2v.sources.ssh import SshTarget, parse_ssh_url
from p2v.sources.ssh_copy import remote_device_size
from p2v.sources.ssh_session import SshSession

__all__ = ["Hooks", "OpenedDisk", "SshOptions", "open_sources", "source_kind", "worst"]

LEVELS = ("app-consistent", "crash-consistent", "fuzzy")


@dataclass
class SshOptions:
    identity: Path | None = None
    known_hosts: Path | None = None


@dataclass
class OpenedDisk:
    url: str
    source: DiskSource
    size: int
    consistency: str  # one of LEVELS
    detail: str = ""


def source_kind(url: str) -> str:
    low = url.lower()
    if low.startswith("ssh://"):
        return "ssh"
    if low.startswith("qemu://"):
        return "qemu"
    if "://" in url:
        raise UsageError(f"unsupported source URL {url!r}", hint="use ssh://USER@HOST/DEV, qemu:///QMP.sock?node=N "
                         "or an image file path")  # fmt: skip
    return "file"


def file_size(path: Path) -> int:
    """Virtual size of an image file of any format qemu reads."""
    if not path.exists():
        raise SourceNotFound(f"{path}: no such file")
    res = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    if res.returncode != 0:
        raise SourceNotFound(f"{path}: qemu-img cannot open it: {res.stderr.strip()}")
    return int(json.loads(res.stdout)["virtual-size"])


def worst(levels: list[str]) -> str:
    """The weakest consistency among several disks (a machine's point is as good as its worst disk)."""
    return max(levels, key=LEVELS.index) if levels else "fuzzy"


@dataclass
class _FileView:
    """A regular file on the source host, read live."""

    device: str
    level: str = "fuzzy"
    method: str = "none"
    detail: str = "image file on the source host, read live"


def _all_regular_files(session: SshSession, paths: list[str]) -> bool:
    res = session.run(["sh", "-c", 'for f in "$@"; do [ -f "$f" ] || exit 1; done', "p2v-kind", *paths],
                      timeout=60, check=False)  # fmt: skip
    return res.rc == 0


@contextmanager
def open_sources(
    urls: list[str],
    *,
    block_size: int,
    consistency: str = "auto",
    hooks: Hooks | None = None,
    ssh: SshOptions | None = None,
    compress: bool = False,
    bwlimit: int | None = None,
) -> Iterator[list[OpenedDisk]]:
    """Open every source URL of a machine, in order; sessions, views and exports close on exit.

    The SSH disks of one host share one session and are captured together (one point in time
    for all of them, hooks run once per host)."""
    ssh = ssh or SshOptions()
    with ExitStack() as stack:
        opened: dict[int, OpenedDisk] = {}
        by_host: dict[tuple[str, int, str], list[tuple[int, str, SshTarget]]] = {}
        for i, url in enumerate(urls):
            kind = source_kind(url)
            if kind == "file":
                from p2v.replication.delta import FileDiskSource

                if not Path(url).exists():
                    raise SourceNotFound(f"{url}: no such file")
                src = FileDiskSource(Path(url), block_size=block_size)
                stack.callback(src.close)
                opened[i] = OpenedDisk(url, src, src.size, "crash-consistent", "image file")
            elif kind == "qemu":
                from p2v.replication.qemu_live import LiveQemuSource, parse_qemu_url

                sock, node = parse_qemu_url(url)
                live = LiveQemuSource(sock, node, block_size=block_size)
                stack.callback(live.close)
                opened[i] = OpenedDisk(url, live, live.size, live.consistency,
                                       "point-in-time export of the running VM's drive")  # fmt: skip
            else:
                t = parse_ssh_url(url)
                by_host.setdefault((t.host, t.port, t.user), []).append((i, url, t))
        for disks in by_host.values():
            from p2v.replication.consistency import consistent_views
            from p2v.replication.delta_ssh import SshDiskSource

            session = stack.enter_context(disks[0][2].session(identity=ssh.identity, known_hosts=ssh.known_hosts))
            sizes = [remote_device_size(session, t.device) for _, _, t in disks]
            if consistency in ("auto", "none") and _all_regular_files(session, [t.device for _, _, t in disks]):
                # image files on the source host (no partitions to snapshot or freeze): read as they are
                views: Sequence[_FileView | ConsistentView] = [_FileView(t.device) for _, _, t in disks]
            else:
                views = stack.enter_context(
                    consistent_views(session, [t.device for _, _, t in disks], consistency, hooks)
                )
            for (i, url, _), size, view in zip(disks, sizes, views, strict=True):
                ssrc = SshDiskSource(session, view.device, size, block_size=block_size, compress=compress,
                                     bwlimit=bwlimit, url=url)  # fmt: skip
                stack.callback(ssrc.close)
                opened[i] = OpenedDisk(url, ssrc, size, view.level, f"{view.method}: {view.detail}")
        yield [opened[i] for i in range(len(urls))]
