"""The SSH keys of the test guests, generated once per cache.

- ``keys/id_ed25519`` (+ ``.pub``): the client key; its public half is root's
  ``authorized_keys`` in every Debian guest.
- ``keys/ssh_host_ed25519_key`` (+ ``.pub``): the host key every Debian guest presents,
  so tests can use strict host-key checking with :func:`known_hosts_line`.

Both are OpenSSH-format ed25519 keys, private halves mode 0600.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def _keys_dir() -> Path:
    from images.cache import cache_root

    path = cache_root() / "keys"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _ensure_key(filename: str, comment: str) -> Path:
    folder = _keys_dir()
    priv, pub = folder / filename, folder / f"{filename}.pub"
    if priv.is_file() and pub.is_file():
        return priv
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if priv.is_file() and pub.is_file():
            return priv
        key = Ed25519PrivateKey.generate()
        priv_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        pub_bytes = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        tmp_priv, tmp_pub = priv.with_suffix(".tmp"), folder / f"{filename}.pub.tmp"
        fd = os.open(tmp_priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(priv_bytes)
        tmp_pub.write_bytes(pub_bytes + f" {comment}\n".encode())
        os.rename(tmp_pub, pub)
        os.rename(tmp_priv, priv)
    return priv


def test_ssh_key() -> Path:
    """Path of the ed25519 private key that logs in as root to the test guests."""
    return _ensure_key("id_ed25519", "p2v-test")


def test_host_key() -> Path:
    """Path of the ed25519 SSH host private key installed in the Debian test guests."""
    return _ensure_key("ssh_host_ed25519_key", "root@p2v-test-guest")


def known_hosts_line(host: str = "127.0.0.1", port: int = 22) -> str:
    """A known_hosts line trusting the test guests' host key at `host`:`port`."""
    kind, blob = Path(f"{test_host_key()}.pub").read_text().split()[:2]
    where = host if port == 22 else f"[{host}]:{port}"
    return f"{where} {kind} {blob}\n"
