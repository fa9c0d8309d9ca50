"""Protection end to end on the "physical" test guest (IDE + e1000, SSH forwarded to loopback):
`p2v protect add` seeds it over SSH, a file written in the guest after the seed appears in the
next recovery point (read back with libguestfs) while the first point keeps the old content,
and `p2v verify` passes on both points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import images
from images.boot import boot_guest
from p2v.disks.guestfs import open_guestfs
from tests.vm.test_convert_linux import BOOT_TIMEOUT, G1, run_p2v

pytestmark = pytest.mark.vm

NEW_FILE = "/root/written-after-seed.txt"


def read_points(images: list[str], paths: list[str]) -> list[dict[str, str | None]]:
    """Mount each recovery point read-only with libguestfs (one appliance) and read files
    (None when absent)."""
    out = []
    with open_guestfs([(img, "qcow2") for img in images], readonly=True) as g:
        roots = sorted(d for d, fs in g.list_filesystems().items() if fs == "ext4")
        assert len(roots) == len(images), roots
        for root in roots:
            g.mount_ro(root, "/")
            out.append({p: (g.cat(p) if g.is_file(p) else None) for p in paths})
            g.umount_all()
    return out


def test_physical_server_seed_then_sync_keeps_both_points(tmp_path: Path) -> None:
    facts = images.GUESTS[G1]
    marker, old_text = facts["marker"]
    site, known = tmp_path / "site", tmp_path / "known_hosts"
    key = str(images.test_ssh_key())
    with boot_guest(images.ensure(G1), fmt="raw", disk_bus="ide", nic_model="e1000", mac=facts["mac"]) as phys:
        phys.wait_for_login(timeout=BOOT_TIMEOUT)
        phys.wait_for_ssh(timeout=120)
        url = f"ssh://root@127.0.0.1:{phys.ssh_port}/dev/sda"
        run_p2v("trust", f"127.0.0.1:{phys.ssh_port}", "--known-hosts", str(known), "--yes")
        common = ["--site", str(site), "--known-hosts", str(known), "--identity", key, "--json"]
        add = json.loads(run_p2v("protect", "add", "srv", url, *common).stdout)
        seed = add["point"]
        assert seed["seq"] == 1 and seed["mode"] == "seed"
        res = phys.ssh(f"echo 'written at {facts['hostname']} after the seed' > {NEW_FILE}; "
                       f"echo changed > {marker}; sync; fsfreeze -f / && fsfreeze -u /")  # fmt: skip
        assert res.rc == 0, res.stderr
        point = json.loads(run_p2v("sync", "srv", *common).stdout)
    assert point["seq"] == 2 and point["mode"] == "hash"
    # an incremental point moves a small fraction of what the seed moved
    assert point["bytes_sent"] < seed["bytes_sent"] / 10, (seed, point)
    pts = json.loads(run_p2v("points", "srv", "--site", str(site), "--json").stdout)["points"]
    assert [p["seq"] for p in pts] == [1, 2]
    first, second = read_points([p["layers"][0]["path"] for p in pts], [NEW_FILE, marker])
    assert first == {NEW_FILE: None, marker: old_text + "\n"} or first == {NEW_FILE: None, marker: old_text}
    assert second[NEW_FILE] == f"written at {facts['hostname']} after the seed\n"
    assert second[marker] == "changed\n"
    rep = json.loads(run_p2v("verify", "srv", "--all", "--site", str(site), "--json").stdout)
    assert [(r["seq"], r["ok"]) for r in rep["points"]] == [(1, True), (2, True)]
