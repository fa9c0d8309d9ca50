"""Verify a recovery point: recompute its block digests and compare with its hash map, or
compare it with the source image it was synced from.

A mismatch is reported, never repaired; the caller raises :class:`~p2v.errors.VerifyFailed`
(see :meth:`VerifyReport.raise_if_failed`). Blocks the map marks unknown are skipped and
counted. Zero extents of the image (holes, zero clusters) are checked against the map
without being read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.disks.formats import detect_format
from p2v.disks.nbd import NbdDisk, open_image
from p2v.errors import VerifyFailed
from p2v.replication.delta import Progress, block_digest, layer_fits, zeros
from p2v.replication.model import DIGEST_SIZE, UNKNOWN_DIGEST, ZERO_DIGEST, HashMap, ProgressCallback

MAX_REPORTED = 10
SCAN_CHUNK = 4 << 20


@dataclass
class VerifyReport:
    """What a verify found. ``mismatched`` holds the first few bad block indexes."""

    image: str
    against: str  # "hash map" or the source path
    block_size: int
    blocks: int
    blocks_checked: int = 0
    bytes_checked: int = 0  # bytes whose content was compared (read, or known zero)
    bytes_read: int = 0
    unknown_skipped: int = 0
    mismatches: int = 0
    mismatched: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    @property
    def mismatched_offsets(self) -> list[int]:
        return [i * self.block_size for i in self.mismatched]

    def _mismatch(self, index: int) -> None:
        self.mismatches += 1
        if len(self.mismatched) < MAX_REPORTED:
            self.mismatched.append(index)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "mismatched_offsets": self.mismatched_offsets}

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        offsets = ", ".join(str(o) for o in self.mismatched_offsets)
        more = f" and {self.mismatches - len(self.mismatched)} more" if self.mismatches > len(self.mismatched) else ""
        raise VerifyFailed(
            f"{self.image}: {self.mismatches} of {self.blocks_checked} blocks do not match the {self.against} "
            f"(at offsets {offsets}{more})",
            hint="the recovery point is damaged; sync again to create a good point, and check the DR storage",
        )


def verify_point(
    image_top: Path, hashmap: HashMap, *, fmt: str = "qcow2", progress: ProgressCallback | None = None
) -> VerifyReport:
    """Recompute the digests of the point whose chain top is ``image_top`` and compare with
    ``hashmap``. A size that differs from the map's raises :class:`VerifyFailed`."""
    started = time.monotonic()
    bs = hashmap.block_size
    report = VerifyReport(str(image_top), "hash map", bs, hashmap.count)
    with open_image(Path(image_top), fmt, what=str(image_top)) as disk:
        if not layer_fits(disk.size, hashmap.size):
            raise VerifyFailed(f"{image_top}: the image is {disk.size} bytes, its hash map says {hashmap.size}")
        tick = Progress(progress, hashmap.size)
        data_map = hashmap.data
        for off, length, data in disk.scan(bs, 0, hashmap.size, chunk=SCAN_CHUNK):
            first = off // bs
            count = (length + bs - 1) // bs
            if data is None:
                lo, hi = first * DIGEST_SIZE, (first + count) * DIGEST_SIZE
                report.bytes_checked += length
                if data_map[lo:hi] == zeros(hi - lo):
                    report.blocks_checked += count
                else:
                    for i in range(first, first + count):
                        _compare(report, i, hashmap[i], ZERO_DIGEST)
            else:
                report.bytes_read += length
                for k in range(count):
                    expected = hashmap[first + k]
                    if expected == UNKNOWN_DIGEST:
                        report.unknown_skipped += 1
                        continue
                    report.bytes_checked += min(bs, length - k * bs)
                    _compare(report, first + k, expected, block_digest(data[k * bs : (k + 1) * bs]))
            tick(off + length)
        tick(hashmap.size, force=True)
    report.wall_s = time.monotonic() - started
    return report


def _compare(report: VerifyReport, index: int, expected: bytes, actual: bytes) -> None:
    if expected == UNKNOWN_DIGEST:
        report.unknown_skipped += 1
        return
    report.blocks_checked += 1
    if expected != actual:
        report._mismatch(index)


def verify_against_source(
    image_top: Path,
    source: Path,
    *,
    source_fmt: str | None = None,
    fmt: str = "qcow2",
    block_size: int = 64 * 1024,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Compare the point whose chain top is ``image_top`` with the image file ``source``
    byte for byte (both read once, through read-only qemu-nbd)."""
    started = time.monotonic()
    source = Path(source)
    sfmt = source_fmt or detect_format(source)
    with (
        open_image(Path(image_top), fmt, what=str(image_top)) as point,
        open_image(source, sfmt, what=str(source)) as src,
    ):
        if point.size != src.size:
            raise VerifyFailed(f"{image_top}: the point is {point.size} bytes, the source {source} is {src.size}")
        bs = block_size
        report = VerifyReport(str(image_top), str(source), bs, (src.size + bs - 1) // bs)
        tick = Progress(progress, src.size)
        for off, length, data in src.scan(bs, chunk=SCAN_CHUNK):
            if data is not None:
                report.bytes_read += length
            for at in range(off, off + length, SCAN_CHUNK):  # zero runs can be huge: compare in pieces
                n = min(SCAN_CHUNK, off + length - at)
                expected = data[at - off : at - off + n] if data is not None else zeros(n)
                _compare_range(report, at, expected, _read_or_zero(point, at, n), bs)
            tick(off + length)
        tick(src.size, force=True)
    report.wall_s = time.monotonic() - started
    return report


def _compare_range(report: VerifyReport, offset: int, expected: bytes, ours: bytes, bs: int) -> None:
    report.bytes_checked += len(expected)
    if ours == expected:
        report.blocks_checked += (len(expected) + bs - 1) // bs
        return
    for k in range(0, len(expected), bs):
        report.blocks_checked += 1
        if ours[k : k + bs] != expected[k : k + bs]:
            report._mismatch((offset + k) // bs)


def _read_or_zero(disk: NbdDisk, offset: int, length: int) -> bytes:
    """Read a range, skipping the read where block status says it is all zeros."""
    if all(zero for _, _, zero in disk.extents(offset, length)):
        return zeros(length)
    return disk.pread(length, offset)
