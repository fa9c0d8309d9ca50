"""``p2v convert``: source -> converted disk(s) + VM spec + libvirt XML.

Pipeline (the source is only ever read):

1. open the source (image checks, OVA/OVF/VMX parsing, or a copy over SSH);
2. for each disk, a qcow2 *edit overlay* backed by the source, and in parallel a
   ``qemu-img convert`` copy of the source into the output disk;
3. one libguestfs appliance over the overlays: inspect, convert (Linux or Windows);
4. when the copies are done, each overlay is re-pointed at its output copy (same
   bytes as the source) and committed into it — conversion edits land in the output
   without a second full copy;
5. VM spec and libvirt XML written; everything is staged in a hidden folder inside
   ``--out`` and moved into place only on success. On any failure or Ctrl-C the
   staging folder is removed and the output directory is left as it was.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2v.convert.fsck import repair_filesystems
from p2v.convert.guest import GuestRoot, find_root, mount_guest
from p2v.convert.linux import Step, convert_linux
from p2v.convert.linux.network import read_nic_config
from p2v.convert.nics import plan_nics
from p2v.disks import qemuimg
from p2v.disks.guestfs import open_guestfs
from p2v.errors import ConversionError, OutputError, UnsupportedGuest, UsageError
from p2v.sources.model import SourceDisk, SourceMachine, SourceNic
from p2v.sources.resolve import SourceOptions, open_source
from p2v.vm.spec import DiskSpec, GuestInfo, VmSpec

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ConvertOptions:
    out_dir: Path
    name: str | None = None
    out_format: str = "qcow2"
    net_map: dict[str, str] = field(default_factory=dict)
    virtio_win: Path | None = None
    luks_keys: list[str] = field(default_factory=list)
    root: str | None = None
    force: bool = False
    identity: Path | None = None
    known_hosts: Path | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    rebuild: str = "auto"  # auto | guest | host (see p2v.convert.linux)
    fsck: bool | None = None  # None: check filesystems of live (SSH) copies only


def resolve_rebuild(mode: str) -> str:
    """auto -> "guest" (the guest's own tools in the appliance) when KVM works, else "host"."""
    if mode in ("guest", "host"):
        return mode
    if mode != "auto":
        raise UsageError(f"--rebuild {mode}: use auto, guest or host")
    from p2v.vm.accel import probe

    return "guest" if probe().kvm_usable else "host"


@dataclass
class ConversionReport:
    name: str
    source: str
    source_kind: str
    guest: dict[str, Any]
    steps: list[Step]
    warnings: list[str]
    files: dict[str, Any]
    timings: dict[str, float]
    bytes: dict[str, int]
    spec: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Staging:
    """A hidden folder in the output directory; moved into place on success, else removed."""

    def __init__(self, out_dir: Path, name: str, finals: list[str], force: bool) -> None:
        self.out_dir = out_dir
        self.created_out = False
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir}: exists and is not a directory")
        clash = [f for f in finals if (out_dir / f).exists()]
        if clash and not force:
            raise OutputError(
                f"{out_dir}: {', '.join(clash)} already exist(s); choose another --name/--out or pass --force"
            )
        if not out_dir.exists():
            try:
                out_dir.mkdir(parents=True)
            except OSError as exc:
                raise OutputError(f"{out_dir}: cannot create output directory: {exc.strerror}") from exc
            self.created_out = True
        self.dir = out_dir / f".p2v-staging-{name}-{secrets.token_hex(4)}"
        try:
            self.dir.mkdir()
        except OSError as exc:
            raise OutputError(f"{out_dir}: cannot write: {exc.strerror}") from exc

    def commit(self, files: list[str]) -> None:
        for f in files:
            (self.dir / f).replace(self.out_dir / f)
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.created_out:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass


def _name_for(src: SourceMachine, opts: ConvertOptions) -> str:
    import re

    name = opts.name or src.name or "converted"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip("-.") or "converted"
    return name[:63]


def convert(
    source: str,
    opts: ConvertOptions,
    *,
    progress: ProgressFn | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ConversionReport:
    step = on_step or (lambda s: None)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    if opts.out_format not in ("qcow2", "raw"):
        raise UsageError(f"--format {opts.out_format}: use qcow2 or raw")
    if opts.virtio_win is not None and not opts.virtio_win.exists():
        from p2v.errors import SourceNotFound

        raise SourceNotFound(f"{opts.virtio_win}: virtio-win ISO or directory not found")
    # SSH sources are copied into a work folder before we know the VM name: use a
    # provisional staging area beside the output.
    opts.out_dir = opts.out_dir.resolve()
    pre = _Staging(opts.out_dir, "source", [], True)
    staging: _Staging | None = None
    try:
        step(f"opening source {source}")
        t = time.monotonic()
        ssh_prog = (lambda done, total: progress("copy over SSH", done, total)) if progress else None
        src = open_source(source, SourceOptions(pre.dir, opts.identity, opts.known_hosts, ssh_prog))
        timings["open_source"] = time.monotonic() - t
        try:
            name = _name_for(src, opts)
            ext = "qcow2" if opts.out_format == "qcow2" else "raw"
            disk_files = [f"{name}-disk{i}.{ext}" for i in range(len(src.disks))]
            finals = [*disk_files, f"{name}.vm.json", f"{name}.xml"]
            staging = _Staging(opts.out_dir, name, finals, opts.force)
            report = _convert_opened(src, source, name, disk_files, staging.dir, opts, progress, step, timings)
            step("finalizing output")
            staging.commit(finals)
        finally:
            src.close()
        pre.abort()
        timings["total"] = time.monotonic() - t_start
        report.timings = timings
        report.files = {k: str(opts.out_dir / v) if isinstance(v, str) else [str(opts.out_dir / x) for x in v]
                        for k, v in report.files.items()}  # fmt: skip
        return report
    except BaseException:
        if staging is not None:
            staging.abort()
        pre.abort()
        raise


def _convert_opened(
    src: SourceMachine,
    source: str,
    name: str,
    disk_files: list[str],
    work: Path,
    opts: ConvertOptions,
    progress: ProgressFn | None,
    step: Callable[[str], None],
    timings: dict[str, float],
) -> ConversionReport:
    overlays = []
    sizes = []
    for i, disk in enumerate(src.disks):
        ov = work / f"edit-{i}.qcow2"
        qemuimg.create_overlay(ov, disk.qemu_filename, disk.format)
        overlays.append(ov)
        info = qemuimg.info(disk.qemu_filename, disk.format, what=disk.display)
        sizes.append(int(info.get("virtual-size", 0)))

    # copies run while the appliance works on the overlays
    jobs: list[qemuimg.ConvertJob] = []
    for i, disk in enumerate(src.disks):
        label = f"copy disk{i}"
        cb = (lambda f, label=label, size=sizes[i]: progress(label, int(f * size), size)) if progress else None
        jobs.append(qemuimg.ConvertJob(disk.qemu_filename, disk.format, work / disk_files[i],
                                       opts.out_format, what=disk.display, progress=cb))  # fmt: skip
    try:
        steps, warnings, groot, guest_extra = _convert_in_appliance(src, name, overlays, opts, step, timings)
        step("waiting for the disk copy")
        t_wait = time.monotonic()
        for j in jobs:
            j.wait()
        timings["copy"] = max(j.seconds for j in jobs) if jobs else 0.0
        timings["copy_wait"] = time.monotonic() - t_wait
    except BaseException:
        for j in jobs:
            j.cancel()
        raise

    t = time.monotonic()
    step("merging conversion changes into the output disk")
    for i, ov in enumerate(overlays):
        qemuimg.rebase_unsafe(ov, str(work / disk_files[i]), opts.out_format)
        qemuimg.commit(ov)
        ov.unlink()
    timings["merge"] = time.monotonic() - t

    nics = guest_extra["nics"]
    firmware = guest_extra["firmware"]
    spec = VmSpec(
        name=name,
        cpus=opts.cpus or src.cpus or 2,
        memory_mib=opts.memory_mib or src.memory_mib or 2048,
        firmware=firmware,
        machine="q35",
        rtc=guest_extra.get("rtc", "utc"),
        disks=[DiskSpec(path=f, format="raw" if opts.out_format == "raw" else "qcow2", bus="virtio",
                        source=d.display, virtual_size=s)
               for f, d, s in zip(disk_files, src.disks, sizes, strict=True)],  # fmt: skip
        nics=nics,
        guest=GuestInfo(type=groot.type, distro=groot.distro, version=groot.version, product=groot.product,
                        arch=groot.arch),  # fmt: skip
        source=source,
        notes=warnings,
    )
    spec.save(work / f"{name}.vm.json")
    from p2v.vm.libvirt import domain_xml

    (work / f"{name}.xml").write_text(domain_xml(spec, work))
    allocated = sum((work / f).stat().st_blocks * 512 for f in disk_files)
    return ConversionReport(
        name=name,
        source=source,
        source_kind=src.kind,
        guest={
            "type": groot.type, "distro": groot.distro, "version": groot.version, "product": groot.product,
            "arch": groot.arch, "hostname": groot.hostname, "root": groot.root, "firmware": firmware,
        },  # fmt: skip
        steps=steps,
        warnings=warnings,
        files={"disks": disk_files, "spec": f"{name}.vm.json", "libvirt_xml": f"{name}.xml"},
        timings=timings,
        bytes={"virtual": sum(sizes), "allocated": allocated},
        spec=spec.model_dump(mode="json"),
    )


def _convert_in_appliance(
    src: SourceMachine,
    name: str,
    overlays: list[Path],
    opts: ConvertOptions,
    step: Callable[[str], None],
    timings: dict[str, float],
    *,
    guest_files: dict[str, str] | None = None,
) -> tuple[list[Step], list[str], GuestRoot, dict[str, Any]]:
    t = time.monotonic()
    step("starting the libguestfs appliance")
    with open_guestfs([(ov, "qcow2") for ov in overlays], readonly=False) as g:
        timings["appliance_launch"] = time.monotonic() - t
        fsck_step = None
        if opts.fsck is True or (opts.fsck is None and src.live):
            step("checking the filesystems of the live copy")
            checked, secs = repair_filesystems(g, what=src.description or name)
            timings["fsck"] = secs
            fixed = [f"{r.device} ({r.fstype}) {r.action}: {r.detail}".rstrip(": ") for r in checked]
            fsck_step = Step("filesystem-check", any(r.action == "repaired" for r in checked),
                             "; ".join(fixed) or "no filesystems", secs)  # fmt: skip
        t = time.monotonic()
        step("inspecting the guest")
        groot = find_root(g, what=src.description or name, luks_keys=opts.luks_keys, root=opts.root)
        mount_guest(g, groot, readonly=False)
        timings["inspect"] = time.monotonic() - t
        t = time.monotonic()
        warnings = list(src.notes) + groot.notes
        extra: dict[str, Any] = {}
        if groot.type == "linux":
            cfg_nics = read_nic_config(g)
            nics, w = plan_nics(name, src.nics, cfg_nics, opts.net_map)
            warnings += w
            pins = [(n.guest_name, n.mac) for n in nics if n.guest_name]
            conv = convert_linux(g, groot.package_format, groot.disks, pins, rebuild=resolve_rebuild(opts.rebuild),
                                 on_step=step)  # fmt: skip
            warnings += conv.warnings
            steps = conv.steps
            fw = conv.facts.firmware if conv.facts else (src.firmware or "bios")
            if src.firmware and conv.facts and src.firmware != fw:
                warnings.append(f"source says firmware {src.firmware}, guest boots with {fw}: using {fw}")
            extra = {"nics": nics, "firmware": fw, "rtc": "utc"}
        elif groot.type == "windows":
            if opts.virtio_win is None:
                raise UsageError(
                    f"{src.description or name}: Windows guest ({groot.product}): pass --virtio-win PATH "
                    "(a virtio-win ISO or directory) to inject drivers"
                )
            from p2v.convert.windows import convert_windows

            step("injecting virtio-win drivers")
            wres = convert_windows(g, groot.root, asdict(groot), opts.virtio_win)
            nics, w = plan_nics(name, src.nics, [], opts.net_map)
            warnings += w + list(wres.warnings)
            steps = [Step("windows-virtio", True, _windows_detail(wres))]
            extra = {"nics": nics, "firmware": src.firmware or "bios", "rtc": wres.rtc_mode}
        else:
            raise UnsupportedGuest(f"{src.description or name}: {groot.type} guests are not supported")
        if guest_files:
            step("writing files into the guest")
            steps.append(_write_guest_files(g, guest_files, what=src.description or name))
        if fsck_step is not None:
            steps.insert(0, fsck_step)
            warnings.append("the source was copied while running (fuzzy): its filesystems were checked; "
                            "data being written during the copy may be missing")  # fmt: skip
        timings["convert"] = time.monotonic() - t
        step("flushing the guest disks")
        t = time.monotonic()
    timings["appliance_shutdown"] = time.monotonic() - t
    return steps, warnings, groot, extra


def _write_guest_files(g: Any, files: dict[str, str], *, what: str) -> Step:
    """Write ``files`` (guest path -> text) into the mounted guest, creating parent folders."""
    t = time.monotonic()
    for path, content in files.items():
        parent = path.rsplit("/", 1)[0] or "/"
        try:
            g.mkdir_p(parent)
            g.write(path, content.encode())
            g.chmod(0o644, path)
        except RuntimeError as exc:
            raise ConversionError(f"{what}: cannot write {path} into the guest: {exc}") from exc
    return Step("guest-files", True, ", ".join(files), time.monotonic() - t)


def check_guest_files(files: dict[str, str]) -> dict[str, str]:
    """Validate guest paths for :func:`convert_in_place`: absolute, normalised, no ``..``, not ``/``."""
    for path in files:
        parts = path.split("/")
        if (not path.startswith("/") or path.endswith("/") or "\0" in path
                or any(p in ("", ".", "..") for p in parts[1:])):  # fmt: skip
            raise UsageError(f"guest file {path!r}: give an absolute, normalised file path (no '..', '.', '//')")
    return files


def convert_in_place(
    overlays: list[Path],
    name: str,
    opts: ConvertOptions,
    *,
    nics: list[SourceNic],
    nic_seed: str | None = None,
    extra_files: dict[str, str] | None = None,
    description: str = "",
    firmware: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert the guest on ``overlays`` (qcow2 files, written in place: their backing files are
    only read) and write the VM spec ``opts.out_dir/NAME.vm.json`` whose virtio disks are the
    overlays (names relative to the spec when they sit beside it).

    ``extra_files`` (guest path -> text) are written into the guest in the same appliance
    session, after the conversion. ``nics`` are the VM's NICs (MAC, source network, guest
    name); with none, they come from the guest's network config: the MACs it binds names to
    are kept, the others are derived from ``nic_seed`` (default ``name``) and the interface
    name. ``opts.net_map`` maps them to DR networks. Nothing but the overlays and the spec is
    written; on failure the spec is not written and the overlays hold partial edits (the
    caller throws them away). Raises what :func:`convert` raises for the guest."""
    step = on_step or (lambda s: None)
    check_guest_files(extra_files or {})
    if not overlays:
        raise UsageError(f"{name}: no disks to convert")
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    out = opts.out_dir.absolute()
    sizes = [int(qemuimg.info(str(ov), "qcow2", what=str(ov)).get("virtual-size", 0)) for ov in overlays]
    src = SourceMachine(
        kind="point", name=name, nics=list(nics), firmware=firmware, description=description or name,
        disks=[SourceDisk(qemu_filename=str(ov), format="qcow2", display=str(ov), capacity=s)
               for ov, s in zip(overlays, sizes, strict=True)],
    )  # fmt: skip
    # _convert_in_appliance seeds generated MACs with its name argument (and names the guest in
    # messages by src.description): pass the seed so a machine keeps its MACs whatever the VM name
    steps, warnings, groot, extra = _convert_in_appliance(src, nic_seed or name, overlays, opts, step, timings,
                                                          guest_files=extra_files)  # fmt: skip
    spec = VmSpec(
        name=name, cpus=opts.cpus or 2, memory_mib=opts.memory_mib or 2048, firmware=extra["firmware"],
        machine="q35", rtc=extra.get("rtc", "utc"),
        disks=[DiskSpec(path=ov.name if ov.parent.absolute() == out else str(ov.absolute()), format="qcow2",
                        bus="virtio", source=description or None, virtual_size=s)
               for ov, s in zip(overlays, sizes, strict=True)],
        nics=extra["nics"],
        guest=GuestInfo(type=groot.type, distro=groot.distro, version=groot.version, product=groot.product,
                        arch=groot.arch),
        source=description, notes=warnings,
    )  # fmt: skip
    spec_file = out / f"{name}.vm.json"
    spec.save(spec_file)
    timings["total"] = time.monotonic() - t_start
    allocated = sum(ov.stat().st_blocks * 512 for ov in overlays)
    return ConversionReport(
        name=name, source=description, source_kind="point",
        guest={
            "type": groot.type, "distro": groot.distro, "version": groot.version, "product": groot.product,
            "arch": groot.arch, "hostname": groot.hostname, "root": groot.root, "firmware": extra["firmware"],
        },
        steps=steps, warnings=warnings,
        files={"disks": [str(ov.absolute()) for ov in overlays], "spec": str(spec_file)},
        timings=timings, bytes={"virtual": sum(sizes), "allocated": allocated},
        spec=spec.model_dump(mode="json"),
    )  # fmt: skip


def _windows_detail(res: Any) -> str:
    vmware = "; VMware Tools removal queued" if res.vmware_tools_uninstall else ""
    return (
        f"{res.catalog_entry}: virtio-win folder {res.driver_folder}; boot drivers {', '.join(res.boot_drivers)}; "
        f"{len(res.files_copied)} files; driver set staged in {res.staged_dir} for pnputil at first boot "
        f"(at most {res.first_boot_retries} tries){vmware}"
    )
