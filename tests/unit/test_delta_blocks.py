"""DR-side block delta: what reaches the layer, and the digests it records (no QEMU)."""

from __future__ import annotations

import random

from p2v.disks.nbd import _read_plan
from p2v.replication.delta import BlockDelta, block_digest, mode_for, sub_digests
from p2v.replication.model import UNKNOWN_DIGEST, ZERO_DIGEST, HashMap, SyncCounters, digest

BS = 64 * 1024


class RecordingLayer:
    def __init__(self, content: bytes) -> None:
        self.buf = bytearray(content)
        self.size = len(content)
        self.ops: list[tuple[str, int, int]] = []

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def pwrite(self, data: bytes, offset: int) -> None:
        self.ops.append(("write", offset, len(data)))
        self.buf[offset : offset + len(data)] = data

    def zero(self, length: int, offset: int) -> None:
        self.ops.append(("zero", offset, length))
        self.buf[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        pass


def test_block_digest_is_the_model_digest() -> None:
    rng = random.Random(1)
    for block in (bytes(BS), bytes(100), rng.randbytes(BS), rng.randbytes(4096 + 7), b"\0" * 4095 + b"\1"):
        assert block_digest(block) == digest(block)
    assert sub_digests(bytes(4096) + b"x" * 10) == [ZERO_DIGEST, digest(b"x" * 10)]


def test_changed_block_writes_only_differing_pieces_and_zeroes_emptied_ones() -> None:
    rng = random.Random(2)
    old_content = rng.randbytes(2 * BS)
    layer = RecordingLayer(old_content)
    old = HashMap(2 * BS, BS)
    for i in range(2):
        old[i] = digest(old_content[i * BS : (i + 1) * BS])
    counters = SyncCounters("hash")
    delta = BlockDelta(layer, old, counters)
    new_block = bytearray(old_content[BS:])
    new_block[4096 * 3 : 4096 * 3 + 10] = b"0123456789"  # piece 3 changed
    new_block[4096 * 7 : 4096 * 8] = bytes(4096)  # piece 7 became zero
    assert not delta.apply(0, old_content[:BS])  # unchanged block: nothing
    assert delta.apply(1, bytes(new_block))
    delta.finish()
    assert layer.ops == [("write", BS + 3 * 4096, 4096), ("zero", BS + 7 * 4096, 4096)]
    assert layer.buf[BS:] == new_block
    assert delta.new[1] == digest(bytes(new_block)) and delta.new[0] == old[0]
    assert counters.blocks_changed == 1 and counters.bytes_written == 4096


def test_seed_writes_are_combined_and_zero_pieces_skipped() -> None:
    rng = random.Random(3)
    size = 40 * BS
    layer = RecordingLayer(bytes(size))
    counters = SyncCounters("seed")
    delta = BlockDelta(layer, HashMap.zeros(size, BS), counters)
    blocks = [rng.randbytes(BS) for _ in range(40)]
    blocks[5] = bytes(BS)
    blocks[6] = bytes(4096) + rng.randbytes(BS - 4096)
    for i, b in enumerate(blocks):
        delta.apply(i, b)
    delta.finish()
    assert layer.buf == b"".join(blocks)
    writes = [op for op in layer.ops if op[0] == "write"]
    assert all(n <= 1 << 20 for _, _, n in writes)
    assert len(writes) <= 4  # runs of up to 1 MiB, split at the zero block and zero piece
    assert ("zero", 5 * BS, BS) not in layer.ops  # the layer already reads zeros there
    assert counters.zero_bytes == BS


def test_zero_range_zeroes_only_blocks_the_map_says_were_data() -> None:
    size = 8 * BS
    layer = RecordingLayer(b"\x07" * size)
    old = HashMap(size, BS)
    for i in (2, 3, 6):
        old[i] = digest(b"\x07" * BS)
    counters = SyncCounters("hash")
    delta = BlockDelta(layer, old, counters)
    delta.zero_range(0, size)
    delta.finish()
    assert layer.ops == [("zero", 2 * BS, 2 * BS), ("zero", 6 * BS, BS)]
    assert delta.new == HashMap.zeros(size, BS)
    assert counters.blocks_changed == 3


def test_unknown_entries_are_compared_with_the_layer() -> None:
    content = random.Random(4).randbytes(BS)
    layer = RecordingLayer(content)
    old = HashMap(BS, BS)
    old[0] = UNKNOWN_DIGEST
    delta = BlockDelta(layer, old, SyncCounters("hash"))
    assert delta.apply(0, content)  # the map changes...
    delta.finish()
    assert layer.ops == []  # ...but nothing is written
    assert delta.new[0] == digest(content)


def test_mode() -> None:
    assert mode_for(HashMap.zeros(BS), {}) == "seed"
    assert mode_for(HashMap.zeros(BS), {"kind": "file"}) == "hash"
    m = HashMap.zeros(BS)
    m[0] = b"\x05" * 16
    assert mode_for(m, {}) == "hash"


def test_read_plan_skips_whole_zero_blocks_only() -> None:
    mib = 1 << 20
    extents = [(0, 100_000, False), (100_000, 5 * mib, True), (100_000 + 5 * mib, 3 * mib, False)]
    end = 100_000 + 8 * mib
    plan = list(_read_plan(extents, BS, 4 * mib, end))
    # contiguous cover of the disk
    pos = 0
    for off, n, _ in plan:
        assert off == pos
        pos += n
    assert pos == end
    zero = [(o, n) for o, n, z in plan if z]
    assert zero == [(2 * BS, (100_000 + 5 * mib) // BS * BS - 2 * BS)]
    assert all(o % BS == 0 for o, _, _ in plan)
    assert all(n <= 4 * mib for _, n, z in plan if not z)
