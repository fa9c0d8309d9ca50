"""`p2v protect add` / `p2v sync` over a real OpenSSH server on 127.0.0.1 (tests/sshd.py):
the delta moves about what changed, a dropped connection fails cleanly and the next sync
completes, and a host whose key changed is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_protect_crash import MIB, make_disk, points, same_content, scribble, verify_all
from tests.sshd import (
    LoopbackSshd,
    sshd_fixture,  # noqa: F401  (the `sshd` fixture)
)

pytestmark = pytest.mark.integration


def p2v_ssh(sshd: LoopbackSshd, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "p2v", *args, "--identity", str(sshd.client_key), "--known-hosts",
           str(sshd.known_hosts)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stderr}")
    return proc


def test_ssh_seed_then_delta_moves_only_changes(sshd: LoopbackSshd, tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 128 * MIB, seed=11)
    add = json.loads(p2v_ssh(sshd, "protect", "add", "s1", sshd.url(disk), "--site", str(site), "--json").stdout)
    seed = add["point"]
    assert seed["mode"] == "seed"
    # zeros are skipped: about half the disk is a hole
    assert seed["bytes_sent"] < 80 * MIB, seed
    scribble(disk, random.Random(7), 256)  # 1 MiB in 4 KiB pieces
    point = json.loads(p2v_ssh(sshd, "sync", "s1", "--site", str(site), "--json").stdout)
    assert point["mode"] == "hash"
    # 256 x 4 KiB changed (maybe fewer distinct): the wire carries ~1 MiB plus maps and sub-hashes
    assert 900 * 1024 < point["bytes_written"] <= 256 * 4096, point
    assert point["bytes_sent"] < 4 * MIB, point
    assert same_content(point["layers"][0]["path"], disk)
    verify_all(site, "s1")


def test_dropped_connection_fails_cleanly_then_next_sync_completes(sshd: LoopbackSshd, tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 64 * MIB, seed=12)
    p2v_ssh(sshd, "protect", "add", "s2", sshd.url(disk), "--site", str(site))
    with open(disk, "r+b") as f:  # a big change so the sync takes a while
        f.write(random.Random(13).randbytes(48 * MIB))
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2v", "sync", "s2", "--site", str(site), "--identity", str(sshd.client_key),
         "--known-hosts", str(sshd.known_hosts), "--bwlimit", "8M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    timer = threading.Timer(2.0, sshd.stop)
    timer.start()
    _, err = proc.communicate(timeout=300)
    timer.join()
    assert proc.returncode == 7, err
    assert "127.0.0.1" in err and str(disk) in err
    assert len(points(site, "s2")) == 1
    assert list(site.rglob("*.partial")) == []
    sshd.start()
    time.sleep(0.5)
    point = json.loads(p2v_ssh(sshd, "sync", "s2", "--site", str(site), "--json").stdout)
    assert same_content(point["layers"][0]["path"], disk)
    verify_all(site, "s2")


def test_changed_host_key_is_refused(sshd: LoopbackSshd, tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 16 * MIB, seed=14)
    p2v_ssh(sshd, "protect", "add", "s3", sshd.url(disk), "--site", str(site))
    sshd.rotate_host_key()
    proc = p2v_ssh(sshd, "sync", "s3", "--site", str(site), check=False)
    assert proc.returncode == 6, proc.stderr
    assert "changed" in proc.stderr.lower()
    assert len(points(site, "s3")) == 1
