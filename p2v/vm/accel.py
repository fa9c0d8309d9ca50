"""Decide KVM or TCG by booting something small, never by looking at /dev/kvm.

On some hosts /dev/kvm exists yet a kernel hangs under it, or ``-cpu host``
aborts (unhandled MSR). The probe boots the host's own kernel with no root
device under KVM: a working KVM reaches the "VFS: Unable to mount root fs"
panic in a second or two and QEMU exits (``panic=-1 -no-reboot``). A hang is
caught by the timeout, a QEMU abort by its exit status.

The verdict is cached per (qemu binary, kernel, /dev/kvm) for a day in the
user cache so that every VM start and guestfs launch does not pay for it.
``P2V_ACCEL=kvm|tcg`` forces the answer (for hosts where the probe is wrong).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2v.paths import cache_dir

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 15.0
CACHE_TTL_S = 24 * 3600
PANIC_MARK = "Kernel panic"


@dataclass
class AccelVerdict:
    accel: str  # "kvm" or "tcg"
    kvm_usable: bool
    reason: str
    cpu: str  # -cpu model to use with this accel
    probe_seconds: float
    cached: bool = False

    @property
    def summary(self) -> str:
        if self.kvm_usable:
            return "KVM"
        return f"KVM unusable, using TCG ({self.reason})"


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def probe_kernel() -> str | None:
    for k in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        if os.access(k, os.R_OK):
            return k
    return None


def _cache_key(qemu: str, kernel: str) -> str:
    qemu = os.path.realpath(qemu)
    st = os.stat(qemu)
    kvm = os.path.exists("/dev/kvm")
    return f"{qemu}:{st.st_mtime_ns}:{kernel}:{kvm}"


def _boot(qemu: str, kernel: str, accel: str, cpu: str, timeout: float) -> tuple[bool, str, float]:
    with tempfile.TemporaryDirectory(prefix="p2v-accel-") as tmp:
        serial = Path(tmp) / "serial.log"
        cmd = [
            qemu, "-accel", accel, "-cpu", cpu, "-m", "256", "-nodefaults", "-display", "none",
            "-serial", f"file:{serial}", "-kernel", kernel,
            "-append", "console=ttyS0 panic=-1 quiet loglevel=1", "-no-reboot",
        ]  # fmt: skip
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, f"{accel} boot hung for {timeout:.0f}s", time.monotonic() - t0
        elapsed = time.monotonic() - t0
        out = serial.read_text(errors="replace") if serial.exists() else ""
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return False, f"{accel} with -cpu {cpu} failed: {err}", elapsed
        if PANIC_MARK not in out:
            return False, f"{accel} boot ended without reaching the kernel's root mount", elapsed
        return True, "booted", elapsed


def probe(force: bool = False, timeout: float = PROBE_TIMEOUT_S) -> AccelVerdict:
    """Return the accelerator to use, probing (or reading the cached probe)."""
    env = os.environ.get("P2V_ACCEL")
    if env in ("kvm", "tcg"):
        return AccelVerdict(env, env == "kvm", "forced by P2V_ACCEL", "host" if env == "kvm" else "max", 0.0)
    qemu = qemu_binary()
    kernel = probe_kernel()
    if qemu is None or kernel is None:
        why = "qemu-system-x86_64 not found" if qemu is None else "no readable kernel in /boot to probe with"
        return AccelVerdict("tcg", False, why, "max", 0.0)
    if not os.path.exists("/dev/kvm"):
        return AccelVerdict("tcg", False, "/dev/kvm does not exist", "max", 0.0)

    cache_file = cache_dir() / "accel-probe.json"
    key = _cache_key(qemu, kernel)
    if not force and cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == key and time.time() - data.get("time", 0) < CACHE_TTL_S:
                v = AccelVerdict(**data["verdict"])
                v.cached = True
                return v
        except (ValueError, KeyError, TypeError):
            pass

    total = 0.0
    verdict: AccelVerdict | None = None
    reasons = []
    for cpu in ("host", "max"):
        ok, why, secs = _boot(qemu, kernel, "kvm", cpu, timeout)
        total += secs
        if ok:
            verdict = AccelVerdict("kvm", True, f"kernel booted under KVM in {secs:.1f}s", cpu, total)
            break
        reasons.append(why)
        if "hung" in why:  # a hang will not improve with another CPU model; don't pay twice
            break
    if verdict is None:
        verdict = AccelVerdict("tcg", False, "; ".join(reasons), "max", total)
    log.info("accel probe: %s", verdict.summary)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "time": time.time(), "verdict": asdict(verdict)}))
    tmp.replace(cache_file)
    return verdict


def qemu_accel_args(verdict: AccelVerdict | None = None) -> list[str]:
    v = verdict or probe()
    if v.kvm_usable:
        return ["-accel", "kvm", "-cpu", v.cpu]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]
