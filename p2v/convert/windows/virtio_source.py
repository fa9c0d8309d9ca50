"""Read a virtio-win driver source: a directory tree or an ISO image.

ISOs are read on the host with pycdlib (no loop mount, no root needed), using the
Rock Ridge names when present, else Joliet, else plain ISO 9660 names (with the
``;1`` version suffix removed). Look-ups are case-insensitive, as on Windows media.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from p2v.errors import InvalidInput, SourceNotFound

# A directory source may not make us read more than this (guards against pointing at /).
MAX_SOURCE_FILES = 200_000


@dataclass(frozen=True)
class SourceFile:
    """A file of the source: its path as stored (real case) and size."""

    path: str
    size: int

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


class VirtioWinSource:
    """An opened virtio-win directory or ISO. Use as a context manager."""

    def __init__(self, location: Path | str) -> None:
        self.location = Path(location)
        self.kind: str
        self._iso: Any = None
        self._rr = False
        self._joliet = False
        self._files: dict[str, SourceFile] = {}
        if not self.location.exists():
            raise SourceNotFound(f"{self.location}: virtio-win source does not exist")
        if self.location.is_dir():
            self.kind = "directory"
            self._scan_directory()
        elif self.location.is_file():
            self.kind = "iso"
            self._open_iso()
        else:
            raise InvalidInput(f"{self.location}: virtio-win source is neither a directory nor an ISO file")

    def __enter__(self) -> VirtioWinSource:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __str__(self) -> str:
        return f"{self.location} ({self.kind})"

    def close(self) -> None:
        if self._iso is not None:
            self._iso.close()
            self._iso = None

    # -- listing -------------------------------------------------------------------------------

    def _add(self, rel: str, size: int) -> None:
        if len(self._files) >= MAX_SOURCE_FILES:
            raise InvalidInput(
                f"{self.location}: more than {MAX_SOURCE_FILES} files; is this really a virtio-win source?"
            )
        self._files[rel.casefold()] = SourceFile(rel, size)

    def _scan_directory(self) -> None:
        root = self.location
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if full.is_symlink() or not full.is_file():
                    continue
                self._add(full.relative_to(root).as_posix(), full.stat().st_size)

    def _open_iso(self) -> None:
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException

        iso = pycdlib.PyCdlib()
        try:
            iso.open(str(self.location))
        except (PyCdlibException, OSError, ValueError) as exc:
            raise InvalidInput(f"{self.location}: not a readable ISO 9660 image: {exc}") from exc
        self._iso = iso
        self._rr = bool(iso.has_rock_ridge())
        self._joliet = bool(iso.has_joliet())
        try:
            if self._rr:
                walker = iso.walk(rr_path="/")
            elif self._joliet:
                walker = iso.walk(joliet_path="/")
            else:
                walker = iso.walk(iso_path="/")
            for dirname, _dirs, files in walker:
                for name in files:
                    full = f"{dirname.rstrip('/')}/{name}"
                    rel = self._clean(full.lstrip("/"))
                    self._add(rel, self._iso_size(full))
        except PyCdlibException as exc:
            self.close()
            raise InvalidInput(f"{self.location}: cannot list the ISO: {exc}") from exc

    def _iso_kw(self, full: str) -> dict[str, str]:
        if self._rr:
            return {"rr_path": full}
        if self._joliet:
            return {"joliet_path": full}
        return {"iso_path": full}

    def _iso_size(self, full: str) -> int:
        rec = self._iso.get_record(**self._iso_kw(full))
        return int(rec.get_data_length())

    def _clean(self, rel: str) -> str:
        if self._rr or self._joliet:
            return rel
        # plain ISO 9660: "VIOSTOR.SYS;1" -> "VIOSTOR.SYS"
        return "/".join(part.split(";", 1)[0].rstrip(".") for part in rel.split("/"))

    def _iso_stored_path(self, rel: str) -> str:
        if self._rr or self._joliet:
            return "/" + rel
        return "/" + "/".join(f"{p};1" if i == rel.count("/") else p for i, p in enumerate(rel.split("/")))

    # -- queries -------------------------------------------------------------------------------

    def files(self) -> list[SourceFile]:
        return sorted(self._files.values(), key=lambda f: f.path)

    def lookup(self, rel: str) -> SourceFile | None:
        return self._files.get(rel.strip("/").casefold())

    def files_in(self, folder: str) -> list[SourceFile]:
        """Files directly inside ``folder`` (case-insensitive), sorted by path."""
        prefix = folder.strip("/").casefold() + "/"
        out = [f for key, f in self._files.items() if key.startswith(prefix) and "/" not in key[len(prefix) :]]
        return sorted(out, key=lambda f: f.path)

    def read(self, rel: str) -> bytes:
        entry = self.lookup(rel)
        if entry is None:
            raise SourceNotFound(f"{self.location}: has no file {rel}")
        if self.kind == "directory":
            try:
                return (self.location / entry.path).read_bytes()
            except OSError as exc:
                raise SourceNotFound(f"{self.location}: cannot read {entry.path}: {exc}") from exc
        from pycdlib.pycdlibexception import PyCdlibException

        buf = io.BytesIO()
        try:
            self._iso.get_file_from_iso_fp(buf, **self._iso_kw(self._iso_stored_path(entry.path)))
        except PyCdlibException as exc:
            raise InvalidInput(f"{self.location}: cannot read {entry.path} from the ISO: {exc}") from exc
        return buf.getvalue()
