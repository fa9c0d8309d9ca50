"""Physical-server sources against a real OpenSSH server on 127.0.0.1 (see tests/sshd.py).

The "device" is a sparse file with random data and zero regions; the copy must be
byte-identical, must not send the zero blocks, and must get past the 512 MiB mark
where paramiko's own re-key stalls (paramiko issue #822).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2v.cli.main import app
from p2v.errors import ChangedHostKey, RemoteError, SourceNotFound, UnknownHostKey
from p2v.sources import ssh_session
from p2v.sources.ssh import (
    SshSession,
    collect_facts,
    copy_device,
    fetch_host_key,
    open_ssh_source,
    parse_ssh_url,
)
from p2v.sources.ssh_session import REKEY_AFTER_BYTES
from tests.sshd import (
    LoopbackSshd,
    loopback_sshd,
    sshd_fixture,  # noqa: F401  (the `sshd` fixture)
)

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
ZB = 64 << 10


@dataclass
class DiskImage:
    path: Path
    size: int
    sha256: str
    zero_bytes: int  # bytes in 64 KiB-aligned blocks that are all zero


def make_disk_image(path: Path, mib: int, tail: int = 12345, seed: int = 7) -> DiskImage:
    """A sparse file: random data (every 64 KiB block unique) with zero regions of several shapes."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(4 * MiB)
    zero_bytes = 0
    digest = hashlib.sha256()
    with path.open("wb") as f:
        f.truncate(mib * MiB + tail)
        for i in range(mib):
            block = bytearray(pool[(i % 4) * MiB : (i % 4 + 1) * MiB])
            for c in range(0, MiB, ZB):
                struct.pack_into(">QQ", block, c, i, c)  # unique, so misplaced blocks show up
            shape = i % 20
            if i in (1, 2) or shape == 3:  # whole MiB of zeros
                block[:] = bytes(MiB)
                if i % 40 == 23:  # ...except one byte in the middle of one block
                    block[ZB * 5 + 777] = 1
            elif shape == 7:  # data, then zeros (a partition that is half used)
                block[MiB // 2 :] = bytes(MiB // 2)
            elif shape == 13:  # alternating 64 KiB data / zero
                for c in range(ZB, MiB, 2 * ZB):
                    block[c : c + ZB] = bytes(ZB)
            for c in range(0, MiB, ZB):
                chunk = block[c : c + ZB]
                if chunk.count(0) == ZB:
                    zero_bytes += ZB
                else:
                    f.seek(i * MiB + c)
                    f.write(chunk)
            digest.update(block)
        tail_data = rnd.randbytes(tail)
        f.seek(mib * MiB)
        f.write(tail_data)
        digest.update(tail_data)
    return DiskImage(path, mib * MiB + tail, digest.hexdigest(), zero_bytes)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskImage]:
    img = make_disk_image(tmp_path_factory.mktemp("bigdisk") / "disk.raw", 650)
    # the data alone must cross paramiko's 512 MiB re-key mark
    assert img.size - img.zero_bytes > REKEY_AFTER_BYTES + 32 * MiB
    yield img
    img.path.unlink()  # ~600 MiB: do not leave it in pytest's kept temp dirs


@pytest.fixture
def small_disk(tmp_path: Path) -> DiskImage:
    return make_disk_image(tmp_path / "small.raw", 24, tail=4321, seed=11)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- copying ------------------------------------------------------------------


def test_copy_650_mib_identical_sparse_and_past_the_rekey_mark(
    sshd: LoopbackSshd, big_disk: DiskImage, tmp_path: Path
) -> None:
    dest = tmp_path / "copy.raw"
    seen: list[tuple[int, int]] = []
    with SshSession(**sshd.session_args()) as session:
        stats = copy_device(session, str(big_disk.path), dest, progress=lambda d, t: seen.append((d, t)))
        # the connection is still good after the re-key: run another command on it
        assert session.run(["echo", "still here"]).text == "still here\n"
    print(f"\npython mode: {stats.to_dict()}")
    copied_sha256, copied_size, data_allocated = sha256_of(dest), dest.stat().st_size, allocated(dest)
    dest.unlink()  # ~600 MiB
    assert copied_sha256 == big_disk.sha256
    assert copied_size == big_disk.size
    assert stats.mode == "python"
    assert stats.bytes_total == big_disk.size
    assert stats.bytes_zero_skipped == big_disk.zero_bytes
    data = big_disk.size - big_disk.zero_bytes
    assert data_allocated <= data + 4 * MiB  # the zero regions are holes
    assert data <= stats.bytes_sent < data + 64 * 1024  # zeros never crossed the wire, framing is small
    assert stats.bytes_sent > 512 * MiB  # past the point where paramiko re-keys by itself
    assert stats.ranges >= 2 and stats.rekeys >= 1  # and we re-keyed between ranges
    assert not dest.with_name("copy.raw.partial").exists()
    assert seen[-1] == (big_disk.size, big_disk.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_stream_fallback_gives_the_same_bytes(sshd: LoopbackSshd, small_disk: DiskImage, tmp_path: Path) -> None:
    dest = tmp_path / "copy.raw"
    with SshSession(**sshd.session_args()) as session:
        # 8 MiB ranges: four dd runs, the last one short and not MiB-aligned
        stats = copy_device(session, str(small_disk.path), dest, use_python=False, range_bytes=8 * MiB)
    assert stats.mode == "stream" and stats.ranges == 4
    assert sha256_of(dest) == small_disk.sha256
    assert stats.bytes_sent == small_disk.size  # everything crossed the wire...
    assert stats.bytes_zero_skipped == small_disk.zero_bytes  # ...but zeros were not written
    assert allocated(dest) <= small_disk.size - small_disk.zero_bytes + MiB


def test_host_without_python_falls_back_to_streaming(tmp_path: Path, small_disk: DiskImage) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "cat", "dd", "stat", "blockdev", "readlink", "sed", "getconf", "grep", "uname"):
        found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        assert found, tool
        (tools / tool).symlink_to(found)
    with loopback_sshd(tmp_path / "sshd", extra_config=f"SetEnv PATH={tools}") as server:
        with SshSession(**server.session_args()) as session:
            machine = collect_facts(session, str(small_disk.path))
            stats = copy_device(session, str(small_disk.path), tmp_path / "copy.raw")
    assert any("no python3" in note for note in machine.notes)
    assert stats.mode == "stream"
    assert sha256_of(tmp_path / "copy.raw") == small_disk.sha256


def test_connection_dropped_mid_copy_raises_and_leaves_nothing(
    sshd: LoopbackSshd, big_disk: DiskImage, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "copy.raw"
    killed: list[int] = []

    def kill_server_at_100_mib(done: int, total: int) -> None:
        if done > 100 * MiB and not killed:
            killed.append(done)
            sshd.stop()  # kills the listener and the session processes

    with SshSession(**sshd.session_args()) as session:
        with pytest.raises(RemoteError) as err:
            copy_device(session, str(big_disk.path), dest, progress=kill_server_at_100_mib)
    assert killed
    assert "connection lost" in err.value.message
    assert str(big_disk.path) in err.value.message
    assert list(out.iterdir()) == []  # no copy.raw, no copy.raw.partial


def test_copy_refuses_to_overwrite_and_reports_unreadable_devices(
    sshd: LoopbackSshd, small_disk: DiskImage, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "exists.raw"
    existing.write_bytes(b"precious")
    with SshSession(**sshd.session_args()) as session:
        with pytest.raises(Exception, match="already exists") as err:
            copy_device(session, str(small_disk.path), existing)
        assert err.value.exit_code == 11  # type: ignore[attr-defined]
        assert existing.read_bytes() == b"precious"
        with pytest.raises(RemoteError, match="No such file or directory"):
            copy_device(session, str(tmp_path / "no-such-disk"), out / "new.raw")
    assert sorted(p.name for p in out.iterdir()) == ["exists.raw"]


def test_open_ssh_source_copies_and_describes_the_machine(
    sshd: LoopbackSshd, small_disk: DiskImage, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    machine = open_ssh_source(
        sshd.url(small_disk.path), workdir=work, identity=sshd.client_key, known_hosts=sshd.known_hosts
    )
    with machine:
        assert machine.kind == "ssh"
        (disk,) = machine.disks
        assert disk.format == "raw" and disk.qemu_filename == str(work / "127.0.0.1-disk0.raw")
        assert disk.capacity == small_disk.size
        assert sha256_of(Path(disk.qemu_filename)) == small_disk.sha256
        assert any("copied" in n for n in machine.notes)
    assert not (work / "127.0.0.1-disk0.raw").exists()  # close() removed it

    with pytest.raises(SourceNotFound, match="does not exist"):
        open_ssh_source(
            sshd.url(tmp_path / "nope"), workdir=work, identity=sshd.client_key, known_hosts=sshd.known_hosts
        )
    assert list(work.iterdir()) == []


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[str, DiskImage]]:
    """A read-only loop block device over a small image (skipped where losetup is not allowed)."""
    img = make_disk_image(tmp_path / "loop.raw", 12, tail=8192, seed=5)  # whole 512-byte sectors
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(img.path)], capture_output=True, text=True
    )
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device, img
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_block_device_is_sized_and_copied_in_both_modes(
    sshd: LoopbackSshd, loop_disk: tuple[str, DiskImage], tmp_path: Path
) -> None:
    device, img = loop_disk
    with SshSession(**sshd.session_args()) as session:
        machine = collect_facts(session, device)
        python = copy_device(session, device, tmp_path / "python.raw")
        stream = copy_device(session, device, tmp_path / "stream.raw", use_python=False)
    assert machine.disks[0].capacity == img.size  # blockdev --getsize64
    assert (python.mode, stream.mode) == ("python", "stream")
    assert python.bytes_zero_skipped == stream.bytes_zero_skipped == img.zero_bytes
    assert sha256_of(tmp_path / "python.raw") == sha256_of(tmp_path / "stream.raw") == img.sha256


# -- facts -------------------------------------------------------------------


def test_collect_facts_against_localhost(sshd: LoopbackSshd, small_disk: DiskImage) -> None:
    with SshSession(**sshd.session_args()) as session:
        machine = collect_facts(session, str(small_disk.path))
    assert machine.kind == "ssh"
    assert machine.name == Path("/proc/sys/kernel/hostname").read_text().strip()
    assert machine.cpus == os.cpu_count()
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal:")))
    assert machine.memory_mib == mem_kib // 1024
    assert machine.firmware == ("uefi" if Path("/sys/firmware/efi").is_dir() else "bios")
    physical = sorted(p.name for p in Path("/sys/class/net").iterdir() if (p / "device").exists())
    assert sorted(n.name or "" for n in machine.nics) == physical
    for nic in machine.nics:
        assert nic.mac == (Path("/sys/class/net") / str(nic.name) / "address").read_text().strip()
        assert nic.model == os.path.basename(os.readlink(f"/sys/class/net/{nic.name}/device/driver"))
    (disk,) = machine.disks
    assert disk.capacity == small_disk.size and disk.format == "raw"
    assert parse_ssh_url(disk.qemu_filename).device == str(small_disk.path)
    assert any("python3" in n for n in machine.notes)


def test_run_quotes_arguments_and_checks_the_exit_status(sshd: LoopbackSshd) -> None:
    with SshSession(**sshd.session_args()) as session:
        res = session.run(["printf", "%s|", "a b", "it's", "$HOME", "*"])
        assert (res.rc, res.stdout) == (0, b"a b|it's|$HOME|*|")
        res = session.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert res == (3, b"out\n", b"err\n")
        with pytest.raises(RemoteError, match=r"exit status 3: err"):
            session.run(["sh", "-c", "echo err >&2; exit 3"])
        # lots of stderr and stdout at once must not dead-lock (both are drained)
        res = session.run(["sh", "-c", "head -c 5000000 /dev/zero >&2; head -c 5000000 /dev/zero"])
        assert len(res.stdout) == 5_000_000
        with pytest.raises(RemoteError, match=r"timed out|no output"):
            session.run(["sleep", "5"], timeout=1)


def test_session_rekeys_between_commands_not_inside_them(sshd: LoopbackSshd, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh_session, "REKEY_AFTER_BYTES", 256 << 10)
    with SshSession(**sshd.session_args()) as session:
        # paramiko's own trigger, which can dead-lock when a channel closes during the
        # exchange (paramiko #822), is out of reach; the session re-keys between channels
        assert session.transport.packetizer.REKEY_BYTES >= 1 << 36
        for _ in range(16):
            assert session.run(["head", "-c", "100000", "/dev/zero"]).stdout == bytes(100000)
        assert session.rekeys >= 5
        assert session.run(["echo", "ok"]).text == "ok\n"


# -- trust ---------------------------------------------------------------------


def test_unknown_host_is_rejected_with_its_fingerprint(sshd: LoopbackSshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    with pytest.raises(UnknownHostKey) as err:
        SshSession(**{**sshd.session_args(), "known_hosts": empty}).connect()
    assert f"127.0.0.1:{sshd.port}" in err.value.message
    assert sshd.host_fingerprint() in err.value.message
    assert f"p2v trust --known-hosts {empty} 127.0.0.1:{sshd.port}" in err.value.message
    assert err.value.exit_code == 6

    work = tmp_path / "work"
    with pytest.raises(UnknownHostKey):
        open_ssh_source(sshd.url("/etc/hostname"), workdir=work, identity=sshd.client_key, known_hosts=empty)
    assert list(work.iterdir()) == []
    assert not empty.exists()  # rejecting never records anything


def test_changed_host_key_is_rejected_with_both_fingerprints(sshd: LoopbackSshd) -> None:
    old = sshd.host_fingerprint()
    with SshSession(**sshd.session_args()) as session:
        session.run(["true"])
    sshd.rotate_host_key()  # known_hosts still holds the old key
    new = sshd.host_fingerprint()
    with pytest.raises(ChangedHostKey) as err:
        SshSession(**sshd.session_args()).connect()
    assert old in err.value.message and new in err.value.message
    assert "--replace" in (err.value.hint or "")


def test_fetch_host_key_matches_ssh_keygen(sshd: LoopbackSshd) -> None:
    info = fetch_host_key(sshd.host, sshd.port, timeout=10)
    assert (info.key_type, info.key_base64) == tuple(sshd.host_public_key().split())
    assert info.fingerprint == sshd.host_fingerprint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="cannot connect"):
        fetch_host_key("127.0.0.1", closed_port, timeout=5)


def test_wrong_identity_is_an_authentication_error(sshd: LoopbackSshd, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(RemoteError, match="authentication failed") as err:
        SshSession(**{**sshd.session_args(), "identity": stranger}).connect()
    assert err.value.exit_code == 7


def test_p2v_trust_records_the_key_then_sessions_connect(sshd: LoopbackSshd, tmp_path: Path) -> None:
    kh = tmp_path / "conf" / "known_hosts"
    runner = CliRunner()
    target = f"127.0.0.1:{sshd.port}"

    declined = runner.invoke(app, ["trust", target, "--known-hosts", str(kh)], input="n\n")
    assert declined.exit_code == 6, declined.output
    assert sshd.host_fingerprint() in declined.output
    assert not kh.exists()

    accepted = runner.invoke(app, ["trust", target, "--known-hosts", str(kh)], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert f"[127.0.0.1]:{sshd.port} {sshd.host_public_key()}" in kh.read_text().splitlines()
    with SshSession(**{**sshd.session_args(), "known_hosts": kh}) as session:
        assert session.run(["echo", "ok"]).text == "ok\n"

    again = runner.invoke(app, ["trust", target, "--known-hosts", str(kh), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["status"] == "unchanged"

    # the host is reinstalled: a plain re-trust refuses and says --replace
    sshd.rotate_host_key()
    refused = runner.invoke(app, ["trust", target, "--known-hosts", str(kh), "--yes"])
    assert refused.exit_code == 6
    assert "--replace" in refused.output
    with pytest.raises(ChangedHostKey):
        SshSession(**{**sshd.session_args(), "known_hosts": kh}).connect()

    replaced = runner.invoke(app, ["trust", target, "--known-hosts", str(kh), "--yes", "--replace", "--json"])
    assert replaced.exit_code == 0, replaced.output
    result = json.loads(replaced.stdout)
    assert result["status"] == "replaced" and result["fingerprint"] == sshd.host_fingerprint()
    assert kh.read_text().count(f"[127.0.0.1]:{sshd.port} ") == 1
    with SshSession(**{**sshd.session_args(), "known_hosts": kh}) as session:
        assert session.run(["true"]).rc == 0


def test_ipv6_host_trust_and_copy(tmp_path: Path, small_disk: DiskImage) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    kh = tmp_path / "known_hosts"
    with loopback_sshd(tmp_path / "sshd6", host="::1") as server:
        trusted = CliRunner().invoke(app, ["trust", f"[::1]:{server.port}", "--known-hosts", str(kh), "--yes"])
        assert trusted.exit_code == 0, trusted.output
        assert kh.read_text().startswith(f"[::1]:{server.port} ssh-ed25519 ")
        machine = open_ssh_source(
            server.url(small_disk.path), workdir=tmp_path / "work", identity=server.client_key, known_hosts=kh
        )
        with machine:
            assert machine.disks[0].qemu_filename.endswith("__1-disk0.raw")
            assert sha256_of(Path(machine.disks[0].qemu_filename)) == small_disk.sha256
