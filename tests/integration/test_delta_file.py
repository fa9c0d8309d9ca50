"""Hash-mode sync of image files into qcow2 recovery-point layers, and verify (real qemu)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from p2v.disks.nbd import open_layer
from p2v.errors import SourceChanged, VerifyFailed
from p2v.replication.delta import FileDiskSource
from p2v.replication.model import HashMap, SyncResult
from p2v.replication.verify import verify_against_source, verify_point

MiB = 1 << 20
BS = 64 * 1024
SIZE = 96 * MiB


def new_layer(path: Path, size: int = SIZE, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2", str(path)]
    else:
        args += [str(path), str(size)]
    subprocess.run(args, check=True, cwd=path.parent)
    return path


def make_disk(path: Path, size: int = SIZE, seed: int = 1) -> None:
    """Random data with zero regions (every third 8 MiB is a hole, one region holds written zeros)."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, 8 * MiB):
            if (off // (8 * MiB)) % 3 != 2:
                f.seek(off)
                f.write(rng.randbytes(6 * MiB))
        f.seek(MiB)
        f.write(bytes(MiB))  # explicit zeros inside data


def scribble(path: Path, pieces: int, seed: int) -> set[int]:
    """Rewrite ``pieces`` random 4 KiB pieces; returns their indexes."""
    rng = random.Random(seed)
    size = path.stat().st_size
    chosen = {rng.randrange(size // 4096) for _ in range(pieces)}
    with path.open("r+b") as f:
        for p in sorted(chosen):
            f.seek(p * 4096)
            f.write(rng.randbytes(4096))
    return chosen


def images_equal(a: Path, a_fmt: str, b: Path, b_fmt: str = "qcow2") -> bool:
    res = subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, str(a), str(b)], capture_output=True)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode == 0


def sync_into(layer: Path, source: FileDiskSource, old: HashMap, state: dict[str, object]) -> SyncResult:
    with open_layer(layer) as target:
        return source.sync(target, old, state)


@pytest.fixture(name="seeded")
def seeded_fixture(tmp_path: Path) -> tuple[Path, Path, SyncResult]:
    src = tmp_path / "source.raw"
    make_disk(src)
    base = new_layer(tmp_path / "base.qcow2")
    result = sync_into(base, FileDiskSource(src), HashMap.zeros(SIZE, BS), {})
    return src, base, result


def test_seed_copies_the_disk_and_skips_zeros(seeded: tuple[Path, Path, SyncResult]) -> None:
    src, base, result = seeded
    c = result.counters
    assert c.mode == "seed"
    assert images_equal(src, "raw", base)
    data = sum(6 * MiB for off in range(0, SIZE, 8 * MiB) if (off // (8 * MiB)) % 3 != 2) - MiB
    assert c.bytes_written == data  # the holes and the explicit zeros were not written
    assert c.bytes_read <= data + 4 * MiB  # holes were not even read
    assert verify_point(base, result.hashmap).ok


def test_delta_writes_about_what_changed_and_earlier_point_stays(
    tmp_path: Path, seeded: tuple[Path, Path, SyncResult]
) -> None:
    src, base, first = seeded
    before = tmp_path / "before.raw"
    subprocess.run(["cp", "--sparse=always", str(src), str(before)], check=True)
    changed = scribble(src, 300, seed=7)
    with src.open("r+b") as f:  # a region that became zero
        f.seek(3 * MiB)
        f.write(bytes(2 * BS))
    top = new_layer(tmp_path / "rp-2.qcow2", backing=base)
    second = sync_into(top, FileDiskSource(src), first.hashmap, first.state)
    c = second.counters
    assert c.mode == "hash"
    assert images_equal(src, "raw", top)
    assert images_equal(before, "raw", base)  # the earlier point is untouched
    assert len(changed) * 4096 * 0.9 <= c.bytes_written <= len(changed) * 4096
    assert c.extra["bytes_zeroed"] == 2 * BS
    # the layer holds ~the changed pieces (4 KiB subclusters), not 64 KiB blocks
    allocated = top.stat().st_blocks * 512
    assert allocated < len(changed) * 4096 * 2 + 2 * MiB
    assert verify_point(top, second.hashmap).ok
    assert verify_point(base, first.hashmap).ok
    report = verify_against_source(top, src)
    assert report.ok and report.bytes_checked == SIZE


def test_flipped_byte_in_a_layer_is_reported(tmp_path: Path, seeded: tuple[Path, Path, SyncResult]) -> None:
    src, base, first = seeded
    scribble(src, 50, seed=9)
    top = new_layer(tmp_path / "rp-2.qcow2", backing=base)
    second = sync_into(top, FileDiskSource(src), first.hashmap, first.state)
    assert verify_point(top, second.hashmap).ok
    # find a data cluster stored in the top layer and flip one byte of it on disk
    mapping = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)],
                                        check=True, capture_output=True, text=True).stdout)  # fmt: skip
    extent = next(e for e in mapping if e["data"] and e["depth"] == 0 and "offset" in e)
    with top.open("r+b") as f:
        f.seek(extent["offset"] + 17)
        byte = f.read(1)
        f.seek(extent["offset"] + 17)
        f.write(bytes([byte[0] ^ 0x40]))
    report = verify_point(top, second.hashmap)
    assert not report.ok
    assert report.mismatches == 1
    assert report.mismatched == [(extent["start"] + 17) // BS]
    assert report.mismatched_offsets == [(extent["start"] + 17) // BS * BS]
    with pytest.raises(VerifyFailed, match=r"rp-2\.qcow2: 1 of \d+ blocks do not match the hash map \(at offsets"):
        report.raise_if_failed()
    assert not verify_against_source(top, src).ok


def test_unknown_map_entries_are_skipped_and_counted(seeded: tuple[Path, Path, SyncResult]) -> None:
    _, base, first = seeded
    m = first.hashmap.copy()
    m[3] = b"\xff" * 16
    m[4] = b"\xff" * 16
    report = verify_point(base, m)
    assert report.ok and report.unknown_skipped == 2


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc"])
def test_other_source_formats(tmp_path: Path, fmt: str) -> None:
    raw = tmp_path / "disk.raw"
    make_disk(raw, 32 * MiB, seed=3)
    ext = {"qcow2": "qcow2", "vmdk": "vmdk", "vpc": "vhd"}[fmt]
    img = tmp_path / f"disk.{ext}"
    opts = ["-o", "subformat=fixed,force_size=on"] if fmt == "vpc" else []
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(img)], check=True)
    source = FileDiskSource(img)
    assert source.fmt == fmt and source.size == 32 * MiB
    layer = new_layer(tmp_path / "base.qcow2", 32 * MiB)
    result = sync_into(layer, source, HashMap.zeros(32 * MiB, BS), {})
    assert images_equal(raw, "raw", layer)
    assert verify_point(layer, result.hashmap).ok


def test_size_change_is_refused_with_both_sizes(seeded: tuple[Path, Path, SyncResult], tmp_path: Path) -> None:
    src, base, first = seeded
    os.truncate(src, SIZE + MiB)
    top = new_layer(tmp_path / "rp-2.qcow2", backing=base)
    with pytest.raises(SourceChanged, match=rf"source\.raw is now {SIZE + MiB} bytes, the site recorded {SIZE}"):
        sync_into(top, FileDiskSource(src), first.hashmap, first.state)


def test_progress_reaches_the_end(tmp_path: Path) -> None:
    src = tmp_path / "source.raw"
    make_disk(src, 16 * MiB)
    seen: list[tuple[int, int]] = []
    layer = new_layer(tmp_path / "base.qcow2", 16 * MiB)
    with open_layer(layer) as target:
        FileDiskSource(src).sync(target, HashMap.zeros(16 * MiB), {}, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (16 * MiB, 16 * MiB)
    assert all(d <= t for d, t in seen)
