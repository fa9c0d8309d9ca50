"""qemu-nbd + libnbd block I/O on real images (p2v.disks.nbd)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2v.disks.nbd import SMALL_WRITE, NbdExport, open_image, open_layer
from p2v.errors import InvalidInput, OutputError

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def qcow2(path: Path, size: int | None = None, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on"]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    subprocess.run(args, check=True, cwd=path.parent)
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_layer_reads_fall_through_writes_and_zeroes_stick(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2", 16 * MiB)
    with open_layer(base) as disk:
        disk.pwrite(b"\xaa" * (2 * MiB), 0)
        disk.flush()
    top = qcow2(tmp_path / "top.qcow2", backing=base)
    with open_layer(top) as disk:
        assert disk.size == 16 * MiB
        assert disk.pread(4, 4096) == b"\xaa" * 4  # from the backing layer
        disk.pwrite(b"new!", 8192)
        assert disk.pread(4, 8192) == b"new!"  # queued write seen by the next read
        disk.zero(4096, 12288)  # over backing data: must read as zeros, not fall through
        disk.flush()
    with open_image(top, "qcow2") as disk:
        assert disk.pread(4, 8192) == b"new!"
        assert disk.pread(4096, 12288) == bytes(4096)
        assert disk.pread(4, 16384) == b"\xaa" * 4
    with open_image(base, "qcow2") as disk:
        assert disk.pread(4, 8192) == b"\xaa" * 4  # the backing layer was never written
    # extended_l2: a 4 KiB write allocates 4 KiB subclusters, not a 128 KiB cluster
    assert (top.stat().st_blocks * 512) < 1 * MiB


@pytest.mark.parametrize(
    ("sizes", "writes"),
    [
        ((512, 4096, 12288), 3000),  # small: aio on one connection
        ((SMALL_WRITE + 512, SMALL_WRITE + 8192), 150),  # large: the writer threads' connections
        ((4096, SMALL_WRITE + 4096), 600),  # both, switching back and forth
    ],
    ids=["small-aio", "large-threads", "mixed"],
)
def test_overlapping_writes_land_in_call_order(tmp_path: Path, sizes: tuple[int, ...], writes: int) -> None:
    import random

    rnd = random.Random(7)
    size = 2 * MiB
    expected = bytearray(size)
    layer = qcow2(tmp_path / "w.qcow2", size)
    with open_layer(layer) as disk:
        for i in range(writes):  # many writes to a few overlapping ranges, and zeroing among them
            n = rnd.choice(sizes)
            off = rnd.randrange(0, (size - n) // 2048) * 2048
            if i % 7 == 3:  # zeroing goes the way of the pending writes
                disk.zero(n, off)
                expected[off : off + n] = bytes(n)
            else:
                data = bytes([i % 251 + 1]) * n
                disk.pwrite(data, off)
                expected[off : off + n] = data
            if i % 97 == 0:  # reads see every earlier write, whichever way it went
                assert disk.pread(n, off) == bytes(expected[off : off + n])
        disk.flush()
        assert (disk._ah is not None) == any(n <= SMALL_WRITE for n in sizes)
        assert (len(disk._whs) > 1) == any(n > SMALL_WRITE for n in sizes)
    with open_image(layer, "qcow2") as disk:
        assert disk.pread(size, 0) == bytes(expected)


def test_large_requests_are_split(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "big.qcow2", 80 * MiB)
    data = os.urandom(MiB) * 70
    with open_layer(img) as disk:
        disk.pwrite(data, MiB)  # > 32 MiB: several NBD requests
        disk.flush()
        assert disk.pread(len(data), MiB) == data


def test_extents_and_scan_skip_holes(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(3 * MiB))
        f.seek(60 * MiB + 100)
        f.write(b"tail")
    with open_image(raw, "raw") as disk:
        ext = list(disk.extents())
        assert sum(n for _, n, _ in ext) == 64 * MiB
        data_ranges = [(o, n) for o, n, z in ext if not z]
        assert any(o <= 10 * MiB and o + n >= 13 * MiB for o, n in data_ranges)
        assert sum(n for _, n, z in ext if z) >= 55 * MiB
        pieces = list(disk.scan(64 * 1024, chunk=MiB))
        read = sum(n for _, n, d in pieces if d is not None)
        assert 3 * MiB <= read <= 5 * MiB  # the holes were not read
        content = b"".join(d if d is not None else bytes(n) for _, n, d in pieces)
    assert content == raw.read_bytes()


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "ro.qcow2", MiB)
    with open_image(img, "qcow2") as disk, pytest.raises(OutputError, match="read-only"):
        disk.pwrite(b"x", 0)


def test_bad_image_error_names_it_with_qemu_message(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.qcow2"
    bogus.write_bytes(b"not a qcow2 image at all" * 100)
    with pytest.raises(InvalidInput, match=r"bogus\.qcow2: qemu-nbd cannot serve the image: .*qcow2"):
        with open_image(bogus, "qcow2"):
            pass


def test_no_space_is_an_output_error(tmp_path: Path) -> None:
    """A write the layer's filesystem cannot hold fails as OutputError, not silently."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.decode().strip()}")
    try:
        img = qcow2(mnt / "layer.qcow2", 64 * MiB)
        with pytest.raises(OutputError, match=r"layer\.qcow2: no space left"):
            with open_layer(img) as disk:
                for off in range(0, 32 * MiB, MiB):
                    disk.pwrite(os.urandom(MiB), off)
                disk.flush()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_qemu_nbd_dies_with_a_killed_p2v(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "x.qcow2", MiB)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from p2v.disks.nbd import NbdExport
        e = NbdExport(Path({str(img)!r}), "qcow2", read_only=False)
        e.start()
        print(e.proc.pid, e.socket, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pid_text, sock = child.stdout.readline().split()
        nbd_pid = int(pid_text)
        assert alive(nbd_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while alive(nbd_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(nbd_pid), "qemu-nbd outlived the process that started it"
    finally:
        child.kill()
        child.wait()
    # kill -9 leaves the private socket folder; the next export removes it once it is stale
    left = Path(sock).parent
    assert left.is_dir()
    old = time.time() - 3600
    os.utime(left, (old, old))
    with NbdExport(img, "qcow2"):
        assert not left.exists()


def test_export_stops_and_cleans_up(tmp_path: Path) -> None:
    img = qcow2(tmp_path / "y.qcow2", MiB)
    export = NbdExport(img, "qcow2")
    with export:
        pid = export.proc.pid if export.proc else -1
        sock_dir = export.socket.parent
        with export.connect() as a, export.connect() as b:  # several clients at once
            assert a.size == b.size == MiB
    assert not alive(pid)
    assert not sock_dir.exists()
