import pytest

from p2v.convert.linux.devices import _rewrite_text, appliance_device
from p2v.convert.linux.facts import DEVNAME_RE

DISKS = ["/dev/sda", "/dev/sdb"]


@pytest.mark.parametrize(
    "guest,expected",
    [
        ("/dev/sda1", "/dev/sda1"),
        ("/dev/hda2", "/dev/sda2"),
        ("/dev/vdb3", "/dev/sdb3"),
        ("/dev/xvda1", "/dev/sda1"),
        ("/dev/cciss/c0d1p2", "/dev/sdb2"),
        ("/dev/sdc1", None),  # no third disk
    ],
)
def test_guest_names_map_to_same_partition_in_appliance(guest, expected):
    assert appliance_device(guest, DISKS) == expected


def test_by_id_names_map_only_on_single_disk_guests():
    dev = "/dev/disk/by-id/ata-ST500DM002_Z3T0-part2"
    assert appliance_device(dev, ["/dev/sda"]) == "/dev/sda2"
    assert appliance_device(dev, DISKS) is None


def test_rewrite_keeps_comments_and_whole_tokens():
    fstab = (
        "# /dev/sda1 was the installer's root\n"
        "/dev/sda1 / ext4 errors=remount-ro 0 1\n"
        "/dev/sda10 /data ext4 defaults 0 2\n"
        "/dev/sda2 none swap sw 0 0\n"
    )
    out, done = _rewrite_text("/etc/fstab", fstab, {"/dev/sda1": "UUID=aaaa", "/dev/sda2": "UUID=bbbb"})
    lines = out.splitlines()
    assert lines[0].startswith("# /dev/sda1")  # comment untouched
    assert lines[1].startswith("UUID=aaaa / ext4")
    assert lines[2].startswith("/dev/sda10 ")  # not a prefix match
    assert lines[3].startswith("UUID=bbbb none swap")
    assert sum(r.count for r in done) == 2


def test_kernel_cmdline_rewrite():
    line = 'GRUB_CMDLINE_LINUX_DEFAULT="console=ttyS0 resume=/dev/sda2 root=/dev/sda1"\n'
    out, _ = _rewrite_text("/etc/default/grub", line, {"/dev/sda1": "UUID=r", "/dev/sda2": "UUID=s"})
    assert "resume=UUID=s" in out and "root=UUID=r" in out


def test_devname_regex_finds_hardware_names_only():
    text = "root=/dev/sda1 /dev/mapper/vg0-root /dev/vg0/root /dev/hdb3 /dev/cciss/c0d0p1 /dev/md0 UUID=x"
    assert DEVNAME_RE.findall(text) == ["/dev/sda1", "/dev/hdb3", "/dev/cciss/c0d0p1"]
