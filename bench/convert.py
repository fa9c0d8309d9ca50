"""Benchmark: `p2v convert` vs `virt-v2v -i disk ... -o local` on test guest 1, in one run.

Both convert the same raw image of the "physical" Debian server; both outputs are then
booted under QEMU (virtio disk + virtio NIC, same MAC) to a login prompt. Writes JSON
with both wall times, their ratio, p2v's own time breakdown, and whether each booted.

    .venv/bin/python bench/convert.py [--skip-boot] [--out bench/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import images  # noqa: E402
from p2v.vm.accel import probe  # noqa: E402
from p2v.vm.cmdline import RunOverrides  # noqa: E402
from p2v.vm.runtime import VirtualMachine  # noqa: E402
from p2v.vm.spec import DiskSpec, NicSpec, VmSpec  # noqa: E402


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    return time.monotonic() - t0, proc


def boot_to_login(spec: VmSpec, spec_dir: Path, timeout: float = 900) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        ov = RunOverrides(snapshot=True, memory_mib=1024, cache="unsafe")
        with VirtualMachine(spec, spec_dir, overrides=ov) as vm:
            vm.wait_for_console(r"login: ?", timeout=timeout)
            return {"booted": True, "seconds_to_login": round(time.monotonic() - t0, 1)}
    except Exception as exc:  # a failed boot is a result here, not a crash
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return {"booted": False, "error": lines[0][:300] if lines else repr(exc),
                "console_tail": lines[-12:], "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-boot", action="store_true", help="only time the conversions")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert.json")
    args = ap.parse_args()

    src = images.ensure("debian-physical-bios")
    mac = images.GUESTS["debian-physical-bios"]["mac"]
    verdict = probe()
    work = Path(tempfile.mkdtemp(prefix="p2v-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    result: dict[str, Any] = {
        "benchmark": "convert",
        "source": str(src),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "accel": verdict.summary},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        # p2v
        p2v_out = work / "p2v"
        secs, proc = run_timed([sys.executable, "-m", "p2v", "convert", str(src), "--out", str(p2v_out),
                                "--name", "bench", "--json"])  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"p2v convert failed: {proc.stderr}")
        rep = json.loads(proc.stdout)
        result["p2v"] = {"wall_s": round(secs, 1), "timings": {k: round(v, 1) for k, v in rep["timings"].items()},
                         "steps": {s["name"]: round(s["seconds"], 1) for s in rep["steps"]},
                         "allocated_bytes": rep["bytes"]["allocated"]}  # fmt: skip

        # virt-v2v (Debian package), same input, local output, qcow2
        v2v_out = work / "v2v"
        v2v_out.mkdir()
        env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
        if not verdict.kvm_usable:
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        secs, proc = run_timed(["virt-v2v", "-i", "disk", str(src), "-o", "local", "-os", str(v2v_out),
                                "-of", "qcow2", "-on", "bench"], env=env)  # fmt: skip
        result["virt_v2v"] = {"wall_s": round(secs, 1), "rc": proc.returncode,
                              "version": subprocess.run(["virt-v2v", "--version"], capture_output=True,
                                                        text=True).stdout.strip()}  # fmt: skip
        if proc.returncode != 0:
            result["virt_v2v"]["error"] = proc.stderr.strip().splitlines()[-3:]
        result["ratio_p2v_over_virt_v2v"] = round(result["p2v"]["wall_s"] / result["virt_v2v"]["wall_s"], 3)
        result["target"] = "p2v <= 0.5 x virt-v2v wall time, and p2v's output boots"

        if not args.skip_boot:
            spec = VmSpec.load(p2v_out / "bench.vm.json")
            result["p2v"]["boot"] = boot_to_login(spec, p2v_out)
            v2v_disks = sorted(v2v_out.glob("bench-sd*"))
            if proc.returncode == 0 and v2v_disks:
                vspec = VmSpec(name="bench-v2v", cpus=spec.cpus, memory_mib=1024,
                               disks=[DiskSpec(path=str(d), format="qcow2", bus="virtio") for d in v2v_disks],
                               nics=[NicSpec(mac=mac, model="virtio")])  # fmt: skip
                result["virt_v2v"]["boot"] = boot_to_login(vspec, v2v_out)
        result["target_met"] = (result["ratio_p2v_over_virt_v2v"] <= 0.5
                                and result["p2v"].get("boot", {"booted": True})["booted"])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
