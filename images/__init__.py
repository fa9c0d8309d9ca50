"""Recipes that build the test guests, cached by the hash of what went into them.

Public API (used by the tests, the demo and the benchmarks)::

    images.ensure(name) -> Path       # the artifact of recipe `name`, built if missing
    images.test_ssh_key() -> Path     # ed25519 private key for root login in the guests
    images.test_host_key() -> Path    # ed25519 SSH *host* key every Debian guest presents
    images.known_hosts_line(host, port) -> str
    images.GUESTS[name] -> dict       # facts about each guest that tests check
    images.recipes() -> dict[str, Recipe]
    images.boot.boot_guest(disk, fmt=..., ...)   # boot a guest under QEMU for a test (console, SSH)

Command line: ``python -m images build NAME...`` and ``python -m images list``.

Registry (how another module adds recipes)::

    from images import Recipe, register, module_source

    register(Recipe(
        name="my-guest",                 # what `ensure()` and `python -m images build` take
        ext="qcow2",                     # artifact suffix; "" for a directory artifact
        build=build_my_guest,            # build(out: Path, parents: dict[name, Path]) -> None
        sources=(module_source(__name__),),  # files whose text goes into the hash
        params={"size_gib": 4},          # JSON-able parameters, also hashed
        parents=("debian-rootfs",),      # recipes built first; their hashes go into ours
        entry="guest.vmx",               # for directory artifacts: the file ensure() returns
        uses_ssh_keys=True,              # hash the test SSH keys (False for key-less recipes)
    ))

`build` writes the artifact at `out` (a file path, or an existing empty directory
when ``ext == ""``). It runs under the recipe's lock with a temporary `out` in the
cache folder; the result is renamed into place only when `build` returns, so a
failed or interrupted build leaves nothing behind. See :mod:`images.cache`.

Cache: ``p2v.paths.cache_dir() / "images"``, artifacts named ``<name>-<hash12>.<ext>``.
"""

from __future__ import annotations

from pathlib import Path

from images.cache import (
    Recipe,
    cache_root,
    ensure,
    module_source,
    recipe_hash,
    recipes,
    register,
    unregister,
)
from images.guests import GUESTS
from images.keys import known_hosts_line, test_host_key, test_ssh_key

__all__ = [
    "GUESTS",
    "Recipe",
    "artifact_path",
    "cache_root",
    "ensure",
    "known_hosts_line",
    "module_source",
    "recipe_hash",
    "recipes",
    "register",
    "test_host_key",
    "test_ssh_key",
    "unregister",
]


def artifact_path(name: str) -> Path:
    """Where recipe `name`'s artifact is (or would be) cached, without building it."""
    from images.cache import artifact_location

    return artifact_location(name)


# Recipe modules register themselves on import. `windows` belongs to the Windows-guest
# work and is imported when present; add new recipe modules to this tuple.
RECIPE_MODULES = ("rootfs", "debian", "debian_facts", "exports", "windows")


def _load_recipe_modules() -> None:
    import importlib
    import importlib.util

    for mod in RECIPE_MODULES:
        if importlib.util.find_spec(f"{__name__}.{mod}") is not None:
            importlib.import_module(f"{__name__}.{mod}")


_load_recipe_modules()
