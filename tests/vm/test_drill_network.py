"""Two drill VMs on the isolated DR network: they reach each other on the plan's segment,
nothing else (not the slirp host, not the DR host's address, not the outside), while p2v on
the host still reaches their forwarded check ports; the health checks run against them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import images
from p2v.disks.guestfs import open_guestfs
from p2v.orchestration.checks import CheckTarget, run_check
from p2v.orchestration.checks_model import AgentCheck, ConsoleCheck, SshCheck, TcpCheck
from p2v.vm.cmdline import RunOverrides
from p2v.vm.drillnet import (
    SEGMENT_NIC_NAME,
    DrillNetwork,
    forward_states,
    segment_config_files,
    segment_mac,
    usernet_reader,
)
from p2v.vm.runtime import VirtualMachine
from p2v.vm.spec import DiskSpec, VmSpec
from tests.guestssh import ssh_run, wait_ssh

pytestmark = pytest.mark.vm
G1 = "debian-physical-bios"
BOOT_TIMEOUT = 600
ADDR = {"srv-a": "192.168.50.10", "srv-b": "192.168.50.11"}
NO_LISTENER_PORT = 8080

# run inside the guest (python3-minimal is there; ping and nc are not)
TCP_PROBE = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
except OSError as e:
    print("failed", e); sys.exit(1)
c.settimeout(2)
try:
    banner = c.recv(8)
except OSError:
    banner = b""
print("connected", banner.decode(errors="replace")); sys.exit(0)
"""
UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
# a DNS query for deb.debian.org (A): to the slirp resolver, or any UDP port
query = bytes.fromhex("503201000001000000000000036465620664656269616e036f72670000010001")
try:
    s.sendto(query, (sys.argv[1], int(sys.argv[2])))
    data, addr = s.recvfrom(1500)
except OSError as e:
    print("no answer", e); sys.exit(1)
print("answer", len(data)); sys.exit(0)
"""
ICMP_PROBE = """
import socket, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
pkt = struct.pack("!BBHHH", 8, 0, 0, 0x5032, 1) + b"p2vdrill"
pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2)
try:
    s.sendto(pkt, (sys.argv[1], 0))
except OSError as e:
    print("send failed", e); sys.exit(2)
end = time.time() + 2
while time.time() < end:
    try:
        data, addr = s.recvfrom(1500)
    except socket.timeout:
        break
    if addr[0] == sys.argv[1] and data[20] == 0:
        print("reply"); sys.exit(0)
print("no reply"); sys.exit(1)
"""


def guest_py(port: int, script: str, *args: str) -> tuple[int, str]:
    quoted = script.replace("'", "'\"'\"'")
    rc, out, err = ssh_run(port, f"python3 -c '{quoted}' {' '.join(args)}", timeout=30)
    return rc, (out + err).strip()


def host_ip() -> str:
    """The DR host's own address on its default route (what a guest must not reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.200", 9))  # no packet is sent for a UDP connect
        return str(s.getsockname()[0])


class HostListener:
    """A TCP listener on all host addresses that counts who connects."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VmSpec]:
    out = tmp_path_factory.mktemp("drill-converted")
    proc = subprocess.run(
        [sys.executable, "-m", "p2v", "convert", str(images.ensure(G1)), "--out", str(out), "--name", "srv1",
         "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    return out, VmSpec.load(out / "srv1.vm.json")


@pytest.fixture(scope="module")
def drill(converted: tuple[Path, VmSpec], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    out, spec = converted
    work = tmp_path_factory.mktemp("drill")
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    base = spec.disk_paths(out)[0]
    mac0 = spec.nics[0].mac
    overlays = {}
    for name in ADDR:
        overlays[name] = work / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                        str(overlays[name])], check=True)  # fmt: skip
    # one appliance writes the segment config into both overlays
    with open_guestfs([(overlays[n], "qcow2") for n in ADDR], readonly=False) as g:
        for i, name in enumerate(ADDR):
            g.mount(f"/dev/sd{'ab'[i]}1", "/")
            files = segment_config_files(
                spec.guest.distro, SEGMENT_NIC_NAME, segment_mac(run_id, name), f"{ADDR[name]}/24"
            )
            for path, text in files.items():
                g.mkdir_p(path.rsplit("/", 1)[0])
                g.write(path, text.encode())
            g.umount_all()
    net = DrillNetwork(run_id)
    vms: dict[str, VirtualMachine] = {}
    ports: dict[str, dict[int, int]] = {}
    try:
        for name in ADDR:
            args, ports[name] = net.nic_args(name, mac0, segment_mac(run_id, name), [NO_LISTENER_PORT])
            vm_spec = spec.model_copy(
                update={"name": name, "disks": [DiskSpec(path=str(overlays[name]), format="qcow2", bus="virtio")]}
            )
            vm = VirtualMachine(
                vm_spec, work, overrides=RunOverrides(nic_args=tuple(args), cache="unsafe", memory_mib=512)
            )
            vm.launch()  # both boot in parallel from here on
            vms[name] = vm
        t0 = time.monotonic()
        for name, vm in vms.items():
            vm.wait_for_console(r"login: ?", timeout=BOOT_TIMEOUT)
            wait_ssh(ports[name][22], console=vm.console_text)
        print(f"\nboth drill VMs answer SSH {time.monotonic() - t0:.0f}s after launch")
        yield {"vms": vms, "ports": ports, "run_id": run_id, "net": net}
    finally:
        for vm in vms.values():
            vm.shutdown(timeout=0, hard=True)
        net.close()


def test_segment_nic_has_the_plans_address_and_keeps_management_nic(drill: dict) -> None:
    port = drill["ports"]["srv-a"][22]
    rc, out, err = ssh_run(port, f"ip -4 -o addr show dev {SEGMENT_NIC_NAME}; ip -4 -o addr show dev eth0; "
                                 f"cat /sys/class/net/{SEGMENT_NIC_NAME}/address")  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert f"inet {ADDR['srv-a']}/24" in lines[0]
    assert "inet 10.0.2.15/24" in lines[1], "the management NIC keeps its own DHCP config"
    assert lines[2] == segment_mac(drill["run_id"], "srv-a")


def test_drill_vms_reach_each_other_on_the_segment(drill: dict) -> None:
    a, b = drill["ports"]["srv-a"][22], drill["ports"]["srv-b"][22]
    rc, said = guest_py(a, TCP_PROBE, ADDR["srv-b"], "22")
    assert rc == 0 and "SSH-" in said, said
    rc, said = guest_py(a, ICMP_PROBE, ADDR["srv-b"])
    assert rc == 0 and said == "reply", said
    rc, said = guest_py(b, TCP_PROBE, ADDR["srv-a"], "22")
    assert rc == 0 and "SSH-" in said, said


def test_drill_vm_reaches_nothing_outside_the_segment(drill: dict) -> None:
    a = drill["ports"]["srv-a"][22]
    listener = HostListener()
    try:
        dr_host = host_ip()
        with socket.create_connection((dr_host, listener.port), timeout=3):
            pass  # the listener is reachable from the host itself
        time.sleep(0.2)
        assert listener.peers == [dr_host]
        for target in ("10.0.2.2", dr_host, "10.0.2.3"):
            rc, said = guest_py(a, TCP_PROBE, target, str(listener.port))
            assert rc == 1 and said.startswith("failed"), f"{target}: {said}"
        rc, said = guest_py(a, TCP_PROBE, dr_host, "22")
        assert rc == 1, f"the DR host's sshd answered a drill VM: {said}"
        rc, said = guest_py(a, TCP_PROBE, "1.1.1.1", "443")
        assert rc == 1, said
        for target in (dr_host, "1.1.1.1"):
            rc, said = guest_py(a, ICMP_PROBE, target)
            assert rc != 0 and "reply" not in said.split(), f"{target}: {said}"
        # measured: slirp's virtual gateway answers ping itself, inside QEMU, even with restrict=on;
        # nothing reaches the host (the TCP probes above show 10.0.2.2 leads nowhere)
        rc, said = guest_py(a, ICMP_PROBE, "10.0.2.2")
        print(f"\nping 10.0.2.2 from a drill VM (slirp's own gateway): {said}")
        assert listener.peers == [dr_host], "a drill VM connected to the DR host"
    finally:
        listener.close()


def test_drill_vm_sends_no_udp_out_not_even_dns(drill: dict) -> None:
    a = drill["ports"]["srv-a"][22]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", 0))
        udp.settimeout(0.5)
        port = udp.getsockname()[1]
        udp.sendto(b"ping", (host_ip(), port))
        assert udp.recv(16) == b"ping"  # the host receives UDP on that port
        for target in ("10.0.2.2", host_ip()):
            rc, said = guest_py(a, UDP_PROBE, target, str(port))
            assert rc == 1, f"{target}: {said}"
        with pytest.raises(TimeoutError):
            udp.recv(16)
    rc, said = guest_py(a, UDP_PROBE, "10.0.2.3", "53")  # slirp's DNS forwarder
    assert rc == 1, f"slirp's DNS answered a drill VM: {said}"


def test_slirp_forward_without_guest_listener_closes_quickly(drill: dict) -> None:
    """Measured: slirp accepts at once, then closes when the guest answers with a reset."""
    vm = drill["vms"]["srv-a"]
    hp = drill["ports"]["srv-a"][NO_LISTENER_PORT]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", hp), timeout=3) as s:
        accepted = time.monotonic() - t0
        s.settimeout(5)
        try:
            data = s.recv(16)
        except ConnectionResetError:
            data = b"(reset)"
        closed = time.monotonic() - t0
    print(f"\nslirp forward, no guest listener: accepted in {accepted * 1000:.1f} ms, "
          f"closed after {closed * 1000:.1f} ms with {data!r}")  # fmt: skip
    assert data in (b"", b"(reset)") and closed < 3
    hp22 = drill["ports"]["srv-a"][22]
    with socket.create_connection(("127.0.0.1", hp22), timeout=3) as s:
        s.settimeout(5)
        assert s.recv(4) == b"SSH-"
        states = forward_states(usernet_reader(vm.qmp)(), hp22, 22)
    # earlier SSH sessions linger as TIME_WAIT; ours is the one ESTABLISHED, none waits for the guest
    assert "ESTABLISHED" in states and "SYN_SENT" not in states, states


def test_health_checks_against_drill_vm(drill: dict) -> None:
    vm = drill["vms"]["srv-a"]
    ports = drill["ports"]["srv-a"]
    target = CheckTarget(
        machine="srv-a", host="127.0.0.1", ports=ports, console_log=vm.console_log,
        agent_socket=vm.files.guest_agent_socket, ssh_identity=images.test_ssh_key(), known_hosts=None,
        usernet=usernet_reader(vm.qmp),
    )  # fmt: skip
    ok = run_check(TcpCheck(port=22, timeout=30), target)
    assert ok.ok, ok.message
    closed = run_check(TcpCheck(port=NO_LISTENER_PORT, timeout=4, interval=1), target)
    assert not closed.ok and "closed" in closed.message, closed.message
    ssh = run_check(SshCheck(command=f"ip -4 -o addr show dev {SEGMENT_NIC_NAME}", expect_output=ADDR["srv-a"],
                             timeout=60), target)  # fmt: skip
    assert ssh.ok, ssh.message
    console = run_check(ConsoleCheck(pattern=r"login: ?$", timeout=10), target)
    assert console.ok, console.message
    agent = run_check(AgentCheck(timeout=4, interval=1), target)  # the test guest has no qemu-guest-agent
    assert not agent.ok and "guest agent" in agent.message, agent.message
    print("\n" + "\n".join(f"{r.check}: ok={r.ok} {r.seconds:.2f}s x{r.attempts}: {r.message}"
                           for r in (ok, closed, ssh, console, agent)))  # fmt: skip
