"""Windows conversion at registry level: virtio-win drivers injected offline.

Public API::

    convert_windows(g, root, inspection, virtio_win, *, first_boot_retries=3) -> WindowsConversion
    windows_facts(g, root, inspection) -> dict
    load_catalog(path=None) -> WindowsCatalog      # drivers/windows.yaml, validated
    windows_catalog() -> WindowsCatalog            # the default one, cached
    VirtioWinSource(path)                          # a virtio-win ISO or directory

See :mod:`p2v.convert.windows.convert` for the order of work and its guarantees,
:mod:`.bootdriver` for the registry entries and :mod:`.firstboot` for the first-boot
mechanism.
"""

from __future__ import annotations

from p2v.convert.windows.catalog import WindowsCatalog, load_catalog, windows_catalog
from p2v.convert.windows.convert import CopiedFile, WindowsConversion, convert_windows
from p2v.convert.windows.facts import windows_facts
from p2v.convert.windows.virtio_source import VirtioWinSource

__all__ = [
    "CopiedFile",
    "VirtioWinSource",
    "WindowsCatalog",
    "WindowsConversion",
    "convert_windows",
    "load_catalog",
    "windows_catalog",
    "windows_facts",
]
