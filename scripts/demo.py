"""`make demo`: the whole disaster-recovery cycle on the built-in sample physical server.

Runs the real CLI (`python -m p2v ...`), printing each command, on two "physical" servers
(db and web: QEMU VMs of the physical test guest on IDE + e1000, SSH forwarded to loopback):

 1. production: boot db and web, write an order file on db;
 2. protect both over SSH (seed), write more orders, one incremental `p2v sync` each;
 3. `p2v plan validate` / `p2v plan show` of examples/plans/demo.yaml;
 4. `p2v drill`: the points boot on an isolated network, checks run, everything is removed;
 5. disaster: production is killed, `p2v failover --disaster` boots db then web at DR;
 6. orders written at DR (db's DR VM, over SSH);
 7. production "rebuilt" as blank disks: `p2v fallback --boot-production` copies DR back,
    boots production on its original-class hardware (IDE/e1000) and runs the checks;
 8. production db verified over SSH: orders from before and during the disaster, IDE/e1000;
 9. `p2v report` of the drill, the failover and the fallback (Markdown printed, HTML kept);
10. production powered off, one `p2v sync` each: incremental, no reseed;
11. every VM the demo started is stopped.

State lives in ./demo-out (site: demo-out/site, P2V_STATE: demo-out/state); a rerun stops
what an earlier run left running and starts from an empty demo-out. Exit 0 on success,
non-zero with the failing command's stderr otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
SITE = OUT / "site"
STATE = OUT / "state"
PLAN = ROOT / "examples" / "plans" / "demo.yaml"
os.environ["P2V_SITE"] = str(SITE)
os.environ["P2V_STATE"] = str(STATE)
# the CLI's tables are written to a pipe (the demo tees them): give them the terminal's width
os.environ["COLUMNS"] = str(shutil.get_terminal_size((120, 24)).columns)
sys.path.insert(0, str(ROOT))

import images  # noqa: E402
from p2v.recovery.sources import source_reachable  # noqa: E402
from p2v.vm.spec import DiskSpec, NicSpec, VmSpec  # noqa: E402
from tests.guestssh import ssh_run, wait_ssh  # noqa: E402

# paramiko logs each refused connection while a guest boots (wait_ssh retries): keep it quiet
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False

GUEST = "debian-physical-bios"
MACHINES = ("db", "web")
BEFORE = "/root/orders-before-disaster.txt"
AFTER_SEED = "/root/orders-after-seed.txt"
DURING = "/root/orders-during-disaster.txt"
BOOT_TIMEOUT = 900.0
PHASES: list[tuple[str, float]] = []


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


@contextmanager
def phase(title: str) -> Iterator[None]:
    banner(title)
    t = time.monotonic()
    try:
        yield
    finally:
        PHASES.append((title, time.monotonic() - t))


def _pump(stream: IO[str], sink: IO[str] | None, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()


def p2v(*args: str, show_stdout: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m p2v ARGS`, streaming its stderr (and stdout unless ``show_stdout`` is
    False) while keeping both; raise DemoFailed with the stderr tail on a non-zero exit."""
    print("$ p2v " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "p2v", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout if show_stdout else None, out)),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err))]  # fmt: skip
    for t in pumps:
        t.start()
    rc = proc.wait()
    for t in pumps:
        t.join()
    done = subprocess.CompletedProcess(proc.args, rc, "".join(out), "".join(err))
    if check and rc != 0:
        tail = "".join(err[-40:]).rstrip() or "(no stderr)"
        raise DemoFailed(f"`p2v {' '.join(args[:2])}` failed with exit code {rc}; its stderr:\n{tail}")
    return done


def p2v_json(*args: str) -> Any:
    return json.loads(p2v(*args, "--json", show_stdout=False).stdout)


def guest_sh(port: int, command: str, what: str) -> str:
    """Run ``command`` as root in the guest on 127.0.0.1:port; its stdout (DemoFailed if it fails)."""
    print(f"[ssh root@127.0.0.1:{port}] {command}", flush=True)
    rc, out, err = ssh_run(port, command, timeout=120)
    if rc != 0:
        raise DemoFailed(f"{what}: `{command}` exited {rc} in the guest on port {port}: {err.strip()}")
    return out


def running_vms() -> list[str]:
    proc = p2v("vm", "list", "--json", show_stdout=False, check=False)
    if proc.returncode != 0:
        return []
    return [v["name"] for v in json.loads(proc.stdout)["vms"] if v.get("state") == "running"]


def stop_all(graceful: bool = False) -> None:
    """Stop every VM in the demo's state folder (production, DR and fallback VMs)."""
    for name in running_vms():
        p2v("vm", "stop", name, *(("--timeout", "60") if graceful else ("--force",)), check=False)


def newest_run(kind: str) -> dict[str, Any]:
    runs = p2v_json("run", "list", "--limit", "1")["runs"]
    if not runs or runs[0]["kind"] != kind:
        raise DemoFailed(f"no {kind} run found at {SITE}: {runs}")
    run: dict[str, Any] = p2v_json("run", "show", str(runs[0]["id"]))
    return run


def step_port(run: dict[str, Any], key: str) -> int:
    for s in run["steps"]:
        if s["key"] == key:
            return int(s["detail"]["ports"]["22"])
    raise DemoFailed(f"run {run['id']} has no step {key}")


def production() -> dict[str, int]:
    """Boot db and web as "physical" servers (own qcow2 overlay of the sample, IDE + e1000,
    machine pc); their forwarded SSH ports."""
    sample = images.ensure(GUEST)
    facts = images.GUESTS[GUEST]
    ports: dict[str, int] = {}
    for name in MACHINES:
        disk = OUT / f"prod-{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", facts["format"], "-b", str(sample),
                        str(disk)], check=True, capture_output=True, text=True)  # fmt: skip
        spec = VmSpec(name=f"demo-{name}", cpus=1, memory_mib=768, firmware="bios", machine="pc",
                      disks=[DiskSpec(path=disk.name, format="qcow2", bus="ide")],
                      nics=[NicSpec(mac=facts["mac"], model="e1000")],
                      source=f"production server {name} (sample {GUEST})")  # fmt: skip
        spec.save(OUT / f"prod-{name}.vm.json")
        info = p2v_json("vm", "start", str(OUT / f"prod-{name}.vm.json"))
        ports[name] = int(info["ssh_port"])
        print(f"  {info['name']}: pid {info['pid']}, ssh port {ports[name]}, console {info['console_log']}")
    for name in MACHINES:
        wait_ssh(ports[name], timeout=BOOT_TIMEOUT)
        out = guest_sh(ports[name], "hostname; readlink -f /sys/block/sda; "
                       "grep DRIVER /sys/class/net/eth0/device/uevent", f"production {name}")  # fmt: skip
        print("  " + out.strip().replace("\n", "\n  "))
    return ports


def run_demo() -> None:
    key = images.test_ssh_key()
    known = OUT / "known_hosts"
    ident = ["-i", str(key)]

    with phase("1. Production: two physical servers, db and web (IDE disk, e1000 NIC)"):
        ports = production()
        guest_sh(ports["db"], f"echo 'order 1001: 3 chairs (written at production)' > {BEFORE} && sync",
                 "write orders")  # fmt: skip

    with phase("2. Protect them at the DR site over SSH (seed), then one incremental sync each"):
        for name in MACHINES:
            p2v("trust", f"127.0.0.1:{ports[name]}", "--known-hosts", str(known), "--yes")
            p2v("protect", "add", name, f"ssh://root@127.0.0.1:{ports[name]}/dev/sda", *ident,
                "--known-hosts", str(known))  # fmt: skip
        guest_sh(ports["db"], f"echo 'order 1002: 1 table (after the seed)' > {AFTER_SEED} && sync",
                 "write orders")  # fmt: skip
        guest_sh(ports["web"], "echo 'web cache rebuilt' > /root/web-after-seed.txt && sync", "write on web")
        for name in MACHINES:
            p2v("sync", name, *ident, "--known-hosts", str(known))
        p2v("points", "db")

    with phase("3. The recovery plan"):
        p2v("plan", "validate", str(PLAN))
        p2v("plan", "show", str(PLAN))

    with phase("4. Drill: boot the newest points on an isolated network, run the checks, clean up"):
        p2v("drill", str(PLAN), *ident)
        drill = newest_run("drill")
        print(f"drill run {drill['id']}: {drill['state']}")

    with phase("5. Disaster: production is lost; failover to DR"):
        for name in MACHINES:
            p2v("vm", "stop", f"demo-{name}", "--force")
        for name in MACHINES:
            url = f"ssh://root@127.0.0.1:{ports[name]}/dev/sda"
            alive = source_reachable(url, timeout=5.0)
            print(f"  source_reachable({url}) -> {alive}")
            if alive:
                raise DemoFailed(f"{url} still answers after its VM was stopped")
        p2v("failover", str(PLAN), "--disaster", *ident)
        failover = newest_run("failover")

    with phase("6. Business goes on at DR: orders written on db's DR VM"):
        dr_port = step_port(failover, "boot:db")
        out = guest_sh(dr_port, f"echo 'order 1003: 2 lamps (written at DR)' > {DURING} && sync; ls -l /root",
                       "write orders at DR")  # fmt: skip
        print(out.rstrip())
        p2v("vm", "list")

    with phase("7. Production rebuilt (blank disks): fallback, boot production on IDE/e1000"):
        size = str(images.GUESTS[GUEST]["virtual_size"])
        targets = []
        for name in MACHINES:
            blank = OUT / f"rebuilt-{name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), size], check=True,
                           capture_output=True, text=True)  # fmt: skip
            targets += ["--target", f"{name}={blank}"]
        p2v("fallback", str(PLAN), *targets, "--boot-production", *ident)
        fallback = newest_run("fallback")

    with phase("8. Verify production db: orders from before and during the disaster, original hardware"):
        prod_port = step_port(fallback, "boot-prod:db")
        out = guest_sh(prod_port, f"cat {BEFORE} {AFTER_SEED} {DURING}; hostname; "
                       "grep DRIVER /sys/class/net/eth0/device/uevent; readlink -f /sys/block/sda",
                       "verify production")  # fmt: skip
        print(out.rstrip())
        for want in ("written at production", "after the seed", "written at DR", "DRIVER=e1000", "/ata"):
            if want not in out:
                raise DemoFailed(f"production db after fallback: {want!r} missing from {out!r}")
        print("OK: all orders are on production, which runs on IDE (ata) + e1000 again")

    with phase("9. Reports"):
        for run in (drill, failover, fallback):
            p2v("report", str(run["id"]), "--format", "md")
            p2v("report", str(run["id"]), "--format", "html", "--output", str(OUT / f"report-{run['kind']}.html"))

    with phase("10. Production protected again: the next sync moves only what changed (no reseed)"):
        for name in MACHINES:  # power production off so that its disk image is still while it is read
            p2v("vm", "stop", f"fallback{fallback['id']}-{name}", "--timeout", "60")
        disk_size = int(images.GUESTS[GUEST]["virtual_size"])
        for name in MACHINES:
            point = p2v_json("sync", name)
            print(f"  {name}: point {point['seq']} ({point['mode']}), wrote {point['bytes_written']} B "
                  f"({100 * point['bytes_written'] / disk_size:.2f}% of the {disk_size >> 30} GiB disk)")  # fmt: skip
            if point["mode"] == "seed" or point["bytes_written"] > 0.02 * disk_size:
                raise DemoFailed(f"the sync of {name} after fallback was not incremental: {point}")
        p2v("points", "db")


def main() -> int:
    t0 = time.monotonic()
    images.ensure(GUEST)
    banner("0. Clean up an earlier run")
    if STATE.exists():
        stop_all()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    failure: str | None = None
    try:
        run_demo()
    except (DemoFailed, AssertionError, subprocess.CalledProcessError, OSError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        failure = f"{exc}{detail or ''}"
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        with phase("11. Clean up: stop every VM the demo started"):
            stop_all(graceful=failure is None)
    banner("Done" if failure is None else "FAILED")
    for title, seconds in PHASES:
        print(f"  {seconds:7.1f}s  {title}")
    print(f"  {time.monotonic() - t0:7.1f}s  total")
    print(f"output: {OUT} (site: {SITE}, HTML reports: {OUT}/report-*.html)")
    if failure is not None:
        print(f"demo: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
