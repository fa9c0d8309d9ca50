"""Fallback sync: make a production disk equal to the DR disk, moving as little as possible.

The DR VM of machine M ran from recovery point P on overlays above P's layer. For one disk:

1. **C, changed at DR**: blocks the layers above P allocate (``qemu-img map``; the disk is
   not read), see :mod:`p2v.recovery.fallback_changes`.
2. **Classify the target**: the target hashes itself and reports only the blocks that differ
   from the *reference map* (P's map, with unknown digests computed from P's image; after an
   earlier pass against the same target, P's map with what that pass wrote: the *journal*).
   A mismatching block whose target content already equals the DR content is harmless (an
   earlier pass put it there). What remains is D: empty -> ``"equal"`` (send C); every block
   of D reads zero -> ``"blank"`` (copy every non-zero block of the DR disk); otherwise
   ``"diverged"``: :class:`SplitBrain`, unless ``discard_production_changes`` (send C and D).
3. **Send** each candidate block read from the DR image whose digest differs from what the
   target holds; all-zero blocks go as zeroing requests (no payload).
4. **Verify**: the target fsyncs, reads back every touched block and returns its digest;
   each must equal the DR digest. The journal is updated only then.

A pre-sync (``final=False``) and a final pass are the same operation; the journal makes the
second one move only what changed since. The DR image must not be written while it is read:
for the final pass stop the DR VM; for a pre-sync give a frozen layer (e.g. the overlay a
QMP ``blockdev-snapshot-sync`` left below the VM's new top). QEMU's image locks make
``qemu-img``/``qemu-nbd`` refuse an overlay a running VM writes, which is reported with that
advice. (Reading a live NBD export of the running VM is not implemented.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from p2v.disks.nbd import NbdDisk, open_image
from p2v.errors import P2VError, SplitBrain, UsageError, VerifyFailed
from p2v.protection.sources import SshOptions, source_kind
from p2v.recovery.fallback_changes import dr_changes, read_blocks, resolve_unknown
from p2v.recovery.fallback_targets import FallbackTarget, ImageFileTarget, SshDeviceTarget, ssh_launcher
from p2v.replication.model import ZERO_DIGEST, HashMap, digest, zeros
from p2v.site.site import Site

log = logging.getLogger(__name__)

PhaseProgress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``; phase is ``"scan"`` or ``"send"``."""

SCAN_CHUNK = 4 << 20


@dataclass
class FallbackResult:
    machine: str
    disk: int
    point: int
    target: str
    target_state: str  # "blank" | "equal" | "diverged" (only with discard_production_changes)
    final: bool
    blocks_changed_at_dr: int  # C
    bytes_changed_at_dr: int  # C in whole blocks
    bytes_allocated_at_dr: int  # what the layers above P allocate (conversion edits + DR writes)
    divergence_blocks: int  # D
    divergence_bytes: int
    blocks_sent: int  # blocks whose content went to the target (data or zeroing)
    bytes_sent: int  # write frames + payload towards the target (file target: data handed to the writer)
    bytes_written: int  # bytes applied at the target (data and zeros)
    scan_wire_bytes: int  # map up + mismatch replies down during classification (0 for a file)
    target_bytes_read: int  # read on the target side while classifying
    dr_bytes_read: int  # read from the DR image
    verified_blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def journal_path(site: Site, machine: str, seq_p: int, disk_index: int, target_url: str) -> Path:
    """Where the digests of what earlier passes left on this target are kept (in the site)."""
    tag = hashlib.sha256(target_url.encode()).hexdigest()[:12]
    return site.disk_dir(machine, disk_index) / f"fallback-p{seq_p:06d}-{tag}.map"


@contextlib.contextmanager
def open_target(url: str, ssh: SshOptions | None = None) -> Iterator[FallbackTarget]:
    """The production target ``url``: ``ssh://user@host[:port]/dev/sdX`` or an image file path."""
    kind = source_kind(url)
    if kind == "qemu":
        raise UsageError(f"fallback target {url!r}: give ssh://USER@HOST/DEVICE or an image file")
    if kind == "file":
        target = ImageFileTarget(Path(url))
        try:
            yield target
        finally:
            target.close()
        return
    from p2v.sources.ssh import parse_ssh_url

    ssh = ssh or SshOptions()
    t = parse_ssh_url(url)
    with t.session(identity=ssh.identity, known_hosts=ssh.known_hosts) as session:
        yield SshDeviceTarget(url, t.device, ssh_launcher(session))


@contextlib.contextmanager
def _machine_lock(site: Site, machine: str, purpose: str) -> Iterator[None]:
    if site.holds_lock(machine):
        yield
    else:
        with site.lock(machine, purpose):
            yield


def _blocks_bytes(indexes: Any, m: HashMap) -> int:
    return sum(m.block_range(i)[1] for i in indexes)


def reference_map(site: Site, machine: str, seq_p: int, disk_index: int, journal: Path | None = None) -> HashMap:
    """P's map with unknown digests computed from P's image, or the journal when there is one."""
    pmap = HashMap.load(site.point_map(machine, seq_p, disk_index))
    if journal is not None and journal.exists():
        with contextlib.suppress(P2VError):
            j = HashMap.load(journal)
            if (j.size, j.block_size) == (pmap.size, pmap.block_size):
                return j
        log.warning("%s: ignoring a damaged fallback journal", journal)
    point = site.point_image(machine, seq_p, disk_index)
    if pmap.unknown_count():
        with open_image(point, "qcow2", what=f"point {seq_p} of {machine}") as img:
            n = resolve_unknown(pmap, img)
        log.info("machine %s disk %d: computed %d unknown digests of point %d", machine, disk_index, n, seq_p)
    return pmap


@dataclass
class TargetState:
    """What a target holds compared with the point DR started from (no DR data read)."""

    state: str  # "blank" | "equal" | "diverged"
    divergence_blocks: int
    divergence_bytes: int
    journaled: bool  # an earlier fallback pass wrote to it (compared with its journal, not P)


def classify_target(site: Site, machine: str, seq_p: int, disk_index: int, target_url: str, *,
                    ssh_options: SshOptions | None = None) -> TargetState:  # fmt: skip
    """Scan the target against point ``seq_p``'s map (or the journal of an earlier pass) while the
    DR VM still runs: a fallback can refuse a split-brain before it stops anything."""
    jpath = journal_path(site, machine, seq_p, disk_index, target_url)
    ref = reference_map(site, machine, seq_p, disk_index, jpath)
    with open_target(target_url, ssh_options) as target:
        if 0 <= target.size < ref.size:
            raise UsageError(f"fallback target {target_url} has {target.size} bytes, smaller than the "
                             f"protected disk ({ref.size} bytes)")  # fmt: skip
        mism = target.scan(ref).mismatches
    if not mism:
        state = "equal"
    elif all(d == ZERO_DIGEST for d in mism.values()):
        state = "blank"
    else:
        state = "diverged"
    return TargetState(state, len(mism), _blocks_bytes(mism, ref), jpath.exists())


def split_brain_error(machine: str, disk_index: int, target_url: str, seq_p: int, ts: TargetState,
                      block_size: int) -> SplitBrain:  # fmt: skip
    return SplitBrain(
        f"machine {machine} disk {disk_index}: production target {target_url} was changed after failover: "
        f"{ts.divergence_bytes} bytes in {ts.divergence_blocks} blocks of {block_size} bytes differ from "
        f"recovery point {seq_p}",
        hint="check which side holds the data you need; to overwrite production with the DR disk, "
        "run again with --discard-production-changes",
    )


def fallback_disk(
    site: Site,
    machine: str,
    seq_p: int,
    disk_index: int,
    dr_image: Path,
    target_url: str,
    *,
    discard_production_changes: bool = False,
    ssh_options: SshOptions | None = None,
    progress: PhaseProgress | None = None,
    final: bool = True,
) -> FallbackResult:
    """Make ``target_url`` hold the DR disk (``dr_image``: the DR VM's overlay above point ``seq_p``).

    Raises :class:`SplitBrain` (exit 17) when production changed on its own and
    ``discard_production_changes`` is false; :class:`VerifyFailed` when the target does not
    read back what was sent; UsageError when ``dr_image`` is not based on the point;
    InvalidInput when the DR image is in use by a running VM or the target is too small;
    SourceNotFound / RemoteError / OutputError for target access problems.
    """
    t0 = time.monotonic()
    record = site.machine(machine)
    if not 0 <= disk_index < len(record.disks):
        raise UsageError(f"machine {machine} has no disk {disk_index} (it has {len(record.disks)})")
    dr_image = Path(dr_image).absolute()
    point_layer = site.point_image(machine, seq_p, disk_index)
    where = f"machine {machine} disk {disk_index}"
    with _machine_lock(site, machine, "fallback"):
        jpath = journal_path(site, machine, seq_p, disk_index, target_url)
        ref = reference_map(site, machine, seq_p, disk_index, jpath)
        bs, size = ref.block_size, ref.size
        changes = dr_changes(dr_image, point_layer, bs, size)
        changed = changes.blocks
        with (
            open_target(target_url, ssh_options) as target,
            open_image(dr_image, "qcow2", what=f"DR image {dr_image}") as dr,
        ):
            if 0 <= target.size < size:
                raise UsageError(f"fallback target {target_url} has {target.size} bytes, smaller than the "
                                 f"protected disk ({size} bytes)")  # fmt: skip
            scan = target.scan(ref, (lambda d, t: progress("scan", d, t)) if progress else None)
            mism = scan.mismatches
            dr_bytes = 0
            # a non-zero mismatch that already holds the DR content is an earlier pass's work
            harmless: dict[int, bytes] = {}
            nonzero = sorted(i for i, d in mism.items() if d != ZERO_DIGEST)
            for i, data in read_blocks(dr, nonzero, bs, size):
                dr_bytes += len(data)
                if digest(data) == mism[i]:
                    harmless[i] = mism[i]
            divergent = {i: d for i, d in mism.items() if i not in harmless}
            if not divergent:
                state = "equal"
            elif all(d == ZERO_DIGEST for d in divergent.values()):
                state = "blank"
            else:
                state = "diverged"
            div_bytes = _blocks_bytes(divergent, ref)
            if state == "diverged" and not discard_production_changes:
                raise SplitBrain(
                    f"{where}: production target {target_url} was changed after failover: {div_bytes} bytes in "
                    f"{len(divergent)} blocks of {bs} bytes differ from recovery point {seq_p} (and from the DR disk)",
                    hint="check which side holds the data you need; to overwrite production with the DR disk, "
                    "run again with --discard-production-changes",
                )
            log.info("%s: target %s is %s (%d blocks changed at DR, %d divergent)", where, target_url, state,
                     len(changed), len(divergent))  # fmt: skip

            def held(i: int) -> bytes:
                return mism.get(i, ref[i])

            sent: dict[int, bytes] = {}
            blocks: Iterator[tuple[int, bytes | None]]
            with target.writer(size, bs) as w:
                if state == "blank":
                    blocks = _dr_blocks_full(dr, ref, bs, size, held)
                else:
                    wanted = sorted(set(changed) | (set(divergent) if state == "diverged" else set()))
                    blocks = read_blocks(dr, wanted, bs, size)
                done = 0
                for i, content in blocks:
                    dr_bytes += len(content) if content is not None else 0
                    d = digest(content) if content is not None else ZERO_DIGEST
                    if d != held(i):
                        off = i * bs
                        length = min(bs, size - off)
                        # where the target holds what the reference map says, only the parts the
                        # DR layers allocate differ from it (the rest reads P's content on both sides)
                        parts = [(0, length)]
                        if d != ZERO_DIGEST and content is not None and state != "blank" and i not in mism:
                            parts = changes.pieces(i, length) or parts
                        for po, pl in parts:
                            piece = content[po : po + pl] if content is not None else None
                            if piece is None or piece == zeros(pl):
                                w.zero(off + po, pl)
                            else:
                                w.write(off + po, piece)
                        sent[i] = d
                    ref[i] = d  # after the pass the target holds the DR content
                    done += 1
                    if progress and done % 256 == 0:
                        progress("send", i * bs, size)
                outcome = w.finish()
            if progress:
                progress("send", size, size)
        bad = [i for i, d in sent.items() if outcome.digests.get(i) != d]
        if bad:
            offs = ", ".join(str(i * bs) for i in bad[:10])
            raise VerifyFailed(f"{where}: fallback target {target_url} does not read back what was sent: "
                               f"{len(bad)} of {len(sent)} blocks differ (offsets {offs})")  # fmt: skip
        for i, d in harmless.items():
            ref[i] = d
        tmp = jpath.with_name(jpath.name + ".tmp")
        ref.save(tmp)
        os.replace(tmp, jpath)
    return FallbackResult(
        machine=machine, disk=disk_index, point=seq_p, target=target_url, target_state=state, final=final,
        blocks_changed_at_dr=len(changed), bytes_changed_at_dr=_blocks_bytes(changed, ref),
        bytes_allocated_at_dr=changes.allocated_bytes,
        divergence_blocks=len(divergent), divergence_bytes=div_bytes, blocks_sent=len(sent),
        bytes_sent=outcome.bytes_sent, bytes_written=outcome.bytes_written,
        scan_wire_bytes=scan.wire_up + scan.wire_down, target_bytes_read=scan.bytes_read, dr_bytes_read=dr_bytes,
        verified_blocks=len(sent), seconds=time.monotonic() - t0,
    )  # fmt: skip


def _dr_blocks_full(
    dr: NbdDisk, ref: HashMap, bs: int, size: int, held: Callable[[int], bytes]
) -> Iterator[tuple[int, bytes | None]]:
    """Every block of the DR disk for a full copy: data blocks read, and (content ``None``)
    the blocks of zero extents where the target may not read zero."""
    for off, length, data in dr.scan(bs, chunk=SCAN_CHUNK):
        first, count = off // bs, (length + bs - 1) // bs
        if data is None:
            for i in range(first, first + count):
                if held(i) != ZERO_DIGEST:
                    yield i, None
            continue
        for k in range(count):
            yield first + k, data[k * bs : (k + 1) * bs]
