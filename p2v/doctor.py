"""``p2v doctor``: is every component p2v drives present and working on this host?

Each component gives one :class:`Check`. Essential components are the ones a
conversion or a VM start cannot do without; a missing optional one (OVMF for
UEFI guests, the ssh client) is reported but does not fail the report. The
libguestfs check really launches an appliance, since an installed but broken
libguestfs (no kernel readable, KVM that hangs) is the usual trouble.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.errors import MissingComponent, P2VError
from p2v.vm import accel as accel_mod
from p2v.vm.firmware import INSTALL_HINT as OVMF_HINT
from p2v.vm.firmware import find_ovmf

TOOL_TIMEOUT_S = 30.0


@dataclass
class Check:
    """One component: ``detail`` is its version or what is wrong; ``fix`` one line saying how to fix it."""

    name: str
    ok: bool
    essential: bool
    detail: str
    fix: str = ""
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorReport:
    checks: list[Check]
    accel: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every essential component works."""
        return all(c.ok for c in self.checks if c.essential)

    @property
    def accel_summary(self) -> str:
        return str(self.accel.get("summary", ""))

    def missing_essential(self) -> list[Check]:
        return [c for c in self.checks if c.essential and not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "accel": self.accel, "checks": [c.to_dict() for c in self.checks]}

    def raise_if_broken(self) -> None:
        """Raise :class:`MissingComponent` naming the essential components that failed."""
        bad = self.missing_essential()
        if bad:
            names = ", ".join(c.name for c in bad)
            raise MissingComponent(f"missing or broken: {names}", hint=bad[0].fix or "run `p2v doctor`")


def _tool_check(
    name: str, argv: list[str], fix: str, *, essential: bool = True, stderr: bool = False
) -> Check:
    """Run ``argv`` (its first element looked up on PATH) and report the first line of its output."""
    exe = shutil.which(argv[0])
    if exe is None:
        return Check(name, False, essential, f"{argv[0]} not found on PATH", fix)
    try:
        proc = subprocess.run(
            [exe, *argv[1:]], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name, False, essential, f"{exe} did not run: {exc}", fix)
    out = (proc.stderr if stderr else proc.stdout).strip() or proc.stderr.strip()
    first = out.splitlines()[0] if out else ""
    if proc.returncode != 0:
        return Check(name, False, essential, f"{exe} failed (exit {proc.returncode}): {first}", fix)
    return Check(name, True, essential, short_version(first))


def short_version(line: str) -> str:
    """``QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`` -> ``7.2.22 (Debian 1:7.2+dfsg-7)``."""
    m = re.search(r"(?:version |^\S*/\S+ |^qemu-\S+ )(\d+\.\d+\S*(?: \([^)]*\))?)", line)
    if m:
        return m.group(1)
    return line.split(",")[0]  # "OpenSSH_9.2p1 Debian-2, OpenSSL 3.0" -> "OpenSSH_9.2p1 Debian-2"


def _import_check(
    name: str, module: str, fix: str, version: Callable[[Any], str] | None = None, *, essential: bool = True
) -> Check:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return Check(name, False, essential, f"python module {module!r} not importable: {exc}", fix)
    try:
        ver = version(mod) if version else str(getattr(mod, "__version__", "importable"))
    except Exception as exc:  # a broken binding: report, do not crash the doctor
        return Check(name, False, essential, f"python module {module!r} is broken: {exc}", fix)
    return Check(name, True, essential, ver)


def _nbd_version(mod: Any) -> str:
    return f"libnbd {mod.NBD().get_version()}"


def _guestfs_version(mod: Any) -> str:
    g = mod.GuestFS(python_return_dict=True)
    try:
        v = g.version()
    finally:
        g.close()
    return f"libguestfs {v['major']}.{v['minor']}.{v['release']}"


def _guestfs_check(launch: bool, verdict: accel_mod.AccelVerdict) -> Check:
    fix = "apt-get install libguestfs-tools python3-guestfs; run libguestfs-test-tool for details"
    base = _import_check("libguestfs", "guestfs", fix, _guestfs_version)
    if not base.ok or not launch:
        if base.ok:
            base.detail += " (appliance launch skipped)"
        return base
    from p2v.disks.guestfs import open_guestfs

    tcg = " with force_tcg" if not verdict.kvm_usable else " with KVM"
    with tempfile.TemporaryDirectory(prefix="p2v-doctor-") as tmp:
        scratch = Path(tmp) / "scratch.img"
        with scratch.open("wb") as f:
            f.truncate(16 * 1024 * 1024)
        t0 = time.monotonic()
        try:
            with open_guestfs([(scratch, "raw")], readonly=True, memsize_mib=512) as g:
                g.list_devices()
        except P2VError as exc:
            return Check("libguestfs", False, True, f"appliance launch failed{tcg}: {exc.message}", fix)
        secs = time.monotonic() - t0
    return Check(
        "libguestfs",
        True,
        True,
        f"{base.detail}; appliance launched in {secs:.1f}s{tcg}",
        seconds=round(secs, 1),
    )


def _ovmf_check() -> Check:
    try:
        fw = find_ovmf()
    except MissingComponent as exc:
        return Check("OVMF (UEFI guests)", False, False, exc.message, OVMF_HINT)
    return Check("OVMF (UEFI guests)", True, False, f"{fw.code} + {fw.vars_template.name}")


def _accel_check(verdict: accel_mod.AccelVerdict) -> Check:
    fix = ""
    if not verdict.kvm_usable:
        fix = "TCG works but is 10-50x slower: check /dev/kvm access and VT-x/AMD-V (nested virtualization)"
    cached = " (cached probe)" if verdict.cached else ""
    return Check("acceleration", True, False, verdict.summary + cached, fix, round(verdict.probe_seconds, 1))


def run_checks(reprobe: bool = False, launch_appliance: bool = True) -> DoctorReport:
    """Check every component; ``reprobe`` re-runs the KVM/TCG probe instead of using its cache.

    ``launch_appliance=False`` skips the libguestfs appliance launch (10-15 s
    under TCG) and only checks that the bindings load.
    """
    verdict = accel_mod.probe(force=reprobe)
    checks = [
        _tool_check(
            "qemu-system-x86_64", ["qemu-system-x86_64", "--version"], "apt-get install qemu-system-x86"
        ),
        _tool_check("qemu-img", ["qemu-img", "--version"], "apt-get install qemu-utils"),
        _tool_check("qemu-nbd", ["qemu-nbd", "--version"], "apt-get install qemu-utils"),
        _guestfs_check(launch_appliance, verdict),
        _import_check("libnbd", "nbd", "apt-get install python3-libnbd", _nbd_version),
        _import_check("hivex", "hivex", "apt-get install python3-hivex"),
        _ovmf_check(),
        _tool_check(
            "ssh client", ["ssh", "-V"], "apt-get install openssh-client", essential=False, stderr=True
        ),
        _import_check("paramiko", "paramiko", "pip install paramiko (in the p2v virtualenv)"),
        _accel_check(verdict),
    ]
    accel = asdict(verdict)
    accel["summary"] = verdict.summary
    return DoctorReport(checks, accel)
