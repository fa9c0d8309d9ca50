"""The QEMU runtime against real QEMU under TCG.

No guest images exist at this tier, so the guest is the host's own kernel:
alone it panics at "unable to mount root" and, with ``panic=0``, stays up
without answering the power button; with the tiny initramfs built below
(klibc's shell and tools plus the ACPI button and evdev modules) it prints a
ready line, offers a shell on the serial console, and powers off when the ACPI
power button is pressed, like a real guest would.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2v.cli.main import app
from p2v.errors import MissingComponent, SourceNotFound, VmError
from p2v.vm import detached, process
from p2v.vm.accel import probe_kernel
from p2v.vm.cmdline import RunOverrides
from p2v.vm.firmware import find_ovmf
from p2v.vm.runtime import VirtualMachine, VmState
from p2v.vm.spec import DiskBus, DiskSpec, NicModel, NicSpec, VmSpec

READY = "p2v-test-guest ready"
INIT_SCRIPT = f"""#!/bin/sh
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
insmod /lib/button.ko
insmod /lib/evdev.ko
for n in /sys/class/input/event*; do
  read name < $n/device/name
  if [ "$name" = "Power Button" ]; then
    ( dd if=/dev/input/${{n##*/}} of=/dev/null bs=24 count=1 2>/dev/null
      echo "p2v-test-guest: power button pressed"; poweroff -f ) &
  fi
done
echo "{READY}"
exec sh
"""


def cpio_entry(name: str, data: bytes = b"", mode: int = 0o100644) -> bytes:
    """One file of a 'newc' cpio archive (the initramfs format)."""
    fields = (0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    head = ("070701" + "".join(f"{v:08x}" for v in fields)).encode() + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


@pytest.fixture(scope="session")
def kernel() -> str:
    k = probe_kernel()
    if k is None:
        pytest.skip("no readable kernel in /boot to boot as a test guest")
    return k


@pytest.fixture(scope="session")
def guest_args(kernel: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """-kernel/-initrd/-append for the tiny guest that honours the ACPI power button."""
    version = Path(kernel).name.removeprefix("vmlinuz-")
    mods = Path("/lib/modules") / version / "kernel" / "drivers"
    needed = [mods / "acpi" / "button.ko", mods / "input" / "evdev.ko"]
    klibc_so = glob.glob("/usr/lib/klibc-*.so") or glob.glob("/lib/klibc-*.so")
    klibc_bin = Path("/usr/lib/klibc/bin")
    if not klibc_so or not klibc_bin.is_dir() or not all(p.exists() for p in needed):
        pytest.skip("klibc-utils or the kernel's button/evdev modules (uncompressed) are missing")
    archive = b"".join(cpio_entry(d, mode=0o040755) for d in ("dev", "proc", "sys", "bin", "lib"))
    archive += cpio_entry("init", INIT_SCRIPT.encode(), 0o100755)
    for tool in sorted(klibc_bin.iterdir()):
        archive += cpio_entry(f"bin/{tool.name}", tool.read_bytes(), 0o100755)
    archive += cpio_entry(f"lib/{Path(klibc_so[0]).name}", Path(klibc_so[0]).read_bytes(), 0o100755)
    for mod in needed:
        archive += cpio_entry(f"lib/{mod.name}", mod.read_bytes())
    archive += cpio_entry("TRAILER!!!")
    initrd = tmp_path_factory.mktemp("guest") / "initrd.cpio"
    initrd.write_bytes(archive)
    return ("-kernel", kernel, "-initrd", str(initrd), "-append", "console=ttyS0 panic=0")


@pytest.fixture(autouse=True)
def _tcg_and_no_leaks(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    monkeypatch.setenv("P2V_ACCEL", "tcg")  # KVM hangs on this host; the probe costs 15 s
    yield
    base = str(tmp_path_factory.getbasetemp())
    leaked = [pid for pid in qemu_pids() if base in " ".join(process.pid_cmdline(pid))]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"QEMU processes left running: {leaked}"


def qemu_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            cmd = process.pid_cmdline(int(d.name))
            if cmd and "qemu-system" in Path(cmd[0]).name and process.pid_running(int(d.name)):
                pids.append(int(d.name))
    return pids


def gone(pid: int) -> bool:
    """Independent of p2v: the pid no longer exists, or is only a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


def tiny_spec(name: str = "t1", **kw: object) -> VmSpec:
    base: dict[str, object] = {"name": name, "memory_mib": 256, "nics": [NicSpec(mac="52:54:00:12:34:56")]}
    base.update(kw)
    return VmSpec.model_validate(base)


# -- VirtualMachine ----------------------------------------------------------------


def test_launch_qmp_console_and_graceful_powerdown(tmp_path: Path, guest_args: tuple[str, ...]) -> None:
    vm = VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=guest_args))
    with vm:
        assert vm.state is VmState.RUNNING
        assert vm.qmp("query-status")["status"] == "running"
        assert vm.ssh_port and 1024 < vm.ssh_port < 65536
        assert vm.wait_for_console(r"Linux version \S+", 120).startswith("Linux version ")
        vm.wait_for_console(READY, 120)
        pid, run_dir = vm.pid, vm.run_dir
        assert pid is not None and not gone(pid)
        result = vm.shutdown(timeout=90)
    assert result.method == "powerdown", vm.console_text()[-500:]
    assert result.exit_code == 0
    assert wait_gone(pid)
    assert vm.state is VmState.STOPPED
    assert not run_dir.exists(), "a temporary run dir is removed at shutdown"
    assert "power button pressed" in vm.console_text()


def test_guest_ignoring_power_button_is_quit(tmp_path: Path, kernel: str) -> None:
    args = ("-kernel", kernel, "-append", "console=ttyS0 panic=0")
    run_dir = tmp_path / "run"
    vm = VirtualMachine(tiny_spec(), tmp_path, run_dir=run_dir, overrides=RunOverrides(extra_args=args))
    vm.launch()
    try:
        vm.wait_for_console("Kernel panic", 120)
        pid = vm.pid
        assert pid is not None
    finally:
        result = vm.shutdown(timeout=2)
    assert result.method == "quit"
    assert wait_gone(pid)
    assert (run_dir / "console.log").exists(), "a given run dir keeps its console log"
    assert not (run_dir / "qmp.sock").exists() and not (run_dir / "qemu.pid").exists()
    with pytest.raises(VmError, match="state stopped"):
        vm.qmp("query-status")


def test_unresponsive_qemu_is_killed(tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "QMP_STOP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(process, "QUIT_WAIT_S", 1.0)
    monkeypatch.setattr(process, "TERM_WAIT_S", 1.0)
    vm = VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=("-kernel", kernel)))
    vm.launch()
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a hung QEMU: answers neither QMP nor SIGTERM
    result = vm.shutdown(timeout=1)
    assert result.method == "kill"
    assert wait_gone(pid)


def test_context_manager_stops_qemu_on_error(tmp_path: Path, kernel: str) -> None:
    vm = VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=("-kernel", kernel)))
    with pytest.raises(KeyboardInterrupt), vm:
        pid = vm.pid
        raise KeyboardInterrupt
    assert pid is not None and wait_gone(pid)
    assert vm.state is VmState.STOPPED


def test_qemu_dies_with_the_python_process_that_started_it(tmp_path: Path, kernel: str) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from p2v.vm.cmdline import RunOverrides
        from p2v.vm.runtime import VirtualMachine
        from p2v.vm.spec import VmSpec
        vm = VirtualMachine(VmSpec(name="orphan", memory_mib=256), Path("."),
                            overrides=RunOverrides(extra_args=("-kernel", {kernel!r})))
        vm.launch()
        print(vm.pid, vm.run_dir, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "P2V_ACCEL": "tcg"},
    )
    assert child.stdout is not None
    pid_text, run_dir = child.stdout.readline().split()
    qemu_pid = int(pid_text)
    assert not gone(qemu_pid)
    child.kill()  # no chance to clean up
    child.wait()
    try:
        assert wait_gone(qemu_pid), "QEMU outlived the Python process that launched it"
    finally:
        if not gone(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
        shutil.rmtree(run_dir, ignore_errors=True)  # what the killed process could not remove


def test_launch_failure_reports_qemu_error_and_leaves_nothing(tmp_path: Path) -> None:
    before = set(qemu_pids())
    vm = VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=("-device", "no-such-card")))
    with pytest.raises(VmError, match="no-such-card"):
        vm.launch()
    assert vm.state is VmState.FAILED
    time.sleep(0.5)
    assert set(qemu_pids()) <= before


def test_wait_returns_when_the_guest_ends_by_itself(tmp_path: Path, kernel: str) -> None:
    args = ("-kernel", kernel, "-append", "console=ttyS0 panic=-1", "-no-reboot")
    with VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=args)) as vm:
        assert vm.wait(120) == 0
        assert vm.state is VmState.STOPPED
        assert "Kernel panic" in vm.console_text()
    with VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=args)) as vm:
        with pytest.raises(
            VmError, match=r"(?s)QEMU exited \(status 0\) before the console showed /never/.*panic"
        ):
            vm.wait_for_console("never", 120)
        assert vm.state is VmState.FAILED


def test_uefi_vm_boots_into_ovmf(tmp_path: Path) -> None:
    try:
        find_ovmf()
    except MissingComponent:
        pytest.skip("OVMF is not installed")
    with VirtualMachine(VmSpec(name="uefi1", firmware="uefi", memory_mib=256), tmp_path) as vm:
        # no disk: the firmware's boot manager falls back to its built-in shell
        assert vm.wait_for_console(r"BdsDxe|UEFI Interactive Shell", 120)
        vm.shutdown(timeout=0, hard=True)


def test_taken_ssh_port_is_reported(tmp_path: Path, kernel: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ov = RunOverrides(ssh_port=port, extra_args=("-kernel", kernel))
        with pytest.raises(VmError, match=f"forwarding rule.*{port}"):
            VirtualMachine(tiny_spec(), tmp_path, overrides=ov).launch()


def test_missing_disk_is_named(tmp_path: Path) -> None:
    vm = VirtualMachine(tiny_spec(disks=[DiskSpec(path="nope.qcow2")]), tmp_path)
    with pytest.raises(SourceNotFound, match=r"nope\.qcow2"):
        vm.launch()


def test_wait_for_console_timeout_shows_last_lines(tmp_path: Path, kernel: str) -> None:
    args = ("-kernel", kernel, "-append", "console=ttyS0 panic=0")
    with VirtualMachine(tiny_spec(), tmp_path, overrides=RunOverrides(extra_args=args)) as vm:
        vm.wait_for_console("Kernel panic", 120)
        with pytest.raises(VmError, match=r"(?s)did not show /never-printed/ within 1s.*Kernel panic"):
            vm.wait_for_console("never-printed", 1)
        vm.shutdown(timeout=0, hard=True)


BUS_NIC = [
    ("virtio", "virtio"),
    ("virtio-scsi", "e1000"),
    ("sata", "e1000e"),
    ("ide", "rtl8139"),
    ("scsi", "vmxnet3"),
]


@pytest.mark.parametrize(("bus", "nic"), BUS_NIC)
def test_qemu_accepts_every_bus_and_nic_model(tmp_path: Path, bus: DiskBus, nic: NicModel) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    spec = tiny_spec(
        disks=[DiskSpec(path="d.raw", format="raw", bus=bus)],
        nics=[NicSpec(mac="52:54:00:00:00:09", model=nic)],
    )
    with VirtualMachine(spec, tmp_path, overrides=RunOverrides(extra_args=("-S",))) as vm:
        blocks = vm.qmp("query-block")
        assert [(b["device"], "disk0-dev" in b["qdev"]) for b in blocks if b.get("inserted")] == [
            ("disk0", True)
        ]
        expected_disk = {"virtio": "virtio-blk-pci", "sata": "ide-hd", "ide": "ide-hd"}.get(bus, "scsi-hd")
        assert vm.qmp("qom-get", path="/machine/peripheral/disk0-dev", property="type") == expected_disk
        nic_type = vm.qmp("qom-get", path="/machine/peripheral/nic0", property="type")
        assert nic_type == {"virtio": "virtio-net-pci"}.get(nic, nic)
        assert vm.qmp("qom-get", path="/machine/peripheral/nic0", property="mac") == "52:54:00:00:00:09"
        machine = "pc" if bus == "ide" else "q35"
        assert ["-machine", machine] == vm.command[vm.command.index("-machine") :][:2]
        vm.shutdown(timeout=0, hard=True)


def test_snapshot_overlay_protects_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\1" * 1024 * 1024)
    spec = tiny_spec(disks=[DiskSpec(path="d.raw", format="raw")], firmware="uefi")
    run_dir = tmp_path / "run"
    with VirtualMachine(
        spec, tmp_path, run_dir=run_dir, overrides=RunOverrides(snapshot=True, extra_args=("-S",))
    ) as vm:
        (image,) = [b["inserted"]["image"] for b in vm.qmp("query-block") if b["device"] == "disk0"]
        assert image["filename"] == str(run_dir / "overlay-0.qcow2")
        assert image["backing-image"]["filename"] == str(disk)
        # the guest writes into the overlay, never into the disk
        vm.qmp("human-monitor-command", **{"command-line": 'qemu-io disk0 "write -P 0x42 0 64k"'})
        vm.qmp("human-monitor-command", **{"command-line": 'qemu-io disk0 "flush"'})
        overlay_map = subprocess.run(
            ["qemu-img", "map", "-U", "--output=json", str(run_dir / "overlay-0.qcow2")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        first = json.loads(overlay_map)[0]
        assert (first["start"], first["length"], first["depth"], first["data"]) == (0, 65536, 0, True)
        assert (run_dir / "OVMF_VARS.fd").stat().st_size > 0, "UEFI VM has its own VARS copy"
        vm.shutdown(timeout=0, hard=True)
    assert disk.read_bytes() == b"\1" * 1024 * 1024
    assert not (run_dir / "overlay-0.qcow2").exists(), "the throw-away overlay is removed at stop"


# -- detached VMs (p2v vm start/stop/list/console) --------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # deep enough that the sockets must move to a short folder (AF_UNIX paths are limited)
    d = tmp_path / "state-with-a-deliberately-long-name-that-pushes-socket-paths-past-the-unix-limit"
    monkeypatch.setenv("P2V_STATE", str(d))
    return d


def write_spec(tmp_path: Path, name: str = "det1") -> Path:
    path = tmp_path / f"{name}.vm.json"
    tiny_spec(name).save(path)
    return path


def test_detached_start_list_stop_round_trip(
    tmp_path: Path, state: Path, guest_args: tuple[str, ...]
) -> None:
    spec = write_spec(tmp_path)
    info = detached.start_vm(
        spec, overrides=RunOverrides(extra_args=guest_args), wait_for=READY, wait_timeout=120
    )
    assert info.name == "det1" and info.ssh_command == f"ssh -p {info.ssh_port} root@127.0.0.1"
    assert info.accel["accel"] == "tcg"
    saved = json.loads((state / "vms" / "det1" / "info.json").read_text())
    assert saved["pid"] == info.pid and saved["qmp_socket"] == info.qmp_socket
    assert not gone(info.pid)

    (listed,) = detached.list_vms()
    assert (listed.name, listed.state, listed.status, listed.pid) == ("det1", "running", "running", info.pid)

    with pytest.raises(VmError, match="already running"):
        detached.start_vm(spec, overrides=RunOverrides(extra_args=guest_args))

    result = detached.stop_vm("det1", timeout=90)
    assert result.method == "powerdown"
    assert wait_gone(info.pid)
    assert not (state / "vms" / "det1").exists()
    assert result.console_log and READY in Path(result.console_log).read_text()
    assert not Path(info.qmp_socket).exists()
    assert not Path(info.qmp_socket).is_relative_to(state), "socket paths this long go to a short folder"
    assert not Path(info.qmp_socket).parent.exists(), "the short socket folder is removed at stop"
    assert detached.list_vms() == []
    with pytest.raises(VmError, match="no VM named det1"):
        detached.stop_vm("det1")


def test_dead_vm_is_listed_dead_and_its_run_dir_cleaned(tmp_path: Path, state: Path, kernel: str) -> None:
    spec = write_spec(tmp_path, "crashy")
    info = detached.start_vm(spec, overrides=RunOverrides(snapshot=False, extra_args=("-kernel", kernel)))
    os.kill(info.pid, signal.SIGKILL)
    assert wait_gone(info.pid)
    (listed,) = detached.list_vms()
    assert listed.state == "dead"
    (state / "vms" / "crashy" / "leftover").write_text("stale")
    again = detached.start_vm(spec, overrides=RunOverrides(extra_args=("-kernel", kernel)))
    try:
        assert again.pid != info.pid
        assert not (state / "vms" / "crashy" / "leftover").exists()
    finally:
        assert detached.stop_vm("crashy", force=True).method == "quit"
    assert wait_gone(again.pid)


def test_console_attach_talks_to_the_guest_shell(
    tmp_path: Path, state: Path, guest_args: tuple[str, ...]
) -> None:
    spec = write_spec(tmp_path, "shell")
    info = detached.start_vm(
        spec, overrides=RunOverrides(extra_args=guest_args), wait_for=READY, wait_timeout=120
    )
    try:
        stdin_r, stdin_w = os.pipe()
        out_path = tmp_path / "out"
        outcome: list[str] = []
        with out_path.open("wb") as out:
            t = threading.Thread(
                target=lambda: outcome.append(
                    detached.attach_console("shell", stdin_fd=stdin_r, stdout_fd=out.fileno())
                )
            )
            t.start()
            os.write(stdin_w, b"echo hello-$((6*7))\n")
            deadline = time.monotonic() + 60
            while b"hello-42" not in out_path.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.2)
            os.write(stdin_w, b"\x1d")  # Ctrl-] detaches
            t.join(10)
        os.close(stdin_r)
        os.close(stdin_w)
        assert b"hello-42" in out_path.read_bytes()
        assert outcome == ["detached"]
        assert "hello-42" in detached.console_log_path("shell").read_text(), (
            "the log records attached sessions too"
        )
    finally:
        detached.stop_vm("shell", force=True)
    assert wait_gone(info.pid)


BOOT_MESSAGE = b"p2v-boot-sector says hello\r\n"


def boot_sector_disk(path: Path) -> None:
    """A 1 MiB raw disk whose MBR code writes BOOT_MESSAGE to COM1 and halts."""
    code = bytes.fromhex(
        "fc"  # cld
        "31c0 8ed8"  # xor ax,ax; mov ds,ax
        "be177c"  # mov si, 0x7c17 (the message below)
        "baf803"  # mov dx, 0x3f8 (COM1)
        "ac 84c0 7403"  # loop: lodsb; test al,al; jz halt
        "ee ebf8"  # out dx,al; jmp loop
        "fa f4 ebfc"  # halt: cli; hlt; jmp halt
    )
    mbr = (code + BOOT_MESSAGE + b"\0").ljust(510, b"\0") + b"\x55\xaa"
    path.write_bytes(mbr.ljust(1024 * 1024, b"\0"))


def test_cli_start_list_stop_json(tmp_path: Path, state: Path) -> None:
    boot_sector_disk(tmp_path / "boot.raw")
    spec = tmp_path / "clivm.vm.json"
    tiny_spec("clivm", disks=[DiskSpec(path="boot.raw", format="raw", bus="sata")]).save(spec)
    runner = CliRunner()
    res = runner.invoke(app, ["vm", "start", str(spec), "--snapshot", "--json"])
    assert res.exit_code == 0, res.output
    started = json.loads(res.stdout)
    assert started["name"] == "clivm" and started["ssh_command"].startswith("ssh -p ")
    assert started["snapshot"] is True
    assert "using TCG" in res.stderr, "running under TCG must be visible"
    try:
        res = runner.invoke(app, ["vm", "list", "--json"])
        assert [(v["name"], v["state"]) for v in json.loads(res.stdout)["vms"]] == [("clivm", "running")]
        res = runner.invoke(app, ["vm", "start", str(spec)])
        assert res.exit_code == VmError.exit_code and "already running" in res.stderr
        deadline = time.monotonic() + 60
        while BOOT_MESSAGE.strip() not in Path(started["console_log"]).read_bytes():
            assert time.monotonic() < deadline, "the boot sector's message never reached the console log"
            time.sleep(0.5)
    finally:
        res = runner.invoke(app, ["vm", "stop", "clivm", "--timeout", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "quit", "a halted boot sector ignores the power button"
    assert wait_gone(started["pid"])
    res = runner.invoke(app, ["vm", "console", "clivm", "--log"])
    assert res.exit_code == 0 and "p2v-boot-sector says hello" in res.stdout, "the kept log stays readable"
    assert (tmp_path / "boot.raw").read_bytes()[510:512] == b"\x55\xaa"
