"""Benchmark: `p2v status` over a site with 1,000 machines and 100,000 recovery points.

Builds the catalog through the catalog API in one transaction (rows only, no layer files), then
times ``Site.open`` + ``Site.status()`` (the library) and, when the CLI has a ``status``
command, ``p2v status --json`` as a subprocess. Target: under 1 s. Writes JSON.

    .venv/bin/python bench/status.py [--machines 1000] [--points 100] [--library-only]
                                     [--out bench/results/status.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2v.site import ProtectionPolicy, Site  # noqa: E402

TARGET_S = 1.0


def build(site_dir: Path, machines: int, points: int) -> float:
    """Fill a new site's catalog; returns seconds taken."""
    t0 = time.monotonic()
    now = time.time()
    with Site.open(site_dir) as site:
        cat = site.catalog
        with cat.transaction("filling the benchmark catalog") as db:
            for m in range(machines):
                policy = ProtectionPolicy(retain_count=points, rpo_seconds=3600 if m % 2 else 900).to_dict()
                mid = cat.insert_machine(db, f"host-{m:04d}", policy, [(f"ssh://root@host-{m:04d}/dev/sda", 64 << 30)],
                                         now - 200 * 86400)  # fmt: skip
                for seq in range(1, points + 1):
                    created = now - (points - seq) * 3600 - (m % 7) * 600
                    layer = "base" if seq == 1 else f"rp-{seq:06d}"
                    mode = "seed" if seq == 1 else "hash"
                    counters = {"mode": mode, "bytes_read": 64 << 30,
                                "bytes_sent": 5 << 20, "bytes_written": 4 << 20, "wall_s": 120.0}  # fmt: skip
                    cat.insert_point(db, mid, seq=seq, created_at=created, committed_at=created + 120,
                                     consistency="crash-consistent", mode=mode, wall_s=120.0,
                                     layers=[(0, f"{layer}.qcow2", f"{layer}.map", 4 << 20, counters)])  # fmt: skip
    return time.monotonic() - t0


def time_library(site_dir: Path, repeat: int) -> dict[str, Any]:
    samples, opens, rows = [], [], 0
    for _ in range(repeat):
        t0 = time.monotonic()
        with Site.open(site_dir) as site:
            t1 = time.monotonic()
            status = site.status()
            t2 = time.monotonic()
        rows = len(status)
        opens.append(t1 - t0)
        samples.append(t2 - t0)
    return {"rows": rows, "first_s": samples[0], "median_s": statistics.median(samples), "max_s": max(samples),
            "open_median_s": statistics.median(opens), "samples_s": samples}  # fmt: skip


def time_cli(site_dir: Path, repeat: int) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "p2v", "status", "--json"]
    env = {**os.environ, "P2V_SITE": str(site_dir)}
    probe = subprocess.run([sys.executable, "-m", "p2v", "status", "--help"], capture_output=True, text=True,
                           env=env, cwd=ROOT, check=False)  # fmt: skip
    if probe.returncode != 0:
        return None
    samples, out = [], ""
    for _ in range(repeat):
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        samples.append(time.monotonic() - t0)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-500:], "rc": proc.returncode}
        out = proc.stdout
    return {"cmd": " ".join(cmd[1:]), "median_s": statistics.median(samples), "max_s": max(samples),
            "samples_s": samples, "stdout_bytes": len(out)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100, help="points per machine")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--library-only", action="store_true", help="do not time `p2v status --json`")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "status.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="p2v-bench-status-") as tmp:
        site_dir = Path(tmp) / "site"
        build_s = build(site_dir, args.machines, args.points)
        catalog_bytes = sum(p.stat().st_size for p in site_dir.glob("catalog.sqlite*"))
        lib = time_library(site_dir, args.repeat)
        cli = None if args.library_only else time_cli(site_dir, args.repeat)
    result: dict[str, Any] = {
        "benchmark": "p2v status over a large catalog",
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "machines": args.machines,
        "points": args.machines * args.points,
        "build_s": round(build_s, 2),
        "catalog_bytes": catalog_bytes,
        "library": lib,
        "cli": cli,
        "cli_note": None if cli is not None else ("skipped (--library-only)" if args.library_only
                                                  else "the CLI has no `status` command yet"),  # fmt: skip
        "target_s": TARGET_S,
        "library_meets_target": lib["max_s"] < TARGET_S,
        "cli_meets_target": (cli["max_s"] < TARGET_S) if cli and "max_s" in cli else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["library_meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
