"""The isolated network of a drill: VMs reach each other, nothing else reaches or is reached.

Each drill VM gets two NICs:

- **NIC0, management** (the guest's own first NIC, its source MAC, its own DHCP
  config): QEMU user-mode networking with ``restrict=on``. The guest gets
  10.0.2.15 from slirp but no route out: with ``restrict=on`` slirp drops every
  packet the guest sends to the slirp host (10.0.2.2), the DR host's own
  addresses and the outside world. Only the ``hostfwd`` ports work, and only in
  the host -> guest direction, bound to 127.0.0.1: that is how p2v's health
  checks (and SSH on guest port 22) reach the VM. Measured from a booted drill
  VM: TCP and UDP to 10.0.2.2, to the DR host's address and to the outside fail,
  slirp's DNS (10.0.2.3) does not answer, ICMP echo to the DR host or outside
  gets no reply; only slirp's *emulated* gateway 10.0.2.2 answers ping (inside
  QEMU; no packet reaches the host).
- **NIC1, the plan's segment**: one L2 segment shared by all VMs of a run and
  nobody else, made with QEMU's ``-netdev socket,mcast=GROUP:PORT,localaddr=127.0.0.1``.
  Every VM joins the same multicast group on the loopback interface; frames a VM
  sends reach the other VMs of the run only (the group is never joined on a real
  interface, so nothing leaves the host and nothing from outside enters).
  Measured on the DR host (Debian 12, kernel ``lo`` without the MULTICAST flag,
  no multicast route): joining a group with interface 127.0.0.1 and sending with
  ``IP_MULTICAST_IF`` 127.0.0.1 works, no sysctl or route needed. The group and
  port derive from the run id (239.192.0.0/10, organisation-local scope), so two
  drills never share a segment and a resumed run finds its own again.
  The guest addresses its segment NIC statically from the plan
  (:func:`segment_config_files`), pinned by MAC to the name ``drnet0``.

Slirp and TCP forwards (measured with QEMU 7.2): slirp accepts a connection on a
forwarded host port *immediately*, before the guest answered the SYN it sends on;
with no guest (or a guest still booting) the host side stays open, silent, for a
long time (slirp retries the SYN for 75 s). When the guest has no listener it
answers with a reset and slirp closes the host side at once (the client reads EOF).
So "connect() worked" proves nothing; :func:`forward_states` reads the guest side's
TCP state from QEMU's ``info usernet`` (``SYN_SENT`` until the guest answers,
``ESTABLISHED`` after) and :mod:`p2v.orchestration.checks` uses it for tcp checks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from p2v.errors import InvalidInput, UsageError
from p2v.vm.spec import MAC_RE, mac_from_seed

SEGMENT_NIC_NAME = "drnet0"
MGMT_GUEST_ADDRESS = "10.0.2.15"  # what slirp's DHCP gives the first guest NIC
MANAGEMENT_PORT = 22
SEGMENT_ROUTE_METRIC = 200  # a segment gateway never replaces the management default route
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "rtl8139",
            "vmxnet3": "vmxnet3"}  # fmt: skip
_IFUPDOWN_FAMILY = ("debian", "ubuntu", "linuxmint", "devuan", "kali", "raspbian")
_RHEL_FAMILY = ("rhel", "redhat", "centos", "fedora", "rocky", "almalinux", "alma", "oracle", "ol", "scientific")
_SUSE_FAMILY = ("sles", "suse", "opensuse", "opensuse-leap", "opensuse-tumbleweed")
_USERNET_ROW = re.compile(
    r"^\s*TCP\[(?P<state>[A-Z_]+)\]\s+\d+\s+(?P<laddr>\S+)\s+(?P<lport>\d+)\s+(?P<faddr>\S+)\s+(?P<fport>\d+)",
    re.MULTILINE,
)


def segment_endpoint(run_id: str) -> tuple[str, int]:
    """The multicast group and UDP port of ``run_id``'s segment (stable for a run id)."""
    if not run_id:
        raise UsageError("drill network: the run id is empty")
    h = hashlib.sha256(f"p2v-drill-segment:{run_id}".encode()).digest()
    group = f"239.{192 + (h[0] & 0x3F)}.{h[1]}.{1 + h[2] % 254}"
    port = 20000 + int.from_bytes(h[3:5], "big") % 30000
    return group, port


def segment_mac(run_id: str, machine: str) -> str:
    """A stable MAC (QEMU's 52:54:00 range) for ``machine``'s segment NIC in ``run_id``."""
    return mac_from_seed(f"p2v-drill-segment-nic:{run_id}:{machine}")


def guest_nic_name(taken: Iterable[str] = ()) -> str:
    """The guest name for the segment NIC: ``drnet0``, or the next ``drnetN`` free in ``taken``."""
    used = set(taken)
    n = 0
    while f"drnet{n}" in used:
        n += 1
    return f"drnet{n}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class DrillNetwork:
    """The networks of one drill run (see the module docstring).

    ``nic_args`` returns the QEMU arguments for one VM (to pass as
    :attr:`~p2v.vm.cmdline.RunOverrides.nic_args`) and the guest -> host port map
    its checks use. Nothing runs outside QEMU, so :meth:`close` has nothing to
    stop today; call it anyway (a context manager), it forgets the port maps.
    """

    def __init__(self, run_id: str, *, host: str = "127.0.0.1") -> None:
        self.run_id = run_id
        self.host = host
        self.group, self.port = segment_endpoint(run_id)
        self.ports: dict[str, dict[int, int]] = {}

    def __enter__(self) -> DrillNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nic_args(
        self,
        machine: str,
        mac0: str,
        mac1: str,
        forward_ports: Iterable[int],
        *,
        model: str = "virtio",
        host_ports: Mapping[int, int] | None = None,
    ) -> tuple[list[str], dict[int, int]]:
        """QEMU ``-netdev``/``-device`` args for ``machine`` and its guest -> host port map.

        NIC0 (``mac0``, management, user-mode ``restrict=on``) forwards each of
        ``forward_ports`` plus 22 from a free port on ``host``; NIC1 (``mac1``)
        joins the run's segment. Host ports come from ``host_ports`` (guest ->
        host, e.g. the ports a resumed run recorded) where given, else fresh free
        ones (call again if QEMU reports a forwarding port taken). Raises :class:`UsageError` for a
        bad MAC, port or NIC model.
        """
        device = _DEVICES.get(model)
        if device is None:
            raise UsageError(f"drill network: NIC model {model!r} unknown; use one of {', '.join(_DEVICES)}")
        macs = []
        for mac in (mac0, mac1):
            norm = mac.lower().replace("-", ":")
            if not MAC_RE.match(norm):
                raise UsageError(f"drill network: {machine}: not a MAC address: {mac!r}")
            macs.append(norm)
        if macs[0] == macs[1]:
            raise UsageError(f"drill network: {machine}: both NICs have MAC {macs[0]}")
        guest_ports = sorted({MANAGEMENT_PORT, *forward_ports})
        for p in guest_ports:
            if not 1 <= p <= 65535:
                raise UsageError(f"drill network: {machine}: guest port {p} out of range 1-65535")
        given = dict(host_ports or {})
        guest_ports = sorted({*guest_ports, *given})
        for p in given.values():
            if not 1 <= p <= 65535:
                raise UsageError(f"drill network: {machine}: host port {p} out of range 1-65535")
        port_map = {gp: given.get(gp) or free_tcp_port(self.host) for gp in guest_ports}
        forwards = "".join(f",hostfwd=tcp:{self.host}:{hp}-:{gp}" for gp, hp in port_map.items())
        args = [
            "-netdev", f"user,id=net0,restrict=on{forwards}",
            "-device", f"{device},netdev=net0,mac={macs[0]},id=nic0",
            "-netdev", f"socket,id=net1,mcast={self.group}:{self.port},localaddr=127.0.0.1",
            "-device", f"{device},netdev=net1,mac={macs[1]},id=nic1",
        ]  # fmt: skip
        self.ports[machine] = port_map
        return args, dict(port_map)

    def close(self) -> None:
        self.ports.clear()


# -- guest configuration of the segment NIC ------------------------------------------------


def _family(distro_hint: str) -> str:
    d = distro_hint.strip().lower()
    if d in _RHEL_FAMILY or d.startswith(("rhel", "centos", "rocky", "alma")):
        return "rhel"
    if d in _SUSE_FAMILY or "suse" in d:
        return "suse"
    if d in _IFUPDOWN_FAMILY:
        return "debian"
    return "unknown"


def segment_config_files(
    distro_hint: str, nic_name: str, mac: str, address: str, gateway: str | None = None
) -> dict[str, str]:
    """Guest files (path -> content) that name the NIC with ``mac`` ``nic_name`` and give it ``address``.

    ``address`` is CIDR (``192.168.50.10/24``); ``gateway`` (optional) must be in
    its network and gets route metric 200, so it never replaces the management
    NIC's default route. Written for every Linux guest: a systemd ``.link`` file
    and a udev rule (the name, bound to the MAC the way conversion pins NIC
    names) and a systemd-networkd ``.network`` file matching the MAC; plus, by
    ``distro_hint`` (the inspected distro: debian, ubuntu, rhel, fedora, sles...),
    an ifupdown stanza in ``/etc/network/interfaces.d`` (Debian family and unknown
    distros) or an ``ifcfg`` file (RHEL and SUSE families). Files a guest's
    network stack does not read are inert. Raises :class:`InvalidInput` naming
    the bad value.
    """
    if not _IFNAME_RE.match(nic_name):
        raise InvalidInput(f"segment NIC name {nic_name!r}: use at most 15 letters, digits, '_', '.', '-'")
    mac = mac.lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise InvalidInput(f"segment NIC {nic_name}: not a MAC address: {mac!r}")
    if "/" not in address:
        raise InvalidInput(f"segment address {address!r}: give the prefix length too, e.g. {address}/24")
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError as exc:
        raise InvalidInput(f"segment address {address!r}: {exc}") from exc
    if iface.version != 4:
        raise InvalidInput(f"segment address {address!r}: only IPv4 segments are supported")
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address) and iface.network.prefixlen < 31:
        raise InvalidInput(f"segment address {address!r}: that is the network's own or broadcast address")
    gw = None
    if gateway:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError as exc:
            raise InvalidInput(f"segment gateway {gateway!r}: {exc}") from exc
        if gw not in iface.network or gw == iface.ip:
            raise InvalidInput(f"segment gateway {gateway}: not another address in {iface.network}")
    header = f"# Written by p2v for DR drills: {nic_name} is the recovery plan's isolated segment.\n"
    files: dict[str, str] = {
        f"/etc/systemd/network/10-p2v-{nic_name}.link": (
            header + f"[Match]\nMACAddress={mac}\n\n[Link]\nName={nic_name}\n"
        ),
        f"/etc/udev/rules.d/70-p2v-{nic_name}.rules": (
            header.replace("\n", "") + "\n"
            f'SUBSYSTEM=="net", ACTION=="add", ATTR{{address}}=="{mac}", ATTR{{type}}=="1", NAME="{nic_name}"\n'
        ),
    }
    network = header + f"[Match]\nMACAddress={mac}\n\n[Network]\nAddress={iface.with_prefixlen}\n"
    network += "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    if gw:
        network += f"\n[Route]\nGateway={gw}\nMetric={SEGMENT_ROUTE_METRIC}\n"
    files[f"/etc/systemd/network/50-p2v-dr-{nic_name}.network"] = network
    family = _family(distro_hint)
    if family in ("debian", "unknown"):
        stanza = header + f"auto {nic_name}\niface {nic_name} inet static\n    address {iface.with_prefixlen}\n"
        if gw:
            stanza += f"    gateway {gw}\n    metric {SEGMENT_ROUTE_METRIC}\n"
        files[f"/etc/network/interfaces.d/p2v-dr-{nic_name}"] = stanza
    elif family == "rhel":
        text = header + (
            f"DEVICE={nic_name}\nNAME={nic_name}\nHWADDR={mac}\nTYPE=Ethernet\nONBOOT=yes\nBOOTPROTO=none\n"
            f"IPADDR={iface.ip}\nPREFIX={iface.network.prefixlen}\nIPV6INIT=no\n"
        )
        text += f"GATEWAY={gw}\nIPV4_ROUTE_METRIC={SEGMENT_ROUTE_METRIC}\n" if gw else "DEFROUTE=no\n"
        files[f"/etc/sysconfig/network-scripts/ifcfg-{nic_name}"] = text
    else:  # suse
        files[f"/etc/sysconfig/network/ifcfg-{nic_name}"] = header + (
            f"STARTMODE='auto'\nBOOTPROTO='static'\nIPADDR='{iface.with_prefixlen}'\n"
        )
        if gw:
            files[f"/etc/sysconfig/network/ifroute-{nic_name}"] = (
                header + f"default {gw} - {nic_name} metric {SEGMENT_ROUTE_METRIC}\n"
            )
    return files


# -- what slirp says about forwarded connections ---------------------------------------


def forward_states(usernet_text: str, host_port: int, guest_port: int) -> list[str]:
    """TCP states of the guest side of connections forwarded from ``host_port`` to ``guest_port``.

    ``usernet_text`` is QEMU's ``info usernet`` (HMP) output. The listening entry
    (``HOST_FORWARD``) is left out; ``SYN_SENT`` means the guest has not answered
    yet, ``ESTABLISHED`` that a guest program accepted the connection.
    """
    states = []
    for m in _USERNET_ROW.finditer(usernet_text):
        if m["state"] == "HOST_FORWARD":
            continue
        if int(m["lport"]) == host_port and int(m["fport"]) == guest_port:
            states.append(m["state"])
    return states


def usernet_reader(qmp: Callable[..., Any]) -> Callable[[], str]:
    """A function returning ``info usernet`` of a VM, given its QMP call (``VirtualMachine.qmp``)."""

    def read() -> str:
        return str(qmp("human-monitor-command", **{"command-line": "info usernet"}))

    return read
