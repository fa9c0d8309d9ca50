"""Re-protect a machine after fallback without a reseed.

After the final fallback pass, production holds the DR disk. The site already holds almost
all of it: the chain head (P, or a later point) plus the DR overlays. A new recovery point
whose content equals the DR disk is written like any sync (a partial layer over the head,
sealed by :meth:`~p2v.site.points.PointTransaction.commit`; a crash leaves the earlier
points as they were), but locally and only for the blocks that can differ between the head
and the DR disk: C (allocated above P in the DR image) and the blocks where the head's map
differs from P's (or either does not know its digest). Their content is read from the DR
image and only the 4 KiB pieces that differ from the head are written. The new map is the
head's with those digests replaced, so the next ``p2v sync`` (hash mode against it) moves
only what production changed after fallback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from p2v.disks.nbd import open_image, open_layer
from p2v.errors import SourceChanged, UsageError
from p2v.protection.sources import SshOptions, file_size, source_kind
from p2v.recovery.fallback_changes import changed_blocks, read_blocks, unknown_blocks
from p2v.recovery.fallback_sync import PhaseProgress, _machine_lock
from p2v.replication.delta import BlockDelta
from p2v.replication.model import HashMap, SyncCounters, SyncResult
from p2v.site.model import RecoveryPoint
from p2v.site.site import Site

log = logging.getLogger(__name__)


def _target_size(url: str, ssh: SshOptions) -> int:
    if source_kind(url) == "file":
        return file_size(Path(url))
    if source_kind(url) != "ssh":
        raise UsageError(f"production target {url!r}: give ssh://USER@HOST/DEVICE or an image file")
    from p2v.sources.ssh import parse_ssh_url
    from p2v.sources.ssh_copy import remote_device_size

    t = parse_ssh_url(url)
    with t.session(identity=ssh.identity, known_hosts=ssh.known_hosts) as session:
        return remote_device_size(session, t.device)


def set_source_urls(site: Site, machine: str, urls: list[str]) -> list[int]:
    """Point the machine's disks at ``urls`` (one per disk); returns the disks whose URL changed.

    (Done here through a catalog transaction until the site grows a method for it.)"""
    record = site.machine(machine)
    changed = [d.index for d, u in zip(record.disks, urls, strict=True) if d.url != u]
    if changed:
        mid = site.catalog.machine_row(machine)["id"]  # type: ignore[index]
        with site.catalog.transaction(f"pointing {machine} at its production disks") as db:
            db.executemany("UPDATE disks SET source_url = ? WHERE machine_id = ? AND idx = ?",
                           [(urls[i], mid, i) for i in changed])  # fmt: skip
    return changed


def reprotect_from_dr(
    site: Site,
    machine: str,
    seq_p: int,
    dr_images: list[Path],
    *,
    target_urls: list[str] | None = None,
    ssh_options: SshOptions | None = None,
    progress: PhaseProgress | None = None,
) -> RecoveryPoint:
    """Commit a new recovery point of ``machine`` equal to the DR disks (``dr_images[i]`` is disk
    i's DR overlay above point ``seq_p``); then, with ``target_urls``, make them the machine's
    sources so the next sync starts from the fallback state.

    Raises UsageError (wrong number of images/targets, an image not based on the point),
    SourceChanged (a target whose size is not the protected disk's), Busy (the machine is
    locked elsewhere), OutputError (the site is full; nothing is committed)."""
    t0 = time.monotonic()
    record = site.machine(machine)
    if len(dr_images) != len(record.disks):
        raise UsageError(f"machine {machine} has {len(record.disks)} disks, {len(dr_images)} DR images given")
    if target_urls is not None:
        if len(target_urls) != len(record.disks):
            raise UsageError(f"machine {machine} has {len(record.disks)} disks, {len(target_urls)} targets given")
        for d, url in zip(record.disks, target_urls, strict=True):
            size = _target_size(url, ssh_options or SshOptions())
            if size != d.size:
                raise SourceChanged(
                    f"production target {url} has {size} bytes, disk {d.index} of {machine} has {d.size}",
                    hint="a production disk of another size needs a new seed: p2v protect remove, then add",
                )
    images = [Path(p).absolute() for p in dr_images]
    with _machine_lock(site, machine, "reprotect"):
        pmaps = [HashMap.load(site.point_map(machine, seq_p, i)) for i in range(len(images))]
        changed = [
            changed_blocks(img, site.point_image(machine, seq_p, i), m.block_size, m.size)
            for i, (img, m) in enumerate(zip(images, pmaps, strict=True))
        ]
        with site.begin_point(machine) as tx:
            results: list[SyncResult] = []
            for part, img, pmap, c in zip(tx.disks, images, pmaps, changed, strict=True):
                head = part.old_map
                if (head.size, head.block_size) != (pmap.size, pmap.block_size):
                    raise UsageError(f"machine {machine} disk {part.index}: point {seq_p} and the head differ in "
                                     "geometry")  # fmt: skip
                wanted = set(c) | set(head.differing(pmap)) | set(unknown_blocks(head)) | set(unknown_blocks(pmap))
                counters = SyncCounters(mode="fallback", disk_size=part.size)
                with open_layer(part.partial_path, what=f"new point of {machine}") as layer, \
                        open_image(img, "qcow2", what=f"DR image {img}") as dr:  # fmt: skip
                    delta = BlockDelta(layer, head, counters)
                    done = 0
                    for i, data in read_blocks(dr, sorted(wanted), head.block_size, head.size):
                        counters.bytes_read += len(data)
                        delta.apply(i, data)
                        done += 1
                        if progress and done % 256 == 0:
                            progress("reprotect", i * head.block_size, head.size)
                    delta.finish()
                    layer.flush()
                counters.extra.update(blocks_considered=len(wanted), blocks_changed_at_dr=len(c), from_point=seq_p)
                counters.wall_s = time.monotonic() - t0
                state = {"kind": "fallback", "from_point": seq_p}
                results.append(SyncResult(delta.new, counters, state))
            point = tx.commit(results, consistency="crash-consistent",
                              meta={"detail": f"re-protected from the DR disks of point {seq_p} after fallback",
                                    "fallback_from": seq_p, "wall_s": time.monotonic() - t0})  # fmt: skip
        if target_urls is not None:
            moved = set_source_urls(site, machine, target_urls)
            if moved:
                log.info("machine %s: disks %s now read from their production targets", machine, sorted(moved))
    return point
