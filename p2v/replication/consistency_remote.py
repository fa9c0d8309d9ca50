"""The remote half of consistent views: small POSIX shell scripts run on the source over SSH.

Everything p2v creates on a source for one view carries the run's id (8 hex digits):

- ``/run/p2v-<id>.state``: the owner line (the ``sshd`` process serving our connection and
  its start time), the loop devices we attached, the filesystems we froze;
- ``/run/p2v-meta-<id>.img``: the LVM metadata captured before the snapshots (tmpfs);
- LVs ``p2v-snap-<id>-<n>`` and device-mapper views ``p2v-view-<id>-<n>``.

A run whose owner process is gone (connection dropped, p2v killed, host rebooted: /run is
empty then and the snapshot LVs have no state file) is dead, and :func:`begin_run` removes
its leftovers before a new run starts; live runs of other p2v processes are left alone.

Scripts print ``key value...`` lines on stdout and a one-line reason on stderr when they
fail; they never write to a filesystem that may be frozen (only /run, a tmpfs).
"""

from __future__ import annotations

import logging
import re
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2v.errors import RemoteError, SourceNotFound
from p2v.replication.consistency_layout import (
    CAPTURE_HEADER,
    PVS_FIELDS,
    DiskLayout,
    Mount,
    PvSegment,
    SnapshotPlan,
    SnapshotUnavailable,
    parse_lsblk,
    parse_mountinfo,
    parse_pvs,
)
from p2v.sources.ssh_session import RemoteProcess, SshSession

log = logging.getLogger(__name__)

LVM_TIMEOUT = 180.0  # lvcreate/lvremove wait for udev; slow hosts take a while
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH; export PATH"
LVM_CONFIG = "backup { backup = 0 archive = 0 }"  # no archive file per temporary snapshot
RUN_ID_RE = re.compile(r"[0-9a-f]{8}")
_VIEW_RE = re.compile(r"p2v-view-([0-9a-f]{8})(?:-\d+)?")
_SNAP_RE = re.compile(r"p2v-snap-([0-9a-f]{8})-\d+")
_META_RE = re.compile(r"/run/p2v-meta-([0-9a-f]{8})\.img")

SNAPSHOT_TOOLS = ("lvcreate", "lvremove", "lvs", "vgs", "dmsetup", "losetup", "dd", "blockdev")
FREEZE_TOOLS = ("fsfreeze", "timeout")


def new_run_id() -> str:
    return secrets.token_hex(4)


def snapshot_name(run_id: str, index: int) -> str:
    return f"p2v-snap-{run_id}-{index}"


def view_name(run_id: str, index: int) -> str:
    return f"p2v-view-{run_id}-{index}"


def _sh(session: SshSession, script: str, *args: str, timeout: float = 60.0, input: bytes | None = None) -> str:
    """Run ``script`` with ``sh -c``; RemoteError naming what failed and its stderr."""
    res = session.run(["sh", "-c", f"{PATH}\n{script}", "p2v", *args], timeout=timeout, check=False, input=input)
    if res.rc != 0:
        first = script.strip().splitlines()[0][:80] if script.strip() else "sh"
        raise RemoteError(
            f"{session.label}: {_what(script) or first} failed (exit status {res.rc}): "
            f"{res.stderr_text[-2000:] or '(no stderr)'}"
        )
    return res.text


def _what(script: str) -> str:
    m = re.match(r"\s*#\s*(.+)", script)
    return m.group(1).strip() if m else ""


# -- probing ----------------------------------------------------------------------------

_PROBE = r"""# probing the disk
dev=$1
real=$(readlink -f -- "$dev") || real=$dev
if [ ! -b "$real" ]; then echo "$dev is not a block device on this host" >&2; exit 3; fi
echo "@lsblk"
lsblk -bPp -o NAME,KNAME,TYPE,SIZE,MAJ:MIN,PKNAME,RO -- "$real" || exit 4
kn=$(lsblk -dno KNAME -- "$real")
echo "@starts"
for s in /sys/class/block/"$kn"/*/start; do
  [ -r "$s" ] && echo "${s%/start}" "$(cat "$s")"
done
echo "@mountinfo"
cat /proc/self/mountinfo
echo "@swaps"
tail -n +2 /proc/swaps | while read -r f t rest; do
  [ "$t" = partition ] && readlink -f -- "$f"
done
echo "@missing"
for t in $2; do command -v "$t" >/dev/null 2>&1 || echo "$t"; done
"""


@dataclass
class Probe:
    layout: DiskLayout
    missing: list[str]  # tools not on the host's PATH


def _sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: list[str] = out.setdefault("", [])
    for line in text.splitlines():
        if line.startswith("@") and " " not in line:
            current = out.setdefault(line[1:], [])
        else:
            current.append(line)
    return out


def parse_probe(device: str, text: str) -> Probe:
    """The disk probe's output (lsblk, partition starts, mountinfo, swaps, missing tools)."""
    sec = _sections(text)
    tree = parse_lsblk("\n".join(sec.get("lsblk", [])))
    if not tree:
        raise RemoteError(f"{device}: lsblk printed nothing about it")
    disk = tree[0]
    starts: dict[str, int] = {}
    for line in sec.get("starts", []):
        sysdir, _, sectors = line.rpartition(" ")
        if sysdir and sectors.isdigit():
            starts["/dev/" + sysdir.rsplit("/", 1)[-1]] = int(sectors) * 512
    layout = DiskLayout(
        device=device,
        path=disk.kname,
        majmin=disk.majmin,
        size=disk.size,
        tree=tree,
        part_starts=starts,
        mounts=parse_mountinfo("\n".join(sec.get("mountinfo", [])), [d.majmin for d in tree]),
        swaps={line.strip() for line in sec.get("swaps", []) if line.strip()},
    )
    return Probe(layout, [t for t in sec.get("missing", []) if t.strip()])


def probe_disk(session: SshSession, device: str, tools: Sequence[str] = ()) -> Probe:
    """What ``device`` holds on the source, and which of ``tools`` are missing there."""
    res = session.run(["sh", "-c", f"{PATH}\n{_PROBE}", "p2v", device, " ".join(tools)], timeout=60, check=False)
    if res.rc == 3:
        raise SourceNotFound(f"{session.label}: {device}: {res.stderr_text or 'not a block device'}")
    if res.rc != 0:
        raise RemoteError(f"{session.label}: probing {device} failed (exit status {res.rc}): {res.stderr_text}")
    return parse_probe(device, res.text)


def probe_pvs(session: SshSession) -> list[PvSegment]:
    """Every PV segment on the host (``pvs --segments``); empty when LVM is not installed."""
    script = (
        "# listing LVM physical volumes (pvs)\n"
        "command -v pvs >/dev/null 2>&1 || exit 0\n"
        'exec pvs --segments --noheadings --nameprefixes --units b --nosuffix -o "$1"'
    )
    text = _sh(session, script, PVS_FIELDS, timeout=LVM_TIMEOUT)
    try:
        return parse_pvs(text)
    except ValueError as exc:
        raise RemoteError(f"{session.label}: cannot read the pvs report: {exc}") from exc


# -- runs and their leftovers -----------------------------------------------------------

# The owner is the sshd process serving this connection: it lives exactly as long as the
# connection (a command's parent shell may be gone while the connection lives on).
_BEGIN = r"""# registering the run
id=$1
[ "$(id -u)" = 0 ] || { echo "logged in as $(id -un), not root" >&2; exit 6; }
st=/run/p2v-$id.state
stat_of() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null; }
p=$$
while [ "$p" -gt 1 ]; do
  c=$(cat "/proc/$p/comm" 2>/dev/null) || break
  case $c in sshd*) break ;; esac
  set -- $(stat_of "$p"); p=${2:-1}
done
[ "$p" -gt 1 ] || p=$PPID
set -- $(stat_of "$p")
umask 077
echo "owner $p ${20}" > "$st" || { echo "cannot write $st" >&2; exit 5; }
for f in /run/p2v-*.state; do
  [ -e "$f" ] && [ "$f" != "$st" ] || continue
  i=${f#/run/p2v-}; i=${i%.state}
  read -r _ op os < "$f" || op=0
  alive=0
  if [ "${op:-0}" -gt 1 ] 2>/dev/null; then
    # the same process (pid and start time), and not a zombie nobody reaped yet
    set -- $(stat_of "$op"); [ "${20:-}" = "$os" ] && [ "$1" != Z ] && alive=1
  fi
  echo "run $i $alive"
done
command -v dmsetup >/dev/null 2>&1 && dmsetup ls 2>/dev/null | while read -r n rest; do echo "view $n"; done
command -v lvs >/dev/null 2>&1 && lvs --noheadings -o vg_name,lv_name 2>/dev/null | while read -r v l; do
  case $l in p2v-snap-*) echo "snap $v/$l" ;; esac
done
for f in /run/p2v-meta-*.img; do [ -e "$f" ] && echo "file $f"; done
exit 0
"""


def dead_runs(listing: str, current: str) -> list[str]:
    """Run ids with leftovers whose owner is gone, from the begin script's listing."""
    alive: set[str] = {current}
    seen: set[str] = set()
    for line in listing.splitlines():
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if kind == "run":
            run_id, _, flag = rest.partition(" ")
            if RUN_ID_RE.fullmatch(run_id):
                seen.add(run_id)
                if flag.strip() == "1":
                    alive.add(run_id)
        elif kind == "view" and (m := _VIEW_RE.fullmatch(rest)):
            seen.add(m.group(1))
        elif kind == "snap" and (m := _SNAP_RE.fullmatch(rest.rpartition("/")[2])):
            seen.add(m.group(1))
        elif kind == "file" and (m := _META_RE.fullmatch(rest)):
            seen.add(m.group(1))
    return sorted(seen - alive)


def begin_run(session: SshSession, run_id: str) -> list[str]:
    """Register run ``run_id`` on the source and remove the leftovers of dead runs.

    Returns warnings about leftovers that could not be removed; SnapshotUnavailable when the
    SSH user is not root.
    """
    res = session.run(["sh", "-c", f"{PATH}\n{_BEGIN}", "p2v", run_id], timeout=LVM_TIMEOUT, check=False)
    if res.rc == 6:
        raise SnapshotUnavailable(f"{res.stderr_text}: LVM snapshots and fsfreeze need root on the source")
    if res.rc != 0:
        raise RemoteError(
            f"{session.label}: registering on the source failed (exit status {res.rc}): "
            f"{res.stderr_text or '(no stderr)'}"
        )
    listing = res.text
    warnings: list[str] = []
    for dead in dead_runs(listing, run_id):
        log.info("%s: removing leftovers of an earlier p2v run %s", session.label, dead)
        warnings += remove_run(session, dead)
    return warnings


_REMOVE = r"""# removing what p2v created on the source
id=$1
st=/run/p2v-$id.state
warn() { echo "warn $*"; }
if [ -f "$st" ]; then
  grep '^frozen ' "$st" | while read -r _ mp; do fsfreeze -u "$mp" 2>/dev/null && echo "thawed $mp"; done
fi
if command -v dmsetup >/dev/null 2>&1; then
  dmsetup ls 2>/dev/null | while read -r n rest; do
    case $n in
      "p2v-view-$id"|"p2v-view-$id"-*)
        dmsetup remove --retry "$n" 2>/dev/null || dmsetup remove --force "$n" 2>/dev/null \
          || warn "cannot remove device-mapper view $n (still open?)" ;;
    esac
  done
fi
if [ -f "$st" ]; then
  grep '^loop ' "$st" | while read -r _ dev back; do
    cur=$(losetup -n -O BACK-FILE -l "$dev" 2>/dev/null | sed 's/ *$//')
    if [ -n "$cur" ] && [ "$cur" = "$back" ]; then losetup -d "$dev" || warn "cannot detach $dev ($back)"; fi
  done
fi
if command -v lvs >/dev/null 2>&1; then
  lvs --noheadings -o vg_name,lv_name 2>/dev/null | while read -r v l; do
    case $l in
      "p2v-snap-$id"-*)
        lvremove -f --config "$2" "$v/$l" >/dev/null 2>&1 \
          || lvremove -f --config "$2" "$v/$l" >/dev/null 2>&1 \
          || warn "cannot remove snapshot $v/$l" ;;
    esac
  done
fi
rm -f "/run/p2v-meta-$id.img" "$st"
exit 0
"""


def remove_run(session: SshSession, run_id: str) -> list[str]:
    """Remove everything run ``run_id`` created (best effort); warnings for what stayed."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise ValueError(f"bad run id {run_id!r}")
    try:
        out = _sh(session, _REMOVE, run_id, LVM_CONFIG, timeout=LVM_TIMEOUT)
    except RemoteError as exc:
        return [f"cleanup of p2v run {run_id} on the source failed: {exc.message} (the next run retries)"]
    return [f"{session.label}: {line[5:]}" for line in out.splitlines() if line.startswith("warn ")]


# -- snapshots and views ----------------------------------------------------------------


@dataclass
class Snapshots:
    """What :func:`take_snapshots` made: devices for the view tables, and when."""

    devices: dict[str, str]  # LV key -> snapshot major:minor
    disk_loops: dict[str, str]  # disk path -> major:minor of a read-only loop over it
    capture_loop: str  # major:minor of the loop over the captured metadata
    first: float  # source clock, seconds: first snapshot created
    last: float  # ... last one
    taken_at: float = field(default_factory=time.time)  # local clock, right after they existed

    @property
    def spread_s(self) -> float:
        return max(0.0, self.last - self.first)


def snapshot_script(run_id: str, plan: SnapshotPlan, disks: Sequence[str]) -> str:
    """The shell script that captures metadata, attaches loops and creates the snapshots."""
    q = shlex.quote
    out = [
        "# creating LVM snapshots",
        "set -u",
        "trap '' PIPE",  # a dropped connection must not kill us half-way: cleanup needs the state file
        f"id={q(run_id)}",
        'st="/run/p2v-$id.state"',
        'meta="/run/p2v-meta-$id.img"',
        'fail() { code=$1; shift; echo "$*" >&2; exit "$code"; }',
        "umask 077",
        f'truncate -s {CAPTURE_HEADER} "$meta" || fail 10 "cannot create $meta"',
    ]
    for m in plan.metadata:
        out.append(
            f'dd if={q(m.disk)} of="$meta" bs=1M iflag=direct,skip_bytes,count_bytes oflag=seek_bytes '
            f"conv=notrunc status=none skip={m.disk_offset} count={m.length} seek={m.file_offset} "
            f'|| fail 11 "cannot read the LVM metadata of {m.disk} at byte {m.disk_offset}"'
        )
    for vg, seqno in sorted(plan.vg_seqnos.items()):
        out.append(f"s=$(vgs --noheadings -o vg_seqno {q(vg)}) || fail 12 'vgs {vg} failed'")
        out.append(
            f'[ "$(echo $s)" = {seqno} ] || fail 12 "volume group {vg} changed while p2v prepared its snapshots '
            f'(metadata revision $(echo $s), expected {seqno}): try again"'
        )
    out.append("sync")
    out.append('echo "first $(date +%s.%N)"')
    for n, t in enumerate(plan.targets):
        name = snapshot_name(run_id, n)
        out.append(
            f"lvcreate --yes --ignoremonitoring --config {q(LVM_CONFIG)} --snapshot --name {name} "
            f"--size {t.cow_bytes}b {q(t.key)} >/dev/null || fail 14 'creating a snapshot of {t.key} failed'"
        )
    out.append('echo "last $(date +%s.%N)"')
    for disk in disks:
        out.append(
            f"L=$(losetup --read-only --direct-io=on --find --show {q(disk)} 2>/dev/null) "
            f"|| L=$(losetup --read-only --find --show {q(disk)}) || fail 13 'cannot attach a loop device to {disk}'"
        )
        out.append(f'echo "loop $L {disk}" >> "$st"')
        out.append(f'echo "disk-loop {disk} $(cat /sys/block/${{L#/dev/}}/dev)"')
    out.append("M=$(losetup --read-only --find --show \"$meta\") || fail 13 'cannot attach a loop device to $meta'")
    out.append('echo "loop $M $meta" >> "$st"')
    out.append('echo "capture-loop $(cat /sys/block/${M#/dev/}/dev)"')
    for n, t in enumerate(plan.targets):
        name = snapshot_name(run_id, n)
        out.append(f"set -- $(lvs --noheadings -o lv_kernel_major,lv_kernel_minor {q(t.vg + '/' + name)})")
        out.append(f'echo "snap {t.key} $1:$2"')
    return "\n".join(out) + "\n"


def parse_snapshot_output(text: str) -> Snapshots:
    devices: dict[str, str] = {}
    loops: dict[str, str] = {}
    capture = ""
    first = last = 0.0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "snap":
            devices[parts[1]] = parts[2]
        elif len(parts) == 3 and parts[0] == "disk-loop":
            loops[parts[1]] = parts[2]
        elif len(parts) == 2 and parts[0] == "capture-loop":
            capture = parts[1]
        elif len(parts) == 2 and parts[0] in ("first", "last"):
            value = float(parts[1]) if re.fullmatch(r"\d+(\.\d+)?", parts[1]) else 0.0
            first, last = (value, last) if parts[0] == "first" else (first, value)
    return Snapshots(devices, loops, capture, first, last)


def take_snapshots(session: SshSession, run_id: str, plan: SnapshotPlan, disks: Sequence[str]) -> Snapshots:
    """Capture the metadata, attach the loops, create every snapshot of ``plan`` (one script)."""
    text = _sh(session, snapshot_script(run_id, plan, disks), timeout=LVM_TIMEOUT + 60 * len(plan.targets))
    snaps = parse_snapshot_output(text)
    missing = [t.key for t in plan.targets if not re.fullmatch(r"\d+:\d+", snaps.devices.get(t.key, ""))]
    if missing or not snaps.capture_loop or set(snaps.disk_loops) != set(disks):
        raise RemoteError(f"{session.label}: snapshot script output is incomplete ({', '.join(missing)}): {text!r}")
    return snaps


_CREATE_VIEW = r"""# creating the device-mapper view
name=$1
dmsetup create --readonly "$name" || exit 20
dmsetup mknodes "$name" 2>/dev/null
blockdev --getsize64 "/dev/mapper/$name" || exit 21
"""


def create_view(session: SshSession, name: str, table: str, size: int) -> str:
    """Create the read-only view ``name`` from ``table``; its path (checked to be ``size`` bytes)."""
    out = _sh(session, _CREATE_VIEW, name, input=table.encode(), timeout=LVM_TIMEOUT).strip()
    path = f"/dev/mapper/{name}"
    if out != str(size):
        raise RemoteError(f"{session.label}: view {path} has {out or 'no'} bytes, the disk has {size}")
    return path


_HEALTH = r"""# checking the snapshots
lvs --noheadings --separator ' ' -o vg_name,lv_name,lv_attr,snap_percent 2>/dev/null | while read -r v l a p; do
  case $l in "p2v-snap-$1"-*) echo "$v/$l $a ${p:-0}" ;; esac
done
exit 0
"""


def snapshot_problems(session: SshSession, run_id: str, plan: SnapshotPlan) -> list[str]:
    """Snapshots of this run that overflowed (their COW filled up: reads from them fail)."""
    out = _sh(session, _HEALTH, run_id, timeout=LVM_TIMEOUT)
    names = {f"{t.vg}/{snapshot_name(run_id, n)}": t for n, t in enumerate(plan.targets)}
    problems: list[str] = []
    found: set[str] = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] not in names:
            continue
        found.add(parts[0])
        attr, pct = parts[1], parts[2] if len(parts) > 2 else "0"
        t = names[parts[0]]
        full = pct.replace(",", ".").startswith("100")
        if (len(attr) > 4 and attr[4] == "I") or full:
            problems.append(
                f"the snapshot of {t.key} overflowed its {t.cow_bytes >> 20} MiB copy-on-write space during "
                "the read (the source wrote too much): this point is not usable"
            )
    for name, t in names.items():
        if name not in found:
            problems.append(f"the snapshot of {t.key} ({name}) disappeared during the read")
    return problems


# -- freezing ---------------------------------------------------------------------------


def freeze_script(run_id: str, mounts: Sequence[Mount], max_s: float) -> str:
    """Freeze ``mounts``, say ``ready``, hold until stdin closes (or ``max_s``), thaw.

    stdin reaches end of file when p2v closes the channel or the connection drops, so the
    source cannot stay frozen because p2v went away; ``timeout`` bounds a silent network;
    a detached guard thaws when this script is killed; the next run thaws what the state
    file still lists.
    """
    q = shlex.quote
    out = [
        "# freezing filesystems",
        "set -u",
        "trap '' PIPE",
        f'st="/run/p2v-{run_id}.state"',
    ]
    thaw = ["thaw() {"]
    for n, m in reversed(list(enumerate(mounts))):
        thaw.append(f"  if [ $f{n} = 1 ]; then fsfreeze -u {q(m.mountpoint)} && f{n}=0; fi")
    thaw.append('  sed -i "/^frozen /d" "$st" 2>/dev/null; :')
    thaw.append("}")
    out += [f"f{n}=0" for n in range(len(mounts))] + thaw
    out.append("trap 'thaw; exit 1' HUP INT TERM")
    # A guard outside this process tree thaws if the holder dies without thawing (killed with
    # its whole session) or overstays: it polls the holder (a zombie counts as gone).
    unfreeze = "; ".join(f"fsfreeze -u {q(m.mountpoint)} 2>/dev/null" for m in reversed(mounts)) or ":"
    guard = (
        'alive() { s=$(sed "s/^.*) //" "/proc/$1/stat" 2>/dev/null) || return 1; '
        'case $s in Z*|X*|"") return 1 ;; esac; }; '
        f"end=$(( $(date +%s) + {max(1, int(max_s)) + 5} )); "
        'while alive "$1" && [ "$(date +%s)" -lt "$end" ]; do sleep 1; done; '
        f"{unfreeze}"
    )
    out.append(f"( setsid sh -c {q(guard)} p2v-thaw-guard $$ </dev/null >/dev/null 2>&1 & )")
    out.append("sync")
    for n, m in enumerate(mounts):
        out.append(f'printf "frozen %s\\n" {q(m.mountpoint)} >> "$st"')
        out.append(
            f'if err=$(fsfreeze -f {q(m.mountpoint)} 2>&1); then f{n}=1; echo "frozen {n}"; '
            f'else echo "live {n} $err"; fi'
        )
    out.append("echo ready")
    out.append(f"timeout {max(1, int(max_s))} cat >/dev/null; rc=$?")
    out.append("thaw")
    out.append('if [ "$rc" = 124 ]; then echo expired; fi')
    out.append("echo thawed")
    return "\n".join(out) + "\n"


@dataclass
class FreezeResult:
    frozen: list[Mount]
    live: list[tuple[Mount, str]]  # could not be frozen, and why


class FreezeHold:
    """Filesystems frozen on the source while this object is held (see :func:`freeze_script`)."""

    def __init__(self, session: SshSession, run_id: str, mounts: Sequence[Mount], max_s: float) -> None:
        self.session = session
        self.mounts = list(mounts)
        self.max_s = max_s
        self._script = freeze_script(run_id, self.mounts, max_s)
        self._proc: RemoteProcess | None = None
        self._buffer = b""

    def _line(self, deadline: float) -> str | None:
        assert self._proc is not None
        while b"\n" not in self._buffer:
            data = self._proc.read(4096, deadline=deadline)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace")

    def start(self, timeout: float = 120.0) -> FreezeResult:
        self._proc = self.session.start(
            ["sh", "-c", f"{PATH}\n{self._script}"], read_timeout=self.max_s + 120, name="fsfreeze"
        )
        result = FreezeResult([], [])
        deadline = time.monotonic() + timeout
        while (line := self._line(deadline)) is not None:
            kind, _, rest = line.partition(" ")
            if kind == "ready":
                return result
            idx, _, why = rest.partition(" ")
            if kind in ("frozen", "live") and idx.isdigit() and int(idx) < len(self.mounts):
                m = self.mounts[int(idx)]
                if kind == "frozen":
                    result.frozen.append(m)
                else:
                    result.live.append((m, why.strip() or "cannot be frozen"))
        rc = self._proc.wait(10)
        stderr = self._proc.stderr_tail()
        self._proc.close()
        self._proc = None
        raise RemoteError(f"{self.session.label}: freezing filesystems failed (exit status {rc}): {stderr}")

    def release(self, timeout: float = 60.0) -> bool:
        """Thaw now. True if the freeze held until now; False if ``max_s`` ran out first."""
        if self._proc is None:
            return True
        proc, self._proc = self._proc, None
        expired = False
        try:
            proc.shutdown_write()
            deadline = time.monotonic() + timeout
            self._proc = proc
            while (line := self._line(deadline)) is not None:
                if line == "expired":
                    expired = True
            self._proc = None
            rc = proc.wait(timeout)
            if rc != 0:
                raise RemoteError(f"{self.session.label}: thawing failed (exit status {rc}): {proc.stderr_tail()}")
        finally:
            self._proc = None
            proc.close()
        return not expired
