"""Windows registry hives on the host, through python3-hivex, with typed values.

Conversion downloads a hive from the guest, edits it here and uploads the result;
nothing reaches the guest until :meth:`Hive.commit` wrote a complete new file.
Key look-ups are case-insensitive, as in Windows.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from p2v.errors import ConversionError, MissingComponent

REG_NONE = 0
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7
REG_QWORD = 11

TYPE_NAMES = {
    REG_NONE: "REG_NONE",
    REG_SZ: "REG_SZ",
    REG_EXPAND_SZ: "REG_EXPAND_SZ",
    REG_BINARY: "REG_BINARY",
    REG_DWORD: "REG_DWORD",
    REG_MULTI_SZ: "REG_MULTI_SZ",
    REG_QWORD: "REG_QWORD",
}


@dataclass(frozen=True)
class RegValue:
    """A registry value: its type and raw data."""

    type: int
    data: bytes

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def sz(cls, text: str) -> RegValue:
        return cls(REG_SZ, (text + "\0").encode("utf-16-le"))

    @classmethod
    def expand_sz(cls, text: str) -> RegValue:
        return cls(REG_EXPAND_SZ, (text + "\0").encode("utf-16-le"))

    @classmethod
    def multi_sz(cls, items: Sequence[str]) -> RegValue:
        return cls(REG_MULTI_SZ, ("".join(f"{s}\0" for s in items) + "\0").encode("utf-16-le"))

    @classmethod
    def dword(cls, n: int) -> RegValue:
        return cls(REG_DWORD, struct.pack("<I", n & 0xFFFFFFFF))

    @classmethod
    def qword(cls, n: int) -> RegValue:
        return cls(REG_QWORD, struct.pack("<Q", n & 0xFFFFFFFFFFFFFFFF))

    @classmethod
    def binary(cls, data: bytes) -> RegValue:
        return cls(REG_BINARY, bytes(data))

    # -- decoders ------------------------------------------------------------------------------
    def as_str(self) -> str:
        if self.type in (REG_SZ, REG_EXPAND_SZ):
            return self.data.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        if self.type == REG_MULTI_SZ:
            return "\n".join(self.as_strings())
        if self.type in (REG_DWORD, REG_QWORD):
            return str(self.as_int())
        return self.data.hex()

    def as_strings(self) -> list[str]:
        if self.type != REG_MULTI_SZ:
            return [self.as_str()]
        text = self.data.decode("utf-16-le", errors="replace")
        return [s for s in text.split("\0") if s]

    def as_int(self) -> int:
        if self.type == REG_DWORD and len(self.data) >= 4:
            return int(struct.unpack_from("<I", self.data)[0])
        if self.type == REG_QWORD and len(self.data) >= 8:
            return int(struct.unpack_from("<Q", self.data)[0])
        if self.type in (REG_SZ, REG_EXPAND_SZ):
            return int(self.as_str().strip(), 0)
        raise ValueError(f"{TYPE_NAMES.get(self.type, self.type)} value is not a number")

    def to_json(self) -> Any:
        """A JSON-able rendering (ints, strings, lists, hex) for reports and facts."""
        if self.type in (REG_DWORD, REG_QWORD):
            return self.as_int()
        if self.type == REG_MULTI_SZ:
            return self.as_strings()
        if self.type in (REG_SZ, REG_EXPAND_SZ):
            return self.as_str()
        return self.data.hex()


KeyPath = str | Sequence[str]


def split_path(path: KeyPath) -> list[str]:
    """``"ControlSet001\\Services"`` or ``["ControlSet001", "Services"]`` -> parts."""
    if isinstance(path, str):
        return [p for p in path.replace("/", "\\").split("\\") if p]
    return [p for p in path if p]


class Hive:
    """A hive file opened with python3-hivex (read-only unless ``write=True``)."""

    def __init__(self, path: Path, *, write: bool = False, label: str | None = None) -> None:
        try:
            import hivex
        except ImportError as exc:  # pragma: no cover - environment problem
            raise MissingComponent("python3-hivex is not importable", hint="apt-get install python3-hivex") from exc
        self.path = path
        self.label = label or str(path)
        self.writable = write
        try:
            self._h = hivex.Hivex(str(path), write=write)
        except RuntimeError as exc:
            raise ConversionError(f"{self.label}: cannot open the registry hive: {exc}") from exc
        # Key paths (backslash-joined, from the hive root) this handle created or changed.
        self.changed_keys: list[str] = []

    def __enter__(self) -> Hive:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._h = None

    # -- navigation ----------------------------------------------------------------------------
    @property
    def root(self) -> int:
        return int(self._h.root())

    def node(self, path: KeyPath, *, start: int | None = None) -> int | None:
        """The node at ``path`` below ``start`` (default: root), or None."""
        node = self.root if start is None else start
        for part in split_path(path):
            child = self._h.node_get_child(node, part)
            if not child:
                return None
            node = int(child)
        return node

    def _note(self, key: str) -> None:
        if key not in self.changed_keys:
            self.changed_keys.append(key)

    def ensure(self, path: KeyPath, *, start: int | None = None) -> int:
        """The node at ``path`` (below ``start``), creating missing keys."""
        node = self.root if start is None else start
        done: list[str] = []
        for part in split_path(path):
            done.append(part)
            child = self._h.node_get_child(node, part)
            if not child:
                where = "\\".join(done)
                try:
                    child = self._h.node_add_child(node, part)
                except RuntimeError as exc:
                    raise ConversionError(f"{self.label}: cannot add key {where}: {exc}") from exc
                if start is None:
                    self._note(where)
            node = int(child)
        return node

    def name(self, node: int) -> str:
        return str(self._h.node_name(node))

    def children(self, node: int) -> list[tuple[str, int]]:
        return [(str(self._h.node_name(c)), int(c)) for c in self._h.node_children(node)]

    # -- values --------------------------------------------------------------------------------
    def values(self, node: int) -> dict[str, RegValue]:
        out: dict[str, RegValue] = {}
        for v in self._h.node_values(node):
            t, data = self._h.value_value(v)
            out[str(self._h.value_key(v))] = RegValue(int(t), bytes(data))
        return out

    def get(self, node: int, name: str) -> RegValue | None:
        want = name.casefold()
        for key, value in self.values(node).items():
            if key.casefold() == want:
                return value
        return None

    def get_at(self, path: KeyPath, name: str) -> RegValue | None:
        node = self.node(path)
        return None if node is None else self.get(node, name)

    def set(self, node: int, name: str, value: RegValue) -> bool:
        """Set one value; returns False when it already had exactly this type and data."""
        existing = self.get(node, name)
        if existing == value:
            return False
        # Keep the stored spelling of an existing value's name.
        if existing is not None:
            name = next(k for k in self.values(node) if k.casefold() == name.casefold())
        try:
            self._h.node_set_value(node, {"key": name, "t": value.type, "value": value.data})
        except RuntimeError as exc:
            raise ConversionError(f"{self.label}: cannot set value {name!r}: {exc}") from exc
        return True

    def set_values(self, path: KeyPath, values: dict[str, RegValue]) -> int:
        """Create ``path`` (from the root) if needed and set ``values`` there; returns the node."""
        node = self.ensure(path)
        changed = [self.set(node, name, value) for name, value in values.items()]
        if any(changed):
            self._note("\\".join(split_path(path)))
        return node

    def commit(self, out: Path) -> None:
        """Write the edited hive to ``out`` (a new file; the original stays as it was)."""
        try:
            self._h.commit(str(out))
        except RuntimeError as exc:
            raise ConversionError(f"{self.label}: cannot write the edited hive: {exc}") from exc
