"""Find the UEFI firmware (OVMF) a UEFI guest boots with.

OVMF comes as two files: the read-only CODE image and a VARS template that each
VM copies, because the guest writes its boot entries into it. The two must come
from the same build and size (2 MiB or 4 MiB flash layout), so they are looked
up as pairs. Secure-boot builds are skipped on purpose: they need SMM and a
secure pflash, which converted guests do not expect.

``P2V_OVMF_CODE`` and ``P2V_OVMF_VARS`` (both together) override the search.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2v.errors import MissingComponent

OVMF_PAIRS: tuple[tuple[str, str], ...] = (
    # Debian / Ubuntu (package "ovmf"); the 4 MiB layout first, as Debian recommends
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    # Fedora / RHEL (package "edk2-ovmf")
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    # Arch (package "edk2-ovmf")
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    # openSUSE (package "qemu-ovmf-x86_64")
    ("/usr/share/qemu/ovmf-x86_64-code.bin", "/usr/share/qemu/ovmf-x86_64-vars.bin"),
)

INSTALL_HINT = "apt-get install ovmf (Fedora: dnf install edk2-ovmf), or set P2V_OVMF_CODE and P2V_OVMF_VARS"


@dataclass(frozen=True)
class OvmfFirmware:
    """A matching pair of OVMF flash images."""

    code: Path
    vars_template: Path

    def to_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "vars_template": str(self.vars_template)}


def _readable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.R_OK)


def find_ovmf(pairs: Sequence[tuple[str, str]] = OVMF_PAIRS) -> OvmfFirmware:
    """Return the first installed OVMF CODE/VARS pair.

    Raises :class:`MissingComponent` naming the places searched when none is found,
    or naming the override variable when ``P2V_OVMF_CODE``/``P2V_OVMF_VARS`` point
    to files that are missing.
    """
    env_code = os.environ.get("P2V_OVMF_CODE")
    env_vars = os.environ.get("P2V_OVMF_VARS")
    if env_code or env_vars:
        if not (env_code and env_vars):
            raise MissingComponent(
                "P2V_OVMF_CODE and P2V_OVMF_VARS must be set together",
                hint="export both, pointing to a CODE image and its matching VARS template",
            )
        fw = OvmfFirmware(Path(env_code), Path(env_vars))
        for var, path in (("P2V_OVMF_CODE", fw.code), ("P2V_OVMF_VARS", fw.vars_template)):
            if not _readable(path):
                raise MissingComponent(f"{var}={path}: not a readable file", hint=INSTALL_HINT)
        return fw
    for code, vars_template in pairs:
        fw = OvmfFirmware(Path(code), Path(vars_template))
        if _readable(fw.code) and _readable(fw.vars_template):
            return fw
    searched = ", ".join(code for code, _ in pairs)
    raise MissingComponent(
        f"UEFI firmware (OVMF) not found; looked for {searched}",
        hint=INSTALL_HINT,
    )
