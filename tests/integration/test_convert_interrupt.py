"""Ctrl-C during a conversion: exit 130, nothing left in the output directory, no process left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import images

pytestmark = pytest.mark.integration


def _procs_mentioning(text: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(cmd)
    return out


def _default_sigint() -> None:
    """Undo an inherited SIG_IGN: a shell starts background jobs (``make test &``) with SIGINT
    ignored, Python then keeps it ignored, and the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_conversion_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2v", "convert", str(images.ensure("debian-physical-bios")), "--out", str(out),
         "--name", "intr"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.glob(".p2v-staging-intr-*/edit-0.qcow2")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "conversion never started staging"
        time.sleep(0.2)
    time.sleep(4)  # the appliance is launching and the copy is running
    assert _procs_mentioning(str(out)), "expected qemu-img/appliance working on the staging folder"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err.lower()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    time.sleep(1)
    assert _procs_mentioning(str(out)) == [], "a qemu-img or appliance process outlived the conversion"
