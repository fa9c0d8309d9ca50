"""Turn the SOURCE argument into an opened :class:`SourceMachine`.

``ssh://user@host[:port]/dev/sdX`` → physical server over SSH; ``*.ova`` → OVA;
``*.ovf`` → unpacked OVF; ``*.vmx`` → VMware VM; any other file → disk image.
A directory holding exactly one .ovf or .vmx is opened as that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2v.errors import SourceNotFound
from p2v.sources.model import SourceMachine


@dataclass
class SourceOptions:
    workdir: Path
    identity: Path | None = None
    known_hosts: Path | None = None
    progress: Callable[[int, int], None] | None = None


def open_source(source: str, opts: SourceOptions) -> SourceMachine:
    if source[:6].lower() == "ssh://":
        from p2v.sources.ssh import open_ssh_source

        return open_ssh_source(
            source, workdir=opts.workdir, identity=opts.identity, known_hosts=opts.known_hosts,
            progress=opts.progress,
        )  # fmt: skip
    path = Path(source)
    if not path.exists():
        raise SourceNotFound(f"{source}: no such file or directory")
    if path.is_dir():
        found = sorted(path.glob("*.ovf")) + sorted(path.glob("*.vmx"))
        if len(found) != 1:
            raise SourceNotFound(
                f"{source}: a directory source must hold exactly one .ovf or .vmx (found {len(found)})"
            )
        path = found[0]
    suffix = path.suffix.lower()
    if suffix == ".ova":
        from p2v.sources.ova import open_ova

        return open_ova(path, workdir=opts.workdir)
    if suffix == ".ovf":
        from p2v.sources.ovf import open_ovf

        return open_ovf(path, workdir=opts.workdir)
    if suffix == ".vmx":
        from p2v.sources.vmx import open_vmx

        return open_vmx(path)
    from p2v.sources.image import open_image

    return open_image(path)
