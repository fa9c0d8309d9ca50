"""SSH host trust: p2v's own known_hosts file, fetching and recording host keys.

p2v never reads ``~/.ssh/known_hosts`` and never trusts a key on first use: a host
is trusted only after ``p2v trust HOST`` (or :func:`record_host_key`) wrote its key
into p2v's file, ``$P2V_KNOWN_HOSTS`` or ``~/.config/p2v/known_hosts``. The file is
in OpenSSH format (``host`` for port 22, ``[host]:port`` otherwise; hashed
``|1|...`` names written by ``ssh-keygen -H`` are understood).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from p2v.errors import ChangedHostKey, OutputError, RemoteError, UsageError

DEFAULT_PORT = 22

# Host key algorithms in the order we ask for them (what `p2v trust` records first).
HOST_KEY_PREFERENCE = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

RecordStatus = Literal["added", "replaced", "unchanged"]

_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def default_known_hosts() -> Path:
    """``$P2V_KNOWN_HOSTS``, else ``$XDG_CONFIG_HOME/p2v/known_hosts`` (``~/.config``)."""
    env = os.environ.get("P2V_KNOWN_HOSTS")
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "p2v" / "known_hosts"


def host_entry(host: str, port: int) -> str:
    """The host field OpenSSH writes: ``host`` on port 22, ``[host]:port`` otherwise."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def host_label(host: str, port: int) -> str:
    """``host:port`` for messages and for the ``p2v trust`` argument (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fingerprint_sha256(key_blob: bytes) -> str:
    """``SHA256:<base64 without padding>``, the form ``ssh-keygen -l`` prints."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class HostKeyInfo:
    """One host key as offered by a server (or as recorded for it)."""

    host: str
    port: int
    key_type: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...
    key_base64: str
    fingerprint: str  # SHA256:...

    @classmethod
    def from_pkey(cls, host: str, port: int, key: paramiko.PKey) -> HostKeyInfo:
        blob = key.asbytes()
        return cls(
            host=host,
            port=port,
            key_type=key.get_name(),
            key_base64=base64.b64encode(blob).decode("ascii"),
            fingerprint=fingerprint_sha256(blob),
        )

    @property
    def entry(self) -> str:
        return host_entry(self.host, self.port)

    @property
    def label(self) -> str:
        return host_label(self.host, self.port)

    def known_hosts_line(self) -> str:
        return f"{self.entry} {self.key_type} {self.key_base64}\n"

    def same_key(self, other: HostKeyInfo) -> bool:
        return self.key_type == other.key_type and self.key_base64 == other.key_base64

    def to_dict(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "key_type": self.key_type,
            "key_base64": self.key_base64,
            "fingerprint": self.fingerprint,
        }


def parse_host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address."""
    spec = text.strip()
    if spec.startswith("ssh://"):
        spec = spec[len("ssh://") :].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port_text = spec, ""
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise UsageError(f"{text!r}: unterminated '[' in host (use [ADDRESS]:PORT)")
        host, rest = spec[1:close], spec[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
    if ":" in host and not is_ipv6(host):
        raise UsageError(f"{text!r}: {host!r} is not an IPv6 address (write [ADDRESS]:PORT)")
    if not host or (":" not in host and not _HOST_RE.match(host)):
        raise UsageError(f"{text!r}: not a host name or address")
    if port_text == "":
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"{text!r}: port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _entry_matches(names: list[str], wanted: str) -> bool:
    for name in names:
        if name.startswith("|1|"):
            try:
                if paramiko.HostKeys.hash_host(wanted, name) == name:
                    return True
            except (ValueError, AssertionError, IndexError):
                continue
        elif name == wanted:
            return True
    return False


def _parse_line(line: str) -> HostKeyEntry | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or stripped.startswith("@"):
        return None
    try:
        return HostKeyEntry.from_line(stripped)
    except (InvalidHostKey, ValueError, paramiko.SSHException):
        return None


def lookup_host_keys(host: str, port: int, known_hosts: Path | None = None) -> list[HostKeyInfo]:
    """The keys recorded for ``host:port`` (empty when the host is unknown or the file is absent)."""
    path = known_hosts or default_known_hosts()
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"known_hosts file {path}: cannot read it: {exc.strerror}") from exc
    wanted = host_entry(host, port)
    found: list[HostKeyInfo] = []
    for line in lines:
        entry = _parse_line(line)
        if entry is None or entry.key is None or not _entry_matches(entry.hostnames, wanted):
            continue
        found.append(HostKeyInfo.from_pkey(host, port, entry.key))
    return found


def fetch_host_key(host: str, port: int = DEFAULT_PORT, timeout: float = 15.0) -> HostKeyInfo:
    """Connect, run the key exchange, and return the server's host key; no authentication.

    Raises :class:`RemoteError` when the host cannot be reached or does not speak SSH.
    """
    label = host_label(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise RemoteError(f"{label}: cannot connect: {exc.strerror or exc}") from exc
    transport = paramiko.Transport(sock)
    try:
        options = transport.get_security_options()
        supported = set(options.key_types)
        preferred = [k for k in HOST_KEY_PREFERENCE if k in supported]
        options.key_types = tuple(preferred + [k for k in options.key_types if k not in preferred])
        transport.banner_timeout = timeout
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise RemoteError(f"{label}: SSH key exchange failed: {str(exc) or type(exc).__name__}") from exc
    finally:
        transport.close()
        sock.close()
    return HostKeyInfo.from_pkey(host, port, key)


def record_host_key(info: HostKeyInfo, known_hosts: Path | None = None, *, replace: bool = False) -> RecordStatus:
    """Write ``info`` into the known_hosts file (atomically, mode 0600).

    Returns ``"unchanged"`` when exactly this key is already recorded, ``"added"`` when
    the host was unknown, ``"replaced"`` when ``replace=True`` swapped a different key.
    A different key already recorded and ``replace=False`` raises :class:`ChangedHostKey`.
    """
    path = known_hosts or default_known_hosts()
    existing = lookup_host_keys(info.host, info.port, path)
    if any(k.same_key(info) for k in existing):
        return "unchanged"
    if existing and not replace:
        raise ChangedHostKey(
            f"{info.label}: the host key changed: recorded {existing[0].key_type} {existing[0].fingerprint}, "
            f"offered {info.key_type} {info.fingerprint}",
            hint=f"if the change is expected (reinstalled host), run: p2v trust --replace {info.label}",
        )
    try:
        old_lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    except OSError as exc:
        raise UsageError(f"known_hosts file {path}: cannot read it: {exc.strerror}") from exc
    wanted = info.entry
    kept: list[str] = []
    for line in old_lines:
        entry = _parse_line(line)
        if replace and entry is not None and _entry_matches(entry.hostnames, wanted):
            if len(entry.hostnames) == 1:
                continue  # drop this host's old key
            # a line shared with other names: keep it for them, drop only our name
            others = [n for n in entry.hostnames if not _entry_matches([n], wanted)]
            line = f"{','.join(others)} {' '.join(line.split()[1:])}\n"
        kept.append(line if line.endswith("\n") else line + "\n")
    kept.append(info.known_hosts_line())
    _write_atomically(path, "".join(kept))
    return "replaced" if existing else "added"


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"known_hosts file {path}: cannot write it: {exc.strerror or exc}") from exc
