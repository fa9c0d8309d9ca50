"""What changed at the DR site since failover, found without reading the disk.

The DR VM runs on qcow2 overlays above the layer of the recovery point it started from
(``overlay -> ... -> layer of P -> ... -> base``). Every byte it (or the conversion) changed
is allocated in one of the layers above P's layer, so ``qemu-img map`` of the DR image lists
them: entries whose ``depth`` is smaller than the depth of P's layer in the chain. Rounded
out to the hash map's block size, that is the set C of blocks changed at DR.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.disks.nbd import NbdDisk
from p2v.errors import InvalidInput, MissingComponent, UsageError
from p2v.replication.model import DIGEST_SIZE, UNKNOWN_DIGEST, HashMap, digest

QEMU_IMG = "qemu-img"
READ_RUN = 4 << 20  # largest read of consecutive blocks
LOCKED_HINT = (
    "stop the DR VM first (final sync), or give a frozen layer: after a QMP blockdev-snapshot-sync "
    "the old overlay no longer changes and can be pre-synced while the VM runs"
)


def _qemu_img_json(args: list[str], what: str) -> Any:
    try:
        proc = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise InvalidInput(f"{what}: qemu-img {args[0]} did not finish in 600 s") from exc
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        msg = err[-1].removeprefix("qemu-img: ") if err else f"exit status {proc.returncode}"
        if "lock" in proc.stderr.lower() or "another process" in proc.stderr.lower():
            raise InvalidInput(f"{what}: in use by another process (a running DR VM?): {msg}", hint=LOCKED_HINT)
        raise InvalidInput(f"{what}: {msg}")
    return json.loads(proc.stdout)


def backing_chain(image: Path) -> list[Path]:
    """The files of ``image``'s chain, top first (absolute paths)."""
    image = Path(image).absolute()
    if not image.is_file():
        raise UsageError(f"DR image {image}: no such file")
    info = _qemu_img_json(["info", "--backing-chain", "--output=json", "-f", "qcow2", str(image)],
                          f"DR image {image}")  # fmt: skip
    chain: list[Path] = []
    for entry in info:
        p = Path(entry["filename"])
        if not p.is_absolute():
            p = (chain[-1].parent if chain else Path.cwd()) / p
        chain.append(p)
    return chain


def point_depth(dr_image: Path, point_layer: Path) -> int:
    """How many layers lie above ``point_layer`` in ``dr_image``'s chain (UsageError if it is not in it)."""
    chain = backing_chain(dr_image)
    for depth, p in enumerate(chain):
        try:
            if os.path.samefile(p, point_layer):
                return depth
        except OSError:
            continue
    names = " -> ".join(str(p) for p in chain)
    raise UsageError(
        f"DR image {dr_image} is not based on {point_layer} (its chain: {names})",
        hint="give the overlay the DR VM of this recovery point ran on",
    )


@dataclass
class DrChanges:
    """What the layers above the point allocate: merged byte extents and the blocks they touch."""

    block_size: int
    extents: list[tuple[int, int]] = field(default_factory=list)  # (start, end), ascending, merged
    blocks: list[int] = field(default_factory=list)  # ascending block indexes (C)

    @property
    def allocated_bytes(self) -> int:
        return sum(e - s for s, e in self.extents)

    def pieces(self, index: int, length: int) -> list[tuple[int, int]]:
        """``(offset_in_block, length)`` of block ``index``'s allocated parts (the rest is P's content)."""
        lo = index * self.block_size
        hi = lo + length
        k = bisect.bisect_right(self.extents, (lo, 1 << 62)) - 1
        out: list[tuple[int, int]] = []
        for s, e in self.extents[max(k, 0) :]:
            if s >= hi:
                break
            a, b = max(s, lo), min(e, hi)
            if a < b:
                out.append((a - lo, b - a))
        return out


def dr_changes(dr_image: Path, point_layer: Path, block_size: int, size: int) -> DrChanges:
    """The extents and ``block_size`` blocks that layers above ``point_layer`` allocate."""
    out = DrChanges(block_size)
    depth = point_depth(dr_image, point_layer)
    if depth == 0:
        return out
    entries = _qemu_img_json(["map", "--output=json", "-f", "qcow2", str(Path(dr_image).absolute())],
                             f"DR image {dr_image}")  # fmt: skip
    count = (size + block_size - 1) // block_size
    last = -1
    for e in entries:
        if int(e["depth"]) >= depth:
            continue
        start = int(e["start"])
        stop = min(size, start + int(e["length"]))
        if start >= stop:
            continue
        if out.extents and out.extents[-1][1] == start:
            out.extents[-1] = (out.extents[-1][0], stop)
        else:
            out.extents.append((start, stop))
        first = max(start // block_size, last + 1)
        end = min(count, (stop + block_size - 1) // block_size)
        if first < end:
            out.blocks.extend(range(first, end))
            last = end - 1
    return out


def changed_blocks(dr_image: Path, point_layer: Path, block_size: int, size: int) -> list[int]:
    """Sorted indexes of the ``block_size`` blocks that layers above ``point_layer`` allocate."""
    return dr_changes(dr_image, point_layer, block_size, size).blocks


def block_runs(indexes: Iterable[int], block_size: int, size: int) -> Iterator[tuple[int, int]]:
    """``(first_index, count)`` runs of consecutive blocks, at most :data:`READ_RUN` bytes each."""
    per_run = max(1, READ_RUN // block_size)
    first = prev = -2
    for i in indexes:
        if i == prev + 1 and i - first < per_run:
            prev = i
            continue
        if first >= 0:
            yield first, prev - first + 1
        first = prev = i
    if first >= 0:
        yield first, prev - first + 1


def read_blocks(disk: NbdDisk, indexes: Iterable[int], block_size: int, size: int) -> Iterator[tuple[int, bytes]]:
    """``(index, content)`` of each block in ``indexes`` (ascending), read in runs."""
    for first, count in block_runs(indexes, block_size, size):
        off = first * block_size
        data = disk.pread(min(count * block_size, size - off), off)
        for k in range(count):
            yield first + k, data[k * block_size : (k + 1) * block_size]


def unknown_blocks(m: HashMap) -> list[int]:
    """Indexes of the blocks whose digest ``m`` does not know."""
    data = bytes(m.data)
    out: list[int] = []
    pos = data.find(UNKNOWN_DIGEST)
    while pos >= 0:
        if pos % DIGEST_SIZE:
            pos = data.find(UNKNOWN_DIGEST, pos + 1)
            continue
        out.append(pos // DIGEST_SIZE)
        pos = data.find(UNKNOWN_DIGEST, pos + DIGEST_SIZE)
    return out


def resolve_unknown(m: HashMap, image: NbdDisk) -> int:
    """Replace :data:`UNKNOWN_DIGEST` entries of ``m`` with digests read from ``image``; how many."""
    unknown = unknown_blocks(m)
    for i, data in read_blocks(image, unknown, m.block_size, m.size):
        m[i] = digest(data)
    return len(unknown)
