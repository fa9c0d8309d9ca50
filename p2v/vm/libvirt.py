"""Render a :class:`~p2v.vm.spec.VmSpec` as libvirt domain XML (``virsh define NAME.xml``).

The XML describes the same virtual hardware as :func:`p2v.vm.cmdline.build_command`
(machine type, disk buses, NIC models and MACs, firmware, clock, serial
console, guest agent channel), so a converted machine can also be run by a
libvirt-managed DR site. NIC ``network`` names map one-to-one to libvirt
network names: the site must define them (``default``, ``isolated``, ...).

UEFI: when OVMF is found on this host, the loader and a per-domain NVRAM
(created by libvirt from the VARS template) are written explicitly; otherwise
``<os firmware='efi'>`` lets the libvirt host choose its own firmware. The two
forms are not combined, as some libvirt versions drop an explicit loader path
when ``firmware='efi'`` is also set.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # building only; parsing untrusted XML uses defusedxml
from pathlib import Path

from p2v.errors import MissingComponent
from p2v.vm.cmdline import GUEST_AGENT_CHANNEL, RunOverrides, effective_machine
from p2v.vm.firmware import OvmfFirmware, find_ovmf
from p2v.vm.spec import VmSpec

NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"

LIBVIRT_NIC_MODELS: dict[str, str] = {
    "virtio": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}

# spec bus -> (libvirt target bus, device name prefix, SCSI controller model or None)
_BUS_TARGETS: dict[str, tuple[str, str, str | None]] = {
    "virtio": ("virtio", "vd", None),
    "virtio-scsi": ("scsi", "sd", "virtio-scsi"),
    "scsi": ("scsi", "sd", "lsilogic"),
    "sata": ("sata", "sd", None),
    "ide": ("ide", "hd", None),
}


def disk_dev_name(prefix: str, index: int) -> str:
    """Linux-style device names: vda..vdz, vdaa..vdzz, ... for index 0, 1, ..."""
    letters = ""
    n = index + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _os_element(root: ET.Element, spec: VmSpec, machine: str, ovmf: OvmfFirmware | None) -> None:
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch=spec.guest.arch or "x86_64", machine=machine)
    if spec.firmware == "uefi":
        fw = ovmf
        if fw is None:
            try:
                fw = find_ovmf()
            except MissingComponent:
                fw = None
        if fw is None:
            os_el.set("firmware", "efi")
        else:
            _sub(os_el, "loader", str(fw.code), readonly="yes", type="pflash")
            _sub(os_el, "nvram", f"{NVRAM_DIR}/{spec.name}_VARS.fd", template=str(fw.vars_template))
    else:
        os_el.set("firmware", "bios")
    _sub(os_el, "boot", dev="hd")


def _disks(devices: ET.Element, spec: VmSpec, spec_dir: Path) -> None:
    counters: dict[str, int] = {}
    controllers: dict[str, int] = {}  # SCSI controller model -> controller index
    scsi_units: dict[str, int] = {}
    for disk, path in zip(spec.disks, spec.disk_paths(spec_dir), strict=True):
        bus, prefix, scsi_model = _BUS_TARGETS[disk.bus]
        n = counters.get(prefix, 0)
        counters[prefix] = n + 1
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type=disk.format, discard="unmap")
        _sub(el, "source", file=str(path.absolute()))
        _sub(el, "target", dev=disk_dev_name(prefix, n), bus=bus)
        if scsi_model is not None:
            if scsi_model not in controllers:
                controllers[scsi_model] = len(controllers)
            unit = scsi_units.get(scsi_model, 0)
            scsi_units[scsi_model] = unit + 1
            _sub(
                el, "address", type="drive", controller=str(controllers[scsi_model]),
                bus="0", target=str(unit), unit="0",
            )  # fmt: skip
    for model, index in controllers.items():
        _sub(devices, "controller", type="scsi", index=str(index), model=model)


def domain_xml(spec: VmSpec, spec_dir: Path, *, ovmf: OvmfFirmware | None = None) -> str:
    """The libvirt domain XML for ``spec``; disk paths are made absolute against ``spec_dir``.

    ``ovmf`` defaults to the firmware found on this host (see the module docstring).
    """
    machine = effective_machine(spec, RunOverrides())
    root = ET.Element("domain", type="kvm")
    _sub(root, "name", spec.name)
    desc = [f"Converted by p2v from {spec.source}" if spec.source else "Converted by p2v"]
    if spec.guest.type != "unknown":
        desc.append(f"guest: {spec.guest.type} {spec.guest.distro} {spec.guest.version}".rstrip())
    _sub(root, "description", "; ".join(desc))
    _sub(root, "memory", str(spec.memory_mib * 1024), unit="KiB")
    _sub(root, "currentMemory", str(spec.memory_mib * 1024), unit="KiB")
    _sub(root, "vcpu", str(spec.cpus), placement="static")
    _os_element(root, spec, machine, ovmf)
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    _sub(root, "cpu", mode="host-model")
    _sub(root, "clock", offset=spec.rtc)
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    _disks(devices, spec, spec_dir)
    for nic in spec.nics:
        iface = _sub(devices, "interface", type="network")
        _sub(iface, "mac", address=nic.mac)
        _sub(iface, "source", network=nic.network)
        _sub(iface, "model", type=LIBVIRT_NIC_MODELS[nic.model])
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(devices, "input", type="tablet", bus="usb")
    _sub(devices, "graphics", type="vnc", autoport="yes", listen="127.0.0.1")
    video = _sub(devices, "video")
    _sub(video, "model", type="vga")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"
