"""A fake virtio-win driver source, generated from a list of paths.

Real virtio-win ISOs are large and not redistributable here, and the
conversion only needs their *layout*: which file sits in which folder. Like
virt-v2v's test suite, this module describes the layout as a list of relative
paths and writes each file with small dummy content that is distinct per path
(the path itself is in it), so a test can tell exactly which source file was
copied into a guest.

Layout, as real ISOs (0.1.2xx) have it:

* per driver, per Windows version, per architecture:
  ``viostor/2k19/amd64/viostor.sys`` (``.inf``, ``.cat``, ``.pdb``), the same
  for ``vioscsi``, ``NetKVM``, ``Balloon``, ``vioserial``, ``viorng``,
  ``qemupciserial``, ``pvpanic``, ``qxldod``;
* the flattened layout newer ISOs also carry: ``amd64/2k19/viostor.sys`` with
  every driver of that version in one folder (no ``.pdb``);
* a few top-level files (guest agent MSI, installer, licence) that a converter
  must ignore.

Version folders: 2k16, 2k19, 2k22, w10, w11; ``x86`` only where real ISOs
have it (w10). There is deliberately no 2k8 / 2k12 folder, so an older guest
finds no drivers.

Recipes (registered when :mod:`images` loads :mod:`images.windows`):
``virtio-win-dir`` (a directory; ``ensure`` returns its licence file, use
``.parent``) and ``virtio-win-iso`` (ISO 9660 with Joliet and Rock Ridge).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path

from images.host import run

ISO_VOLUME_ID = "virtio-win-0.1.999"
LICENCE_FILE = "virtio-win_license.txt"

# Version folders per architecture folder, as in real ISOs.
VERSION_FOLDERS: dict[str, tuple[str, ...]] = {
    "amd64": ("2k16", "2k19", "2k22", "w10", "w11"),
    "x86": ("w10",),
}

# Driver folder -> files in it (per version/arch), by the names real ISOs use.
DRIVER_FILES: dict[str, tuple[str, ...]] = {
    "viostor": ("viostor.sys", "viostor.inf", "viostor.cat", "viostor.pdb"),
    "vioscsi": ("vioscsi.sys", "vioscsi.inf", "vioscsi.cat", "vioscsi.pdb"),
    "NetKVM": ("netkvm.sys", "netkvm.inf", "netkvm.cat", "netkvmco.exe", "netkvm.pdb"),
    "Balloon": ("balloon.sys", "balloon.inf", "balloon.cat", "blnsvr.exe", "balloon.pdb"),
    "vioserial": ("vioser.sys", "vioser.inf", "vioser.cat", "vioser.pdb"),
    "viorng": ("viorng.sys", "viorng.inf", "viorng.cat", "viorngum.dll", "viorng.pdb"),
    "qemupciserial": ("qemupciserial.inf", "qemupciserial.cat"),
    "pvpanic": ("pvpanic.sys", "pvpanic.inf", "pvpanic.cat", "pvpanic.pdb"),
    "qxldod": ("qxldod.sys", "qxldod.inf", "qxldod.cat", "qxldod.pdb"),
}

TOP_LEVEL_FILES = (
    LICENCE_FILE,
    "virtio-win-guest-tools.exe",
    "virtio-win-gt-x64.msi",
    "guest-agent/qemu-ga-x86_64.msi",
    "guest-agent/qemu-ga-i386.msi",
    "data/info.json",
)


def virtio_win_paths() -> list[str]:
    """Every file path of the fake source, relative to its root, sorted."""
    paths: set[str] = set(TOP_LEVEL_FILES)
    for arch, versions in VERSION_FOLDERS.items():
        for version in versions:
            for driver, files in DRIVER_FILES.items():
                for name in files:
                    paths.add(f"{driver}/{version}/{arch}/{name}")
                    if not name.endswith(".pdb"):
                        paths.add(f"{arch}/{version}/{name}")
    return sorted(paths)


def fake_content(rel_path: str) -> bytes:
    """Dummy bytes for one file: its path plus a digest of it, unique per path."""
    digest = hashlib.sha256(rel_path.encode()).hexdigest()
    text = f"fake virtio-win file\npath: {rel_path}\nsha256(path): {digest}\n"
    if rel_path.endswith(".inf"):
        text = f'; {text.replace(chr(10), chr(10) + "; ")}\n[Version]\nSignature="$WINDOWS NT$"\n'
    return text.encode()


def build_tree(out_dir: Path) -> Path:
    """Write the fake source as a directory tree under ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in virtio_win_paths():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fake_content(rel))
    return out_dir


def build_iso(out_iso: Path, *, tree: Path | None = None) -> Path:
    """Write the fake source as an ISO 9660 image with Joliet and Rock Ridge names."""
    from images.host import scratch_dir

    if tree is not None:
        _mkisofs(tree, out_iso)
        return out_iso
    with scratch_dir("virtio-win") as work:
        _mkisofs(build_tree(work / "root"), out_iso)
    return out_iso


def _mkisofs(tree: Path, out_iso: Path) -> None:
    tool = shutil.which("xorriso")
    if tool is not None:
        argv = [tool, "-as", "mkisofs"]
    else:
        argv = ["genisoimage"]
    run([*argv, "-quiet", "-J", "-joliet-long", "-R", "-V", ISO_VOLUME_ID, "-o", str(out_iso), str(tree)])


def _build_dir_recipe(out: Path, parents: Mapping[str, Path]) -> None:
    build_tree(out)


def _build_iso_recipe(out: Path, parents: Mapping[str, Path]) -> None:
    build_iso(out)


def register_recipes() -> None:
    from images import Recipe, module_source, register

    source = (module_source(__name__),)
    register(
        Recipe(
            name="virtio-win-dir",
            ext="",
            build=_build_dir_recipe,
            sources=source,
            entry=LICENCE_FILE,
            uses_ssh_keys=False,
            description="fake virtio-win driver tree (directory); ensure() returns its licence file",
        )
    )
    register(
        Recipe(
            name="virtio-win-iso",
            ext="iso",
            build=_build_iso_recipe,
            sources=source,
            uses_ssh_keys=False,
            description="fake virtio-win driver tree as an ISO 9660 + Joliet + Rock Ridge image",
        )
    )
