"""Fallback to an image-file production target, and re-protection without reseed (real
qemu-img / qemu-nbd / SQLite; no mocks).

Set-up shared by the tests: a raw "production" disk protected at a site (point P), a DR
overlay above P's layer into which "the DR VM" wrote a few MiB at random offsets.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2v.disks.nbd import open_layer
from p2v.errors import InvalidInput, UsageError
from p2v.protection import service
from p2v.protection.service import ProtectOptions
from p2v.recovery.fallback_reprotect import reprotect_from_dr
from p2v.recovery.fallback_sync import SplitBrain, fallback_disk
from p2v.replication.model import UNKNOWN_DIGEST, HashMap
from p2v.site.site import Site
from tests.integration.test_protect_crash import MIB, make_disk, scribble

pytestmark = pytest.mark.integration

BS = 64 * 1024


@dataclass
class DrSetup:
    site_path: Path
    site: Site
    source: Path
    seq: int
    overlay: Path


def same(a: Path, a_fmt: str, b: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", "raw", str(a), str(b)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return res.returncode == 0


def write_at_dr(overlay: Path, rnd: random.Random, pieces: int, size: int) -> int:
    """Write ``pieces`` random runs (4 KiB .. 64 KiB, 4 KiB aligned) into the DR overlay."""
    total = 0
    with open_layer(overlay) as layer:
        for _ in range(pieces):
            n = rnd.randrange(1, 17) * 4096
            off = rnd.randrange((size - n) // 4096) * 4096
            layer.pwrite(rnd.randbytes(n), off)
            total += n
        layer.flush()
    return total


def make_dr(tmp_path: Path, size: int = 64 * MIB, seed: int = 1, name: str = "m") -> DrSetup:
    site_path, source = tmp_path / "site", tmp_path / "prod.raw"
    make_disk(source, size, seed=seed)
    service.protect_add(site_path, name, [str(source)], ProtectOptions(block_size=BS))
    site = Site.open(site_path)
    seq = site.point(name).seq
    overlay = tmp_path / "dr-disk0.qcow2"
    # like the failover's overlays (p2v.recovery.drvm): 4 KiB subclusters, so allocation shows each write
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on", "-F",
                    "qcow2", "-b", str(site.point_image(name, seq, 0)), str(overlay)], check=True)  # fmt: skip
    write_at_dr(overlay, random.Random(seed + 100), 60, size)  # ~2 MiB at DR
    return DrSetup(site_path, site, source, seq, overlay)


def copy_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def test_equal_target_gets_only_what_changed_at_dr_then_presync_and_final(tmp_path: Path) -> None:
    dr = make_dr(tmp_path)
    target = tmp_path / "target.raw"
    copy_sparse(dr.source, target)
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target), final=False)
    assert res.target_state == "equal"
    assert res.divergence_bytes == 0
    assert 0 < res.bytes_changed_at_dr < 8 * MIB  # C, from the overlay's allocation only
    assert res.bytes_sent <= 1.2 * res.bytes_changed_at_dr, res
    # only the 4 KiB pieces the DR layer allocates travel, not their whole 64 KiB blocks
    assert res.bytes_sent <= res.bytes_allocated_at_dr < res.bytes_changed_at_dr, res
    assert res.dr_bytes_read <= res.bytes_changed_at_dr  # the DR disk was not read whole
    assert res.verified_blocks == res.blocks_sent > 0
    assert same(dr.overlay, "qcow2", target)
    # the DR VM writes on (4 runs: at most 8 blocks); the final pass moves only those
    more = write_at_dr(dr.overlay, random.Random(5), 4, 64 * MIB)
    final = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    assert final.target_state == "equal"
    assert 0 < final.bytes_sent <= 8 * BS and final.bytes_sent >= more // 2, final
    assert same(dr.overlay, "qcow2", target)
    again = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    assert again.bytes_sent == 0 and again.blocks_sent == 0


def test_blank_target_gets_a_full_copy(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=2)
    target = tmp_path / "blank.raw"
    with open(target, "wb") as f:
        f.truncate(64 * MIB)
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    assert res.target_state == "blank"
    # make_disk fills half the disk plus a tail block: about that much must move, zeros do not
    assert 32 * MIB <= res.bytes_sent <= 36 * MIB, res
    assert same(dr.overlay, "qcow2", target)


def test_qcow2_target_and_unknown_digests_in_the_point_map(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=3)
    map_path = dr.site.point_map("m", dr.seq, 0)
    m = HashMap.load(map_path)
    for i in (0, 5, 100):  # blocks the map does not know: computed from P's image first
        m[i] = UNKNOWN_DIGEST
    m.save(map_path)
    target = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(dr.source), str(target)], check=True)
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    assert res.target_state == "equal"
    assert res.bytes_sent <= 1.2 * res.bytes_changed_at_dr
    res2 = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(dr.overlay), str(target)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert res2.returncode == 0, res2.stdout + res2.stderr


def test_split_brain_is_refused_with_its_size_then_discarded_on_request(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=4)
    target = tmp_path / "target.raw"
    copy_sparse(dr.source, target)
    with open(target, "r+b") as f:  # production wrote after failover: two blocks, one of them in the hole
        f.seek(40 * MIB + 8192)
        f.write(b"production" * 100)
        f.seek(3 * BS)
        f.write(b"\x07" * 4096)
    before = target.read_bytes()
    with pytest.raises(SplitBrain) as err:
        fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    assert err.value.exit_code == 17
    msg = err.value.message
    assert "machine m disk 0" in msg and str(target) in msg
    assert f"{2 * BS} bytes in 2 blocks" in msg
    assert target.read_bytes() == before  # nothing written
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target), discard_production_changes=True)
    assert res.target_state == "diverged"
    assert res.divergence_bytes == 2 * BS and res.divergence_blocks == 2
    assert same(dr.overlay, "qcow2", target)


def test_dr_image_of_another_point_is_refused(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=5)
    stray = tmp_path / "stray.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(stray), "64M"], check=True)
    with pytest.raises(UsageError, match="not based on"):
        fallback_disk(dr.site, "m", dr.seq, 0, stray, str(dr.source))


def test_reprotect_from_dr_then_sync_moves_only_changes_after_fallback(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=6)
    target = tmp_path / "rebuilt.raw"
    copy_sparse(dr.source, target)
    fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
    point = reprotect_from_dr(dr.site, "m", dr.seq, [dr.overlay], target_urls=[str(target)])
    assert point.seq == dr.seq + 1 and point.mode == "fallback"
    assert 0 < point.bytes_written <= 1.2 * point.layers[0].counters["blocks_changed"] * BS
    assert dr.site.machine("m").disks[0].url == str(target)
    dr.site.close()
    first = service.sync(dr.site_path, "m")
    assert first["mode"] == "hash"
    assert first["bytes_written"] == 0, first  # no reseed: production already equals the new point
    scribble(target, random.Random(9), 256)  # 1 MiB in 4 KiB pieces after fallback
    second = service.sync(dr.site_path, "m")
    assert 900 * 1024 < second["bytes_written"] <= 256 * 4096, second
    rep = service.verify(dr.site_path, "m", all_points=True)
    assert rep["ok"], rep
    site = Site.open(dr.site_path)
    assert same(site.point_image("m", None, 0), "qcow2", target)
    site.close()


def test_fallback_on_a_running_layer_is_refused_with_advice(tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=7, size=16 * MIB)
    holder = subprocess.Popen(["qemu-nbd", "--persistent", "--socket", str(tmp_path / "s.sock"), "-f", "qcow2",
                               str(dr.overlay)], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1.0)  # qemu-nbd holds the image's write lock, as a running DR VM does
        target = tmp_path / "t.raw"
        shutil.copyfile(dr.source, target)
        with pytest.raises(InvalidInput) as err:
            fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, str(target))
        assert "in use by another process" in err.value.message and str(dr.overlay) in err.value.message
        assert err.value.hint and "stop the DR VM" in err.value.hint
    finally:
        holder.terminate()
        holder.wait()
