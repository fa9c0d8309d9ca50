import gzip
import lzma

import pytest

from p2v.convert.linux.initrd import list_initrd, modules_in


def _newc(files: dict[str, bytes]) -> bytes:
    out = b""
    ino = 1
    for name, data in [*files.items(), ("TRAILER!!!", b"")]:
        nb = name.encode() + b"\0"
        hdr = b"070701" + b"".join(
            f"{v:08x}".encode()
            for v in (ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        rec = hdr + nb
        rec += b"\0" * (-len(rec) % 4)
        rec += data + b"\0" * (-len(data) % 4)
        out += rec
        ino += 1
    return out


def test_microcode_then_compressed_main_archive():
    early = _newc({"kernel/x86/microcode/GenuineIntel.bin": b"ucode"})
    main = _newc({
        "usr/lib/modules/6.1.0/kernel/drivers/block/virtio_blk.ko": b"x",
        "usr/lib/modules/6.1.0/kernel/drivers/ata/ahci.ko.xz": b"y",
        "./init": b"#!/bin/sh",
    })
    for comp in (gzip.compress, lambda b: lzma.compress(b, format=lzma.FORMAT_XZ)):
        data = early + b"\0" * 512 + comp(main)
        names = list_initrd(data)
        assert "init" in names and "kernel/x86/microcode/GenuineIntel.bin" in names
        assert modules_in(names) == {"virtio_blk", "ahci"}


def test_garbage_is_an_error_not_an_empty_listing():
    with pytest.raises(ValueError):
        list_initrd(b"this is not an initramfs")


def test_round_trip_keeps_prefix_and_every_entry():
    from p2v.convert.linux.initrd import CpioEntry, read_initrd, write_initrd

    early = _newc({"kernel/x86/microcode/AuthenticAMD.bin": b"amd"})
    main = _newc({"init": b"#!/bin/sh\n", "conf/modules": b"ahci\n"})
    for kind, comp in (("gzip", gzip.compress), ("xz", lambda b: lzma.compress(b, format=lzma.FORMAT_XZ))):
        img = read_initrd(early + comp(main))
        assert img.prefix == early and img.compression == kind
        assert {e.name: e.data for e in img.entries} == {"init": b"#!/bin/sh\n", "conf/modules": b"ahci\n"}
        img.entries.append(CpioEntry("lib/virtio_blk.ko", 0o100644, b"ko"))
        again = read_initrd(write_initrd(img))
        assert again.prefix == early and again.compression == kind
        assert [e.name for e in again.entries] == ["init", "conf/modules", "lib/virtio_blk.ko"]
        assert list_initrd(write_initrd(img)) >= {"kernel/x86/microcode/AuthenticAMD.bin", "lib/virtio_blk.ko"}
