"""VMDK descriptors, extents, snapshot parents and sparse headers (pure Python, no qemu).

Sparse files with grain tables are built byte by byte here; the qemu-img-made
ones (and the qemu-img check path) are exercised in tests/integration/test_ova.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from p2v.errors import InvalidInput, SourceNotFound, UnsafeInput
from p2v.sources.vmdk import (
    inspect_sparse,
    looks_like_descriptor,
    parse_descriptor,
    read_descriptor,
    validate_vmdk,
)

FLAT = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=12345678
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 4096 FLAT "base-flat.vmdk" 0

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "2"
ddb.virtualHWVersion = "14"
"""


def descriptor(create_type: str, extents: list[str], parent: str | None = None, adapter: str = "ide") -> str:
    lines = ["# Disk DescriptorFile", "version=1", "CID=0000abcd"]
    lines.append("parentCID=0000abcd" if parent else "parentCID=ffffffff")
    if parent:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += [f'createType="{create_type}"', "", *extents, "", f'ddb.adapterType = "{adapter}"', ""]
    return "\n".join(lines)


def flat_file(path: Path, sectors: int) -> None:
    with open(path, "wb") as f:
        f.truncate(sectors * 512)


def test_parse_monolithic_flat() -> None:
    d = parse_descriptor(FLAT, origin="base.vmdk")
    assert d.create_type == "monolithicFlat"
    assert (d.version, d.cid, d.parent_cid) == (1, 0x12345678, 0xFFFFFFFF)
    assert len(d.extents) == 1
    e = d.extents[0]
    assert (e.access, e.sectors, e.type, e.filename, e.offset) == ("RW", 4096, "FLAT", "base-flat.vmdk", 0)
    assert d.adapter_type == "lsilogic"
    assert d.capacity == 4096 * 512
    assert d.parent_hint is None
    assert not d.embedded


def test_parse_split_sparse_snapshot_and_zero_extents() -> None:
    text = descriptor(
        "twoGbMaxExtentSparse",
        ['RW 4192256 SPARSE "w-s001.vmdk"', 'RDONLY 8192 SPARSE "w-s002.vmdk"', "RW 1024 ZERO",
         'NOACCESS 100 VMFS "raw-flat.vmdk" 2048'],
        parent="w-base.vmdk",
    )
    d = parse_descriptor(text, origin="w-000001.vmdk")
    assert [(e.access, e.type, e.filename, e.offset) for e in d.extents] == [
        ("RW", "SPARSE", "w-s001.vmdk", 0),
        ("RDONLY", "SPARSE", "w-s002.vmdk", 0),
        ("RW", "ZERO", None, 0),
        ("NOACCESS", "VMFS", "raw-flat.vmdk", 2048),
    ]
    assert d.parent_hint == "w-base.vmdk"
    assert d.capacity == (4192256 + 8192 + 1024 + 100) * 512


def test_descriptor_errors_name_the_file() -> None:
    with pytest.raises(InvalidInput, match=r"x\.vmdk: not a VMDK descriptor"):
        parse_descriptor("RW 10 FLAT \"a\" 0\n", origin="x.vmdk")
    with pytest.raises(InvalidInput, match=r"x\.vmdk: VMDK descriptor lists no extents"):
        parse_descriptor('createType="monolithicFlat"\n', origin="x.vmdk")
    with pytest.raises(InvalidInput, match=r"x\.vmdk: line 2: unknown VMDK extent type 'WEIRD'"):
        parse_descriptor('createType="vmfs"\nRW 10 WEIRD "a" 0\n', origin="x.vmdk")


def test_looks_like_descriptor() -> None:
    assert looks_like_descriptor(FLAT.encode())
    assert not looks_like_descriptor(b"KDMV" + bytes(508))
    assert not looks_like_descriptor(b"\0" * 512)


def test_read_descriptor_text_and_not_a_vmdk(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_text(FLAT)
    assert read_descriptor(tmp_path / "base.vmdk").create_type == "monolithicFlat"  # type: ignore[union-attr]
    (tmp_path / "junk.vmdk").write_bytes(b"\x00" * 1024)
    with pytest.raises(InvalidInput, match=r"junk\.vmdk: not a VMDK"):
        read_descriptor(tmp_path / "junk.vmdk")
    with pytest.raises(SourceNotFound, match=r"nope\.vmdk"):
        read_descriptor(tmp_path / "nope.vmdk")


def test_validate_flat_vmdk(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_text(FLAT)
    flat_file(tmp_path / "base-flat.vmdk", 4096)
    disk = validate_vmdk(tmp_path / "base.vmdk")
    assert disk.format == "vmdk"
    assert disk.qemu_filename == str(tmp_path / "base.vmdk")
    assert disk.capacity == 4096 * 512
    assert (disk.bus, disk.controller) == ("scsi", "lsilogic")


def test_missing_extent_is_source_not_found(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_text(FLAT)
    with pytest.raises(SourceNotFound) as err:
        validate_vmdk(tmp_path / "base.vmdk")
    assert "base-flat.vmdk" in err.value.message
    assert str(tmp_path / "base.vmdk") in err.value.message


def test_truncated_flat_extent_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "base.vmdk").write_text(FLAT)
    flat_file(tmp_path / "base-flat.vmdk", 4095)
    with pytest.raises(InvalidInput, match=r"base-flat\.vmdk' is truncated: 2096640 bytes, .* needs 2097152"):
        validate_vmdk(tmp_path / "base.vmdk")


@pytest.mark.parametrize("name", ["../outside-flat.vmdk", "/etc/hostname", "sub/../../outside-flat.vmdk"])
def test_extent_outside_the_folder_is_unsafe(tmp_path: Path, name: str) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    flat_file(tmp_path / "outside-flat.vmdk", 8)
    (vm / "d.vmdk").write_text(descriptor("monolithicFlat", [f'RW 8 FLAT "{name}" 0']))
    with pytest.raises(UnsafeInput) as err:
        validate_vmdk(vm / "d.vmdk")
    assert name in err.value.message
    assert "outside" in err.value.message


def test_extent_symlink_leaving_the_folder_is_unsafe(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    flat_file(tmp_path / "secret", 8)
    (vm / "d-flat.vmdk").symlink_to(tmp_path / "secret")
    (vm / "d.vmdk").write_text(descriptor("monolithicFlat", ['RW 8 FLAT "d-flat.vmdk" 0']))
    with pytest.raises(UnsafeInput, match=r"d-flat\.vmdk"):
        validate_vmdk(vm / "d.vmdk")


def test_snapshot_chain_inside_the_folder(tmp_path: Path) -> None:
    flat_file(tmp_path / "base-flat.vmdk", 64)
    (tmp_path / "base.vmdk").write_text(descriptor("monolithicFlat", ['RW 64 FLAT "base-flat.vmdk" 0']))
    flat_file(tmp_path / "snap-flat.vmdk", 64)
    (tmp_path / "snap.vmdk").write_text(
        descriptor("monolithicFlat", ['RW 64 FLAT "snap-flat.vmdk" 0'], parent="base.vmdk")
    )
    assert validate_vmdk(tmp_path / "snap.vmdk").capacity == 64 * 512


def test_parent_outside_the_folder_is_unsafe(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    flat_file(vm / "snap-flat.vmdk", 64)
    (vm / "snap.vmdk").write_text(
        descriptor("monolithicFlat", ['RW 64 FLAT "snap-flat.vmdk" 0'],
                   parent="/vmfs/volumes/datastore1/other/base.vmdk")
    )
    with pytest.raises(UnsafeInput) as err:
        validate_vmdk(vm / "snap.vmdk")
    assert "/vmfs/volumes/datastore1/other/base.vmdk" in err.value.message
    assert "parent" in err.value.message


def test_missing_parent_is_source_not_found(tmp_path: Path) -> None:
    flat_file(tmp_path / "snap-flat.vmdk", 64)
    (tmp_path / "snap.vmdk").write_text(
        descriptor("monolithicFlat", ['RW 64 FLAT "snap-flat.vmdk" 0'], parent="base.vmdk")
    )
    with pytest.raises(SourceNotFound, match=r"parent VMDK 'base\.vmdk' not found"):
        validate_vmdk(tmp_path / "snap.vmdk")


def test_parent_loop_is_invalid(tmp_path: Path) -> None:
    flat_file(tmp_path / "a-flat.vmdk", 8)
    flat_file(tmp_path / "b-flat.vmdk", 8)
    for me, other in (("a", "b"), ("b", "a")):
        text = descriptor("monolithicFlat", [f'RW 8 FLAT "{me}-flat.vmdk" 0'], parent=f"{other}.vmdk")
        (tmp_path / f"{me}.vmdk").write_text(text)
    with pytest.raises(InvalidInput, match="loops"):
        validate_vmdk(tmp_path / "a.vmdk")


def test_raw_device_mapping_is_refused(tmp_path: Path) -> None:
    flat_file(tmp_path / "lun-rdm.vmdk", 8)
    (tmp_path / "lun.vmdk").write_text(descriptor("vmfsRawDeviceMap", ['RW 8 VMFSRDM "lun-rdm.vmdk"']))
    with pytest.raises(InvalidInput, match="raw device mapping"):
        validate_vmdk(tmp_path / "lun.vmdk")


# --- synthetic hosted-sparse files ------------------------------------------------------------------

GRAIN = 128  # sectors (64 KiB)
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")


def sparse_vmdk(path: Path, *, capacity: int = 4096, grains: tuple[int, ...] = (0, 5),
                desc: str | None = None, compressed_sizes: tuple[int, ...] | None = None) -> int:
    """Write a monolithicSparse VMDK (header, embedded descriptor, 1 GD, GTs, grains); return its size.

    ``grains`` are the virtual grain numbers that hold data. With ``compressed_sizes``, grains
    are stream-style (12-byte marker + compressed bytes) and the compressed flag is set.
    """
    desc_sector, desc_sectors, gd_sector = 1, 20, 21
    gtes = 512
    gt_count = -(-capacity // (GRAIN * gtes))
    gt_sector = gd_sector + 1
    first_grain = 128
    flags = 0x3 | ((1 << 16) | (1 << 17) if compressed_sizes else 0)
    header = HEADER.pack(b"KDMV", 3 if compressed_sizes else 1, flags, capacity, GRAIN, desc_sector,
                         desc_sectors, gtes, 0, gd_sector, first_grain, 0, b"\n \r\n",
                         1 if compressed_sizes else 0)
    data = bytearray(header.ljust(512, b"\0"))
    text = (desc or descriptor("monolithicSparse", [f'RW {capacity} SPARSE "{path.name}"'])).encode()
    data += text.ljust(desc_sectors * 512, b"\0")
    gd = [gt_sector + i * 4 for i in range(gt_count)]
    data += struct.pack(f"<{len(gd)}I", *gd).ljust(512, b"\0")
    table = [0] * (gt_count * gtes)
    sector = first_grain
    payload = bytearray()
    for i, g in enumerate(grains):
        table[g] = sector
        if compressed_sizes:
            size = compressed_sizes[i]
            blob = struct.pack("<QI", g * GRAIN, size) + b"\x5a" * size
            blob = blob.ljust(-(-len(blob) // 512) * 512, b"\0")
        else:
            blob = bytes([i + 1]) * (GRAIN * 512)
        payload += blob
        sector += len(blob) // 512
    data += struct.pack(f"<{len(table)}I", *table)
    data = data.ljust(first_grain * 512, b"\0") + payload
    path.write_bytes(bytes(data))
    return len(data)


def test_embedded_descriptor_is_read(tmp_path: Path) -> None:
    sparse_vmdk(tmp_path / "s.vmdk")
    d = read_descriptor(tmp_path / "s.vmdk")
    assert d is not None
    assert d.embedded
    assert d.create_type == "monolithicSparse"
    assert d.extents[0].type == "SPARSE"
    header, embedded = inspect_sparse(tmp_path / "s.vmdk")
    assert header.capacity_sectors == 4096
    assert header.grain_sectors == GRAIN
    assert embedded is not None and embedded.create_type == "monolithicSparse"


def test_sparse_without_embedded_descriptor_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    sparse_vmdk(path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<QQ", raw, 28, 0, 0)  # descriptorOffset, descriptorSize
    path.write_bytes(bytes(raw))
    assert read_descriptor(path) is None
    (tmp_path / "delta.vmdk").write_bytes(b"COWD" + bytes(2044))
    assert read_descriptor(tmp_path / "delta.vmdk") is None


@pytest.mark.parametrize("cut", [1, 512, GRAIN * 512 - 1])
def test_sparse_cut_inside_its_last_grain_is_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "s.vmdk"
    size = sparse_vmdk(path)
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with pytest.raises(InvalidInput) as err:
        inspect_sparse(path)
    msg = err.value.message
    assert msg.startswith(f"{path}: VMDK is truncated")
    assert str(size - cut) in msg
    assert "\n" not in msg


def test_sparse_cut_before_its_grain_tables_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    sparse_vmdk(path)
    with open(path, "r+b") as f:
        f.truncate(22 * 512 + 100)  # inside the first grain table
    with pytest.raises(InvalidInput, match="grain table at sector 22 lies past the end"):
        inspect_sparse(path)


def test_compressed_grains_checked_by_their_marker(tmp_path: Path) -> None:
    path = tmp_path / "c.vmdk"
    size = sparse_vmdk(path, compressed_sizes=(1000, 3000))
    inspect_sparse(path)  # complete: fine
    # the last grain's marker says 3000 bytes follow; keep fewer
    last_grain_start = 128 * 512 + 1024
    with open(path, "r+b") as f:
        f.truncate(last_grain_start + 12 + 2999)
    assert size > last_grain_start + 12 + 2999
    with pytest.raises(InvalidInput, match="truncated"):
        inspect_sparse(path)


def test_corrupt_sparse_header_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    sparse_vmdk(path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<Q", raw, 20, 100)  # grain size not a power of two
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInput, match="grain size 100"):
        inspect_sparse(path)
    path.write_bytes(b"KDMV" + bytes(100))
    with pytest.raises(InvalidInput, match="truncated"):
        inspect_sparse(path)


def test_sparse_window_inside_a_bigger_file(tmp_path: Path) -> None:
    inner = tmp_path / "s.vmdk"
    size = sparse_vmdk(inner)
    container = tmp_path / "box.bin"
    container.write_bytes(b"\xff" * 1536 + inner.read_bytes() + b"\xee" * 700)
    header, _ = inspect_sparse(container, offset=1536, size=size, label="box:s.vmdk")
    assert header.capacity_sectors == 4096
    with pytest.raises(InvalidInput, match=r"box:s\.vmdk: VMDK is truncated"):
        inspect_sparse(container, offset=1536, size=size - 600, label="box:s.vmdk")
