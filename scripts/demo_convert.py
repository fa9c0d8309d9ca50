"""Conversion-only demo (`.venv/bin/python scripts/demo_convert.py`): convert the built-in
sample physical server and boot it on KVM/QEMU (`make demo` runs the whole DR cycle instead:
scripts/demo.py).

Runs the real CLI, step by step, printing each command and what it did:
doctor -> inspect -> convert -> vm start (virtio disk + virtio NIC) -> SSH into the
converted server -> vm stop. Rerunnable: it replaces its own earlier output.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import images  # noqa: E402
from tests.guestssh import ssh_run, wait_ssh  # noqa: E402

OUT = ROOT / "demo-out"
NAME = "sample-srv"


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def p2v(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "p2v", *args]
    print("$ p2v " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=capture, check=False)
    if check and proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stderr)
        sys.exit(f"demo: `p2v {args[0]}` failed with exit code {proc.returncode}")
    return proc


def main() -> int:
    t0 = time.monotonic()
    sample = images.ensure("debian-physical-bios")
    facts = images.GUESTS["debian-physical-bios"]
    print(f"Sample 'physical' server: {sample}\n  (Debian 12, fstab on /dev/sda1, initramfs with only "
          "SATA/IDE drivers: it does not boot on virtio as it is)")  # fmt: skip

    banner("1. Check this host")
    p2v("doctor", "--no-launch")

    banner("2. Inspect the source (read-only)")
    p2v("inspect", str(sample))

    banner("3. Convert it for KVM")
    p2v("vm", "stop", NAME, "--force", capture=True, check=False)  # leftover from an earlier run
    t = time.monotonic()
    p2v("convert", str(sample), "--out", str(OUT), "--name", NAME, "--force")
    convert_s = time.monotonic() - t

    banner("4. Boot the converted VM (virtio disk and NIC, throw-away overlay)")
    t = time.monotonic()
    started = p2v("vm", "start", str(OUT / f"{NAME}.vm.json"), "--snapshot", "--memory", "1024",
                  "--wait-login", "900", "--json", capture=True)  # fmt: skip
    info = json.loads(started.stdout)
    print(json.dumps({k: info.get(k) for k in ("name", "pid", "ssh_port", "console_log", "accel")}, indent=2))
    try:
        port = int(info["ssh_port"])
        wait_ssh(port, timeout=300)
        boot_s = time.monotonic() - t
        banner("5. Log in over SSH (the server's own host key and root key)")
        cmd = ("hostname; ip -br link show eth0; ip -br -4 addr show eth0; findmnt -no SOURCE /; "
               "lsmod | grep -E '^virtio_(blk|net)' | cut -d' ' -f1")
        rc, out, err = ssh_run(port, cmd)
        print(out.rstrip())
        if rc != 0 or out.splitlines()[0] != facts["hostname"]:
            sys.exit(f"demo: unexpected answer from the converted server: {out!r} {err!r}")
    finally:
        banner("6. Stop it")
        p2v("vm", "stop", NAME, check=False)

    banner("Done")
    print(f"converted in {convert_s:.0f}s, booted to SSH in {boot_s:.0f}s, demo total {time.monotonic() - t0:.0f}s")
    print(f"output: {OUT}/{NAME}-disk0.qcow2, {NAME}.vm.json, {NAME}.xml")
    print(f"boot it yourself: .venv/bin/p2v vm start {OUT}/{NAME}.vm.json && .venv/bin/p2v vm console {NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
