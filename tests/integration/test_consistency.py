"""Consistent views over real SSH (tests/sshd.py on 127.0.0.1, logged in as root) on this host.

The source disk is a loop device over a sparse file holding ext4, mounted: enough for the
``none`` and ``freeze`` modes, hooks, errors and the removal of a crashed run's leftovers.
The LVM snapshot scenario (:func:`lvm_snapshot_scenario`) needs device-mapper in the kernel;
it runs here when the host has it, and always in tests/vm/test_consistency_lvm.py (a Debian
guest, since this host's kernel may have no device-mapper at all).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2v.disks.guestfs import open_guestfs
from p2v.errors import RemoteError, SourceNotFound, UsageError
from p2v.replication.consistency import Hooks, consistent_view
from p2v.sources.ssh_session import SshSession
from tests.sshd import LoopbackSshd, sshd_fixture  # noqa: F401  (the `sshd` fixture)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mount, fsfreeze)"),
]

MiB = 1 << 20


def _run(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=check)


def p2v_objects() -> str:
    """Everything named p2v-* on this host: dm devices, LVs, loop backing files, /run files."""
    out = _run(
        "dmsetup ls 2>/dev/null | grep p2v- ; lvs --noheadings -o lv_name 2>/dev/null | grep p2v- ; "
        "losetup -a | grep p2v- ; ls /run | grep '^p2v-' ; true"
    ).stdout
    return out.strip()


@dataclass
class MountedFs:
    image: Path
    device: str  # /dev/loopN
    mountpoint: Path


@pytest.fixture
def mounted_fs(tmp_path: Path) -> Iterator[MountedFs]:
    """ext4 on a loop device, mounted, with a file in it; always unmounted and detached."""
    image = tmp_path / f"p2vtest-{uuid.uuid4().hex[:8]}.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    _run(f"mkfs.ext4 -q -F {image}")
    res = _run(f"losetup --find --show {image}", check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {res.stderr.strip()}")
    device = res.stdout.strip()
    mnt = tmp_path / "p2vtest-mnt"
    mnt.mkdir()
    try:
        _run(f"mount {device} {mnt}")
        (mnt / "old.txt").write_text("old\n")
        _run("sync")
        yield MountedFs(image, device, mnt)
    finally:
        _run(f"fsfreeze -u {mnt} 2>/dev/null; umount {mnt} 2>/dev/null; losetup -d {device}", check=False)


@pytest.fixture
def session(sshd: LoopbackSshd) -> Iterator[SshSession]:
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        yield s


def _writer(path: Path, text: str) -> subprocess.Popen[bytes]:
    """A process writing ``text`` to ``path`` and syncing it (blocks while the fs is frozen)."""
    return subprocess.Popen(["sh", "-c", f"echo {shlex.quote(text)} > {shlex.quote(str(path))} && sync"])


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    assert proc.wait(timeout) == 0
    return time.monotonic() - t0


# -- none, auto without LVM, errors ------------------------------------------------------


def test_none_reads_the_device_itself_and_says_the_point_is_fuzzy(session: SshSession, mounted_fs: MountedFs):
    with consistent_view(session, mounted_fs.device, "none") as view:
        assert (view.device, view.level, view.method) == (mounted_fs.device, "fuzzy", "none")
        assert view.detail == f"live read (mounted read-write: {mounted_fs.mountpoint})"
        assert view.size == 64 * MiB and view.taken_at is None
        head = session.run(["dd", f"if={view.device}", "bs=4096", "count=1", "status=none"]).stdout
        assert len(head) == 4096
    assert view.warnings == [] and p2v_objects() == ""


def test_auto_without_lvm_falls_back_to_fuzzy_and_says_why(session: SshSession, mounted_fs: MountedFs):
    with consistent_view(session, mounted_fs.device, "auto") as view:
        assert (view.device, view.level, view.method) == (mounted_fs.device, "fuzzy", "none")
        assert "no LVM snapshot: " in view.detail
    assert p2v_objects() == ""
    # asking for a snapshot explicitly is refused with the reason, exit code 2
    with pytest.raises(UsageError, match=rf"{mounted_fs.device}: an LVM snapshot is not possible: ") as exc:
        with consistent_view(session, mounted_fs.device, "lvm-snapshot"):
            pytest.fail("the block must not run")
    assert exc.value.exit_code == 2
    assert p2v_objects() == ""


def test_bad_device_and_bad_mode_are_refused(session: SshSession, tmp_path: Path):
    with pytest.raises(SourceNotFound, match=r"/dev/p2vtest-nonexistent.*not a block device") as exc:
        with consistent_view(session, "/dev/p2vtest-nonexistent", "auto"):
            pytest.fail("the block must not run")
    assert exc.value.exit_code == 3
    with pytest.raises(UsageError, match="consistency mode 'fsfreeze'"):
        with consistent_view(session, "/dev/null", "fsfreeze"):
            pytest.fail("the block must not run")
    assert p2v_objects() == ""


# -- hooks ------------------------------------------------------------------------------


def test_pre_hook_runs_before_and_post_hook_after_the_read(session: SshSession, mounted_fs: MountedFs):
    log = mounted_fs.mountpoint / "hooks.log"
    hooks = Hooks(pre=[f"echo pre >> {log}"], post=[f"echo post >> {log}"], timeout_s=30)
    with consistent_view(session, mounted_fs.device, "none", hooks) as view:
        assert log.read_text() == "pre\n"  # a live read has no earlier point-in-time: post comes after it
        assert view.level == "fuzzy" and view.detail.endswith("; 1 pre hook ok")
    assert log.read_text() == "pre\npost\n"


def test_a_failing_pre_hook_aborts_names_the_hook_and_still_runs_post(session: SshSession, mounted_fs: MountedFs):
    log = mounted_fs.mountpoint / "hooks.log"
    hooks = Hooks(pre=[f"echo flushing >> {log}", "echo 'database refused' >&2; exit 3"], post=[f"echo post >> {log}"])
    with pytest.raises(RemoteError, match=r"pre hook `echo 'database refused' >&2; exit 3` failed with exit status 3: "
                                          r"database refused") as exc:  # fmt: skip
        with consistent_view(session, mounted_fs.device, "freeze", hooks):
            pytest.fail("the block must not run")
    assert exc.value.exit_code == 7
    assert log.read_text() == "flushing\npost\n"
    assert p2v_objects() == ""  # and nothing stays frozen:
    assert _wait(_writer(mounted_fs.mountpoint / "after.txt", "x"), 10) < 5


def test_a_hanging_pre_hook_times_out(session: SshSession, mounted_fs: MountedFs):
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match=r"pre hook `sleep 60` timed out after 1 s"):
        with consistent_view(session, mounted_fs.device, "none", Hooks(pre=["sleep 60"], timeout_s=1)):
            pytest.fail("the block must not run")
    assert time.monotonic() - t0 < 20


# -- freeze -----------------------------------------------------------------------------


def test_freeze_blocks_writes_during_the_read_and_thaws_after(session: SshSession, mounted_fs: MountedFs):
    mnt = mounted_fs.mountpoint
    with consistent_view(session, mounted_fs.device, "freeze", Hooks(pre=["sync"])) as view:
        assert (view.device, view.level, view.method) == (mounted_fs.device, "app-consistent", "freeze")
        assert view.detail == f"froze {mnt} for the read; 1 pre hook ok"
        assert view.taken_at is not None and abs(view.taken_at - time.time()) < 30
        writer = _writer(mnt / "during.txt", "written during the freeze")
        time.sleep(2)
        assert writer.poll() is None, "a write to a frozen filesystem must block"
        # the device reads fine meanwhile (the helper only reads, and writes to stdout)
        data = session.run(["sh", "-c", f"dd if={view.device} bs=1M status=none | wc -c"]).text
        assert int(data) == 64 * MiB
        frozen_for = time.monotonic()
    assert _wait(writer, 30) < 10
    assert time.monotonic() - frozen_for < 10
    assert (mnt / "during.txt").read_text() == "written during the freeze\n"
    assert p2v_objects() == "" and view.warnings == []


def test_a_dropped_connection_thaws_the_source(sshd: LoopbackSshd, mounted_fs: MountedFs):
    mnt = mounted_fs.mountpoint
    with SshSession(**sshd.session_args()) as s:  # type: ignore[arg-type]
        with pytest.raises(RemoteError):
            with consistent_view(s, mounted_fs.device, "freeze") as view:
                writer = _writer(mnt / "during.txt", "x")
                time.sleep(1)
                assert writer.poll() is None
                sshd.stop()  # the connection drops: the holder sees end of input and thaws
                waited = _wait(writer, 30)
        assert any("connection lost" in w for w in view.warnings)
    assert waited < 15
    # the crashed run's state file stays until the next run, which removes it
    assert "p2v-" in p2v_objects()
    sshd.start()
    with SshSession(**sshd.session_args()) as s2:  # type: ignore[arg-type]
        with consistent_view(s2, mounted_fs.device, "freeze"):
            pass
    assert p2v_objects() == ""


def test_the_freeze_limit_thaws_and_makes_the_read_fail(session: SshSession, mounted_fs: MountedFs):
    writer = None
    with pytest.raises(RemoteError, match="freeze limit of 2 s passed before the read finished"):
        with consistent_view(session, mounted_fs.device, "freeze", max_freeze_s=2):
            writer = _writer(mounted_fs.mountpoint / "during.txt", "x")
            assert _wait(writer, 20) < 10  # thawed by the limit while still inside the block
    assert writer is not None and p2v_objects() == ""


def test_leftovers_of_a_crashed_run_are_removed_and_live_runs_are_not(session: SshSession, mounted_fs: MountedFs):
    mnt = mounted_fs.mountpoint
    dead, live = "0badc0de", "cafef00d"
    # a crashed run: owner gone, a capture file, and the filesystem it froze still frozen
    Path(f"/run/p2v-{dead}.state").write_text(f"owner 4194303 1\nfrozen {mnt}\n")
    Path(f"/run/p2v-meta-{dead}.img").write_bytes(b"\0" * 4096)
    # another p2v that is still running (its owner, this test process, is alive)
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    Path(f"/run/p2v-{live}.state").write_text(f"owner {os.getpid()} {start}\n")
    try:
        _run(f"fsfreeze -f {mnt}")
        writer = _writer(mnt / "blocked.txt", "x")
        with consistent_view(session, mounted_fs.device, "auto") as view:
            assert _wait(writer, 30) < 15  # thawed by the new run's clean-up of the dead one
            assert not Path(f"/run/p2v-meta-{dead}.img").exists()
            assert not Path(f"/run/p2v-{dead}.state").exists()
        assert Path(f"/run/p2v-{live}.state").exists()
        assert view.warnings == []
    finally:
        for name in (f"p2v-{dead}.state", f"p2v-meta-{dead}.img", f"p2v-{live}.state"):
            Path("/run", name).unlink(missing_ok=True)


# -- LVM snapshots (shared with the vm tier) --------------------------------------------


def remote_sh(session: SshSession, cmd: str, timeout: float = 120) -> str:
    return session.run(["sh", "-c", cmd], timeout=timeout).text


def remote_p2v_objects(session: SshSession) -> str:
    return remote_sh(
        session,
        "dmsetup ls 2>/dev/null | grep p2v- ; lvs --noheadings -o lv_name 2>/dev/null | grep p2v- ; "
        "losetup -a | grep p2v- ; ls /run | grep '^p2v-' ; true",
    ).strip()


def build_lvm_disk(session: SshSession, disk: str, part: str, vg: str, root: str) -> str:
    """GPT on ``disk``: 1 = 32 MiB ext4 at ROOT/boot, 2 = 128 MiB PV, 3 = the rest, a PV with two
    metadata copies. VG ``vg``: data (40 MiB on 2 + 60 MiB on 3: two segments), logs (24 MiB);
    ext4 on both, mounted at ROOT/data and ROOT/logs, with old files. Returns old.bin's sha256."""
    remote_sh(
        session,
        f"""set -e
printf 'label: gpt\\nsize=32MiB\\nsize=128MiB, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\\n\
size=+, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\\n' | sfdisk -q {disk}
udevadm settle 2>/dev/null || sleep 1
mkfs.ext4 -q -F {part}1
pvcreate -q -y {part}2
pvcreate -q -y --pvmetadatacopies 2 {part}3
vgcreate -q {vg} {part}2 {part}3
lvcreate -q -y -n data -L 40M {vg} {part}2
lvcreate -q -y -n logs -L 24M {vg} {part}2
lvextend -q -L +60M {vg}/data {part}3
mkfs.ext4 -q -F /dev/{vg}/data
mkfs.ext4 -q -F /dev/{vg}/logs
mkdir -p {root}/boot {root}/data {root}/logs
mount {part}1 {root}/boot
mount /dev/{vg}/data {root}/data
mount /dev/{vg}/logs {root}/logs
echo old-boot > {root}/boot/old.txt
echo old-data > {root}/data/old.txt
echo old-logs > {root}/logs/old.txt
head -c 80M /dev/urandom > {root}/data/old.bin
sync
""",
        timeout=300,
    )
    return remote_sh(session, f"sha256sum {root}/data/old.bin").split()[0]


def remove_lvm_disk(session: SshSession, vg: str, root: str) -> None:
    session.run(
        ["sh", "-c", f"for m in data logs boot; do fsfreeze -u {root}/$m; umount {root}/$m; done; "
                     f"vgchange -an {vg}; vgremove -f {vg}"],
        timeout=120, check=False,
    )  # fmt: skip


def copy_device(session: SshSession, device: str, dest: Path) -> int:
    """Read ``device`` on the source over SSH into ``dest``; bytes copied."""
    n = 0
    with session.start(["cat", device], read_timeout=120) as proc, dest.open("wb") as f:
        while data := proc.read(1 << 20):
            f.write(data)
            n += len(data)
        assert proc.wait(60) == 0, proc.stderr_tail()
    return n


def lvm_snapshot_scenario(session: SshSession, disk: str, part: str, workdir: Path) -> dict[str, float]:
    """The whole LVM snapshot story on ``disk`` of the source; returns timings."""
    vg = f"p2vtest{uuid.uuid4().hex[:6]}"
    root = f"/run/p2vtest-{vg}"  # mount points (not named p2v-*)
    timings: dict[str, float] = {}
    try:
        old_sum = build_lvm_disk(session, disk, part, vg, root)
        hooks = Hooks(pre=[f"echo pre > {root}/data/pre-marker && sync"], post=[f"echo post > {root}/data/post-marker"])
        t0 = time.monotonic()
        with consistent_view(session, disk, "auto", hooks) as view:
            timings["open_s"] = time.monotonic() - t0
            assert view.method == "lvm-snapshot", view.detail
            assert view.level == "app-consistent"
            assert view.device.startswith("/dev/mapper/p2v-view-")
            assert f"{vg}/data (" in view.detail and f"{vg}/logs (" in view.detail
            assert f"read live: {root}/boot" in view.detail and view.detail.endswith("1 pre hook ok")
            # the post hook ran as soon as the snapshots existed, before the read
            assert remote_sh(session, f"cat {root}/data/post-marker") == "post\n"
            # the source keeps changing while the view is read
            remote_sh(
                session,
                f"echo new-data > {root}/data/new.txt; echo new-logs > {root}/logs/new.txt; "
                f"echo changed > {root}/data/old.txt; echo new-boot > {root}/boot/new.txt; "
                f"dd if=/dev/zero of={root}/data/old.bin bs=1M seek=30 count=20 conv=notrunc status=none; sync",
            )
            assert "p2v-view-" in remote_p2v_objects(session)
            t0 = time.monotonic()
            copied = copy_device(session, view.device, workdir / "copy.img")
            timings["read_s"] = time.monotonic() - t0
            assert copied == view.size
            t0 = time.monotonic()
        timings["close_s"] = time.monotonic() - t0
        assert view.warnings == []
        assert remote_p2v_objects(session) == ""
        with open_guestfs([(workdir / "copy.img", "raw")], readonly=True) as g:
            # the metadata in the copy is from before lvcreate: no snapshot LV in it
            assert sorted(g.lvs()) == [f"/dev/{vg}/data", f"/dev/{vg}/logs"]
            g.mount_ro(f"/dev/{vg}/data", "/")
            assert g.cat("/old.txt") == "old-data\n"
            assert g.cat("/pre-marker") == "pre\n"  # the pre hook ran before the point-in-time
            assert not g.exists("/new.txt") and not g.exists("/post-marker")
            assert g.checksum("sha256", "/old.bin") == old_sum  # spans both segments of the LV
            g.umount("/")
            g.mount_ro(f"/dev/{vg}/logs", "/")
            assert g.cat("/old.txt") == "old-logs\n" and not g.exists("/new.txt")
            g.umount("/")
    finally:
        remove_lvm_disk(session, vg, root)
    return timings


def _device_mapper_works() -> bool:
    return _run("dmsetup version", check=False).returncode == 0


@pytest.mark.skipif(not _device_mapper_works(), reason="no device-mapper in this kernel (tests/vm covers LVM)")
def test_lvm_snapshot_view_on_a_loop_device(session: SshSession, tmp_path: Path):
    image = tmp_path / "p2vtest-lvm.img"
    with image.open("wb") as f:
        f.truncate(320 * MiB)
    disk = _run(f"losetup --partscan --find --show {image}").stdout.strip()
    try:
        lvm_snapshot_scenario(session, disk, f"{disk}p", tmp_path)
    finally:
        _run(f"losetup -d {disk}", check=False)
