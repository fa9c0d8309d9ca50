"""The protection commands' human output and exit codes on a file source (real qemu-img,
qemu-nbd and SQLite): add, sync, points, status, retention, verify (a damaged layer exits 14),
remove."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_protect_crash import MIB, make_disk, p2v, scribble

pytestmark = pytest.mark.integration


def test_protection_commands_print_tables_and_use_their_exit_codes(tmp_path: Path) -> None:
    site, disk = str(tmp_path / "site"), tmp_path / "disk.raw"
    make_disk(disk, 32 * MIB, seed=21)
    add = p2v("protect", "add", "web", str(disk), "--site", site, "--retain", "2", "--rpo", "1h")
    assert "Protected web: point 1 (crash-consistent, seed)" in add.stdout
    for i in range(2):
        scribble(disk, random.Random(22 + i), 10)
        assert "Synced web: point" in p2v("sync", "web", "--site", site).stdout
    table = p2v("points", "web", "--site", site).stdout
    assert all(f" {n} " in table for n in (1, 2, 3)) and "seed" in table and "hash" in table
    status = p2v("status", "--site", site).stdout
    assert "web" in status and "ok" in status and "1h" in status
    assert "1 points merged away, 2 kept" in p2v("retention", "web", "--site", site).stdout
    pts = json.loads(p2v("points", "web", "--site", site, "--json").stdout)["points"]
    assert [p["seq"] for p in pts] == [2, 3]
    assert "point 3: ok" in p2v("verify", "web", "--site", site).stdout
    # damage the newest layer's data: verify finds it and exits 14
    layer = Path(pts[-1]["layers"][0]["path"])
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(layer)], capture_output=True,
                                        text=True, check=True).stdout)  # fmt: skip
    host = next(e["offset"] for e in extents if e["depth"] == 0 and e["data"] and "offset" in e)
    with open(layer, "r+b") as f:  # flip a byte of data this layer holds
        f.seek(host + 100)
        byte = f.read(1)[0]
        f.seek(host + 100)
        f.write(bytes([byte ^ 0xFF]))
    bad = p2v("verify", "web", "--site", site, check=False)
    assert bad.returncode == 14, (bad.stdout, bad.stderr)
    assert "MISMATCH" in bad.stdout and "do not match" in bad.stderr
    # unknown machine and bad usage
    assert p2v("sync", "nope", "--site", site, check=False).returncode == 12
    assert p2v("sync", "--site", site, check=False).returncode == 2
    assert p2v("protect", "add", "x", str(tmp_path / "missing.raw"), "--site", site, check=False).returncode == 3
    removed = p2v("protect", "remove", "web", "--site", site, "--yes")
    assert "Removed web (2 points" in removed.stdout
    assert json.loads(p2v("status", "--site", site, "--json").stdout)["machines"] == []
