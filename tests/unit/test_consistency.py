"""Consistent views, the pure half: parsing what the source prints, the snapshot plan, the
device-mapper table of the view, COW sizing, run bookkeeping, mode selection.

The fixtures are real output, captured on a Debian 12 guest (kernel 6.1, LVM 2.03.16) with a
second disk /dev/sdb: GPT with sdb1 (64 MiB ext4 on /mnt/boot2), sdb2 (256 MiB PV) and sdb3
(190 MiB PV with two metadata copies); VG p2vtestvg with LV data (10 extents on sdb2 then 20
on sdb3: two segments), LV logs (11 extents on sdb2) and an active swap LV on sdb3.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from p2v.errors import UsageError
from p2v.replication.consistency import MODES, check_mode
from p2v.replication.consistency_layout import (
    CAPTURE_HEADER,
    COW_MINIMUM,
    SECTOR,
    Mount,
    SnapshotPlan,
    SnapshotUnavailable,
    cow_sizes,
    parse_mountinfo,
    parse_pvs,
    plan_snapshots,
    view_lines,
    view_table,
)
from p2v.replication.consistency_remote import (
    _BEGIN,
    _CREATE_VIEW,
    _HEALTH,
    _PROBE,
    _REMOVE,
    dead_runs,
    freeze_script,
    parse_probe,
    parse_snapshot_output,
    snapshot_script,
)

MiB = 1 << 20
EXT = 4 * MiB

LSBLK = """\
NAME="/dev/sdb" KNAME="/dev/sdb" TYPE="disk" SIZE="536870912" MAJ:MIN="8:16" PKNAME="" RO="0"
NAME="/dev/sdb1" KNAME="/dev/sdb1" TYPE="part" SIZE="67108864" MAJ:MIN="8:17" PKNAME="/dev/sdb" RO="0"
NAME="/dev/sdb2" KNAME="/dev/sdb2" TYPE="part" SIZE="268435456" MAJ:MIN="8:18" PKNAME="/dev/sdb" RO="0"
NAME="/dev/mapper/p2vtestvg-data" KNAME="/dev/dm-0" TYPE="lvm" SIZE="125829120" MAJ:MIN="254:0" PKNAME="/dev/sdb2" RO="0"
NAME="/dev/mapper/p2vtestvg-logs" KNAME="/dev/dm-1" TYPE="lvm" SIZE="46137344" MAJ:MIN="254:1" PKNAME="/dev/sdb2" RO="0"
NAME="/dev/sdb3" KNAME="/dev/sdb3" TYPE="part" SIZE="199229440" MAJ:MIN="8:19" PKNAME="/dev/sdb" RO="0"
NAME="/dev/mapper/p2vtestvg-data" KNAME="/dev/dm-0" TYPE="lvm" SIZE="125829120" MAJ:MIN="254:0" PKNAME="/dev/sdb3" RO="0"
NAME="/dev/mapper/p2vtestvg-swap" KNAME="/dev/dm-2" TYPE="lvm" SIZE="8388608" MAJ:MIN="254:2" PKNAME="/dev/sdb3" RO="0"
"""  # noqa: E501

MOUNTINFO = r"""22 27 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 27 0:23 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=98176k,mode=755,inode64
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
157 27 254:0 / /mnt/data rw,relatime shared:58 - ext4 /dev/mapper/p2vtestvg-data rw
162 27 254:1 / /mnt/logs rw,relatime shared:87 - ext4 /dev/mapper/p2vtestvg-logs rw
167 27 8:17 / /mnt/boot2 rw,relatime shared:90 - ext4 /dev/sdb1 rw
170 27 254:0 /sub /srv/bind\040mount rw,relatime shared:91 - ext4 /dev/mapper/p2vtestvg-data rw
"""

PROBE_OUTPUT = (
    "@lsblk\n"
    + LSBLK
    + "@starts\n/sys/class/block/sdb/sdb1 2048\n/sys/class/block/sdb/sdb2 133120\n/sys/class/block/sdb/sdb3 657408\n"
    + "@mountinfo\n"
    + MOUNTINFO
    + "@swaps\n/dev/sda2\n/dev/dm-2\n@missing\n"
)


def _pvs_row(pv: str, minor: int, dev_size: int, pe_count: int, mdas: int, start: int, size: int, lv: str,
             lv_size: int, lv_minor: int, seg_start: int, seqno: int = 32, free: int = 67,
             segtype: str = "linear", attr: str = "-wi-ao----", seg_size: int | None = None) -> str:  # fmt: skip
    major = "254" if lv else "-1"
    kminor = str(lv_minor) if lv else "-1"
    return (
        f"  LVM2_PV_NAME='{pv}' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='{minor}' LVM2_VG_NAME='p2vtestvg' "
        f"LVM2_VG_SEQNO='{seqno}' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='{free}' "
        f"LVM2_PE_START='1048576' LVM2_DEV_SIZE='{dev_size}' LVM2_PV_PE_COUNT='{pe_count}' "
        f"LVM2_PV_MDA_COUNT='{mdas}' LVM2_PVSEG_START='{start}' LVM2_PVSEG_SIZE='{size}' LVM2_LV_NAME='{lv}' "
        f"LVM2_LV_ATTR='{attr if lv else ''}' LVM2_LV_SIZE='{lv_size}' LVM2_LV_KERNEL_MAJOR='{major}' "
        f"LVM2_LV_KERNEL_MINOR='{kminor}' LVM2_SEGTYPE='{segtype if lv else 'free'}' "
        f"LVM2_SEG_START_PE='{seg_start}' LVM2_SEG_SIZE_PE='{size if seg_size is None else seg_size}'\n"
    )


# verbatim from the guest (see the module docstring)
PVS = """\
  LVM2_PV_NAME='/dev/sdb2' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='18' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='0' LVM2_PVSEG_SIZE='10' LVM2_LV_NAME='data' LVM2_LV_ATTR='-wi-ao----' LVM2_LV_SIZE='125829120' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='0' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='10'
  LVM2_PV_NAME='/dev/sdb2' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='18' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='10' LVM2_PVSEG_SIZE='11' LVM2_LV_NAME='logs' LVM2_LV_ATTR='-wi-ao----' LVM2_LV_SIZE='46137344' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='1' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='11'
  LVM2_PV_NAME='/dev/sdb2' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='18' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='21' LVM2_PVSEG_SIZE='42' LVM2_LV_NAME='' LVM2_LV_ATTR='' LVM2_LV_SIZE='0' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='free' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='42'
  LVM2_PV_NAME='/dev/sdb3' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='19' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='199229440' LVM2_PV_PE_COUNT='47' LVM2_PV_MDA_COUNT='2' LVM2_PVSEG_START='0' LVM2_PVSEG_SIZE='20' LVM2_LV_NAME='data' LVM2_LV_ATTR='-wi-ao----' LVM2_LV_SIZE='125829120' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='0' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='10' LVM2_SEG_SIZE_PE='20'
  LVM2_PV_NAME='/dev/sdb3' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='19' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='199229440' LVM2_PV_PE_COUNT='47' LVM2_PV_MDA_COUNT='2' LVM2_PVSEG_START='20' LVM2_PVSEG_SIZE='2' LVM2_LV_NAME='swap' LVM2_LV_ATTR='-wi-ao----' LVM2_LV_SIZE='8388608' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='2' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='2'
  LVM2_PV_NAME='/dev/sdb3' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='19' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='32' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='67' LVM2_PE_START='1048576' LVM2_DEV_SIZE='199229440' LVM2_PV_PE_COUNT='47' LVM2_PV_MDA_COUNT='2' LVM2_PVSEG_START='22' LVM2_PVSEG_SIZE='25' LVM2_LV_NAME='' LVM2_LV_ATTR='' LVM2_LV_SIZE='0' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='free' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='25'
"""  # noqa: E501

# verbatim from the guest: `lvcreate -i2 -I64k -n striped -L 16M p2vtestvg` (2 PEs on each PV, 4 LEs)
PVS_STRIPED = """\
  LVM2_PV_NAME='/dev/sdb2' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='18' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='34' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='65' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='21' LVM2_PVSEG_SIZE='2' LVM2_LV_NAME='striped' LVM2_LV_ATTR='-wi-a-----' LVM2_LV_SIZE='16777216' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='2' LVM2_SEGTYPE='striped' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='4'
  LVM2_PV_NAME='/dev/sdb3' LVM2_PV_MAJOR='8' LVM2_PV_MINOR='19' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='34' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='65' LVM2_PE_START='1048576' LVM2_DEV_SIZE='199229440' LVM2_PV_PE_COUNT='47' LVM2_PV_MDA_COUNT='2' LVM2_PVSEG_START='20' LVM2_PVSEG_SIZE='2' LVM2_LV_NAME='striped' LVM2_LV_ATTR='-wi-a-----' LVM2_LV_SIZE='16777216' LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='2' LVM2_SEGTYPE='striped' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='4'
"""  # noqa: E501

# verbatim from a host without device-mapper: a PV on a whole loop device, LVs created
# with --driverloaded n (so inactive), lv1 in two segments around lv2
PVS_WHOLE_DISK_INACTIVE = """\
  LVM2_PV_NAME='/dev/loop0' LVM2_PV_MAJOR='7' LVM2_PV_MINOR='0' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='4' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='38' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='0' LVM2_PVSEG_SIZE='10' LVM2_LV_NAME='lv1' LVM2_LV_ATTR='-wi-XX----' LVM2_LV_SIZE='83886080' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='10'
  LVM2_PV_NAME='/dev/loop0' LVM2_PV_MAJOR='7' LVM2_PV_MINOR='0' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='4' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='38' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='10' LVM2_PVSEG_SIZE='5' LVM2_LV_NAME='lv2' LVM2_LV_ATTR='-wi-XX----' LVM2_LV_SIZE='20971520' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='5'
  LVM2_PV_NAME='/dev/loop0' LVM2_PV_MAJOR='7' LVM2_PV_MINOR='0' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='4' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='38' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='15' LVM2_PVSEG_SIZE='10' LVM2_LV_NAME='lv1' LVM2_LV_ATTR='-wi-XX----' LVM2_LV_SIZE='83886080' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='10' LVM2_SEG_SIZE_PE='10'
  LVM2_PV_NAME='/dev/loop0' LVM2_PV_MAJOR='7' LVM2_PV_MINOR='0' LVM2_VG_NAME='p2vtestvg' LVM2_VG_SEQNO='4' LVM2_VG_EXTENT_SIZE='4194304' LVM2_VG_FREE_COUNT='38' LVM2_PE_START='1048576' LVM2_DEV_SIZE='268435456' LVM2_PV_PE_COUNT='63' LVM2_PV_MDA_COUNT='1' LVM2_PVSEG_START='25' LVM2_PVSEG_SIZE='38' LVM2_LV_NAME='' LVM2_LV_ATTR='' LVM2_LV_SIZE='0' LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='free' LVM2_SEG_START_PE='0' LVM2_SEG_SIZE_PE='38'
"""  # noqa: E501

SDB2, SDB3 = 133120 * SECTOR, 657408 * SECTOR  # partition offsets on the disk


def layout():
    return parse_probe("/dev/disk/by-id/ata-QEMU_HARDDISK_QM00003", PROBE_OUTPUT).layout


def plan() -> SnapshotPlan:
    return plan_snapshots([layout()], parse_pvs(PVS))


# -- parsing ----------------------------------------------------------------------------


def test_probe_output_gives_the_disk_its_partitions_mounts_and_swaps() -> None:
    probe = parse_probe("/dev/disk/by-id/x", PROBE_OUTPUT)
    lay = probe.layout
    assert (lay.device, lay.path, lay.majmin, lay.size) == ("/dev/disk/by-id/x", "/dev/sdb", "8:16", 512 * MiB)
    # the data LV is listed under both partitions it spans, but is one device
    assert [d.name for d in lay.tree].count("/dev/mapper/p2vtestvg-data") == 1
    assert lay.part_starts == {"/dev/sdb1": 1 * MiB, "/dev/sdb2": SDB2, "/dev/sdb3": SDB3}
    assert lay.offset_of("8:18") == SDB2 and lay.offset_of("8:16") == 0 and lay.offset_of("254:0") is None
    # /dev/sda1 (/) is another disk's; the bind mount of data is the same filesystem as /mnt/data
    assert [(m.mountpoint, m.majmin) for m in lay.mounts] == [
        ("/mnt/boot2", "8:17"),
        ("/mnt/data", "254:0"),
        ("/mnt/logs", "254:1"),
    ]
    assert lay.swaps == {"/dev/sda2", "/dev/dm-2"}
    assert probe.missing == []


def test_mountinfo_unescapes_mount_points_and_sees_read_only_filesystems() -> None:
    text = "40 27 7:3 / /srv/with\\040space ro,relatime - ext4 /dev/loop3 ro\n"
    assert parse_mountinfo(text, ["7:3"]) == [Mount("7:3", "/srv/with space", "ext4", True)]
    assert parse_mountinfo(MOUNTINFO, ["254:0"])[0].mountpoint == "/mnt/data"  # not the bind mount


def test_pvs_rows_keep_multi_segment_lvs_and_inactive_lvs_apart() -> None:
    rows = parse_pvs(PVS)
    data = [r for r in rows if r.lv_name == "data"]
    assert [(r.pv_name, r.pvseg_start, r.pvseg_size, r.seg_start_pe) for r in data] == [
        ("/dev/sdb2", 0, 10, 0),
        ("/dev/sdb3", 0, 20, 10),
    ]
    assert data[0].lv_majmin == "254:0" and data[0].extent_size == EXT
    assert {r.segtype for r in rows if not r.lv_name} == {"free"}
    inactive = parse_pvs(PVS_WHOLE_DISK_INACTIVE)
    assert all(r.lv_majmin is None for r in inactive)
    with pytest.raises(ValueError, match="VG_SEQNO"):
        parse_pvs(PVS.replace("LVM2_VG_SEQNO='32'", "LVM2_VG_SEQNO='x'", 1))


# -- the plan ---------------------------------------------------------------------------


def test_plan_snapshots_every_active_lv_but_swap_and_names_what_is_read_live() -> None:
    p = plan()
    # both want max(10%, 256 MiB) = 256 MiB, the VG has 67 free extents (268 MiB): 33 extents each
    # in proportion, and the one left over goes to the first
    assert [(t.key, t.majmin, t.cow_bytes) for t in p.targets] == [
        ("p2vtestvg/data", "254:0", 34 * EXT),
        ("p2vtestvg/logs", "254:1", 33 * EXT),
    ]
    assert all(t.cow_bytes >= COW_MINIMUM for t in p.targets)
    assert p.vg_seqnos == {"p2vtestvg": 32}
    assert p.live == {"/dev/sdb": ["/mnt/boot2", "swap /dev/mapper/p2vtestvg-swap"]}


def test_metadata_ranges_cover_each_pv_head_and_the_tail_with_the_second_copy() -> None:
    p = plan()
    got = [(m.disk_offset, m.length, m.file_offset) for m in p.metadata]
    sdb2_tail = 1 * MiB + 63 * EXT  # pe_start + pe_count * extent
    sdb3_tail = 1 * MiB + 47 * EXT
    assert got == [
        (SDB2, 1 * MiB, CAPTURE_HEADER),
        (SDB2 + sdb2_tail, 256 * MiB - sdb2_tail, CAPTURE_HEADER + 1 * MiB),
        (SDB3, 1 * MiB, CAPTURE_HEADER + 4 * MiB),
        (SDB3 + sdb3_tail, 190 * MiB - sdb3_tail, CAPTURE_HEADER + 5 * MiB),
    ]
    assert p.capture_size == CAPTURE_HEADER + 6 * MiB
    # nothing of the capture file's first sectors holds a PV label copy (LVM would see a duplicate PV)
    assert min(m.file_offset for m in p.metadata) >= 4 * SECTOR


def _resolve(lines, offset):  # (device, device offset) that the view reads at `offset`
    for t in lines:
        if t.start <= offset < t.start + t.length:
            return t.device, t.offset + offset - t.start
    raise AssertionError(f"byte {offset} is not in the view")


def test_view_table_maps_every_lv_extent_to_its_snapshot_at_the_same_lv_offset() -> None:
    p, lay = plan(), layout()
    snaps = {"p2vtestvg/data": "254:10", "p2vtestvg/logs": "254:11"}
    lines = view_lines(p, lay, disk_device="7:0", capture_device="7:1", snapshot_devices=snaps)
    # contiguous, no gaps or overlaps, exactly the disk's size, all whole sectors
    pos = 0
    for t in lines:
        assert t.start == pos and t.length > 0 and t.length % SECTOR == 0
        pos += t.length
    assert pos == lay.size
    # the data LV: LEs 0-9 on sdb2 PEs 0-9, LEs 10-29 on sdb3 PEs 0-19 -> every LE once, in place
    seen = []
    for pv_off, first_pe, count, first_le in ((SDB2, 0, 10, 0), (SDB3, 0, 20, 10)):
        for i in range(count):
            disk_off = pv_off + 1 * MiB + (first_pe + i) * EXT
            assert _resolve(lines, disk_off + 12345) == ("254:10", (first_le + i) * EXT + 12345)
            seen.append(first_le + i)
    assert sorted(seen) == list(range(30))
    assert _resolve(lines, SDB2 + 1 * MiB + 10 * EXT) == ("254:11", 0)  # logs starts at PE 10
    # swap, free extents and the partition outside LVM read live from the disk, in place
    for off in (SDB3 + 1 * MiB + 20 * EXT, SDB2 + 1 * MiB + 30 * EXT, 1 * MiB + 5, 0, lay.size - SECTOR):
        assert _resolve(lines, off) == ("7:0", off)
    # metadata reads from the capture
    assert _resolve(lines, SDB3 + 512) == ("7:1", CAPTURE_HEADER + 4 * MiB + 512)
    assert _resolve(lines, lay.size - 34 * SECTOR) == ("7:0", lay.size - 34 * SECTOR)  # GPT backup: live
    text = view_table(lines)
    assert text.splitlines()[0] == f"0 {SDB2 // SECTOR} linear 7:0 0"
    assert f"{(SDB2 + MiB) // SECTOR} {10 * EXT // SECTOR} linear 254:10 0" in text


def test_view_table_refuses_overlaps_and_ranges_past_the_disk() -> None:
    p, lay = plan(), layout()
    snaps = {"p2vtestvg/data": "254:10", "p2vtestvg/logs": "254:11"}
    lay.size = SDB3 + 100 * MiB
    with pytest.raises(ValueError, match="past the end"):
        view_lines(p, lay, disk_device="7:0", capture_device="7:1", snapshot_devices=snaps)


@pytest.mark.parametrize(
    ("lvs", "free", "want"),
    [
        ([("vg/root", 2560 * MiB)], 1130 * MiB, {"vg/root": 256 * MiB}),  # max(10%, 256 MiB)
        ([("vg/big", 10 << 30)], 2 << 30, {"vg/big": 1024 * MiB}),  # 10% of 10 GiB
        ([("vg/big", 10 << 30)], 300 * MiB, {"vg/big": 300 * MiB}),  # min(free, ...)
        # want 256 + 308 MiB, have 100 extents: 45 + 54 in proportion, the spare one to the bigger wish
        ([("vg/a", 1 << 30), ("vg/b", 3 << 30)], 400 * MiB, {"vg/a": 180 * MiB, "vg/b": 220 * MiB}),
        ([("vg/a", 1 << 30), ("vg/b", 10 << 30)], 404 * MiB, {"vg/a": 80 * MiB, "vg/b": 324 * MiB}),
    ],
)
def test_cow_size_is_ten_percent_at_least_256_mib_within_the_free_space(lvs, free, want) -> None:
    got = cow_sizes(lvs, free, EXT)
    assert got == want
    assert sum(got.values()) <= free


def test_cow_size_refuses_when_free_space_is_too_small() -> None:
    with pytest.raises(SnapshotUnavailable, match=r"vg has 24 MiB free.*vg/root"):
        cow_sizes([("vg/root", 2 << 30)], 24 * MiB, EXT)
    with pytest.raises(SnapshotUnavailable, match="at least 32 MiB"):
        cow_sizes([("vg/a", 1 << 30), ("vg/b", 1 << 30)], 40 * MiB, EXT)


def test_plan_refuses_striped_lvs_with_the_reason() -> None:
    rows = parse_pvs(PVS_STRIPED)
    striped = (
        'NAME="/dev/mapper/p2vtestvg-striped" KNAME="/dev/dm-2" TYPE="lvm" SIZE="16777216" MAJ:MIN="254:2" '
        'PKNAME="/dev/sdb2" RO="0"'
    )
    lsblk = [*LSBLK.split("\n")[:3], striped, LSBLK.split("\n")[5]]
    text = PROBE_OUTPUT.replace(LSBLK, "\n".join(lsblk) + "\n").replace("/dev/dm-2\n", "")  # not a swap here
    with pytest.raises(SnapshotUnavailable, match="p2vtestvg/striped is striped"):
        plan_snapshots([parse_probe("/dev/sdb", text).layout], rows)


@pytest.mark.parametrize(
    ("attr", "reason"),
    [("owi-aos---", "has snapshots"), ("rwi-aor---", "RAID"), ("Vwi-aotz--", "thin volume")],
)
def test_plan_refuses_lv_kinds_it_cannot_map(attr: str, reason: str) -> None:
    rows = parse_pvs(PVS.replace("LVM2_LV_ATTR='-wi-ao----' LVM2_LV_SIZE='46137344'",
                                 f"LVM2_LV_ATTR='{attr}' LVM2_LV_SIZE='46137344'"))  # fmt: skip
    with pytest.raises(SnapshotUnavailable, match=f"p2vtestvg/logs.*{reason}"):
        plan_snapshots([layout()], rows)


def test_plan_refuses_lvm_on_crypt() -> None:
    crypt = (
        'NAME="/dev/sdb" KNAME="/dev/sdb" TYPE="disk" SIZE="536870912" MAJ:MIN="8:16" PKNAME="" RO="0"\n'
        'NAME="/dev/sdb1" KNAME="/dev/sdb1" TYPE="part" SIZE="536870912" MAJ:MIN="8:17" PKNAME="/dev/sdb" RO="0"\n'
        'NAME="/dev/mapper/c" KNAME="/dev/dm-5" TYPE="crypt" SIZE="534773760" MAJ:MIN="254:5" PKNAME="/dev/sdb1" '
        'RO="0"\n'
        'NAME="/dev/mapper/vg-root" KNAME="/dev/dm-6" TYPE="lvm" SIZE="104857600" MAJ:MIN="254:6" '
        'PKNAME="/dev/dm-5" RO="0"\n'
    )
    rows = parse_pvs(
        _pvs_row("/dev/mapper/c", 5, 534773760, 127, 1, 0, 25, "root", 104857600, 6, 0).replace(
            "LVM2_PV_MAJOR='8'", "LVM2_PV_MAJOR='254'"
        )
    )
    lay = parse_probe("/dev/sdb", "@lsblk\n" + crypt + "@starts\n/sys/class/block/sdb/sdb1 2048\n").layout
    with pytest.raises(SnapshotUnavailable, match="vg-root is not on a partition of /dev/sdb"):
        plan_snapshots([lay], rows)


def test_plan_refuses_a_pv_on_the_whole_disk() -> None:
    whole = PVS_WHOLE_DISK_INACTIVE.replace(
        "LVM2_LV_KERNEL_MAJOR='-1' LVM2_LV_KERNEL_MINOR='-1' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' "
        "LVM2_SEG_SIZE_PE='10'",
        "LVM2_LV_KERNEL_MAJOR='254' LVM2_LV_KERNEL_MINOR='0' LVM2_SEGTYPE='linear' LVM2_SEG_START_PE='0' "
        "LVM2_SEG_SIZE_PE='10'",
    )
    lsblk = (
        'NAME="/dev/loop0" KNAME="/dev/loop0" TYPE="loop" SIZE="268435456" MAJ:MIN="7:0" PKNAME="" RO="0"\n'
        'NAME="/dev/mapper/p2vtestvg-lv1" KNAME="/dev/dm-0" TYPE="lvm" SIZE="83886080" MAJ:MIN="254:0" '
        'PKNAME="/dev/loop0" RO="0"\n'
    )
    lay = parse_probe("/dev/loop0", "@lsblk\n" + lsblk).layout
    with pytest.raises(SnapshotUnavailable, match="whole disk"):
        plan_snapshots([lay], parse_pvs(whole))


def test_plan_needs_an_active_lv() -> None:
    plain = "\n".join(LSBLK.splitlines()[:3]) + "\n"
    lay = parse_probe("/dev/sdb", "@lsblk\n" + plain).layout
    with pytest.raises(SnapshotUnavailable, match="no active LVM logical volume"):
        plan_snapshots([lay], [])


# -- runs, scripts, modes ---------------------------------------------------------------


def test_dead_runs_are_those_whose_owner_is_gone() -> None:
    listing = (
        "run 0badc0de 0\n"  # owner gone
        "run 11112222 1\n"  # another live p2v on this host: left alone
        "view p2v-view-0badc0de-0\n"
        "view p2v-view-33334444-1\n"  # no state file at all (host rebooted? /run is empty then)
        "view vg0-root\n"
        "snap vg0/p2v-snap-55556666-0\n"
        "snap vg0/p2v-snap-11112222-0\n"
        "file /run/p2v-meta-77778888.img\n"
        "snap vg0/p2v-snap-notours\n"
    )
    assert dead_runs(listing, "99990000") == ["0badc0de", "33334444", "55556666", "77778888"]
    assert dead_runs("view p2v-view-99990000-0\n", "99990000") == []  # never the current run


def test_snapshot_output_is_parsed() -> None:
    snaps = parse_snapshot_output(
        "first 1700000000.100\nlast 1700000000.350\ndisk-loop /dev/sdb 7:0\ncapture-loop 7:1\n"
        "snap p2vtestvg/data 254:4\nsnap p2vtestvg/logs 254:7\n"
    )
    assert snaps.devices == {"p2vtestvg/data": "254:4", "p2vtestvg/logs": "254:7"}
    assert (snaps.disk_loops, snaps.capture_loop) == ({"/dev/sdb": "7:0"}, "7:1")
    assert snaps.spread_s == pytest.approx(0.25)


@pytest.mark.skipif(shutil.which("dash") is None and shutil.which("sh") is None, reason="no POSIX shell")
def test_every_remote_script_is_valid_posix_shell() -> None:
    mounts = [Mount("254:0", "/mnt/da'ta x", "ext4", False), Mount("8:17", "/", "ext4", False)]
    scripts = {
        "probe": _PROBE,
        "begin": _BEGIN,
        "remove": _REMOVE,
        "view": _CREATE_VIEW,
        "health": _HEALTH,
        "snapshots": snapshot_script("0badc0de", plan(), ["/dev/sdb"]),
        "freeze": freeze_script("0badc0de", mounts, 30),
    }
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell
    for name, script in scripts.items():
        res = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{name}: {res.stderr}"
    # the snapshot script checks the metadata revision and never freezes the origins itself
    snap = scripts["snapshots"]
    assert "vg_seqno p2vtestvg" in snap and "= 32 ]" in snap and "fsfreeze" not in snap
    assert snap.index("lvcreate") < snap.index("losetup")  # loops appear after the snapshots
    assert "'/mnt/da'\"'\"'ta x'" in scripts["freeze"]


def test_modes() -> None:
    assert MODES == ("auto", "lvm-snapshot", "freeze", "none")
    assert check_mode("freeze") == "freeze"
    with pytest.raises(UsageError, match="consistency mode 'snapshot': use one of auto, lvm-snapshot") as exc:
        check_mode("snapshot")
    assert exc.value.exit_code == 2


def _two_disks():
    """The fixture with sdb3 moved to a second disk: /dev/sdc1 (8:33), 1 MiB into /dev/sdc."""
    rows = parse_pvs(PVS.replace("/dev/sdb3", "/dev/sdc1").replace("LVM2_PV_MINOR='19'", "LVM2_PV_MINOR='33'"))
    sdb_lsblk = "\n".join(line for line in LSBLK.splitlines() if "sdb3" not in line and "swap" not in line)
    sdb = parse_probe(
        "/dev/sdb", "@lsblk\n" + sdb_lsblk + "\n@starts\n/sys/class/block/sdb/sdb2 133120\n@mountinfo\n" + MOUNTINFO
    ).layout
    sdc_lsblk = (
        'NAME="/dev/sdc" KNAME="/dev/sdc" TYPE="disk" SIZE="268435456" MAJ:MIN="8:32" PKNAME="" RO="0"\n'
        'NAME="/dev/sdc1" KNAME="/dev/sdc1" TYPE="part" SIZE="199229440" MAJ:MIN="8:33" PKNAME="/dev/sdc" RO="0"\n'
        'NAME="/dev/mapper/p2vtestvg-data" KNAME="/dev/dm-0" TYPE="lvm" SIZE="125829120" MAJ:MIN="254:0" '
        'PKNAME="/dev/sdc1" RO="0"\n'
        'NAME="/dev/mapper/p2vtestvg-swap" KNAME="/dev/dm-2" TYPE="lvm" SIZE="8388608" MAJ:MIN="254:2" '
        'PKNAME="/dev/sdc1" RO="0"\n'
    )
    sdc = parse_probe(
        "/dev/sdc", "@lsblk\n" + sdc_lsblk + "@starts\n/sys/class/block/sdc/sdc1 2048\n@swaps\n/dev/dm-2\n"
    ).layout
    return rows, sdb, sdc


def test_disks_read_together_share_one_set_of_snapshots() -> None:
    rows, sdb, sdc = _two_disks()
    p = plan_snapshots([sdb, sdc], rows)
    assert [t.key for t in p.targets] == ["p2vtestvg/data", "p2vtestvg/logs"]
    assert p.notes == []
    assert {m.disk for m in p.metadata} == {"/dev/sdb", "/dev/sdc"}
    assert [t.key for t in p.targets_on("/dev/sdc")] == ["p2vtestvg/data"]
    assert p.live == {"/dev/sdb": ["/mnt/boot2"], "/dev/sdc": ["swap /dev/mapper/p2vtestvg-swap"]}
    snaps = {"p2vtestvg/data": "254:10", "p2vtestvg/logs": "254:11"}
    on_sdc = view_lines(p, sdc, disk_device="7:2", capture_device="7:1", snapshot_devices=snaps)
    # LE 10 of data is PE 0 of sdc1, which starts 1 MiB into sdc; the capture offsets follow sdb's
    assert _resolve(on_sdc, 1 * MiB + 1 * MiB) == ("254:10", 10 * EXT)
    assert _resolve(on_sdc, 1 * MiB + 512) == ("7:1", CAPTURE_HEADER + 4 * MiB + 512)


def test_an_lv_continuing_on_a_disk_left_out_is_noted() -> None:
    rows, sdb, _ = _two_disks()
    p = plan_snapshots([sdb], rows)
    assert p.notes == ["p2vtestvg/data continues on /dev/sdc1, outside the disks read together"]
    assert {m.disk for m in p.metadata} == {"/dev/sdb"}
