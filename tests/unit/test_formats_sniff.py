import pytest

from p2v.disks.formats import detect_format, sniff_format
from p2v.errors import InvalidInput, SourceNotFound


def test_signatures(tmp_path):
    cases = {
        "a.qcow2": b"QFI\xfb" + b"\0" * 1020,
        "b.vmdk": b"KDMV" + b"\0" * 1020,
        "c.vhdx": b"vhdxfile" + b"\0" * 1016,
        "d.vhd": b"conectix" + b"\0" * 1016,
        "e.vmdk": b"# Disk DescriptorFile\nversion=1\n",
    }
    want = {"a.qcow2": "qcow2", "b.vmdk": "vmdk", "c.vhdx": "vhdx", "d.vhd": "vpc", "e.vmdk": "vmdk"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert sniff_format(p) == want[name]
        assert detect_format(p) == want[name]


def test_fixed_vhd_footer_at_end(tmp_path):
    p = tmp_path / "fixed.vhd"
    p.write_bytes(b"\0" * 4096 + b"conectix" + b"\0" * 504)
    assert detect_format(p) == "vpc"


def test_random_bytes_named_vhdx_is_refused_with_the_file_named(tmp_path):
    p = tmp_path / "disk.vhdx"
    p.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InvalidInput) as e:
        detect_format(p)
    assert str(p) in str(e.value) and "VHDX" in str(e.value)
    assert e.value.exit_code == 4


def test_raw_image_that_starts_like_qcow2_is_not_treated_as_raw(tmp_path):
    # a file named .img but carrying a qcow2 header is opened as qcow2 (and checked), never raw
    p = tmp_path / "disk.img"
    p.write_bytes(b"QFI\xfb" + b"\0" * 1020)
    assert detect_format(p) == "qcow2"


def test_missing_file(tmp_path):
    with pytest.raises(SourceNotFound) as e:
        detect_format(tmp_path / "nope.raw")
    assert e.value.exit_code == 3
