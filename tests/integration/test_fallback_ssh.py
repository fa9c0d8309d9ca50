"""Fallback over SSH (a real OpenSSH server on 127.0.0.1, tests/sshd.py) to a plain file on
the "production host", written by the streamed helper; then re-protection over SSH."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2v.protection import service
from p2v.protection.sources import SshOptions
from p2v.recovery.fallback_reprotect import reprotect_from_dr
from p2v.recovery.fallback_sync import SplitBrain, fallback_disk
from p2v.site.site import Site
from tests.integration.test_fallback_file import BS, copy_sparse, make_dr, same, write_at_dr
from tests.integration.test_protect_crash import MIB, scribble
from tests.sshd import (
    LoopbackSshd,
    sshd_fixture,  # noqa: F401  (the `sshd` fixture)
)

pytestmark = pytest.mark.integration


def opts(sshd: LoopbackSshd) -> SshOptions:
    return SshOptions(identity=sshd.client_key, known_hosts=sshd.known_hosts)


def test_ssh_equal_target_moves_what_changed_at_dr_then_reprotects(sshd: LoopbackSshd, tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=21)
    target = tmp_path / "prod-host-disk.raw"
    copy_sparse(dr.source, target)
    url = sshd.url(target)
    pre = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, url, ssh_options=opts(sshd), final=False)
    assert pre.target_state == "equal"
    assert pre.bytes_sent <= 1.2 * pre.bytes_changed_at_dr, pre
    assert pre.bytes_sent <= 1.02 * pre.bytes_allocated_at_dr, pre  # 4 KiB pieces + 13-byte frames
    # the classification costs the map (1/4096 of the disk) plus 24 bytes per mismatching block
    assert pre.scan_wire_bytes < 64 * MIB // 4096 + 4096, pre
    assert pre.verified_blocks == pre.blocks_sent > 0
    assert same(dr.overlay, "qcow2", target)
    write_at_dr(dr.overlay, random.Random(3), 3, 64 * MIB)
    final = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, url, ssh_options=opts(sshd))
    assert final.target_state == "equal" and 0 < final.bytes_sent <= 6 * (BS + 64), final
    assert same(dr.overlay, "qcow2", target)
    reprotect_from_dr(dr.site, "m", dr.seq, [dr.overlay], target_urls=[url], ssh_options=opts(sshd))
    dr.site.close()
    first = service.sync(dr.site_path, "m", ssh=opts(sshd))
    assert first["bytes_written"] == 0, first  # no reseed
    assert first["bytes_sent"] < 256 * 1024, first  # helper protocol only
    scribble(target, random.Random(8), 256)
    second = service.sync(dr.site_path, "m", ssh=opts(sshd))
    assert 900 * 1024 < second["bytes_written"] <= 256 * 4096, second
    assert second["bytes_sent"] < 4 * MIB, second
    assert service.verify(dr.site_path, "m", all_points=True)["ok"]


def test_ssh_blank_target_full_copy(sshd: LoopbackSshd, tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=22)
    target = tmp_path / "blank.raw"
    with open(target, "wb") as f:
        f.truncate(64 * MIB)
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, sshd.url(target), ssh_options=opts(sshd))
    assert res.target_state == "blank"
    assert 32 * MIB <= res.bytes_written <= 36 * MIB, res
    assert res.bytes_sent < res.bytes_written * 1.01, res
    assert same(dr.overlay, "qcow2", target)


def test_ssh_split_brain_then_discard(sshd: LoopbackSshd, tmp_path: Path) -> None:
    dr = make_dr(tmp_path, seed=23)
    target = tmp_path / "survivor.raw"
    copy_sparse(dr.source, target)
    with open(target, "r+b") as f:
        f.seek(50 * MIB)
        f.write(random.Random(1).randbytes(3 * BS))  # 3 blocks written at production after failover
    url = sshd.url(target)
    with pytest.raises(SplitBrain) as err:
        fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, url, ssh_options=opts(sshd))
    assert f"{3 * BS} bytes in 3 blocks" in err.value.message and url in err.value.message
    res = fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, url, ssh_options=opts(sshd),
                        discard_production_changes=True)  # fmt: skip
    assert res.target_state == "diverged" and res.divergence_bytes == 3 * BS
    assert same(dr.overlay, "qcow2", target)


def test_ssh_missing_device_and_small_target(sshd: LoopbackSshd, tmp_path: Path) -> None:
    from p2v.errors import SourceNotFound, UsageError

    dr = make_dr(tmp_path, seed=24, size=16 * MIB)
    with pytest.raises(SourceNotFound, match="no-such-disk"):
        fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, sshd.url(tmp_path / "no-such-disk"), ssh_options=opts(sshd))
    small = tmp_path / "small.raw"
    with open(small, "wb") as f:
        f.truncate(8 * MIB)
    with pytest.raises(UsageError, match="smaller than the protected disk"):
        fallback_disk(dr.site, "m", dr.seq, 0, dr.overlay, sshd.url(small), ssh_options=opts(sshd))
    assert Site.open(dr.site_path).machine("m").disks[0].url == str(dr.source)
