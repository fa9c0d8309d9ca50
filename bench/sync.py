"""Benchmark: incremental sync of a big disk after 1% random 4 KiB rewrites, in one run:

(a) ``p2v`` hash mode over SSH to 127.0.0.1 (loopback sshd from tests/sshd.py),
(b) ``rsync --inplace --no-whole-file -I`` over SSH to 127.0.0.1 of the same file, same
    starting state (pull, like p2v: the DR side starts it and the source side runs under sshd;
    same cipher, aes128-gcm),
(c) dirty-bitmap mode of a live QEMU drive (p2v.replication.qemu_live, see
    :func:`bitmap_mode`).

For each: wall time, bytes on the wire (p2v: its counters, both directions; rsync: --stats
"Total bytes sent" + "received"), peak RSS of the DR-side process tree (``wait4`` rusage of
the child that ran it) and of the source-side process (VmHWM sampled from /proc). Runs at
each ``--size`` (default 8G then 4G, to show RSS is flat when the size doubles) and writes
``bench/results/sync.json``.

    .venv/bin/python bench/sync.py [--size 8G --size 4G] [--change 0.01] [--seed-over-ssh]
                                   [--compress] [--skip-rsync] [--skip-bitmap] [--work /var/tmp]

Big files go to ``--work`` (default /var/tmp) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2v.disks.nbd import open_layer  # noqa: E402
from p2v.replication.delta import FileDiskSource  # noqa: E402
from p2v.replication.delta_ssh import SshDiskSource  # noqa: E402
from p2v.replication.model import HashMap  # noqa: E402
from p2v.sources.ssh_session import SshSession  # noqa: E402
from tests.sshd import loopback_sshd  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CIPHER = "aes128-gcm@openssh.com"  # what p2v's paramiko transport picks first


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 512M, 8G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------


def make_source(path: Path, size: int, seed: int) -> None:
    """Random content, fast: windows of a 64 MiB random pool at random unaligned offsets, so no
    4 KiB piece repeats at an aligned position and nothing compresses."""
    rng = random.Random(seed)
    pool = os.urandom(64 * MiB + 4 * MiB)
    chunk = 4 * MiB
    with path.open("wb") as f:
        f.truncate(size)
        for off in range(0, size, chunk):
            start = rng.randrange(64 * MiB - 1) | 1  # odd: never 4 KiB aligned
            f.write(pool[start : start + min(chunk, size - off)])


def rewrite_pieces(path: Path, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the 4 KiB pieces at random places; returns how many."""
    rng = random.Random(seed)
    pieces = path.stat().st_size // 4096
    chosen = sorted(rng.sample(range(pieces), int(pieces * fraction)))
    with path.open("r+b") as f:
        for p in chosen:
            f.seek(p * 4096)
            f.write(os.urandom(4096))
        f.flush()
        os.fsync(f.fileno())
    return len(chosen)


def new_layer(path: Path, size: int, backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on"]
    args += ["-b", backing.name, "-F", "qcow2", str(path)] if backing else [str(path), str(size)]
    subprocess.run(args, check=True, cwd=path.parent)
    return path


def drop_caches(enabled: bool) -> None:
    if not enabled:
        return
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        log(f"cannot drop caches ({exc.strerror}); runs are warm-cache")


# -- measuring child processes ---------------------------------------------------------------


class RemotePeak(threading.Thread):
    """Samples the source side while a sync runs: peak RSS (VmHWM) of processes whose command
    line matches ``pattern``, and CPU time of everything the loopback sshd runs (its session
    processes, which encrypt, and the helper or rsync server)."""

    def __init__(self, pattern: bytes, sshd_pid: int) -> None:
        super().__init__(daemon=True)
        self.pattern = pattern
        self.sshd_pid = sshd_pid
        self.peak_kib = 0
        self.cpu_ticks: dict[int, int] = {}
        self._halt = threading.Event()

    def _scan(self) -> None:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        for pid in parents:
            p, depth = parents[pid], 0
            while p not in (0, 1, self.sshd_pid) and depth < 8:
                p, depth = parents.get(p, 0), depth + 1
            if p != self.sshd_pid:
                continue
            self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), ticks[pid])
            try:
                if self.pattern in Path(f"/proc/{pid}/cmdline").read_bytes():
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except OSError:
                continue

    def run(self) -> None:
        while not self._halt.is_set():
            self._scan()
            self._halt.wait(0.25)

    def stop(self) -> tuple[int, float]:
        """(peak RSS in bytes, CPU seconds) of the source side."""
        self._halt.set()
        self.join()
        self._scan()
        return self.peak_kib * 1024, sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")


def run_measured(argv: list[str], remote_pattern: bytes, sshd_pid: int) -> dict[str, Any]:
    """Run ``argv``; its wall time, stdout/stderr, CPU, and peak RSS: of its own process tree via
    /usr/bin/time (forked from a small process, so our own size does not leak into the figure),
    and of the source side via /proc sampling."""
    sampler = RemotePeak(remote_pattern, sshd_pid)
    sampler.start()
    with tempfile.NamedTemporaryFile("r", prefix="p2v-bench-time-") as stats:
        t0 = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", stats.name, *argv],
                              capture_output=True, text=True, check=False)  # fmt: skip
        wall = time.monotonic() - t0
        rss_kib, user, system = stats.read().strip().splitlines()[-1].split()
    remote_rss, remote_cpu = sampler.stop()
    return {"rc": proc.returncode, "wall_s": wall, "stdout": proc.stdout, "stderr": proc.stderr,
            "peak_rss_local": int(rss_kib) * 1024, "cpu_local_s": float(user) + float(system),
            "peak_rss_remote": remote_rss, "cpu_remote_s": remote_cpu}  # fmt: skip


# -- (a) p2v -----------------------------------------------------------------------------------


def child_sync(spec: dict[str, Any]) -> None:
    """In a child process: one SSH hash-mode sync into a new layer; prints counters as JSON."""
    import resource

    size = spec["size"]
    old = HashMap.load(Path(spec["old_map"]))
    t0 = time.monotonic()
    with SshSession(**spec["session"]) as session:
        source = SshDiskSource(session, spec["device"], size, compress=spec["compress"])
        with open_layer(Path(spec["layer"])) as target:
            result = source.sync(target, old, spec["state"])
    if spec.get("new_map"):
        result.hashmap.save(Path(spec["new_map"]))
    out = {"counters": result.counters.to_dict(), "wall_in_child_s": time.monotonic() - t0,
           "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_qemu_nbd": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "cpu_self_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
           "cpu_qemu_nbd_s": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])}  # fmt: skip
    print(json.dumps(out))


def p2v_sync(work: Path, src: Path, base: Path, base_map: Path, size: int, session: dict[str, Any],
             compress: bool, tag: str, sshd_pid: int) -> dict[str, Any]:  # fmt: skip
    layer = new_layer(work / f"rp-{tag}.qcow2", size, backing=base)
    spec = {"size": size, "old_map": str(base_map), "session": session, "device": str(src),
            "compress": compress, "layer": str(layer), "state": {"kind": "ssh"}}  # fmt: skip
    res = run_measured([sys.executable, __file__, "--child", json.dumps(spec)], b"p2v-delta", sshd_pid)
    if res["rc"] != 0:
        raise SystemExit(f"p2v sync failed: {res['stderr'][-3000:]}")
    child = json.loads(res["stdout"].strip().splitlines()[-1])
    c = child["counters"]
    wire = c["bytes_sent"] + c["extra"].get("bytes_upstream", 0)
    return {"wall_s": round(res["wall_s"], 2), "sync_wall_s": round(c["wall_s"], 2), "bytes_on_wire": wire,
            "bytes_from_source": c["bytes_sent"], "bytes_to_source": c["extra"].get("bytes_upstream", 0),
            "bytes_read_source": c["bytes_read"], "bytes_written": c["bytes_written"],
            "blocks_changed": c["blocks_changed"], "peak_rss_dr": res["peak_rss_local"],
            "cpu_dr_s": res["cpu_local_s"], "cpu_source_s": res["cpu_remote_s"],
            "cpu_dr_python_s": round(child["cpu_self_s"], 2),
            "cpu_dr_qemu_nbd_s": round(child["cpu_qemu_nbd_s"], 2),
            "peak_rss_dr_python": child["rss_self"], "peak_rss_qemu_nbd": child["rss_qemu_nbd"],
            "peak_rss_source_helper": res["peak_rss_remote"], "layer": str(layer), "counters": c}  # fmt: skip


def p2v_seed(
    work: Path, src: Path, size: int, session: dict[str, Any] | None, sshd_pid: int
) -> tuple[Path, Path, dict[str, Any]]:
    """The baseline point: over SSH (shows long transfers with re-keys do not stall) or locally."""
    base = new_layer(work / "base.qcow2", size)
    base_map = work / "base.map"
    t0 = time.monotonic()
    if session is not None:
        spec = {"size": size, "old_map": str(work / "zero.map"), "session": session, "device": str(src),
                "compress": False, "layer": str(base), "state": {}, "new_map": str(base_map)}  # fmt: skip
        HashMap.zeros(size).save(work / "zero.map")
        res = run_measured([sys.executable, __file__, "--child", json.dumps(spec)], b"p2v-delta", sshd_pid)
        if res["rc"] != 0:
            raise SystemExit(f"p2v seed failed: {res['stderr'][-3000:]}")
        c = json.loads(res["stdout"].strip().splitlines()[-1])["counters"]
        info = {"how": "ssh", "wall_s": round(res["wall_s"], 1), "bytes_on_wire": c["bytes_sent"],
                "ranges": c["extra"].get("ranges"), "rekeys": c["extra"].get("rekeys"),
                "peak_rss_dr": res["peak_rss_local"], "peak_rss_source_helper": res["peak_rss_remote"]}  # fmt: skip
    else:
        with open_layer(base) as target:
            r = FileDiskSource(src, "raw").sync(target, HashMap.zeros(size), {})
        r.hashmap.save(base_map)
        info = {"how": "local file", "wall_s": round(time.monotonic() - t0, 1)}
    return base, base_map, info


# -- (b) rsync ---------------------------------------------------------------------------------


def rsync_sync(src: Path, dest: Path, sshd: Any) -> dict[str, Any]:
    ssh = ["ssh", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-c", CIPHER]  # fmt: skip
    argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", "-e", shlex.join(ssh),
            f"{sshd.user}@127.0.0.1:{src}", str(dest)]  # fmt: skip
    res = run_measured(argv, b"rsync\0--server", sshd.proc.pid)
    if res["rc"] != 0:
        raise SystemExit(f"rsync failed: {res['stderr'][-3000:]}")
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", res["stdout"]).group(1).replace(",", ""))  # type: ignore[union-attr]
    received = int(re.search(r"Total bytes received: ([\d,]+)", res["stdout"]).group(1).replace(",", ""))  # type: ignore[union-attr]
    matched = re.search(r"Matched data: ([\d,]+)", res["stdout"])
    literal = re.search(r"Literal data: ([\d,]+)", res["stdout"])
    return {"wall_s": round(res["wall_s"], 2), "bytes_on_wire": sent + received, "bytes_sent": sent,
            "bytes_received": received, "literal_data": int(literal.group(1).replace(",", "")) if literal else None,
            "matched_data": int(matched.group(1).replace(",", "")) if matched else None,
            "peak_rss_dr": res["peak_rss_local"], "peak_rss_source": res["peak_rss_remote"],
            "cpu_dr_s": res["cpu_local_s"], "cpu_source_s": res["cpu_remote_s"], "argv": shlex.join(argv)}  # fmt: skip


# -- (c) dirty bitmap ----------------------------------------------------------------------------


def bitmap_mode(work: Path, size: int, fraction: float) -> dict[str, Any]:
    """LEAD: dirty-bitmap mode (issue 3, item 5). Drives
    ``p2v.replication.qemu_live_bench.bench_bitmap_sync`` (written by the live-QEMU engineer):
    a guestless QEMU on a ``size`` qcow2 drive, seed, 1% random 4 KiB writes through QEMU, then
    a bitmap sync. Returns its dict, or {"skipped": why}."""
    try:
        from p2v.replication.qemu_live_bench import bench_bitmap_sync
    except ImportError as exc:
        return {"skipped": f"p2v.replication.qemu_live_bench not available: {exc}"}
    try:
        return dict(bench_bitmap_sync(work / "bitmap", size=size, dirty_fraction=fraction, write_size=4096))
    except Exception as exc:  # a failed peer is a result here
        return {"skipped": f"bitmap bench failed: {type(exc).__name__}: {exc}"}


# -- one size ------------------------------------------------------------------------------------


def same_content(a: Path, a_fmt: str, b: Path, b_fmt: str) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-q", "-f", a_fmt, "-F", b_fmt, str(a), str(b)], check=False)
    return res.returncode == 0


def run_size(args: argparse.Namespace, size: int, sshd: Any, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source.raw"
    log(f"{human(size)}: writing the source disk")
    make_source(src, size, seed=size)
    session = {"host": sshd.host, "port": sshd.port, "user": sshd.user, "identity": str(sshd.client_key),
               "known_hosts": str(sshd.known_hosts)}  # fmt: skip
    log(f"{human(size)}: seeding the baseline point ({'over SSH' if args.seed_over_ssh else 'locally'})")
    base, base_map, seed_info = p2v_seed(work, src, size, session if args.seed_over_ssh else None, sshd.proc.pid)
    result: dict[str, Any] = {"size": size, "seed": seed_info}
    dest = work / "rsync-dest.raw"
    if not args.skip_rsync:
        log(f"{human(size)}: copying the rsync destination (same starting state)")
        subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    pieces = rewrite_pieces(src, args.change, seed=size + 1)
    result["rewritten_pieces"] = pieces
    result["rewritten_bytes"] = pieces * 4096
    result["load_before"] = os.getloadavg()
    drop_caches(args.drop_caches)
    log(f"{human(size)}: p2v hash-mode sync over SSH")
    result["p2v"] = p2v_sync(work, src, base, base_map, size, session, args.compress, "1", sshd.proc.pid)
    log(f"{human(size)}: p2v {result['p2v']['wall_s']} s, {human(result['p2v']['bytes_on_wire'])} on the wire")
    if not args.skip_rsync:
        drop_caches(args.drop_caches)
        log(f"{human(size)}: rsync over SSH")
        result["rsync"] = rsync_sync(src, dest, sshd)
        log(f"{human(size)}: rsync {result['rsync']['wall_s']} s, {human(result['rsync']['bytes_on_wire'])}")
    result["load_after"] = os.getloadavg()
    if args.check:
        log(f"{human(size)}: checking results (qemu-img compare)")
        result["p2v_point_equals_source"] = same_content(src, "raw", Path(result["p2v"]["layer"]), "qcow2")
        if not args.skip_rsync:
            result["rsync_copy_equals_source"] = same_content(src, "raw", dest, "raw")
    if "rsync" in result:
        p, r = result["p2v"], result["rsync"]
        result["ratios"] = {"wall_p2v_over_rsync": round(p["wall_s"] / r["wall_s"], 3),
                            "bytes_p2v_over_rsync": round(p["bytes_on_wire"] / r["bytes_on_wire"], 3)}  # fmt: skip
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_sync(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, action="append", help="disk size (repeat; default 8G and 4G)")
    ap.add_argument("--change", type=float, default=0.01, help="fraction of 4 KiB pieces rewritten")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"), help="where the big files go")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sync.json")
    ap.add_argument("--compress", action="store_true", help="p2v: zlib on data")
    ap.add_argument("--seed-over-ssh", action="store_true", help="seed the baseline over SSH too (timed)")
    ap.add_argument("--skip-rsync", action="store_true")
    ap.add_argument("--skip-bitmap", action="store_true")
    ap.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="keep the page cache between runs (default: drop it before each measured run)",
    )
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the qemu-img compare checks")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    args = ap.parse_args()
    sizes = args.size or [8 * GiB, 4 * GiB]
    top = Path(tempfile.mkdtemp(prefix="p2v-bench-sync-", dir=args.work))
    report: dict[str, Any] = {
        "benchmark": "sync",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "load_at_start": os.getloadavg(),
                 "rsync": subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0]},
        "change_fraction": args.change,
        "compress": args.compress,
        "cache": "dropped before each run" if args.drop_caches else "warm",
        "runs": [],
    }  # fmt: skip
    try:
        with loopback_sshd(top / "sshd") as sshd:
            for size in sizes:
                report["runs"].append(run_size(args, size, sshd, top / f"size-{size >> 20}M"))
        if not args.skip_bitmap:
            size = max(sizes)
            log(f"{human(size)}: dirty-bitmap mode (live QEMU)")
            bitmap = bitmap_mode(top, size, args.change)
            report["bitmap"] = bitmap
            first = next(r for r in report["runs"] if r["size"] == size)
            if "bitmap" in bitmap and isinstance(bitmap["bitmap"], dict):
                report["bitmap_over_p2v_hash_wall"] = round(bitmap["bitmap"]["wall_s"] / first["p2v"]["sync_wall_s"], 4)
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    runs = report["runs"]
    if len(runs) >= 2:
        by = sorted(runs, key=lambda r: r["size"])
        small, big = by[0], by[-1]
        report["rss_growth_when_size_grows"] = {
            "sizes": [small["size"], big["size"]],
            "p2v_dr": [small["p2v"]["peak_rss_dr"], big["p2v"]["peak_rss_dr"]],
            "p2v_source_helper": [small["p2v"]["peak_rss_source_helper"], big["p2v"]["peak_rss_source_helper"]],
        }  # fmt: skip
    report["load_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    for r in runs:
        line = (
            f"{human(r['size'])}: p2v {r['p2v']['wall_s']} s {human(r['p2v']['bytes_on_wire'])} "
            f"RSS {human(r['p2v']['peak_rss_dr'])}"
        )
        if "rsync" in r:
            line += (
                f" | rsync {r['rsync']['wall_s']} s {human(r['rsync']['bytes_on_wire'])} "
                f"RSS {human(r['rsync']['peak_rss_dr'])} | ratios {r['ratios']}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
