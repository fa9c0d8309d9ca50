"""Choose, in a virtio-win source, the folder of each driver for one Windows version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from p2v.convert.windows.catalog import DriverSpec, WindowsCatalog, WindowsVersion
from p2v.convert.windows.virtio_source import SourceFile, VirtioWinSource
from p2v.errors import DriversNotFound


@dataclass(frozen=True)
class ResolvedDriver:
    key: str  # catalog key = driver folder name, e.g. "viostor"
    spec: DriverSpec
    version_folder: str  # e.g. "2k19"
    source_dir: str  # folder in the source, e.g. "viostor/2k19/amd64"
    files: tuple[SourceFile, ...]

    def file(self, name: str) -> SourceFile | None:
        for f in self.files:
            if f.name.casefold() == name.casefold():
                return f
        return None


@dataclass
class DriverSelection:
    version: WindowsVersion
    arch_folder: str
    drivers: dict[str, ResolvedDriver] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    searched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def version_folder(self) -> str:
        """The folder the required (boot) driver came from: the one "chosen" for this guest."""
        for d in self.drivers.values():
            if d.spec.required:
                return d.version_folder
        return self.version.folders[0]


@dataclass(frozen=True)
class _Candidate:
    path: str
    version_folder: str
    per_driver: bool  # the layout has one folder per driver (vs. the flattened layout)


def _candidates(catalog: WindowsCatalog, key: str, version: WindowsVersion, arch_folder: str) -> list[_Candidate]:
    out: list[_Candidate] = []
    for folder in version.folders:
        for layout in catalog.layouts:
            path = layout.format(driver=key, version=folder, arch=arch_folder)
            if all(c.path != path for c in out):
                out.append(_Candidate(path, folder, "{driver}" in layout))
    return out


def _pick_files(
    catalog: WindowsCatalog, spec: DriverSpec, files: list[SourceFile], per_driver_folder: bool
) -> tuple[SourceFile, ...]:
    skip = {e.casefold() for e in catalog.skip_extensions}
    own = {n.casefold() for n in spec.own_files()}
    chosen = []
    for f in files:
        if PurePosixPath(f.name).suffix.casefold() in skip:
            continue
        # A driver's own folder holds only that driver; a flattened folder holds all of them.
        if per_driver_folder or f.name.casefold() in own:
            chosen.append(f)
    return tuple(chosen)


def resolve_drivers(
    catalog: WindowsCatalog,
    version: WindowsVersion,
    arch: str,
    source: VirtioWinSource,
    *,
    guest: str,
) -> DriverSelection:
    """Find every catalog driver for ``version``/``arch`` in ``source``.

    Raises :class:`DriversNotFound` (naming ``guest`` and the source) when a required
    driver, or its .sys, is not there. Optional drivers that are absent are listed in
    ``missing``.
    """
    arch_folder = catalog.arch_folders.get(arch)
    if arch_folder is None:
        raise DriversNotFound(f"no virtio-win drivers for {guest} in {source}: architecture {arch} is unknown")
    selection = DriverSelection(version=version, arch_folder=arch_folder)
    for key, spec in catalog.drivers.items():
        candidates = _candidates(catalog, key, version, arch_folder)
        searched = [c.path for c in candidates]
        selection.searched[key] = searched
        for cand in candidates:
            files = source.files_in(cand.path)
            names = {f.name.casefold() for f in files}
            if spec.inf.casefold() not in names:
                continue
            if spec.sys is not None and spec.sys.casefold() not in names:
                continue
            selection.drivers[key] = ResolvedDriver(
                key=key,
                spec=spec,
                version_folder=cand.version_folder,
                source_dir=files[0].path.rsplit("/", 1)[0],
                files=_pick_files(catalog, spec, files, cand.per_driver),
            )
            break
        else:
            if spec.required:
                raise DriversNotFound(
                    f"no virtio-win drivers for {guest} in {source}: {key} ({spec.inf}, {spec.sys}) "
                    f"is in none of {', '.join(searched)}",
                    hint="use a virtio-win ISO or directory that supports this Windows version",
                )
            selection.missing.append(key)
    return selection
