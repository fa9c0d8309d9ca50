"""The drill network's QEMU arguments, segment addressing and guest config files."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from p2v.errors import InvalidInput, UsageError
from p2v.vm.accel import AccelVerdict
from p2v.vm.cmdline import RunOverrides, build_command
from p2v.vm.drillnet import (
    DrillNetwork,
    forward_states,
    guest_nic_name,
    segment_config_files,
    segment_endpoint,
    segment_mac,
)
from p2v.vm.spec import DiskSpec, NicSpec, VmSpec

MAC0 = "00:1b:21:3a:4f:5e"


def test_segment_is_stable_per_run_and_differs_between_runs() -> None:
    g1, p1 = segment_endpoint("run-1")
    assert segment_endpoint("run-1") == (g1, p1)
    endpoints = {segment_endpoint(f"run-{i}") for i in range(200)}
    assert len(endpoints) == 200
    for group, port in endpoints:
        assert ipaddress.ip_address(group) in ipaddress.ip_network("239.192.0.0/10")
        assert 20000 <= port < 50000
    with pytest.raises(UsageError):
        segment_endpoint("")


def test_segment_macs_are_stable_and_distinct() -> None:
    a, b = segment_mac("r1", "db1"), segment_mac("r1", "web1")
    assert a == segment_mac("r1", "db1") and a != b and a != segment_mac("r2", "db1")
    assert a.startswith("52:54:00:")


def test_nic_args_isolate_management_and_join_the_segment() -> None:
    net = DrillNetwork("run-7")
    args, ports = net.nic_args("db1", MAC0, segment_mac("run-7", "db1"), [5432, 22])
    assert sorted(ports) == [22, 5432] and len(set(ports.values())) == 2
    netdevs = [args[i + 1] for i, a in enumerate(args) if a == "-netdev"]
    devices = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    user, seg = netdevs
    assert user.startswith("user,id=net0,restrict=on,")
    for gp, hp in ports.items():
        assert f"hostfwd=tcp:127.0.0.1:{hp}-:{gp}" in user
    group, port = segment_endpoint("run-7")
    assert seg == f"socket,id=net1,mcast={group}:{port},localaddr=127.0.0.1"
    assert devices == [
        f"virtio-net-pci,netdev=net0,mac={MAC0},id=nic0",
        f"virtio-net-pci,netdev=net1,mac={segment_mac('run-7', 'db1')},id=nic1",
    ]
    # another machine of the same run joins the same segment; another run does not
    other, _ = net.nic_args("web1", "00:1b:21:00:00:01", segment_mac("run-7", "web1"), [])
    assert seg in other
    assert seg not in DrillNetwork("run-8").nic_args("db1", MAC0, segment_mac("run-8", "db1"), [])[0]


def test_nic_args_reuse_recorded_host_ports() -> None:
    net = DrillNetwork("run-7")
    args, ports = net.nic_args("db1", MAC0, segment_mac("run-7", "db1"), [5432], host_ports={22: 40022})
    assert ports[22] == 40022 and sorted(ports) == [22, 5432]
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in args[1]


def test_nic_args_reject_bad_input() -> None:
    net = DrillNetwork("r")
    with pytest.raises(UsageError, match="not a MAC"):
        net.nic_args("db1", "zz:1b", segment_mac("r", "db1"), [])
    with pytest.raises(UsageError, match="both NICs"):
        net.nic_args("db1", MAC0, MAC0, [])
    with pytest.raises(UsageError, match="guest port 70000"):
        net.nic_args("db1", MAC0, segment_mac("r", "db1"), [70000])
    with pytest.raises(UsageError, match="NIC model"):
        net.nic_args("db1", MAC0, segment_mac("r", "db1"), [], model="ne2k")


def test_run_overrides_nic_args_replace_the_specs_nics(tmp_path: Path) -> None:
    spec = VmSpec(name="db1", disks=[DiskSpec(path="d.qcow2")], nics=[NicSpec(mac=MAC0)])
    args, _ = DrillNetwork("r").nic_args("db1", MAC0, segment_mac("r", "db1"), [])
    accel = AccelVerdict("tcg", False, "test", "max", 0.0)
    cmd = build_command(spec, tmp_path, tmp_path / "run", accel=accel,
                        overrides=RunOverrides(nic_args=tuple(args), ssh_port=2222))  # fmt: skip
    netdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-netdev"]
    assert netdevs == [args[1], args[5]]
    assert "hostfwd=tcp:127.0.0.1:2222-:22" not in " ".join(cmd)


def test_guest_nic_name_avoids_taken_names() -> None:
    assert guest_nic_name() == "drnet0"
    assert guest_nic_name(["eth0", "drnet0"]) == "drnet1"


def test_segment_config_for_debian() -> None:
    mac = segment_mac("r", "db1")
    files = segment_config_files("debian", "drnet0", mac.upper(), "192.168.50.10/24")
    assert set(files) == {
        "/etc/systemd/network/10-p2v-drnet0.link",
        "/etc/udev/rules.d/70-p2v-drnet0.rules",
        "/etc/systemd/network/50-p2v-dr-drnet0.network",
        "/etc/network/interfaces.d/p2v-dr-drnet0",
    }
    assert f"[Match]\nMACAddress={mac}\n\n[Link]\nName=drnet0\n" in files["/etc/systemd/network/10-p2v-drnet0.link"]
    assert f'ATTR{{address}}=="{mac}"' in files["/etc/udev/rules.d/70-p2v-drnet0.rules"]
    assert "Address=192.168.50.10/24" in files["/etc/systemd/network/50-p2v-dr-drnet0.network"]
    stanza = files["/etc/network/interfaces.d/p2v-dr-drnet0"]
    assert "auto drnet0\niface drnet0 inet static\n    address 192.168.50.10/24\n" in stanza
    assert "gateway" not in stanza


def test_segment_gateway_never_replaces_the_default_route() -> None:
    files = segment_config_files("ubuntu", "drnet0", MAC0, "10.9.0.5/16", "10.9.0.1")
    assert "gateway 10.9.0.1\n    metric 200" in files["/etc/network/interfaces.d/p2v-dr-drnet0"]
    assert "[Route]\nGateway=10.9.0.1\nMetric=200" in files["/etc/systemd/network/50-p2v-dr-drnet0.network"]


def test_segment_config_for_rhel_and_suse() -> None:
    rhel = segment_config_files("rhel", "drnet0", MAC0, "192.168.50.10/24")
    ifcfg = rhel["/etc/sysconfig/network-scripts/ifcfg-drnet0"]
    assert f"HWADDR={MAC0}" in ifcfg and "IPADDR=192.168.50.10\nPREFIX=24" in ifcfg and "DEFROUTE=no" in ifcfg
    assert not any("interfaces.d" in p for p in rhel)
    suse = segment_config_files("sles", "drnet0", MAC0, "192.168.50.10/24", "192.168.50.1")
    assert "IPADDR='192.168.50.10/24'" in suse["/etc/sysconfig/network/ifcfg-drnet0"]
    assert "default 192.168.50.1 - drnet0 metric 200" in suse["/etc/sysconfig/network/ifroute-drnet0"]


@pytest.mark.parametrize(
    ("name", "mac", "address", "gateway", "message"),
    [
        ("drnet0", MAC0, "192.168.50.10", None, "prefix length"),
        ("drnet0", MAC0, "192.168.500.10/24", None, "192.168.500.10/24"),
        ("drnet0", MAC0, "192.168.50.0/24", None, "network's own"),
        ("drnet0", MAC0, "fd00::5/64", None, "only IPv4"),
        ("drnet0", MAC0, "192.168.50.10/24", "10.0.0.1", "not another address in 192.168.50.0/24"),
        ("drnet0", "nope", "192.168.50.10/24", None, "not a MAC"),
        ("a-very-long-interface-name", MAC0, "192.168.50.10/24", None, "at most 15"),
    ],
)
def test_segment_config_names_the_bad_value(name: str, mac: str, address: str, gateway: str | None,
                                            message: str) -> None:  # fmt: skip
    with pytest.raises(InvalidInput, match=message):
        segment_config_files("debian", name, mac, address, gateway)


def test_forward_states_reads_info_usernet() -> None:
    text = (
        "Hub -1 (net0):\n"
        "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n"
        "  TCP[ESTABLISHED]   14       127.0.0.1 40022       10.0.2.15    22     0     0\n"
        "  TCP[SYN_SENT]      12       127.0.0.1 40080       10.0.2.15  8080     0     0\n"
        "  TCP[HOST_FORWARD]   8       127.0.0.1 40080       10.0.2.15  8080     0     0\n"
        "  TCP[HOST_FORWARD]   7       127.0.0.1 40022       10.0.2.15    22     0     0\n"
        "  UDP[236 sec]        9       10.0.2.15   68       10.0.2.2    67     0     0\n"
    )
    assert forward_states(text, 40022, 22) == ["ESTABLISHED"]
    assert forward_states(text, 40080, 8080) == ["SYN_SENT"]
    assert forward_states(text, 40080, 22) == []
