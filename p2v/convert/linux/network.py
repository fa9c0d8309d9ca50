"""NIC identity in a Linux guest: which interface names its config uses, which MACs
they are bound to, and pinning each name to its MAC so it survives a new NIC model.

A NIC's kernel name depends on its driver and PCI slot (enp0s3 under e1000 becomes
enp1s0 under virtio-net), which breaks every config that names the interface.
Binding the name to the MAC with a systemd .link file keeps it identical on the DR
VM (which keeps the source's MAC) and back on the original hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

LINK_DIR = "/etc/systemd/network"
PERSISTENT_RULES = "/etc/udev/rules.d/70-persistent-net.rules"
UDEV_RULE_RE = re.compile(r'ATTR\{address\}=="([0-9a-fA-F:]{17})".*?NAME="([^"]+)"')


@dataclass
class NicConfig:
    name: str
    mac: str | None = None
    method: str | None = None  # dhcp | static | manual | ...
    address: str | None = None
    source: str = ""  # file that names it


def _text(g: Any, path: str) -> str | None:
    try:
        if g.is_file(path, followsymlinks=True):
            return bytes(g.read_file(path)).decode("utf-8", "replace")
    except RuntimeError:
        return None
    return None


def _ls(g: Any, d: str) -> list[str]:
    try:
        return sorted(g.ls(d)) if g.is_dir(d) else []
    except RuntimeError:
        return []


def _merge(nics: dict[str, NicConfig], nic: NicConfig) -> None:
    cur = nics.get(nic.name)
    if cur is None:
        nics[nic.name] = nic
        return
    cur.mac = cur.mac or nic.mac
    cur.method = cur.method or nic.method
    cur.address = cur.address or nic.address
    if nic.source not in cur.source.split(","):
        cur.source = f"{cur.source},{nic.source}" if cur.source else nic.source


def _ifupdown(g: Any, out: dict[str, NicConfig]) -> None:
    extra = [f"/etc/network/interfaces.d/{f}" for f in _ls(g, "/etc/network/interfaces.d")]
    files = ["/etc/network/interfaces", *extra]
    for path in files:
        text = _text(g, path) or ""
        current: NicConfig | None = None
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            m = re.match(r"iface\s+(\S+)\s+inet6?\s+(\S+)", line)
            if m:
                if m.group(1) == "lo":
                    current = None
                    continue
                current = NicConfig(m.group(1), method=m.group(2), source=path)
                _merge(out, current)
                current = out[m.group(1)]
                continue
            m = re.match(r"(?:auto|allow-hotplug)\s+(.+)", line)
            if m:
                for name in m.group(1).split():
                    if name != "lo":
                        _merge(out, NicConfig(name, source=path))
                continue
            if current is not None:
                m = re.match(r"address\s+(\S+)", line)
                if m:
                    current.address = m.group(1)
                m = re.match(r"hwaddress\s+(?:ether\s+)?(\S+)", line)
                if m:
                    current.mac = m.group(1).lower()


def _udev_rules(g: Any, out: dict[str, NicConfig]) -> None:
    for f in _ls(g, "/etc/udev/rules.d"):
        if not f.endswith(".rules"):
            continue
        path = f"/etc/udev/rules.d/{f}"
        for line in (_text(g, path) or "").splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = UDEV_RULE_RE.search(line)
            if m and 'SUBSYSTEM=="net"' in line:
                _merge(out, NicConfig(m.group(2), mac=m.group(1).lower(), source=path))


def _link_files(g: Any, out: dict[str, NicConfig]) -> None:
    for f in _ls(g, LINK_DIR):
        if not f.endswith(".link"):
            continue
        path = f"{LINK_DIR}/{f}"
        text = _text(g, path) or ""
        mac = re.search(r"^\s*MACAddress\s*=\s*(\S+)", text, re.M)
        name = re.search(r"^\s*Name\s*=\s*(\S+)", text, re.M)
        if mac and name:
            _merge(out, NicConfig(name.group(1), mac=mac.group(1).lower(), source=path))


def _ifcfg(g: Any, out: dict[str, NicConfig]) -> None:
    d = "/etc/sysconfig/network-scripts"
    for f in _ls(g, d):
        if not f.startswith("ifcfg-") or f == "ifcfg-lo":
            continue
        text = _text(g, f"{d}/{f}") or ""
        kv = dict(re.findall(r'^\s*([A-Z_]+)\s*=\s*"?([^"\n]*)"?', text, re.M))
        name = kv.get("DEVICE") or f[len("ifcfg-") :]
        mac = (kv.get("HWADDR") or kv.get("MACADDR") or "").lower() or None
        _merge(out, NicConfig(name, mac=mac, method=(kv.get("BOOTPROTO") or "").lower() or None,
                              address=kv.get("IPADDR"), source=f"{d}/{f}"))  # fmt: skip


def _networkmanager(g: Any, out: dict[str, NicConfig]) -> None:
    d = "/etc/NetworkManager/system-connections"
    for f in _ls(g, d):
        text = _text(g, f"{d}/{f}") or ""
        name = re.search(r"^\s*interface-name\s*=\s*(\S+)", text, re.M)
        mac = re.search(r"^\s*mac-address\s*=\s*(\S+)", text, re.M)
        method = re.search(r"^\[ipv4\][^\[]*?^\s*method\s*=\s*(\S+)", text, re.M | re.S)
        if name:
            _merge(out, NicConfig(name.group(1), mac=mac.group(1).lower() if mac else None,
                                  method=method.group(1) if method else None, source=f"{d}/{f}"))  # fmt: skip


def _netplan(g: Any, out: dict[str, NicConfig]) -> None:
    d = "/etc/netplan"
    for f in _ls(g, d):
        if not f.endswith((".yaml", ".yml")):
            continue
        try:
            data = yaml.safe_load(_text(g, f"{d}/{f}") or "") or {}
        except yaml.YAMLError:
            continue
        eths = (data.get("network") or {}).get("ethernets") or {}
        for key, conf in eths.items():
            conf = conf or {}
            match = conf.get("match") or {}
            name = conf.get("set-name") or match.get("name") or key
            method = "dhcp" if conf.get("dhcp4") else ("static" if conf.get("addresses") else None)
            mac = match.get("macaddress")
            _merge(out, NicConfig(str(name), mac=str(mac).lower() if mac else None, method=method,
                                  source=f"{d}/{f}"))  # fmt: skip


def read_nic_config(g: Any) -> list[NicConfig]:
    """Every interface the guest's network config names, with MACs where config binds them."""
    out: dict[str, NicConfig] = {}
    for reader in (_udev_rules, _link_files, _ifupdown, _ifcfg, _networkmanager, _netplan):
        reader(g, out)
    return list(out.values())


def link_file_text(name: str, mac: str) -> str:
    return (
        "# Written by p2v: keeps this interface's name bound to its MAC address, so the\n"
        "# name survives a change of NIC model or PCI slot (DR site and original hardware).\n"
        f"[Match]\nMACAddress={mac}\n\n[Link]\nName={name}\n"
    )


def udev_rule_text(name: str, mac: str) -> str:
    return (
        f'SUBSYSTEM=="net", ACTION=="add", ATTR{{address}}=="{mac}", ATTR{{type}}=="1", NAME="{name}"\n'
    )


def pin_names(g: Any, pins: list[tuple[str, str]], has_systemd: bool) -> list[str]:
    """Bind each (name, mac); returns the files written or changed. Idempotent."""
    changed: list[str] = []
    if not pins:
        return changed
    if has_systemd:
        g.mkdir_p(LINK_DIR)
        for name, mac in pins:
            path = f"{LINK_DIR}/10-p2v-{name}.link"
            text = link_file_text(name, mac)
            if _text(g, path) != text:
                g.write(path, text.encode())
                changed.append(path)
        # the classic udev rules are replaced by the .link files: keep them, inert, for reference
        if g.is_file(PERSISTENT_RULES):
            g.mv(PERSISTENT_RULES, PERSISTENT_RULES + ".p2v-replaced")
            changed.append(PERSISTENT_RULES)
    else:
        text = "# Written by p2v: interface names bound to MAC addresses\n" + "".join(
            udev_rule_text(n, m) for n, m in pins
        )
        if _text(g, PERSISTENT_RULES) != text:
            g.write(PERSISTENT_RULES, text.encode())
            changed.append(PERSISTENT_RULES)
    return changed
