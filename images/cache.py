"""The recipe registry and the content-addressed image cache.

An artifact is named ``<name>-<hash12>[.<ext>]`` in ``cache_dir()/images``. The hash is
sha256 over a JSON document holding the recipe's name, extension, entry, parameters,
the sha256 of each of its `sources` files (the modules that build it), the full hashes
of its parents and, unless ``uses_ssh_keys=False``, the test SSH public keys. Generic
plumbing (this module, :mod:`images.host`) is not hashed: changing it does not change
what a recipe builds.

Building: an exclusive ``fcntl`` lock per recipe (``.locks/<name>.lock``) so parallel
processes build once; partial output from a crashed earlier build is removed under that
lock; the build writes ``.<final-name>.partial-<pid>`` in the same folder, which is
renamed to the final name only when the build returned; then other-hash artifacts of
the same recipe are deleted. On any failure the partial output is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.errors import P2VError, UsageError
from p2v.paths import cache_dir

log = logging.getLogger("images")

BuildFn = Callable[[Path, Mapping[str, Path]], object]  # the return value is ignored


class ImageBuildError(P2VError):
    """A test-image recipe failed to build."""

    exit_code = 1


class UnknownRecipe(UsageError):
    """No image recipe has this name."""


@dataclass(frozen=True)
class Recipe:
    """How to build one cached artifact. See the package docstring for the fields."""

    name: str
    ext: str
    build: BuildFn
    sources: tuple[Path, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    entry: str | None = None
    uses_ssh_keys: bool = True
    description: str = ""

    @property
    def is_directory(self) -> bool:
        return self.ext == ""


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add `recipe` to the registry (re-registering the same build function is allowed)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", recipe.name):
        raise ValueError(f"recipe name {recipe.name!r}: use letters, digits and . _ + - only")
    old = _REGISTRY.get(recipe.name)
    if old is not None and old.build is not recipe.build:
        raise ValueError(f"recipe {recipe.name!r} is already registered by {old.build.__module__}")
    names = [p.name for p in recipe.sources]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe {recipe.name!r}: source files must have distinct names: {names}")
    if recipe.is_directory and not recipe.entry:
        raise ValueError(f"recipe {recipe.name!r}: a directory artifact needs an entry file")
    _REGISTRY[recipe.name] = recipe
    return recipe


def unregister(name: str) -> None:
    """Remove a recipe from the registry (for tests that register throw-away recipes)."""
    _REGISTRY.pop(name, None)


def recipes() -> dict[str, Recipe]:
    """All registered recipes by name (a copy)."""
    return dict(_REGISTRY)


def get_recipe(name: str) -> Recipe:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownRecipe(f"image recipe {name!r} does not exist (known: {known})") from None


def module_source(module_name: str) -> Path:
    """The source file of an imported module, for a recipe's `sources`."""
    mod = sys.modules[module_name]
    if not mod.__file__:
        raise ValueError(f"module {module_name} has no source file")
    return Path(mod.__file__)


def cache_root() -> Path:
    root = cache_dir() / "images"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_hash(name: str) -> str:
    """Full sha256 hex over everything the artifact of `name` depends on."""
    recipe = get_recipe(name)
    doc: dict[str, Any] = {
        "name": recipe.name,
        "ext": recipe.ext,
        "entry": recipe.entry,
        "params": recipe.params,
        "sources": {p.name: _file_digest(p) for p in recipe.sources},
        "parents": {p: recipe_hash(p) for p in recipe.parents},
    }
    if recipe.uses_ssh_keys:
        from images.keys import test_host_key, test_ssh_key

        doc["ssh_keys"] = [
            Path(f"{test_ssh_key()}.pub").read_text().split()[1],
            Path(f"{test_host_key()}.pub").read_text().split()[1],
        ]
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _final_name(recipe: Recipe, digest: str) -> str:
    suffix = f".{recipe.ext}" if recipe.ext else ""
    return f"{recipe.name}-{digest[:12]}{suffix}"


def _stored_path(recipe: Recipe) -> Path:
    return cache_root() / _final_name(recipe, recipe_hash(recipe.name))


def _entry_of(recipe: Recipe, stored: Path) -> Path:
    return stored / recipe.entry if recipe.entry else stored


def artifact_location(name: str) -> Path:
    """The path `ensure(name)` returns, whether or not it is built yet."""
    recipe = get_recipe(name)
    return _entry_of(recipe, _stored_path(recipe))


def is_built(name: str) -> bool:
    return _stored_path(get_recipe(name)).exists()


@contextmanager
def _recipe_lock(name: str) -> Iterator[None]:
    locks = cache_root() / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "a+") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: waiting for another process building it", name)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("%s: lock acquired after %.0fs", name, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, refusing to descend into mount points."""
    from images.host import remove_tree

    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _own_artifacts(recipe: Recipe) -> Iterator[Path]:
    suffix = re.escape(f".{recipe.ext}") if recipe.ext else ""
    final = re.compile(rf"{re.escape(recipe.name)}-[0-9a-f]{{12}}{suffix}")
    for p in cache_root().iterdir():
        if final.fullmatch(p.name):
            yield p


def _own_partials(recipe: Recipe) -> Iterator[Path]:
    suffix = re.escape(f".{recipe.ext}") if recipe.ext else ""
    partial = re.compile(rf"\.{re.escape(recipe.name)}-[0-9a-f]{{12}}{suffix}\.partial-\d+")
    for p in cache_root().iterdir():
        if partial.fullmatch(p.name):
            yield p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_scratch() -> None:
    """Remove scratch folders (``.work/<label>-<pid>-*``) left by processes that died."""
    work = cache_root() / ".work"
    if not work.is_dir():
        return
    for p in work.iterdir():
        m = re.fullmatch(r"[A-Za-z0-9_.+-]+?-(\d+)-\w+", p.name)
        if m and not _pid_alive(int(m.group(1))):
            log.info("removing scratch folder of a dead build: %s", p.name)
            remove_path(p)


def ensure(name: str) -> Path:
    """Return recipe `name`'s artifact (the entry file for directories), building it if missing.

    Raises :class:`UnknownRecipe` for a name nobody registered and :class:`ImageBuildError`
    (or the P2VError the build raised) when building fails; nothing is left behind then.
    """
    recipe = get_recipe(name)
    stored = _stored_path(recipe)
    if stored.exists():
        return _entry_of(recipe, stored)
    parents = {p: ensure(p) for p in recipe.parents}
    with _recipe_lock(name):
        if stored.exists():
            return _entry_of(recipe, stored)
        _sweep_dead_scratch()
        for stale in _own_partials(recipe):
            log.info("%s: removing partial output of an interrupted build: %s", name, stale.name)
            remove_path(stale)
        partial = stored.with_name(f".{stored.name}.partial-{os.getpid()}")
        t0 = time.monotonic()
        log.info("%s: building %s", name, stored.name)
        try:
            if recipe.is_directory:
                partial.mkdir()
            recipe.build(partial, parents)
            _check_output(recipe, partial)
            os.rename(partial, stored)
        except BaseException as exc:
            remove_path(partial)
            if isinstance(exc, P2VError) or not isinstance(exc, Exception):
                raise
            raise ImageBuildError(f"image recipe {name!r} failed to build: {exc}") from exc
        log.info("%s: built in %.1fs -> %s", name, time.monotonic() - t0, stored)
        for old in _own_artifacts(recipe):
            if old != stored:
                log.info("%s: removing stale artifact %s", name, old.name)
                remove_path(old)
    return _entry_of(recipe, stored)


def _check_output(recipe: Recipe, partial: Path) -> None:
    if recipe.is_directory:
        assert recipe.entry is not None
        if not (partial / recipe.entry).is_file():
            raise ImageBuildError(f"image recipe {recipe.name!r} did not write its entry {recipe.entry}")
    elif not partial.is_file():
        raise ImageBuildError(f"image recipe {recipe.name!r} did not write its output file")
    files = [p for p in partial.rglob("*") if p.is_file()] if recipe.is_directory else [partial]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
