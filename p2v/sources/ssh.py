"""Physical Linux servers over SSH: ``ssh://user@host[:port]/dev/sda``.

:func:`open_ssh_source` connects (trusted hosts only, see ``p2v trust``), collects
the machine's facts, copies the device once into a local sparse raw file and
returns a :class:`~p2v.sources.model.SourceMachine` whose disk is that file.
The pieces are usable alone: :class:`SshSession`, :func:`collect_facts`,
:func:`copy_device`, :func:`fetch_host_key`, :func:`record_host_key`.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from p2v.errors import OutputError, SourceNotFound, UsageError
from p2v.sources.model import SourceDisk, SourceMachine, SourceNic
from p2v.sources.ssh_copy import CopyStats, ProgressCallback, copy_device, remote_device_size
from p2v.sources.ssh_session import CommandResult, RemoteProcess, SshSession
from p2v.sources.ssh_trust import (
    DEFAULT_PORT,
    HostKeyInfo,
    default_known_hosts,
    fetch_host_key,
    host_label,
    is_ipv6,
    lookup_host_keys,
    record_host_key,
)

__all__ = [
    "CommandResult",
    "CopyStats",
    "HostFacts",
    "HostKeyInfo",
    "RemoteProcess",
    "SshSession",
    "SshTarget",
    "collect_facts",
    "copy_device",
    "default_known_hosts",
    "fetch_host_key",
    "lookup_host_keys",
    "open_ssh_source",
    "parse_ssh_url",
    "probe_host",
    "record_host_key",
    "remote_device_size",
]


@dataclass(frozen=True)
class SshTarget:
    """A parsed ``ssh://`` source URL."""

    host: str
    device: str
    user: str = "root"
    port: int = DEFAULT_PORT

    @property
    def label(self) -> str:
        return f"{self.user}@{host_label(self.host, self.port)}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"ssh://{self.user}@{host}{port}{urllib.parse.quote(self.device)}"

    def session(self, *, identity: Path | str | None = None, known_hosts: Path | str | None = None) -> SshSession:
        return SshSession(self.host, port=self.port, user=self.user, identity=identity, known_hosts=known_hosts)


_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def parse_ssh_url(url: str) -> SshTarget:
    """``ssh://[user@]host[:port]/absolute/device`` -> :class:`SshTarget`.

    The user defaults to root and the port to 22; IPv6 addresses go in brackets
    (``ssh://root@[fd00::5]:2222/dev/sda``). Raises :class:`UsageError` naming the URL.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"bad SSH source URL {url!r}: {why}", hint="expected ssh://[USER@]HOST[:PORT]/DEVICE")

    if not url.lower().startswith("ssh://"):
        raise bad("it must start with ssh://")
    if "?" in url or "#" in url:
        raise bad("query strings and fragments are not allowed")
    netloc, slash, path = url[len("ssh://") :].partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if ":" in userinfo:
        raise bad("passwords in URLs are not supported; use a key (--identity or ssh-agent)")
    if at and not userinfo:
        raise bad("empty user name")
    user = urllib.parse.unquote(userinfo) if userinfo else "root"
    if not _USER_RE.match(user):
        raise bad(f"{user!r} is not a valid user name")
    port_text = ""
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close or not is_ipv6(host):
            raise bad(f"{hostport!r} is not a bracketed IPv6 address")
        if rest and not rest.startswith(":"):
            raise bad(f"expected ':PORT' after ']', got {rest!r}")
        port_text = rest[1:]
    else:
        if hostport.count(":") > 1:
            raise bad("put IPv6 addresses in brackets: ssh://root@[fd00::5]:22/dev/sda")
        host, _, port_text = hostport.partition(":")
        if host and not _HOST_RE.match(host):
            raise bad(f"{host!r} is not a host name or IPv4 address")
    if not host:
        raise bad("no host")
    if ":" in hostport.rpartition("]")[2] and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise bad(f"port {port_text!r} is not a number from 1 to 65535")
    port = int(port_text) if port_text else DEFAULT_PORT
    device = urllib.parse.unquote(slash + path)
    if not device or device == "/":
        raise bad("no device path after the host (like /dev/sda)")
    if not device.startswith("/") or device.startswith("//"):
        raise bad(f"device path {device!r} must be absolute")
    if "\x00" in device or "\n" in device:
        raise bad("control characters in the device path")
    return SshTarget(host=host.lower(), device=device, user=user, port=port)


# -- facts ----------------------------------------------------------------

_FACTS_SCRIPT = r"""
dev="$1"
printf 'hostname\t%s\n' "$(cat /proc/sys/kernel/hostname 2>/dev/null || uname -n)"
printf 'cpus\t%s\n' "$(getconf _NPROCESSORS_ONLN 2>/dev/null || grep -c '^processor' /proc/cpuinfo)"
printf 'memkb\t%s\n' "$(sed -n 's/^MemTotal:[[:space:]]*\([0-9]*\).*/\1/p' /proc/meminfo)"
if [ -d /sys/firmware/efi ]; then printf 'firmware\tuefi\n'; else printf 'firmware\tbios\n'; fi
for n in /sys/class/net/*; do
  [ -e "$n/device" ] || continue
  drv=$(readlink "$n/device/driver" 2>/dev/null)
  printf 'nic\t%s\t%s\t%s\n' "${n##*/}" "$(cat "$n/address" 2>/dev/null)" "${drv##*/}"
done
if [ -b "$dev" ]; then
  printf 'kind\tblock\n'
  printf 'size\t%s\n' "$(blockdev --getsize64 "$dev")"
  name=$(readlink -f "$dev"); name=${name##*/}
  printf 'sysfs\t%s\n' "$(readlink -f "/sys/class/block/$name" 2>/dev/null)"
elif [ -f "$dev" ]; then
  printf 'kind\tfile\n'
  printf 'size\t%s\n' "$(stat -L -c %s "$dev")"
elif [ -e "$dev" ]; then
  printf 'kind\tother\n'
else
  printf 'kind\tmissing\n'
fi
if [ -r "$dev" ]; then printf 'readable\tyes\n'; else printf 'readable\tno\n'; fi
"""


@dataclass
class HostFacts:
    """What :func:`probe_host` learned about the host and the device."""

    hostname: str
    cpus: int | None
    memory_mib: int | None
    firmware: str  # bios | uefi
    nics: list[SourceNic] = field(default_factory=list)
    device: str = ""
    device_kind: str = "missing"  # block | file | other | missing
    device_size: int | None = None
    device_bus: str | None = None  # nvme | virtio | sata | scsi | usb | ide
    readable: bool = False
    python3: str | None = None  # "3.11", None when absent or older than 3.5


def _bus_from_sysfs(path: str, device: str) -> str | None:
    name = device.rsplit("/", 1)[-1]
    for marker, bus in (("/nvme", "nvme"), ("/virtio", "virtio"), ("/ata", "sata"), ("/usb", "usb")):
        if marker in path:
            return bus
    if "/host" in path or "/target" in path:
        return "scsi"
    if name.startswith("hd"):
        return "ide"
    return None


def probe_host(session: SshSession, device: str) -> HostFacts:
    """Hostname, CPUs, memory, NICs (with a device, so physical), firmware, the device, python3."""
    res = session.run(["sh", "-c", _FACTS_SCRIPT, "p2v-facts", device], timeout=60)
    values: dict[str, str] = {}
    nics: list[SourceNic] = []
    for line in res.text.splitlines():
        key, _, rest = line.partition("\t")
        if key == "nic":
            name, mac, driver = [*rest.split("\t"), "", ""][:3]
            nics.append(SourceNic(mac=mac.lower() or None, model=driver or None, name=name or None))
        elif key:
            values[key] = rest.strip()

    def number(key: str) -> int | None:
        text = values.get(key, "")
        return int(text) if text.isdigit() else None

    memkb = number("memkb")
    kind = values.get("kind", "missing")
    return HostFacts(
        hostname=values.get("hostname") or session.host,
        cpus=number("cpus"),
        memory_mib=memkb // 1024 if memkb is not None else None,
        firmware=values.get("firmware", "bios"),
        nics=nics,
        device=device,
        device_kind=kind,
        device_size=number("size"),
        device_bus=_bus_from_sysfs(values.get("sysfs", ""), device) if kind == "block" else None,
        readable=values.get("readable") == "yes",
        python3=session.python3_version(),
    )


def _source_machine(target: SshTarget, facts: HostFacts, disk: SourceDisk) -> SourceMachine:
    notes = [
        f"python3 {facts.python3} on the host: only non-zero blocks are sent"
        if facts.python3
        else "no python3 >= 3.5 on the host: the whole device is streamed with dd"
    ]
    return SourceMachine(
        kind="ssh",
        name=facts.hostname,
        disks=[disk],
        cpus=facts.cpus,
        memory_mib=facts.memory_mib,
        firmware=facts.firmware,
        nics=list(facts.nics),
        description=f"physical server {facts.hostname} ({target.label}, {target.device})",
        notes=notes,
    )


def _check_device(target: SshTarget, facts: HostFacts) -> None:
    if facts.device_kind == "missing":
        raise SourceNotFound(f"{target.url}: {target.device} does not exist on {facts.hostname}")
    if facts.device_kind == "other" or facts.device_size is None:
        raise SourceNotFound(f"{target.url}: {target.device} is not a block device or regular file")
    if not facts.readable:
        raise SourceNotFound(
            f"{target.url}: {target.device} is not readable by {target.user}",
            hint="connect as root (ssh://root@...)",
        )


def collect_facts(session: SshSession, device: str) -> SourceMachine:
    """The host's metadata as a SourceMachine whose one disk is the remote ``device``.

    The disk's ``qemu_filename`` is the ``ssh://`` URL (nothing local yet) and its
    ``capacity`` the device size. Raises :class:`SourceNotFound` when the device
    does not exist, is not a block device or file, or cannot be read.
    """
    target = SshTarget(host=session.host, device=device, user=session.user, port=session.port)
    facts = probe_host(session, device)
    _check_device(target, facts)
    disk = SourceDisk(
        qemu_filename=target.url, format="raw", display=target.url, bus=facts.device_bus,
        capacity=facts.device_size, label="disk0",
    )  # fmt: skip
    return _source_machine(target, facts, disk)


def open_ssh_source(
    url: str,
    *,
    workdir: Path,
    identity: Path | str | None = None,
    known_hosts: Path | str | None = None,
    progress: ProgressCallback | None = None,
) -> SourceMachine:
    """Copy the device named by ``url`` into ``workdir/<host>-disk0.raw`` and describe the machine.

    The returned machine's disk is that raw file (format ``raw``); ``close()`` removes
    it. The copy's statistics are in ``notes``. Raises :class:`UsageError` (bad URL),
    :class:`~p2v.errors.HostKeyError` (host not trusted), :class:`RemoteError`,
    :class:`SourceNotFound` (no such device) or :class:`OutputError` (``workdir``).
    """
    target = parse_ssh_url(url)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{workdir}: cannot create the work directory: {exc.strerror}") from exc
    safe_host = re.sub(r"[^A-Za-z0-9._-]", "_", target.host)
    dest = workdir / f"{safe_host}-disk0.raw"
    with target.session(identity=identity, known_hosts=known_hosts) as session:
        facts = probe_host(session, target.device)
        _check_device(target, facts)
        # the server is running: flush what its page cache holds so the copy is as recent as possible
        session.run(["sync"], timeout=300, check=False)
        stats = copy_device(session, target.device, dest, progress=progress, use_python=facts.python3 is not None)
    disk = SourceDisk(
        qemu_filename=str(dest), format="raw", display=target.url, bus=facts.device_bus,
        capacity=stats.bytes_total, label="disk0",
    )  # fmt: skip
    machine = _source_machine(target, facts, disk)
    machine.notes.append(
        f"copied {stats.bytes_total} bytes in {stats.seconds:.1f} s ({stats.mb_per_s:.0f} MB/s, "
        f"{stats.bytes_sent} on the wire, {stats.bytes_zero_skipped} zero bytes skipped)"
    )
    machine.cleanup.append(lambda: dest.unlink(missing_ok=True))
    machine.live = True
    return machine
