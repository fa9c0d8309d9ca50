"""The drill network with real QEMU processes (no guest OS needed): the segment NICs of a run
share one multicast group joined on loopback only, their frames reach that group and no other
run's, and a forwarded port that no guest answers is told apart from an open one."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2v.orchestration.checks import CheckTarget, run_check
from p2v.orchestration.checks_model import TcpCheck
from p2v.vm.cmdline import RunOverrides
from p2v.vm.drillnet import DrillNetwork, segment_endpoint, segment_mac, usernet_reader
from p2v.vm.runtime import VirtualMachine
from p2v.vm.spec import VmSpec

MAC0 = "00:1b:21:3a:4f:5e"


def igmp_memberships(group: str) -> dict[str, int]:
    """Device -> users of ``group`` in this host's /proc/net/igmp."""
    want = socket.inet_aton(group)[::-1].hex().upper()
    found: dict[str, int] = {}
    device = ""
    for line in Path("/proc/net/igmp").read_text().splitlines()[1:]:
        if not line.startswith("\t"):
            device = line.split()[1]
            continue
        fields = line.split()
        if fields[0] == want:
            found[device] = int(fields[1])
    return found


def segment_listener(run_id: str) -> socket.socket:
    group, port = segment_endpoint(run_id)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, port))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
    s.settimeout(0.5)
    return s


def source_macs(s: socket.socket, seconds: float) -> set[str]:
    macs: set[str] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frame = s.recv(65536)
        except TimeoutError:
            continue
        macs.add(":".join(f"{b:02x}" for b in frame[6:12]))
    return macs


def no_rom(args: list[str]) -> list[str]:
    # no guest OS here: keep SeaBIOS from running iPXE on the NICs (CPU time under TCG)
    return [f"{a},romfile=" if i and args[i - 1] == "-device" else a for i, a in enumerate(args)]


@pytest.fixture
def two_vms(tmp_path: Path) -> Iterator[tuple[str, dict[str, VirtualMachine], dict[str, dict[int, int]]]]:
    run_id = f"it-{uuid.uuid4().hex[:8]}"
    vms: dict[str, VirtualMachine] = {}
    ports: dict[str, dict[int, int]] = {}
    with DrillNetwork(run_id) as net:
        try:
            for name in ("seg-a", "seg-b"):
                args, ports[name] = net.nic_args(name, MAC0, segment_mac(run_id, name), [5432])
                vm = VirtualMachine(VmSpec(name=name, memory_mib=64), tmp_path,
                                    overrides=RunOverrides(nic_args=tuple(no_rom(args))))  # fmt: skip
                vm.launch()
                vms[name] = vm
            yield run_id, vms, ports
        finally:
            for vm in vms.values():
                vm.shutdown(timeout=0, hard=True)


def test_segment_is_one_multicast_group_on_loopback_only(
    two_vms: tuple[str, dict[str, VirtualMachine], dict[str, dict[int, int]]],
) -> None:
    run_id, vms, _ = two_vms
    group, _ = segment_endpoint(run_id)
    assert igmp_memberships(group) == {"lo": 2}, "both VMs join the run's group, on lo and nowhere else"
    mine, other = segment_listener(run_id), segment_listener(f"{run_id}-other")
    try:
        vms["seg-a"].qmp("announce-self", initial=50, max=550, rounds=3, step=100)
        seen = source_macs(mine, 2.0)
        assert segment_mac(run_id, "seg-a") in seen, seen
        assert MAC0 not in seen, "management NIC frames must not reach the segment"
        assert source_macs(other, 0.5) == set(), "another run's segment saw this run's frames"
    finally:
        mine.close()
        other.close()


def test_forward_with_no_guest_answer_is_not_an_open_port(
    two_vms: tuple[str, dict[str, VirtualMachine], dict[str, dict[int, int]]],
) -> None:
    """Measured slirp behaviour: the host side is accepted at once, then waits for the guest."""
    _, vms, ports = two_vms
    vm = vms["seg-a"]
    with socket.create_connection(("127.0.0.1", ports["seg-a"][5432]), timeout=3) as s:
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(1)  # accepted and silent: no guest, yet no refusal and no reset
    target = CheckTarget("seg-a", ports=ports["seg-a"], usernet=usernet_reader(vm.qmp))
    res = run_check(TcpCheck(port=5432, timeout=3, interval=1), target)
    assert not res.ok and "guest did not answer" in res.message and "SYN_SENT" in res.message, res.message
    naive = CheckTarget("seg-a", ports=ports["seg-a"])  # without info usernet: fooled, as documented
    assert run_check(TcpCheck(port=5432, timeout=3, interval=1), naive).ok
