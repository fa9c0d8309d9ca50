"""P2V for real: guest 1 runs as a "physical" server (IDE + e1000) with SSH; `p2v trust` records
its host key, `p2v convert ssh://...` copies /dev/sda once over SSH and converts it, and the
result boots on virtio with the server's hostname and NIC MAC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import images
from images.boot import boot_guest
from p2v.vm.spec import VmSpec
from tests.guestssh import ssh_run, wait_ssh
from tests.vm.test_convert_linux import BOOT_TIMEOUT, G1, LOGIN, boot, run_p2v

pytestmark = pytest.mark.vm


def test_physical_server_over_ssh_converts_and_boots(tmp_path: Path) -> None:
    facts = images.GUESTS[G1]
    known = tmp_path / "known_hosts"
    out = tmp_path / "out"
    with boot_guest(images.ensure(G1), fmt="raw", disk_bus="ide", nic_model="e1000", mac=facts["mac"]) as phys:
        phys.wait_for_login(timeout=BOOT_TIMEOUT)
        phys.wait_for_ssh(timeout=120)
        # an untrusted host is refused before anything is copied
        refused = run_p2v("convert", f"ssh://root@127.0.0.1:{phys.ssh_port}/dev/sda", "--out", str(out),
                          "--known-hosts", str(known), "--identity", str(images.test_ssh_key()), check=False)
        assert refused.returncode == 6 and "p2v trust" in refused.stderr and not out.exists()
        trust = run_p2v("trust", f"127.0.0.1:{phys.ssh_port}", "--known-hosts", str(known), "--yes", "--json")
        assert json.loads(trust.stdout)["status"] == "added"
        conv = run_p2v("convert", f"ssh://root@127.0.0.1:{phys.ssh_port}/dev/sda", "--out", str(out),
                       "--name", "p2v1", "--known-hosts", str(known), "--identity", str(images.test_ssh_key()),
                       "--json")  # fmt: skip
    rep = json.loads(conv.stdout)
    assert rep["source_kind"] == "ssh"
    # copied while running: the copy's filesystems are checked before conversion
    assert rep["steps"][0]["name"] == "filesystem-check" and "/dev/sda1 (ext4)" in rep["steps"][0]["detail"]
    assert rep["guest"]["hostname"] == facts["hostname"]
    spec = VmSpec.load(out / "p2v1.vm.json")
    # facts collected over SSH: the NIC with its MAC and name, the CPU count
    assert [(n.mac, n.guest_name) for n in spec.nics] == [(facts["mac"], "eth0")]
    with boot(out, "p2v1") as vm:
        vm.wait_for_console(LOGIN, timeout=BOOT_TIMEOUT)
        assert vm.ssh_port is not None
        wait_ssh(vm.ssh_port, console=vm.console_text)
        _, text, _ = ssh_run(vm.ssh_port, f"hostname; cat /sys/class/net/eth0/address; cat {facts['marker'][0]}")
        assert text.splitlines() == [facts["hostname"], facts["mac"], facts["marker"][1]]
        _, errors, _ = ssh_run(vm.ssh_port, "dmesg | grep -c 'EXT4-fs error' || true")
        assert errors.strip() == "0", "the converted copy must have a consistent filesystem"
