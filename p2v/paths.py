"""Where p2v keeps caches and runtime state on this host."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """User cache: built test images, accel probe results. ``P2V_CACHE`` overrides."""
    env = os.environ.get("P2V_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "p2v"
    base.mkdir(parents=True, exist_ok=True)
    return base


def state_dir() -> Path:
    """Runtime state: running VMs (pid, QMP socket, console log). ``P2V_STATE`` overrides."""
    env = os.environ.get("P2V_STATE")
    base = (
        Path(env)
        if env
        else Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "p2v"
    )
    base.mkdir(parents=True, exist_ok=True)
    return base


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def drivers_dir() -> Path:
    """The driver catalogs (data). ``P2V_DRIVERS`` overrides."""
    env = os.environ.get("P2V_DRIVERS")
    return Path(env) if env else repo_root() / "drivers"
