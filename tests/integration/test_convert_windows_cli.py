"""`p2v convert` on a Windows guest through the CLI: drivers injected, spec records RTC and virtio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import images
from p2v.vm.spec import VmSpec

pytestmark = pytest.mark.integration


def test_windows_2019_converts_from_an_iso(tmp_path: Path) -> None:
    iso = images.ensure("virtio-win-iso")
    proc = subprocess.run(
        [sys.executable, "-m", "p2v", "convert", str(images.ensure("windows-2019")), "--out", str(tmp_path),
         "--name", "win", "--virtio-win", str(iso), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["guest"]["type"] == "windows" and "2019" in rep["guest"]["product"]
    assert [s["name"] for s in rep["steps"] if s["changed"]] == ["windows-virtio"]
    spec = VmSpec.load(tmp_path / "win.vm.json")
    assert spec.rtc == "localtime"
    assert [d.bus for d in spec.disks] == ["virtio"]
    xml = (tmp_path / "win.xml").read_text()
    assert "localtime" in xml
