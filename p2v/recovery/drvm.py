"""Recovery VMs: a recovery point booted as a converted DR VM, without writing into the chain.

:func:`prepare_recovery_vm` pins the point (so retention cannot merge its layer away), makes
one qcow2 overlay per disk in a work folder, backed by the point's layer file (absolute path,
never written), converts the guest on those overlays in one libguestfs session (virtio
drivers, device names, NIC names pinned to MACs, plus any ``extra_files`` such as a drill's
network config) and writes the VM spec beside them, then the record ``VM.recovery.json``
(written last: a folder without it is a half-prepared VM and is redone). A drill throws the
overlays away (:func:`discard_recovery_vm`); a failover keeps them as the live disks, and
fallback later finds what changed at DR from their allocation: they use 128 KiB clusters with
extended L2 entries, so every 4 KiB written is visible as such (measured: 3000 random 4 KiB
writes + 30 MiB sequential map as 41.6 MiB with 128k or 64k subclustered overlays, 210 MiB
with plain 64k clusters, 53 MiB with 256k; 128k keeps half the L2 metadata of 64k).

:func:`boot_recovery_vm` starts it as a detached VM (:mod:`p2v.vm.detached`) that outlives
the command, or as a child VM a drill stops; booting a VM that already runs (a resumed run)
returns the running one.

Pins (see :mod:`p2v.site.pins`): holder ``settings.pin_holder`` (default ``vm:<name>``). A
drill pins with the orchestrator's pid, then with the QEMU pid once booted: when both are
gone the pin lapses by itself. A failover pins with no pid: its overlays stay the live disks,
so the point stays pinned until :func:`discard_recovery_vm` or an explicit unpin (fallback).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.convert.pipeline import ConvertOptions, check_guest_files, convert_in_place
from p2v.errors import Busy, MissingComponent, OutputError, P2VError, SiteError, UnknownMachine, UsageError, VmError
from p2v.site import pins
from p2v.site.retention import ChainMerge
from p2v.site.site import Site
from p2v.sources.model import SourceNic
from p2v.vm import detached as vm_detached
from p2v.vm.cmdline import ISOLATED_NETWORK, RunOverrides
from p2v.vm.process import StopResult
from p2v.vm.runtime import VirtualMachine
from p2v.vm.spec import VmSpec

log = logging.getLogger(__name__)

OVERLAY_OPTIONS = "cluster_size=128k,extended_l2=on"
RECORD_SUFFIX = ".recovery.json"
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SETTLE_TIMEOUT_S = 120.0
Step = Callable[[str], None]


@dataclass
class RecoverySettings:
    """How to bring one machine up at DR.

    ``nics`` None: the NICs the guest's network config names, keeping the MACs it binds them
    to (the source's: the guest finds its interfaces as before, on DR and back on its own
    hardware after fallback); a NIC it does not bind gets ``mac_from_seed(f"{machine}/{iface}")``
    (one NIC ``mac_from_seed(f"{machine}/nic0")`` when it names none). Either way the same for
    every DR VM of that machine, so a failover VM and a later one look alike. ``network`` is
    the DR network of the NICs (default ``isolated`` for drills: no route out, ``default``
    otherwise). ``fsck`` None checks the filesystems of *fuzzy* points only."""

    vm_name: str
    cpus: int | None = None
    memory_mib: int | None = None
    extra_files: dict[str, str] = field(default_factory=dict)
    nics: list[SourceNic] | None = None
    drill: bool = False
    network: str | None = None
    rebuild: str = "auto"
    fsck: bool | None = None
    pin_holder: str | None = None

    def holder(self) -> str:
        return self.pin_holder or f"vm:{self.vm_name}"

    def nics_for(self, machine: str) -> list[SourceNic]:
        """The NICs given; empty when the guest's config decides (see the class docstring)."""
        return list(self.nics) if self.nics is not None else []

    def dr_network(self) -> str:
        return self.network or (ISOLATED_NETWORK if self.drill else "default")


@dataclass
class RecoveryVm:
    """A prepared DR VM: its overlays, spec, the point it starts from, and the conversion."""

    vm_name: str
    machine: str
    site_root: str
    workdir: str
    spec_path: str
    overlays: list[str]
    point: dict[str, Any]  # seq, created_at, consistency, layers (backing file of each overlay)
    conversion: dict[str, Any]  # timings, bytes_allocated, steps, warnings, guest
    pin_holder: str
    drill: bool
    prepared_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryVm:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def record_path(self) -> Path:
        return record_path(Path(self.workdir), self.vm_name)

    def save(self) -> None:
        path = self.record_path
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)


def record_path(workdir: Path, vm_name: str) -> Path:
    return workdir / f"{vm_name}{RECORD_SUFFIX}"


def load_recovery_vm(workdir: Path, vm_name: str) -> RecoveryVm | None:
    """The record a finished :func:`prepare_recovery_vm` left in ``workdir``, else None."""
    try:
        return RecoveryVm.from_dict(json.loads(record_path(workdir, vm_name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable recovery record, preparing again: %s", record_path(workdir, vm_name), exc)
        return None


@dataclass
class BootedVm:
    """A running recovery VM. ``resumed``: it was already running (nothing was started)."""

    name: str
    pid: int
    ssh_port: int | None
    console_log: str
    agent_socket: str
    qmp_socket: str
    run_dir: str
    detached: bool
    resumed: bool = False
    vm: VirtualMachine | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "vm"}

    def stop(self, timeout: float = 60.0, hard: bool = False) -> StopResult:
        """Stop it (power button, then quit, then kill); a no-op when it is not running."""
        if self.vm is not None:
            return self.vm.shutdown(timeout=timeout, hard=hard)
        return stop_recovery_vm(self.name, timeout, hard=hard)


# -- prepare ---------------------------------------------------------------------------------


def _check_settings(settings: RecoverySettings) -> None:
    if not VM_NAME_RE.match(settings.vm_name):
        raise UsageError(f"recovery VM name {settings.vm_name!r} is not valid",
                         hint="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")  # fmt: skip
    if settings.cpus is not None and settings.cpus < 1:
        raise UsageError(f"recovery VM {settings.vm_name}: cpus {settings.cpus} must be at least 1")
    if settings.memory_mib is not None and settings.memory_mib < 64:
        raise UsageError(f"recovery VM {settings.vm_name}: memory {settings.memory_mib} MiB is below 64 MiB")
    check_guest_files(settings.extra_files)


def _create_overlay(overlay: Path, backing: Path) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", OVERLAY_OPTIONS, "-b", str(backing.absolute()),
            "-F", "qcow2", str(overlay)]  # fmt: skip
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise OutputError(f"{overlay}: qemu-img create did not finish in 120 s") from exc
    if proc.returncode != 0:
        tail = "; ".join(ln.strip() for ln in proc.stderr.splitlines()[-3:] if ln.strip())
        raise OutputError(f"{overlay}: cannot create the overlay on {backing}: {tail or proc.returncode}")


def _settle_merge(site: Site, machine: str, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Finish a retention merge an interrupted run left half done, so no layer file changes
    name under the overlays. Waits while another process holds the machine's lock; a merge that
    cannot finish (images held open) is left to :func:`pins.pin_point`, which refuses the one
    point it would still change."""
    row = site.catalog.machine_row(machine)
    if row is None:
        site.machine(machine)  # UnknownMachine
        return
    mid = int(row["id"])
    if site.holds_lock(machine):  # the caller's own lock: it runs (or will run) the merge itself
        return
    deadline = time.monotonic() + timeout
    while site.catalog.journal_row(mid) is not None:
        try:
            with site.lock(machine, "recovery") as held:
                dirs = [site.disk_dir(machine, d.index) for d in site.machine(machine).disks]
                ChainMerge(site.catalog, mid, machine, dirs, site_root=site.root, keep_fds=(held.fd,)).finish()
            return
        except Busy:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        except SiteError as exc:
            log.warning("machine %s: %s", machine, exc.message)
            return


def _existing(workdir: Path, machine: str, seq: int | None, settings: RecoverySettings,
              site: Site) -> RecoveryVm | None:  # fmt: skip
    rec = load_recovery_vm(workdir, settings.vm_name)
    if rec is None:
        return None
    same = (rec.machine == machine and (seq is None or rec.point.get("seq") == seq)
            and Path(rec.site_root) == site.root and all(Path(p).exists() for p in rec.overlays)
            and Path(rec.spec_path).exists())  # fmt: skip
    if same:
        return rec
    what = f"recovery VM {settings.vm_name} in {rec.workdir} (machine {rec.machine} point {rec.point.get('seq')})"
    if _running_from(rec):
        raise VmError(f"{what} is running; it cannot be prepared again",
                      hint="discard it first, or choose another VM name")  # fmt: skip
    if not rec.drill:
        raise OutputError(f"{what} is a failover VM: its overlays hold what changed at DR; it is not replaced",
                          hint="fall back or discard it first, or choose another VM name or work folder")  # fmt: skip
    return None


def prepare_recovery_vm(site: Site, machine: str, seq: int | None, workdir: Path, settings: RecoverySettings, *,
                        on_step: Step | None = None) -> RecoveryVm:  # fmt: skip
    """Make ``machine``'s point ``seq`` (None: the newest) bootable as VM ``settings.vm_name``.

    Idempotent: when ``workdir`` already holds a finished preparation of the same machine and
    point, it is returned as it is (the point is pinned again). Otherwise half-done leftovers
    (and a stopped *drill* VM of that name) are removed and everything is redone; a failover VM
    of that name is never replaced (OutputError), a running one neither (VmError). On any
    failure everything this call created is removed and its pin released. Raises UsageError
    (settings), UnknownMachine/SiteError (no such point), Busy (retention is merging into that
    point), OutputError (work folder),
    ConversionError/UnsupportedGuest (the guest)."""
    step = on_step or (lambda s: None)
    _check_settings(settings)
    workdir = workdir.absolute()
    holder = settings.holder()
    pid = os.getpid() if settings.drill else None
    done = _existing(workdir, machine, seq, settings, site)
    if done is not None:
        pins.pin_point(site, machine, int(done.point["seq"]), holder, pid)
        step(f"recovery VM {settings.vm_name} already prepared: reusing it")
        return done
    t0 = time.monotonic()
    _settle_merge(site, machine)
    point = site.point(machine, seq)
    pins.pin_point(site, machine, point.seq, holder, pid)
    created_dir = not workdir.exists()
    made: list[Path] = []
    try:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{workdir}: cannot create the recovery VM's work folder: {exc.strerror}") from exc
        _remove_leftovers(workdir, settings.vm_name)
        step(f"creating overlays on point {point.seq} of {machine}")
        t = time.monotonic()
        layers: list[str] = []
        overlays: list[Path] = []
        for d in sorted(layer.disk for layer in point.layers):
            backing = site.point_image(machine, point.seq, d)
            ov = workdir / f"{settings.vm_name}-disk{d}.qcow2"
            made.append(ov)
            _create_overlay(ov, backing)
            layers.append(str(backing))
            overlays.append(ov)
        t_overlays = time.monotonic() - t
        fsck = settings.fsck if settings.fsck is not None else (point.consistency == "fuzzy" or None)
        opts = ConvertOptions(out_dir=workdir, name=settings.vm_name, net_map={"*": settings.dr_network()},
                              cpus=settings.cpus, memory_mib=settings.memory_mib, rebuild=settings.rebuild,
                              fsck=fsck)  # fmt: skip
        made.append(workdir / f"{settings.vm_name}.vm.json")
        report = convert_in_place(overlays, settings.vm_name, opts, nics=settings.nics_for(machine), nic_seed=machine,
                                  extra_files=settings.extra_files, description=f"{machine} point {point.seq}",
                                  on_step=step)  # fmt: skip
        timings = dict(report.timings)
        timings["overlays"] = t_overlays
        timings["prepare_total"] = time.monotonic() - t0
        rvm = RecoveryVm(
            vm_name=settings.vm_name, machine=machine, site_root=str(site.root), workdir=str(workdir),
            spec_path=str(workdir / f"{settings.vm_name}.vm.json"), overlays=[str(o) for o in overlays],
            point={"seq": point.seq, "created_at": point.created_at, "consistency": point.consistency,
                   "layers": layers},
            conversion={"timings": timings, "bytes_allocated": report.bytes["allocated"],
                        "bytes_virtual": report.bytes["virtual"], "guest": report.guest,
                        "steps": [asdict(s) for s in report.steps], "warnings": report.warnings},
            pin_holder=holder, drill=settings.drill, prepared_at=time.time(),
        )  # fmt: skip
        made.append(rvm.record_path)
        rvm.save()
        return rvm
    except BaseException:
        for p in made:
            p.unlink(missing_ok=True)
        record_path(workdir, settings.vm_name).with_suffix(".json.tmp").unlink(missing_ok=True)
        if created_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        try:
            pins.unpin(site, machine, holder)
        except P2VError as exc:  # never hide the real error
            log.warning("machine %s: could not release pin %s: %s", machine, holder, exc.message)
        raise


def _remove_leftovers(workdir: Path, vm_name: str) -> None:
    for p in [*workdir.glob(f"{vm_name}-disk*.qcow2"), workdir / f"{vm_name}.vm.json",
              record_path(workdir, vm_name)]:  # fmt: skip
        p.unlink(missing_ok=True)


# -- boot / stop / discard -------------------------------------------------------------------


def _running_from(rvm: RecoveryVm) -> vm_detached.VmInfo | None:
    """The detached VM ``rvm.vm_name`` when it runs from this recovery VM's spec."""
    try:
        info = vm_detached.get_vm(rvm.vm_name)
    except VmError:
        return None
    if Path(info.spec_path) != Path(rvm.spec_path):
        raise VmError(f"a VM named {rvm.vm_name} is already running from another spec ({info.spec_path})",
                      hint="stop it, or give the recovery VM another name")  # fmt: skip
    return info


def _booted(info: vm_detached.VmInfo, resumed: bool) -> BootedVm:
    return BootedVm(name=info.name, pid=info.pid, ssh_port=info.ssh_port, console_log=info.console_log,
                    agent_socket=info.guest_agent_socket, qmp_socket=info.qmp_socket, run_dir=info.run_dir,
                    detached=True, resumed=resumed)  # fmt: skip


def boot_recovery_vm(rvm: RecoveryVm, *, overrides: RunOverrides | None = None, detached: bool = True,
                     wait_for: str | None = None, wait_timeout: float = 600.0) -> BootedVm:  # fmt: skip
    """Start the recovery VM; when a VM of that name already runs from this spec, return it.

    ``detached``: QEMU outlives this process (failover; stop it by name). Otherwise it dies
    with this process and ``BootedVm.vm`` is the handle to stop. ``wait_for``: a console regex to
    wait for (VmError on timeout; the VM is left running). A drill's pin is moved to the QEMU pid."""
    overrides = overrides or RunOverrides()
    running = _running_from(rvm)
    if running is not None:
        booted = _booted(running, resumed=True)
    elif detached:
        try:
            booted = _booted(vm_detached.start_vm(Path(rvm.spec_path), name=rvm.vm_name, overrides=overrides), False)
        except VmError:
            running = _running_from(rvm)  # started by a concurrent call?
            if running is None:
                raise
            booted = _booted(running, resumed=True)
    else:
        spec_path = Path(rvm.spec_path)
        vm = VirtualMachine(VmSpec.load(spec_path), spec_path.parent, run_dir=Path(rvm.workdir) / f"{rvm.vm_name}.run",
                            overrides=overrides, name=rvm.vm_name)  # fmt: skip
        vm.launch()
        files = vm.files
        booted = BootedVm(name=rvm.vm_name, pid=vm.pid or 0, ssh_port=vm.ssh_port, console_log=str(files.console_log),
                          agent_socket=str(files.guest_agent_socket), qmp_socket=str(files.qmp_socket),
                          run_dir=str(files.run_dir), detached=False, vm=vm)  # fmt: skip
    if rvm.drill and booted.pid:
        with Site.open(Path(rvm.site_root)) as site:
            pins.pin_point(site, rvm.machine, int(rvm.point["seq"]), rvm.pin_holder, booted.pid)
    if wait_for:
        _wait_console(booted, wait_for, wait_timeout)
    return booted


def _wait_console(booted: BootedVm, regex: str, timeout: float) -> None:
    if booted.vm is not None:
        booted.vm.wait_for_console(regex, timeout)
        return
    pattern = re.compile(regex, re.MULTILINE)
    deadline = time.monotonic() + timeout
    path = Path(booted.console_log)
    while time.monotonic() < deadline:
        try:
            if pattern.search(path.read_text(errors="replace")):
                return
        except FileNotFoundError:
            pass
        try:
            vm_detached.get_vm(booted.name)
        except VmError as exc:
            raise VmError(f"recovery VM {booted.name} stopped before its console showed /{regex}/") from exc
        time.sleep(0.5)
    raise VmError(f"recovery VM {booted.name}: console did not show /{regex}/ within {timeout:.0f}s",
                  hint=f"the VM is left running: `p2v vm console {booted.name}`")  # fmt: skip


def stop_recovery_vm(name: str, timeout: float = 60.0, *, hard: bool = False) -> StopResult:
    """Stop the detached recovery VM ``name`` (power button, quit after ``timeout``, then kill).
    Idempotent: a VM that is not there gives method ``not-running``."""
    try:
        return vm_detached.stop_vm(name, timeout=timeout, force=hard)
    except VmError as exc:
        if f"no VM named {name}" in exc.message:
            return StopResult(name, "not-running", 0.0)
        raise


def discard_recovery_vm(rvm: RecoveryVm, *, booted: BootedVm | None = None, timeout: float = 10.0,
                        hard: bool = True) -> list[str]:  # fmt: skip
    """Stop the VM if it runs (``hard``: no wait for the guest, its disks are thrown away), then
    remove its overlays, spec, record and work folder, and release its pin. Idempotent.
    Returns the files removed."""
    if booted is not None and booted.vm is not None:
        booted.vm.shutdown(timeout=timeout, hard=hard)
    if _running_from(rvm) is not None:
        stop_recovery_vm(rvm.vm_name, timeout, hard=hard)
    workdir = Path(rvm.workdir)
    removed: list[str] = []
    for p in [*map(Path, rvm.overlays), Path(rvm.spec_path), rvm.record_path]:
        if p.exists():
            p.unlink()
            removed.append(str(p))
    shutil.rmtree(workdir / f"{rvm.vm_name}.run", ignore_errors=True)
    try:
        workdir.rmdir()  # only when nothing else (another VM of the run) lives there
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.info("%s: kept (%s)", workdir, exc.strerror)
    with Site.open(Path(rvm.site_root)) as site:
        try:
            pins.unpin(site, rvm.machine, rvm.pin_holder)
        except UnknownMachine:
            pass  # the machine was removed from the site: its pins went with it
    return removed
