"""SSH source URLs, host specs, p2v's known_hosts file, and the remote reader's wire format."""

from __future__ import annotations

import ast
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from p2v.errors import ChangedHostKey, UsageError
from p2v.sources.ssh import SshTarget, parse_ssh_url
from p2v.sources.ssh_helper import END_TOTALS, FRAME, HELPER_SOURCE
from p2v.sources.ssh_session import resolve_identity
from p2v.sources.ssh_trust import (
    HostKeyInfo,
    default_known_hosts,
    fingerprint_sha256,
    lookup_host_keys,
    parse_host_port,
    record_host_key,
)

# -- URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://web1/dev/sda", SshTarget(host="web1", device="/dev/sda", user="root", port=22)),
        ("ssh://admin@web1.example.com/dev/sda", SshTarget("web1.example.com", "/dev/sda", "admin", 22)),
        ("ssh://root@10.0.0.5:2222/dev/nvme0n1", SshTarget("10.0.0.5", "/dev/nvme0n1", "root", 2222)),
        ("ssh://root@[fd00::5]:2222/dev/sdb", SshTarget("fd00::5", "/dev/sdb", "root", 2222)),
        ("ssh://[::1]/dev/vda", SshTarget("::1", "/dev/vda", "root", 22)),
        ("ssh://Web1.Example.COM:22/dev/sda", SshTarget("web1.example.com", "/dev/sda", "root", 22)),
        ("ssh://root@host/tmp/my%20disk.raw", SshTarget("host", "/tmp/my disk.raw", "root", 22)),
        ("SSH://root@host/dev/disk/by-id/wwn-0x5000", SshTarget("host", "/dev/disk/by-id/wwn-0x5000", "root", 22)),
    ],
)
def test_parse_ssh_url_accepts(url: str, expected: SshTarget) -> None:
    assert parse_ssh_url(url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("root@host/dev/sda", "ssh://"),
        ("http://host/dev/sda", "ssh://"),
        ("ssh://root@host", "no device path"),
        ("ssh://root@host/", "no device path"),
        ("ssh://root@host:99999/dev/sda", "from 1 to 65535"),
        ("ssh://root@host:abc/dev/sda", "from 1 to 65535"),
        ("ssh://root@host:/dev/sda", "from 1 to 65535"),
        ("ssh://root@[host]:22/dev/sda", "bracketed IPv6"),
        ("ssh://root@[::1/dev/sda", "bracketed IPv6"),
        ("ssh://root@[fd00::zz]/dev/sda", "bracketed IPv6"),
        ("ssh://root:secret@host/dev/sda", "passwords"),
        ("ssh://@host/dev/sda", "empty user"),
        ("ssh://root@/dev/sda", "no host"),
        ("ssh://root@fd00::5/dev/sda", "in brackets"),
        ("ssh://root@host/dev/sda?x=1", "query"),
        ("ssh://root@host//dev/sda", "absolute"),
        ("ssh://root@ho st/dev/sda", "not a host name"),
        ("ssh://-oProxyCommand=x@host/dev/sda", "not a valid user"),
    ],
)
def test_parse_ssh_url_rejects_with_the_url_in_the_message(url: str, why: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_ssh_url(url)
    assert url in err.value.message
    assert why.lower() in err.value.message.lower()
    assert err.value.exit_code == 2


def test_target_url_round_trips() -> None:
    for url in ("ssh://root@[fd00::5]:2222/dev/sdb", "ssh://admin@web1/tmp/my%20disk.raw"):
        assert parse_ssh_url(parse_ssh_url(url).url) == parse_ssh_url(url)
    assert parse_ssh_url("ssh://web1:2200/dev/sda").label == "root@web1:2200"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("web1", ("web1", 22)),
        ("web1:2222", ("web1", 2222)),
        ("[fd00::5]:2222", ("fd00::5", 2222)),
        ("[fd00::5]", ("fd00::5", 22)),
        ("[web1]:2222", ("web1", 2222)),
        ("fd00::5", ("fd00::5", 22)),
        ("ssh://admin@web1:2201/dev/sda", ("web1", 2201)),
    ],
)
def test_parse_host_port(spec: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(spec) == expected


@pytest.mark.parametrize("spec", ["", "web1:0", "web1:x", "[fd00::5", "[fd00::5]x", "-oFoo", "bad:host:x", "we b1"])
def test_parse_host_port_rejects(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_host_port(spec)


# -- known_hosts ------------------------------------------------------------


def _key_info(host: str, port: int) -> HostKeyInfo:
    return HostKeyInfo.from_pkey(host, port, paramiko.ECDSAKey.generate())


def test_default_known_hosts_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2V_KNOWN_HOSTS", str(tmp_path / "kh"))
    assert default_known_hosts() == tmp_path / "kh"
    monkeypatch.delenv("P2V_KNOWN_HOSTS")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_known_hosts() == tmp_path / "cfg" / "p2v" / "known_hosts"


def test_fingerprint_is_openssh_sha256_form() -> None:
    fp = fingerprint_sha256(b"abc")
    # sha256("abc") = ba7816bf..., base64 without the trailing "="
    assert fp == "SHA256:ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0"


def test_record_writes_openssh_lines_and_is_idempotent(tmp_path: Path) -> None:
    kh = tmp_path / "conf" / "p2v" / "known_hosts"
    a22, a2222 = _key_info("web1", 22), _key_info("10.0.0.5", 2222)
    assert record_host_key(a22, kh) == "added"
    assert record_host_key(a2222, kh) == "added"
    assert record_host_key(a22, kh) == "unchanged"
    lines = kh.read_text().splitlines()
    assert lines == [
        f"web1 {a22.key_type} {a22.key_base64}",
        f"[10.0.0.5]:2222 {a2222.key_type} {a2222.key_base64}",
    ]
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    assert [k.fingerprint for k in lookup_host_keys("10.0.0.5", 2222, kh)] == [a2222.fingerprint]
    assert lookup_host_keys("10.0.0.5", 22, kh) == []  # port matters
    assert lookup_host_keys("web1", 22, tmp_path / "absent") == []


def test_changed_key_needs_replace_and_replace_keeps_other_hosts(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    old, other = _key_info("web1", 2222), _key_info("db1", 22)
    record_host_key(old, kh)
    record_host_key(other, kh)
    kh.write_text("# kept comment\n" + kh.read_text())
    new = _key_info("web1", 2222)
    with pytest.raises(ChangedHostKey) as err:
        record_host_key(new, kh)
    assert old.fingerprint in err.value.message and new.fingerprint in err.value.message
    assert "--replace" in (err.value.hint or "")
    assert [k.key_base64 for k in lookup_host_keys("web1", 2222, kh)] == [old.key_base64]  # untouched

    assert record_host_key(new, kh, replace=True) == "replaced"
    assert [k.key_base64 for k in lookup_host_keys("web1", 2222, kh)] == [new.key_base64]
    assert [k.key_base64 for k in lookup_host_keys("db1", 22, kh)] == [other.key_base64]
    assert kh.read_text().startswith("# kept comment\n")


def test_hashed_known_hosts_entries_are_understood(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    info = _key_info("web1", 2222)
    hashed = paramiko.HostKeys.hash_host("[web1]:2222")
    kh.write_text(f"{hashed} {info.key_type} {info.key_base64}\n")
    assert [k.fingerprint for k in lookup_host_keys("web1", 2222, kh)] == [info.fingerprint]
    assert lookup_host_keys("web2", 2222, kh) == []
    assert record_host_key(info, kh) == "unchanged"
    new = _key_info("web1", 2222)
    assert record_host_key(new, kh, replace=True) == "replaced"
    assert hashed not in kh.read_text()


# -- the remote reader (run here with this host's python3) -----------------------

ZB = 64 << 10


def _run_helper(path: Path, start: int, budget: int, read_size: int = 4 * ZB) -> tuple[int, list, tuple]:
    out = subprocess.run(
        [sys.executable, "-c", HELPER_SOURCE, str(path), str(start), "0", str(budget), str(read_size), str(ZB)],
        capture_output=True,
        check=True,
    ).stdout
    pos, records = 0, []
    kind, size, zsize = FRAME.unpack_from(out, pos)
    assert (kind, zsize) == (b"H", ZB)
    pos += FRAME.size
    while True:
        kind, offset, length = FRAME.unpack_from(out, pos)
        pos += FRAME.size
        if kind == b"E":
            totals = END_TOTALS.unpack_from(out, pos)
            assert pos + length == len(out)
            return size, records, (offset, *totals)
        if kind == b"D":
            records.append((offset, out[pos : pos + length]))
            pos += length


def test_helper_is_python35_syntax() -> None:
    ast.parse(HELPER_SOURCE, feature_version=(3, 5))


def test_helper_sends_only_nonzero_blocks_and_reports_totals(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    size = 10 * ZB + 1000  # ends in a partial block
    with img.open("wb") as f:
        f.truncate(size)
        f.seek(1 * ZB)
        f.write(b"\x01" * ZB)  # block 1
        f.seek(2 * ZB + 5)
        f.write(b"\x02")  # block 2: one byte set
        f.seek(7 * ZB)
        f.write(b"\x07" * (2 * ZB))  # blocks 7-8, across a read boundary (reads are 4 blocks)
        f.seek(10 * ZB + 999)
        f.write(b"\x0a")  # the partial tail
    data = img.read_bytes()
    dev_size, records, (stop, nread, nsent, nzero, nrec) = _run_helper(img, 0, 1 << 40)
    assert dev_size == size and stop == size and nread == size
    # blocks 1-2 merge into one record; 7 and 8 arrive in two reads
    assert [(o, len(d)) for o, d in records] == [(ZB, 2 * ZB), (7 * ZB, ZB), (8 * ZB, ZB), (10 * ZB, 1000)]
    for offset, chunk in records:
        assert chunk == data[offset : offset + len(chunk)]
    assert nsent == 4 * ZB + 1000 and nzero == 6 * ZB and nrec == 4


def test_helper_stops_after_its_budget_and_resumes(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(os.urandom(16 * ZB))
    _, first, (stop, nread, nsent, _, _) = _run_helper(img, 0, budget=5 * ZB)
    assert stop == 8 * ZB and nread == nsent == 8 * ZB  # stops at the read after the budget
    _, rest, (stop2, *_totals) = _run_helper(img, stop, budget=1 << 40)
    assert stop2 == 16 * ZB
    assert b"".join(d for _, d in first + rest) == img.read_bytes()


def test_helper_fails_with_one_line_for_a_missing_device(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", HELPER_SOURCE, str(tmp_path / "nope"), "0", "0", "1", str(ZB), str(ZB)],
        capture_output=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == f"p2v-helper: {tmp_path / 'nope'}: No such file or directory"
    assert proc.stdout == b""


def test_frame_layout_is_stable() -> None:
    # the helper hard-codes the same layout; a change here must change both
    assert FRAME.format == ">cQI" and END_TOTALS.format == ">QQQQ"
    assert struct.Struct(">cQI").size == 13


# -- identity -------------------------------------------------------------------


def test_identity_comes_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    opt, env = tmp_path / "opt_key", tmp_path / "env_key"
    opt.write_text("x")
    env.write_text("x")
    monkeypatch.delenv("P2V_SSH_IDENTITY", raising=False)
    assert resolve_identity(None) is None  # agent and default keys
    monkeypatch.setenv("P2V_SSH_IDENTITY", str(env))
    assert resolve_identity(None) == env
    assert resolve_identity(opt) == opt
    with pytest.raises(UsageError, match=r"missing_key: no such file"):
        resolve_identity(tmp_path / "missing_key")
