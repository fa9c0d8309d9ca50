"""Turn a :class:`~p2v.vm.spec.VmSpec` into a QEMU command line.

:func:`build_command` is pure: it reads no disk and starts nothing, so every
flag it emits can be checked in a unit test. What it refers to in the run
directory (the VARS copy for UEFI, the throw-away overlays for ``snapshot``,
the sockets) is created by :mod:`p2v.vm.runtime` before QEMU starts; the
names of those files come from :class:`RunFiles` so both sides agree.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from p2v.errors import InvalidInput, UsageError
from p2v.vm.accel import AccelVerdict, qemu_accel_args
from p2v.vm.firmware import OvmfFirmware, find_ovmf
from p2v.vm.spec import DiskBus, NicModel, VmSpec

Machine = Literal["pc", "q35"]
CacheMode = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
ISOLATED_NETWORK = "isolated"

NIC_DEVICES: dict[str, str] = {
    "virtio": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}

# AF_UNIX paths are limited to 108 bytes including the NUL; stay clear of it.
_MAX_SOCKET_PATH = 100
_MAX_AHCI_PORTS = 6
_MAX_IDE_DISKS = 4
_MAX_LSI_TARGETS = 7


@dataclass(frozen=True)
class RunOverrides:
    """What a user (or a test, or a drill) changes for one run without touching the spec.

    ``ssh_port`` None means "no port chosen": :func:`build_command` then adds no
    forward, and :mod:`p2v.vm.runtime` picks a free port before calling it.
    ``snapshot`` boots every disk on a qcow2 overlay in the run directory (the
    spec's disks are never written); ``cache`` sets the host cache mode of every
    disk (``unsafe`` for throw-away test runs only). ``nic_args`` replaces the
    spec's NICs with these ``-netdev``/``-device`` arguments (a drill's isolated
    networks, see :mod:`p2v.vm.drillnet`); ``nic_model`` and ``ssh_port`` then
    do not apply.
    """

    disk_bus: DiskBus | None = None
    nic_model: NicModel | None = None
    machine: Machine | None = None
    snapshot: bool = False
    ssh_port: int | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    cache: CacheMode | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    nic_args: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunFiles:
    """Where one VM run keeps its files. Sockets may live in a shorter folder (see :func:`run_files`)."""

    run_dir: Path
    socket_dir: Path

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def info_file(self) -> Path:
        return self.run_dir / "info.json"

    @property
    def vars_file(self) -> Path:
        return self.run_dir / "OVMF_VARS.fd"

    @property
    def console_socket(self) -> Path:
        return self.socket_dir / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.socket_dir / "qmp.sock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.socket_dir / "qga.sock"

    def overlay(self, index: int) -> Path:
        return self.run_dir / f"overlay-{index}.qcow2"

    def sockets(self) -> list[Path]:
        return [self.console_socket, self.qmp_socket, self.guest_agent_socket]


def run_files(run_dir: Path) -> RunFiles:
    """The file layout of a run in ``run_dir``.

    When the socket paths would pass the AF_UNIX length limit (deep state or
    pytest directories), the sockets go to ``$TMPDIR/p2v-<hash of run_dir>``
    instead; the name is derived from ``run_dir``, so it is the same every time.
    """
    run_dir = run_dir.absolute()
    socket_dir = run_dir
    if len(str(run_dir / "console.sock")) > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
        socket_dir = Path(tempfile.gettempdir()) / f"p2v-{digest}"
    return RunFiles(run_dir, socket_dir)


def qemu_opt(value: str | Path) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (a comma is doubled)."""
    return str(value).replace(",", ",,")


def effective_machine(spec: VmSpec, overrides: RunOverrides) -> Machine:
    """The machine type to run: the override, else ``pc`` when a disk is IDE, else the spec's.

    Raises :class:`UsageError` when the override asks for ``q35`` with IDE disks
    (q35 has no parallel-ATA controller).
    """
    has_ide = any((overrides.disk_bus or d.bus) == "ide" for d in spec.disks)
    if overrides.machine is not None:
        if overrides.machine == "q35" and has_ide:
            raise UsageError(
                f"VM {spec.name}: IDE disks need machine type pc (q35 has no IDE controller); "
                "drop --machine q35 or choose another --disk-bus"
            )
        return overrides.machine
    if has_ide:
        return "pc"
    return spec.machine


def _disk_args(
    spec: VmSpec, spec_dir: Path, files: RunFiles, machine: Machine, overrides: RunOverrides
) -> list[str]:
    args: list[str] = []
    controllers: set[str] = set()
    per_bus: dict[str, int] = {}
    for i, (disk, path) in enumerate(zip(spec.disks, spec.disk_paths(spec_dir), strict=True)):
        bus = overrides.disk_bus or disk.bus
        n = per_bus.get(bus, 0)
        per_bus[bus] = n + 1
        if overrides.snapshot:
            file, fmt = files.overlay(i), "qcow2"
        else:
            file, fmt = path.absolute(), disk.format
        drive = f"file={qemu_opt(file)},format={fmt},if=none,id=disk{i},discard=unmap"
        if overrides.cache:
            drive += f",cache={overrides.cache}"
        args += ["-drive", drive]
        dev_opts = f"drive=disk{i},id=disk{i}-dev,bootindex={i + 1}"
        if bus == "virtio":
            args += ["-device", f"virtio-blk-pci,{dev_opts}"]
        elif bus == "virtio-scsi":
            if "scsi0" not in controllers:
                controllers.add("scsi0")
                args += ["-device", "virtio-scsi-pci,id=scsi0"]
            args += ["-device", f"scsi-hd,{dev_opts},bus=scsi0.0,channel=0,scsi-id={n},lun=0"]
        elif bus == "scsi":
            if n >= _MAX_LSI_TARGETS:
                raise InvalidInput(
                    f"VM {spec.name}: more than {_MAX_LSI_TARGETS} disks on the emulated SCSI "
                    "controller (lsi53c895a); use --disk-bus virtio-scsi"
                )
            if "lsi0" not in controllers:
                controllers.add("lsi0")
                args += ["-device", "lsi53c895a,id=lsi0"]
            args += ["-device", f"scsi-hd,{dev_opts},bus=lsi0.0,scsi-id={n}"]
        elif bus == "sata":
            if n >= _MAX_AHCI_PORTS:
                raise InvalidInput(
                    f"VM {spec.name}: more than {_MAX_AHCI_PORTS} SATA disks (one AHCI controller); "
                    "use --disk-bus virtio-scsi"
                )
            if machine == "q35":
                sata_bus = f"ide.{n}"  # the AHCI controller built into the q35 board
            else:
                if "sata0" not in controllers:
                    controllers.add("sata0")
                    args += ["-device", "ich9-ahci,id=sata0"]
                sata_bus = f"sata0.{n}"
            args += ["-device", f"ide-hd,{dev_opts},bus={sata_bus}"]
        elif bus == "ide":
            if n >= _MAX_IDE_DISKS:
                raise InvalidInput(
                    f"VM {spec.name}: more than {_MAX_IDE_DISKS} IDE disks (two channels, two units "
                    "each); use --disk-bus sata or virtio"
                )
            args += ["-device", f"ide-hd,{dev_opts},bus=ide.{n // 2},unit={n % 2}"]
        else:  # pragma: no cover - DiskBus is a closed Literal
            raise InvalidInput(f"VM {spec.name}: disk {i} has unknown bus {bus!r}")
    return args


def _nic_args(spec: VmSpec, overrides: RunOverrides) -> list[str]:
    if overrides.nic_args is not None:
        return list(overrides.nic_args)
    args: list[str] = []
    for j, nic in enumerate(spec.nics):
        model = overrides.nic_model or nic.model
        netdev = f"user,id=net{j}"
        if nic.network == ISOLATED_NETWORK:
            netdev += ",restrict=on"
        if j == 0 and overrides.ssh_port is not None:
            netdev += f",hostfwd=tcp:127.0.0.1:{overrides.ssh_port}-:22"
        args += ["-netdev", netdev]
        args += ["-device", f"{NIC_DEVICES[model]},netdev=net{j},mac={nic.mac},id=nic{j}"]
    return args


def _firmware_args(spec: VmSpec, files: RunFiles, ovmf: OvmfFirmware | None) -> list[str]:
    if spec.firmware != "uefi":
        return []  # QEMU's default BIOS is SeaBIOS
    fw = ovmf or find_ovmf()
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(fw.code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(files.vars_file)}",
    ]  # fmt: skip


def _channel_args(files: RunFiles) -> list[str]:
    return [
        # serial console: a socket to attach to, and a log QEMU writes even with no one attached
        "-chardev",
        f"socket,id=console0,path={qemu_opt(files.console_socket)},server=on,wait=off,"
        f"logfile={qemu_opt(files.console_log)},logappend=on",
        "-device", "isa-serial,chardev=console0",
        # QMP
        "-chardev", f"socket,id=qmp0,path={qemu_opt(files.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        # guest agent
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={qemu_opt(files.guest_agent_socket)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_CHANNEL}",
    ]  # fmt: skip


def build_command(
    spec: VmSpec,
    spec_dir: Path,
    run_dir: Path,
    *,
    accel: AccelVerdict,
    overrides: RunOverrides | None = None,
    qemu: str = "qemu-system-x86_64",
    ovmf: OvmfFirmware | None = None,
) -> list[str]:
    """The QEMU argument list for ``spec`` (disks relative to ``spec_dir``), its files in ``run_dir``.

    ``ovmf`` defaults to :func:`~p2v.vm.firmware.find_ovmf` for UEFI specs.
    Raises :class:`UsageError` for contradictory overrides, :class:`InvalidInput`
    for a spec QEMU cannot run (too many disks on one controller), and
    :class:`~p2v.errors.MissingComponent` when a UEFI spec finds no OVMF.
    """
    ov = overrides or RunOverrides()
    files = run_files(run_dir)
    machine = effective_machine(spec, ov)
    rtc = f"base={spec.rtc}"
    if spec.guest.type == "windows":
        rtc += ",driftfix=slew"
    cmd = [
        qemu,
        "-name", spec.name,
        "-machine", machine,
        *qemu_accel_args(accel),
        "-smp", str(ov.cpus or spec.cpus),
        "-m", str(ov.memory_mib or spec.memory_mib),
        "-rtc", rtc,
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-pidfile", str(files.pidfile),
        "-msg", "timestamp=on",
    ]  # fmt: skip
    cmd += _firmware_args(spec, files, ovmf)
    cmd += _disk_args(spec, spec_dir, files, machine, ov)
    cmd += _nic_args(spec, ov)
    cmd += _channel_args(files)
    cmd += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0"]
    cmd += list(ov.extra_args)
    return cmd
