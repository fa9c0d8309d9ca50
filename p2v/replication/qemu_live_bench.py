"""Measure dirty-bitmap syncs of a live QEMU drive against a full hash pass over the same drive.

:func:`bench_bitmap_sync` runs the whole scenario on this host and returns plain data (JSON-ready):

1. a qcow2 drive of ``size`` bytes, its first ``fill`` fraction written with data (or ``disk``);
2. a guestless QEMU (TCG, no OS: it idles in the firmware) with that drive as node ``disk0``
   behind a virtio-blk device, so writes arrive through the running QEMU like guest writes;
3. **seed** into layer 1; then a **hash pass** into layer 2 (the whole drive read, hashed and
   compared with the seed's map; nothing changed, nothing written): the baseline;
4. ``dirty_fraction`` of the drive rewritten as random ``write_size`` blocks through QEMU
   (HMP ``qemu-io`` on the device; not timed as part of the sync);
5. **bitmap sync** into layer 3: only the dirty extents are read.

``open_layer(path)`` is a context manager yielding a :class:`~p2v.replication.model.LayerTarget`
on a qcow2 layer (default :func:`p2v.disks.nbd.open_layer`). Everything it creates lives in
``work_dir``; the QEMU is killed and the layers are removed at the end (``keep=True`` keeps them).

For ``bench/sync.py`` (8 GiB, as in the design's 2 GiB rsync comparison)::

    from p2v.replication.qemu_live_bench import bench_bitmap_sync
    result = bench_bitmap_sync(Path(workdir), size=8 << 30)   # 1% random 4 KiB writes
    # result["bitmap"]["wall_s"], ["bytes_read"], result["hash"]["wall_s"], result["ratio"]

It needs ~2x ``size`` of free space in ``work_dir`` (the drive and the seed layer) and takes
~4-5 minutes on the shared 2-core host (fill ~50 s, seed ~80 s, hash pass ~25-45 s, 20971
writes through HMP ~30-40 s, bitmap sync ~4-6 s).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from p2v.errors import VmError
from p2v.replication.model import DEFAULT_BLOCK, HashMap, LayerTarget, SyncResult
from p2v.replication.qemu_live import DEFAULT_GRANULARITY, LiveQemuSource
from p2v.replication.qemu_live_io import DEFAULT_IN_FLIGHT, DEFAULT_REHASH_SHARE
from p2v.vm.qmp import QmpConnection

GiB = 1 << 30
LAYER_OPTIONS = "cluster_size=128k,extended_l2=on"
DEVICE_BACKEND = "/machine/peripheral/vd0/virtio-backend"
OpenLayer = Callable[[Path], AbstractContextManager[LayerTarget]]


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"{argv[0]} {argv[1]} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _layer(path: Path, size: int, backing: Path | None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", LAYER_OPTIONS]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    _run([*argv, str(path), str(size)])
    return path


@contextlib.contextmanager
def guestless_qemu(disk: Path, workdir: Path, fmt: str = "qcow2") -> Iterator[QmpConnection]:
    """QEMU with ``disk`` as node ``disk0`` on device ``vd0``; yields its QMP connection."""
    sock = workdir / "qmp.sock"
    sock.unlink(missing_ok=True)
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-m", "64", "-blockdev", f"driver=file,filename={disk},node-name=f0,cache.direct=off",
            "-blockdev", f"driver={fmt},file=f0,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0,id=vd0", "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
    with (workdir / "qemu.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    conn: QmpConnection | None = None
    try:
        deadline = time.monotonic() + 60
        while conn is None:
            if proc.poll() is not None:
                raise VmError(f"QEMU exited at start: {(workdir / 'qemu.log').read_text()[-500:]}")
            if sock.exists():
                attempt = QmpConnection(sock, vm_name="bench")
                try:
                    attempt.connect()
                    conn = attempt
                except VmError:
                    attempt.close()
            if conn is None:
                if time.monotonic() > deadline:
                    raise VmError("QEMU did not answer on its QMP socket")
                time.sleep(0.1)
        yield conn
    finally:
        if conn is not None:
            conn.close()
        proc.kill()
        proc.wait()


def write_random_blocks(qmp: QmpConnection, size: int, fraction: float, write_size: int, seed: int) -> int:
    """Rewrite ``fraction`` of the drive as random ``write_size`` blocks through QEMU; return the count."""
    count = int(size * fraction / write_size)
    rng = random.Random(seed)
    for slot in rng.sample(range(size // write_size), count):
        qmp.execute("human-monitor-command",
                    {"command-line": f'qemu-io -d {DEVICE_BACKEND} "write -P 0x{rng.randrange(1, 256):02x} '
                                     f'{slot * write_size} {write_size}"'})  # fmt: skip
    return count


def _sync(source: LiveQemuSource, layer: Path, old: HashMap, state: dict[str, Any],
          open_layer: OpenLayer) -> SyncResult:  # fmt: skip
    with open_layer(layer) as target:
        res = source.sync(target, old, state)
        target.flush()
    return res


def _summary(res: SyncResult) -> dict[str, Any]:
    c = res.counters
    return {"mode": c.mode, "wall_s": round(c.wall_s, 3), "bytes_read": c.bytes_read,
            "bytes_written": c.bytes_written, "bytes_rehashed": c.bytes_rehashed,
            "blocks_changed": c.blocks_changed, "dirty_extents": c.extra.get("dirty_extents"),
            "timings_s": c.extra.get("timings_s")}  # fmt: skip


def bench_bitmap_sync(
    work_dir: Path,
    *,
    size: int = 8 * GiB,
    fill: float = 1.0,
    disk: Path | None = None,
    dirty_fraction: float = 0.01,
    write_size: int = 4096,
    granularity: int = DEFAULT_GRANULARITY,
    rehash_share: float = DEFAULT_REHASH_SHARE,
    in_flight: int = DEFAULT_IN_FLIGHT,
    seed: int = 1,
    open_layer: OpenLayer | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the scenario of the module docstring; return its parameters and per-sync counters.

    ``result["ratio"]`` is the bitmap sync's wall time over the hash pass's.
    """
    if open_layer is None:
        from p2v.disks.nbd import open_layer as nbd_open_layer

        open_layer = nbd_open_layer
    work_dir.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if disk is None:
        disk = work_dir / "bench-source.qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size)])
        created.append(disk)
        filled = int(size * fill) // DEFAULT_BLOCK * DEFAULT_BLOCK
        step = 1 * GiB
        cmds = [arg for off in range(0, filled, step)
                for arg in ("-c", f"write -P 0x5a {off} {min(step, filled - off)}")]  # fmt: skip
        if cmds:
            _run(["qemu-io", "-f", "qcow2", *cmds, str(disk)])
    result: dict[str, Any] = {
        "size": size, "fill": fill, "dirty_fraction": dirty_fraction, "write_size": write_size,
        "granularity": granularity, "rehash_share": rehash_share, "in_flight": in_flight,
    }  # fmt: skip
    try:
        with guestless_qemu(disk, work_dir) as qmp:
            src = LiveQemuSource(qmp.socket_path, "disk0", qmp=qmp.execute, work_dir=work_dir,
                                 granularity=granularity, rehash_share=rehash_share, in_flight=in_flight)  # fmt: skip
            size = result["size"] = src.size
            layers = [_layer(work_dir / f"bench-layer-{i}.qcow2", size, None if i == 1 else
                             work_dir / f"bench-layer-{i - 1}.qcow2") for i in (1, 2, 3)]  # fmt: skip
            created += layers
            seeded = _sync(src, layers[0], HashMap.zeros(size), {}, open_layer)
            result["seed"] = _summary(seeded)
            # Baseline: a state naming no bitmap forces hash mode over the whole drive.
            forced = {**seeded.state, "bitmap": "none"}
            hashed = _sync(src, layers[1], seeded.hashmap, forced, open_layer)
            result["hash"] = _summary(hashed)
            t = time.perf_counter()
            result["writes"] = write_random_blocks(qmp, size, dirty_fraction, write_size, seed)
            result["writes_s"] = round(time.perf_counter() - t, 3)
            dirty = _sync(src, layers[2], hashed.hashmap, hashed.state, open_layer)
            result["bitmap"] = _summary(dirty)
            result["ratio"] = round(dirty.counters.wall_s / max(hashed.counters.wall_s, 1e-9), 4)
    finally:
        if not keep:
            for p in created:
                p.unlink(missing_ok=True)
            for p in work_dir.glob("p2v-fleece-*"):
                shutil.rmtree(p, ignore_errors=True)
    return result
