"""What a source disk holds, and the plan for a point-in-time view of it (pure functions).

Parsed here, from text the source prints (see :mod:`p2v.replication.consistency_remote`):

- ``lsblk -bPp -o NAME,KNAME,TYPE,SIZE,MAJ:MIN,PKNAME,RO DISK``: the disk and everything
  stacked on it (partitions, LVs, crypt, md), one ``KEY="value"`` line each;
- the partitions' start sectors (``/sys/class/block/DISK/PART/start``);
- ``/proc/self/mountinfo`` and ``/proc/swaps``: what is mounted or swapped on from that tree;
- ``pvs --segments --nameprefixes`` with the fields in :data:`PVS_FIELDS`: where every LV
  extent lies on every physical volume.

The plan (:func:`plan_snapshots`) says which LVs get a snapshot and how big its COW is,
which byte ranges of the disks hold LVM metadata (captured before ``lvcreate -s`` changes
them), and :func:`view_table` turns it into the device-mapper ``linear`` table of a
read-only view that reads like the whole disk at the instant of the snapshots:

- every extent of a snapshotted LV reads from that LV's snapshot, at the same LV offset
  (an LV spread over several segments and PVs maps segment by segment);
- the metadata areas (the first ``pe_start`` bytes of each PV, and what follows its last
  extent, where a second metadata copy lives) read from the capture, so the view shows
  the metadata as it was before the snapshots existed;
- everything else (partitions outside LVM, free extents, the snapshots' own COW extents,
  inactive or swap LVs) reads live from the disk.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SECTOR = 512
MiB = 1 << 20
COW_FRACTION = 0.10  # of the LV's size ...
COW_FLOOR = 256 * MiB  # ... but at least this much, when the volume group has it free
COW_MINIMUM = 32 * MiB  # less than this per snapshot is not worth trying
CAPTURE_HEADER = MiB
"""Zeros before the captured metadata in the capture file: a device whose first sectors held
a copy of a PV label would show LVM a duplicate PV, and LVM refuses to change a volume group
with duplicates (``lvcreate`` fails with "Cannot update volume group ... duplicate PV")."""

PVS_FIELDS = (
    "pv_name,pv_major,pv_minor,vg_name,vg_seqno,vg_extent_size,vg_free_count,pe_start,dev_size,"
    "pv_pe_count,pv_mda_count,pvseg_start,pvseg_size,lv_name,lv_attr,lv_size,lv_kernel_major,"
    "lv_kernel_minor,segtype,seg_start_pe,seg_size_pe"
)
"""The ``-o`` list of the ``pvs --segments`` report :func:`parse_pvs` reads."""

_NAME_RE = re.compile(r"[A-Za-z0-9+_.-]+")
_LV_KINDS = {
    "o": "has snapshots",
    "s": "is a snapshot",
    "V": "is a thin volume",
    "t": "is a thin pool",
    "r": "is a RAID volume",
    "R": "is a RAID volume",
    "m": "is mirrored",
    "M": "is mirrored",
    "C": "is cached",
}


class SnapshotUnavailable(Exception):
    """The disks cannot be read through LVM snapshots; the message says why (one line)."""


# -- the block-device tree ---------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    """One ``lsblk`` row: a device in the disk's tree."""

    name: str  # /dev/mapper/vg0-root
    kname: str  # /dev/dm-0
    type: str  # disk, part, lvm, crypt, raid1, ...
    size: int
    majmin: str  # "254:0"
    parent: str  # kname of the parent ("" for the disk)
    read_only: bool = False


@dataclass(frozen=True)
class Mount:
    """A mounted filesystem (one per device, however many times it is mounted)."""

    majmin: str
    mountpoint: str
    fstype: str
    read_only: bool  # the filesystem (superblock) is read-only: it cannot change


@dataclass
class DiskLayout:
    """One source disk and what sits on it, as the source reported it."""

    device: str  # as the caller named it
    path: str  # resolved (/dev/sdb)
    majmin: str
    size: int
    tree: list[BlockDevice]  # the disk first, then everything on it (each device once)
    part_starts: dict[str, int] = field(default_factory=dict)  # partition kname -> byte offset on the disk
    mounts: list[Mount] = field(default_factory=list)  # filesystems of the tree
    swaps: set[str] = field(default_factory=set)  # knames of active swap devices in the tree

    def by_majmin(self, majmin: str) -> BlockDevice | None:
        return next((d for d in self.tree if d.majmin == majmin), None)

    def offset_of(self, majmin: str) -> int | None:
        """Byte offset on the disk of the disk itself (0) or one of its partitions, else None."""
        if majmin == self.majmin:
            return 0
        dev = self.by_majmin(majmin)
        if dev is None or dev.type != "part" or dev.parent != self.path:
            return None
        return self.part_starts.get(dev.kname)

    def rw_mounts(self) -> list[Mount]:
        return [m for m in self.mounts if not m.read_only]


def _pairs(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in shlex.split(line):
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


def _unescape_mount(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\040`` etc."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_lsblk(text: str) -> list[BlockDevice]:
    """``lsblk -bPp -o NAME,KNAME,TYPE,SIZE,MAJ:MIN,PKNAME,RO`` output; each device once."""
    seen: dict[str, BlockDevice] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        f = _pairs(line)
        majmin = f.get("MAJ:MIN") or f.get("MAJ_MIN", "")
        if not majmin or majmin in seen:
            continue  # an LV spanning two partitions is listed under both
        seen[majmin] = BlockDevice(
            name=f.get("NAME", ""),
            kname=f.get("KNAME", ""),
            type=f.get("TYPE", ""),
            size=int(f.get("SIZE") or 0),
            majmin=majmin,
            parent=f.get("PKNAME", ""),
            read_only=f.get("RO") == "1",
        )
    return list(seen.values())


def parse_mountinfo(text: str, majmins: Iterable[str]) -> list[Mount]:
    """Filesystems of ``/proc/self/mountinfo`` whose device is one of ``majmins``.

    One entry per device: the first mount point of a filesystem mounted several times
    (bind mounts), which is enough to freeze it.
    """
    wanted = set(majmins)
    mounts: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 3:
            continue
        majmin, root, mountpoint = fields[2], fields[3], _unescape_mount(fields[4])
        if majmin not in wanted:
            continue
        super_ro = "ro" in tail[2].split(",")
        current = mounts.get(majmin)
        if current is None or (root == "/" and len(mountpoint) < len(current.mountpoint)):
            mounts[majmin] = Mount(majmin, mountpoint, tail[0], super_ro)
    return sorted(mounts.values(), key=lambda m: m.mountpoint)


def size_text(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 28) == 0:
        return f"{n / (1 << 30):.2f} GiB".replace(".00 ", " ")
    if n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} bytes"


# -- LVM --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PvSegment:
    """One row of ``pvs --segments``: a run of physical extents and the LV using it (if any)."""

    pv_name: str
    pv_majmin: str
    vg_name: str
    vg_seqno: int
    extent_size: int  # bytes
    vg_free_count: int  # free extents in the whole VG
    pe_start: int  # bytes from the PV's start to its first extent
    dev_size: int  # bytes of the PV's device
    pe_count: int
    mda_count: int
    pvseg_start: int  # first PE of the run
    pvseg_size: int  # PEs in the run
    lv_name: str  # "" for free extents
    lv_attr: str
    lv_size: int
    lv_majmin: str | None  # None when the LV is not active
    segtype: str  # linear, striped, raid1, free, ...
    seg_start_pe: int  # where the LV segment starts, in logical extents of the LV
    seg_size_pe: int

    @property
    def lv_key(self) -> str:
        return f"{self.vg_name}/{self.lv_name}"


def parse_pvs(text: str) -> list[PvSegment]:
    """Rows of ``pvs --segments --noheadings --nameprefixes --units b --nosuffix -o PVS_FIELDS``."""
    rows: list[PvSegment] = []
    for line in text.splitlines():
        if "LVM2_PV_NAME=" not in line:
            continue  # warnings that slipped into stdout
        f = {k.removeprefix("LVM2_"): v for k, v in _pairs(line).items()}
        if not f.get("VG_NAME"):
            continue  # a PV in no volume group holds nothing to snapshot

        def num(key: str, f: dict[str, str] = f) -> int:
            try:
                return int(f.get(key) or 0)
            except ValueError as exc:
                raise ValueError(f"pvs printed {key}={f.get(key)!r}, not a number") from exc

        major, minor = num("LV_KERNEL_MAJOR"), num("LV_KERNEL_MINOR")
        rows.append(
            PvSegment(
                pv_name=f.get("PV_NAME", ""),
                pv_majmin=f"{num('PV_MAJOR')}:{num('PV_MINOR')}",
                vg_name=f["VG_NAME"],
                vg_seqno=num("VG_SEQNO"),
                extent_size=num("VG_EXTENT_SIZE"),
                vg_free_count=num("VG_FREE_COUNT"),
                pe_start=num("PE_START"),
                dev_size=num("DEV_SIZE"),
                pe_count=num("PV_PE_COUNT"),
                mda_count=num("PV_MDA_COUNT"),
                pvseg_start=num("PVSEG_START"),
                pvseg_size=num("PVSEG_SIZE"),
                lv_name=f.get("LV_NAME", ""),
                lv_attr=f.get("LV_ATTR", ""),
                lv_size=num("LV_SIZE"),
                lv_majmin=f"{major}:{minor}" if major >= 0 and minor >= 0 else None,
                segtype=f.get("SEGTYPE", ""),
                seg_start_pe=num("SEG_START_PE"),
                seg_size_pe=num("SEG_SIZE_PE"),
            )
        )
    return rows


# -- the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotTarget:
    """An LV that gets a snapshot, and the snapshot's COW size."""

    vg: str
    lv: str
    size: int
    majmin: str
    cow_bytes: int

    @property
    def key(self) -> str:
        return f"{self.vg}/{self.lv}"


@dataclass(frozen=True)
class MetadataRange:
    """``length`` bytes at ``disk_offset`` of ``disk`` are captured at ``file_offset`` of the capture file."""

    disk: str  # the disk's resolved path
    disk_offset: int
    length: int
    file_offset: int


@dataclass(frozen=True)
class SnapshotRange:
    """``length`` bytes at ``disk_offset`` of ``disk`` read from LV ``key``'s snapshot at ``lv_offset``."""

    disk: str
    disk_offset: int
    length: int
    key: str
    lv_offset: int


@dataclass
class SnapshotPlan:
    """Everything :func:`~p2v.replication.consistency_remote.take_snapshots` does, decided up front."""

    targets: list[SnapshotTarget]
    metadata: list[MetadataRange]
    ranges: list[SnapshotRange]
    vg_seqnos: dict[str, int]  # the metadata revision the plan was made from, per VG
    live: dict[str, list[str]]  # disk path -> what of it is read live ("/boot", "swap /dev/sda2")
    notes: list[str] = field(default_factory=list)  # e.g. an LV that continues on a disk outside the set

    @property
    def capture_size(self) -> int:
        return CAPTURE_HEADER + sum(r.length for r in self.metadata)

    def targets_on(self, disk: str) -> list[SnapshotTarget]:
        keys = {r.key for r in self.ranges if r.disk == disk}
        return [t for t in self.targets if t.key in keys]


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def cow_sizes(lvs: Sequence[tuple[str, int]], free_bytes: int, extent: int) -> dict[str, int]:
    """COW bytes for snapshots of ``lvs`` ((key, LV size) pairs) sharing ``free_bytes`` of one VG.

    Each wants ``max(10% of its LV, 256 MiB)`` rounded up to whole extents, and gets it
    when the VG has room for all; otherwise the free space is shared in proportion, as
    long as every snapshot still gets :data:`COW_MINIMUM` (else SnapshotUnavailable).
    """
    if not lvs:
        return {}
    want = {key: _round_up(max(math.ceil(size * COW_FRACTION), COW_FLOOR), extent) for key, size in lvs}
    total = sum(want.values())
    if total <= free_bytes:
        return want
    free_extents = free_bytes // extent
    got = {key: (free_extents * w // total) * extent for key, w in want.items()}
    # hand out the extents lost to rounding down, biggest wish first
    spare = free_extents - sum(got.values()) // extent
    for key in sorted(want, key=lambda k: -want[k]):
        if spare <= 0:
            break
        got[key] += extent
        spare -= 1
    low = min(got.values())
    if low < max(COW_MINIMUM, extent):
        names = ", ".join(k for k, _ in lvs)
        raise SnapshotUnavailable(
            f"volume group {lvs[0][0].split('/')[0]} has {size_text(free_bytes)} free: not enough for "
            f"snapshots of {names} (each needs at least {size_text(max(COW_MINIMUM, extent))})"
        )
    return got


def _pv_offsets(layouts: Sequence[DiskLayout], rows: Sequence[PvSegment]) -> dict[str, tuple[DiskLayout, int]]:
    """PV majmin -> (its disk, its byte offset on the disk) for PVs that are a disk or a partition of one."""
    out: dict[str, tuple[DiskLayout, int]] = {}
    for row in rows:
        for layout in layouts:
            off = layout.offset_of(row.pv_majmin)
            if off is not None:
                out[row.pv_majmin] = (layout, off)
    return out


def plan_snapshots(layouts: Sequence[DiskLayout], rows: Sequence[PvSegment]) -> SnapshotPlan:
    """Decide snapshots, COW sizes, metadata ranges and view ranges for ``layouts`` read together.

    Raises SnapshotUnavailable when the disks cannot be read through snapshots: no active
    LV on them, an LV type we do not map (striped, raid, thin, existing snapshots), LVM on
    top of crypt/md, or not enough free extents.
    """
    pvs = _pv_offsets(layouts, rows)
    ours = [r for r in rows if r.pv_majmin in pvs]
    swaps = {d.majmin for layout in layouts for d in layout.tree if d.kname in layout.swaps}
    targets_wanted: dict[str, PvSegment] = {}
    for r in ours:
        if not r.lv_name or r.lv_majmin is None or r.lv_majmin in swaps:
            continue  # free extents, an inactive LV (nothing writes it) or swap (never needed back)
        kind = r.lv_attr[:1]
        if kind != "-" or r.segtype != "linear":
            what = _LV_KINDS.get(kind, f"is {r.segtype}")
            raise SnapshotUnavailable(f"LV {r.lv_key} {what}: only plain linear LVs can be snapshotted")
        targets_wanted.setdefault(r.lv_key, r)
    mapped = {r.lv_majmin for r in ours if r.lv_majmin}
    for layout in layouts:
        for dev in layout.tree:
            if dev.type == "lvm" and dev.majmin not in mapped:
                raise SnapshotUnavailable(
                    f"{dev.name} is not on a partition of {layout.path} (LVM on crypt, md or multipath "
                    "is not supported)"
                )
    if not targets_wanted:
        disks = ", ".join(lay.path for lay in layouts)
        raise SnapshotUnavailable(f"no active LVM logical volume to snapshot on {disks}")

    notes: list[str] = []
    for key in targets_wanted:
        for seg in (r for r in rows if r.lv_name and r.lv_key == key):
            if seg.segtype != "linear" or seg.pvseg_size != seg.seg_size_pe:
                raise SnapshotUnavailable(f"LV {key} has a {seg.segtype} segment: only linear LVs are mapped")
            note = f"{key} continues on {seg.pv_name}, outside the disks read together"
            if seg.pv_majmin not in pvs and note not in notes:
                notes.append(note)

    # COW sizes, per volume group
    targets: list[SnapshotTarget] = []
    by_vg: dict[str, list[PvSegment]] = {}
    for row in targets_wanted.values():
        by_vg.setdefault(row.vg_name, []).append(row)
    vg_seqnos: dict[str, int] = {}
    for vg, members in sorted(by_vg.items()):
        head = members[0]
        vg_seqnos[vg] = head.vg_seqno
        sizes = cow_sizes(
            [(m.lv_key, m.lv_size) for m in members], head.vg_free_count * head.extent_size, head.extent_size
        )
        for m in sorted(members, key=lambda x: x.lv_name):
            assert m.lv_majmin is not None
            targets.append(SnapshotTarget(vg, m.lv_name, m.lv_size, m.lv_majmin, sizes[m.lv_key]))

    # metadata ranges and snapshot ranges, per PV of our disks
    metadata: list[MetadataRange] = []
    ranges: list[SnapshotRange] = []
    file_off = CAPTURE_HEADER
    seen_pvs: set[str] = set()
    for r in ours:
        layout, pv_off = pvs[r.pv_majmin]
        if r.pv_majmin not in seen_pvs:
            seen_pvs.add(r.pv_majmin)
            if r.pv_majmin == layout.majmin:
                # the view (and the loop over the disk) would carry the PV label at its start
                raise SnapshotUnavailable(
                    f"{r.pv_name} is a PV on the whole disk, not on a partition: a view of it would show "
                    "LVM a duplicate PV"
                )
            data_end = r.pe_start + r.pe_count * r.extent_size
            if r.pe_start % SECTOR or r.extent_size % SECTOR or r.dev_size < data_end:
                raise SnapshotUnavailable(f"PV {r.pv_name}: unexpected geometry in pvs output")
            if pv_off + r.dev_size > layout.size:
                raise SnapshotUnavailable(f"PV {r.pv_name} reaches past the end of {layout.path}")
            for start, end in ((0, r.pe_start), (data_end, r.dev_size)):
                if end > start:
                    metadata.append(MetadataRange(layout.path, pv_off + start, end - start, file_off))
                    file_off += end - start
        if r.lv_name and r.lv_key in targets_wanted:
            ranges.append(
                SnapshotRange(
                    layout.path,
                    pv_off + r.pe_start + r.pvseg_start * r.extent_size,
                    r.pvseg_size * r.extent_size,
                    r.lv_key,
                    r.seg_start_pe * r.extent_size,
                )
            )

    live: dict[str, list[str]] = {layout.path: [] for layout in layouts}
    snapped = {t.majmin for t in targets}
    for layout in layouts:
        for mount in layout.rw_mounts():
            if mount.majmin not in snapped:
                live[layout.path].append(mount.mountpoint)
        for dev in layout.tree:
            if dev.kname in layout.swaps:
                live[layout.path].append(f"swap {dev.name}")
    return SnapshotPlan(targets, metadata, ranges, vg_seqnos, live, notes)


# -- the view ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLine:
    """One line of a device-mapper ``linear`` table, in bytes (converted to sectors on output)."""

    start: int
    length: int
    device: str  # major:minor
    offset: int

    def text(self) -> str:
        return f"{self.start // SECTOR} {self.length // SECTOR} linear {self.device} {self.offset // SECTOR}"


def view_lines(
    plan: SnapshotPlan,
    layout: DiskLayout,
    *,
    disk_device: str,
    capture_device: str,
    snapshot_devices: dict[str, str],
) -> list[TableLine]:
    """The view of ``layout``'s disk: ``disk_device`` (a read-only loop over the disk) at the
    same offsets, except metadata ranges from ``capture_device`` and LV extents from the
    snapshots (``snapshot_devices``: LV key -> major:minor)."""
    overlay: list[TableLine] = []
    for m in plan.metadata:
        if m.disk == layout.path:
            overlay.append(TableLine(m.disk_offset, m.length, capture_device, m.file_offset))
    for r in plan.ranges:
        if r.disk == layout.path:
            overlay.append(TableLine(r.disk_offset, r.length, snapshot_devices[r.key], r.lv_offset))
    overlay.sort(key=lambda t: t.start)
    lines: list[TableLine] = []
    pos = 0
    for t in overlay:
        if t.start < pos:
            raise ValueError(f"view ranges overlap at byte {t.start} of {layout.path}")
        if t.start % SECTOR or t.length % SECTOR or t.offset % SECTOR:
            raise ValueError(f"view range at byte {t.start} of {layout.path} is not sector-aligned")
        if t.start > pos:
            lines.append(TableLine(pos, t.start - pos, disk_device, pos))
        lines.append(t)
        pos = t.start + t.length
    if pos > layout.size:
        raise ValueError(f"view ranges reach past the end of {layout.path}")
    if pos < layout.size:
        if layout.size % SECTOR:
            raise ValueError(f"{layout.path}: size {layout.size} is not a whole number of sectors")
        lines.append(TableLine(pos, layout.size - pos, disk_device, pos))
    return lines


def view_table(lines: Sequence[TableLine]) -> str:
    return "".join(t.text() + "\n" for t in lines)


def valid_name(name: str) -> bool:
    """VG and LV names LVM accepts (what we put into remote commands unquoted-safe)."""
    return bool(_NAME_RE.fullmatch(name))
