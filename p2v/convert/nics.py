"""Decide the converted VM's NICs: MACs, models, DR networks, and guest names to pin."""

from __future__ import annotations

from collections.abc import Sequence

from p2v.convert.linux.network import NicConfig
from p2v.errors import UsageError
from p2v.sources.model import SourceNic
from p2v.vm.spec import NicSpec, mac_from_seed


def parse_net_map(items: Sequence[str]) -> dict[str, str]:
    """``["VM Network=dr-lan", "*=isolated"]`` → mapping; bad items raise UsageError."""
    out: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise UsageError(f"--net {item!r}: expected SOURCE_NETWORK=DR_NETWORK (use '*' for any)")
        out[src.strip()] = dst.strip()
    return out


def plan_nics(
    vm_name: str,
    source_nics: list[SourceNic],
    config_nics: list[NicConfig],
    net_map: dict[str, str],
) -> tuple[list[NicSpec], list[str]]:
    """Return (NIC specs, warnings). Each NIC keeps the source MAC; guest names are matched
    by MAC, then by order for config entries that name no MAC."""
    warnings: list[str] = []
    by_mac = {c.mac.lower(): c for c in config_nics if c.mac}
    unbound = [c for c in config_nics if not c.mac]
    specs: list[NicSpec] = []

    def network_for(src_net: str | None) -> str:
        if src_net and src_net in net_map:
            return net_map[src_net]
        return net_map.get("*", "default")

    if source_nics:
        for i, sn in enumerate(source_nics):
            mac = (sn.mac or mac_from_seed(f"{vm_name}/nic{i}")).lower()
            cfg = by_mac.pop(mac, None)
            gname = sn.name or (cfg.name if cfg else None)
            if gname is None and unbound:
                gname = unbound.pop(0).name
            specs.append(NicSpec(mac=mac, network=network_for(sn.network), source_network=sn.network,
                                 guest_name=gname))  # fmt: skip
            if sn.mac is None:
                warnings.append(f"NIC {i}: the source gives no MAC; generated {mac}")
        for c in list(by_mac.values()) + unbound:
            warnings.append(f"guest config names interface {c.name} ({c.source}) but the source has no NIC for it")
    else:
        for c in config_nics:
            mac = c.mac or mac_from_seed(f"{vm_name}/{c.name}")
            specs.append(NicSpec(mac=mac, network=network_for(None), guest_name=c.name))
        if not specs:
            specs.append(NicSpec(mac=mac_from_seed(f"{vm_name}/nic0"), network=network_for(None)))
    known = {s.source_network for s in specs}
    for src in net_map:
        if src != "*" and src not in known:
            warnings.append(f"--net {src}=...: no NIC of the source is on network {src!r}")
    return specs, warnings
