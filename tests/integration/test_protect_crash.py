"""Crash safety of `p2v sync` on a file source (real qemu-img/qemu-nbd/SQLite, no mocks):
kill -9 at random moments never damages an earlier point; the next sync cleans up and succeeds;
a full site filesystem fails cleanly; two syncs at once are refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def p2v(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "p2v", *args], capture_output=True, text=True, check=False,
                          env=env)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"p2v {' '.join(args)} -> {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def make_disk(path: Path, size: int, seed: int) -> None:
    """Random data in the first half, zeros (a hole) in the rest, a few random blocks at the end."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size // 2, 4 * MIB):
            f.seek(off)
            f.write(rnd.randbytes(4 * MIB))
        f.seek(size - 64 * 1024)
        f.write(rnd.randbytes(64 * 1024))


def scribble(path: Path, rnd: random.Random, blocks: int) -> None:
    """Rewrite ``blocks`` random 4 KiB blocks of the file."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(blocks):
            f.seek(rnd.randrange(size // 4096) * 4096)
            f.write(rnd.randbytes(4096))


def points(site: Path, name: str) -> list[dict]:
    return json.loads(p2v("points", name, "--site", str(site), "--json").stdout)["points"]


def verify_all(site: Path, name: str) -> dict:
    proc = p2v("verify", name, "--all", "--site", str(site), "--json", check=False)
    rep = json.loads(proc.stdout)
    assert proc.returncode == 0, rep
    assert all(r["ok"] for r in rep["points"]), rep
    return rep


def same_content(point_image: str, source: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", point_image, str(source)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return res.returncode == 0


def qemu_nbd_serving(under: Path) -> list[str]:
    """qemu-nbd processes serving an image under ``under``."""
    out = subprocess.run(["pgrep", "-a", "qemu-nbd"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(under) in line]


def test_kill_9_at_random_moments_never_damages_earlier_points(tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 96 * MIB, seed=1)
    p2v("protect", "add", "m1", str(disk), "--site", str(site), "--json")
    rnd = random.Random(42)
    scribble(disk, rnd, 300)
    t0 = time.monotonic()
    p2v("sync", "m1", "--site", str(site), "--json")
    full = time.monotonic() - t0
    killed = 0
    for trial in range(10):
        before = points(site, "m1")
        scribble(disk, rnd, 300)
        proc = subprocess.Popen([sys.executable, "-m", "p2v", "sync", "m1", "--site", str(site), "--json"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rnd.uniform(0.0, full * 0.8))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        time.sleep(0.2)
        assert qemu_nbd_serving(tmp_path) == [], f"trial {trial}: qemu-nbd outlived a killed p2v"
        after = points(site, "m1")
        # every earlier point is still listed, unchanged, and verifies
        assert [p["seq"] for p in after[: len(before)]] == [p["seq"] for p in before], trial
        verify_all(site, "m1")
    assert killed >= 5, f"only {killed} of 10 syncs were killed mid-way (sync takes {full:.1f}s)"
    # the next sync cleans up whatever the kills left and succeeds
    final = json.loads(p2v("sync", "m1", "--site", str(site), "--json").stdout)
    rep = verify_all(site, "m1")
    assert rep["points"][-1]["seq"] == final["seq"]
    assert same_content(final["layers"][0]["path"], disk)
    leftovers = [p.name for p in (site).rglob("*.partial")]
    assert leftovers == []


def test_second_sync_of_the_same_machine_is_refused(tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 64 * MIB, seed=2)
    p2v("protect", "add", "m2", str(disk), "--site", str(site))
    lock = site / "machines" / "m2" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(lock)!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = p2v("sync", "m2", "--site", str(site), check=False)
        assert proc.returncode == 13, proc.stderr
        assert "m2" in proc.stderr and str(holder.pid) in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    p2v("sync", "m2", "--site", str(site))


def test_source_size_change_is_refused(tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    make_disk(disk, 32 * MIB, seed=3)
    p2v("protect", "add", "m3", str(disk), "--site", str(site))
    with open(disk, "r+b") as f:
        f.truncate(48 * MIB)
    proc = p2v("sync", "m3", "--site", str(site), "--json", check=False)
    assert proc.returncode == 15, proc.stderr
    assert str(disk) in proc.stderr and "size" in proc.stderr
    assert len(points(site, "m3")) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_site_filesystem_fails_cleanly(tmp_path: Path) -> None:
    site, disk = tmp_path / "site", tmp_path / "disk.raw"
    site.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "p2vtest-full", str(site)], check=True)
    try:
        make_disk(disk, 64 * MIB, seed=4)
        with open(disk, "r+b") as f:  # 16 MiB of data: the seed fits
            f.truncate(0)
            f.truncate(64 * MIB)
            f.write(random.Random(5).randbytes(16 * MIB))
        p2v("protect", "add", "m4", str(disk), "--site", str(site))
        with open(disk, "r+b") as f:  # 40 MiB more: it does not
            f.seek(20 * MIB)
            f.write(random.Random(6).randbytes(40 * MIB))
        proc = p2v("sync", "m4", "--site", str(site), "--json", check=False)
        assert proc.returncode == 11, proc.stderr
        assert "no space" in proc.stderr.lower()
        assert list(site.rglob("*.partial")) == []
        assert len(points(site, "m4")) == 1
        verify_all(site, "m4")
        st = json.loads(p2v("status", "--site", str(site), "--json").stdout)
        assert st["machines"][0]["last_result"] == "failed"
    finally:
        subprocess.run(["umount", "-l", str(site)], check=False)
