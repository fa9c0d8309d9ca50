"""A drive of a running QEMU as a replication source: persistent dirty bitmaps, a
point-in-time NBD export served by QEMU itself, and reads of the dirty extents only.

One :meth:`LiveQemuSource.sync`, all over QMP on the VM's monitor socket:

1. **Bitmaps.** Every ``p2v-*`` bitmap on the node except the one the last committed point
   recorded (``state["bitmap"]``) is removed: those belong to syncs whose point never
   committed. The recorded bitmap is trusted only when it exists, QEMU does not flag it
   ``inconsistent`` (an unclean stop while the image was open), it is recording, and its
   granularity is the one it was made with; otherwise the sync falls back to reading the
   whole export and comparing with the old hash map (mode ``hash``, the reason in
   ``counters.extra["fallback"]``).
2. **Point in time.** One QMP ``transaction`` adds the next bitmap ``p2v-<gen+1>`` (it
   records every write after this instant), freezes a copy of the recorded bitmap onto the
   fleecing node, and starts ``blockdev-backup sync=none`` from the drive into that node: a
   temporary qcow2 overlay whose backing is the drive itself. QEMU then copies each cluster
   the guest is about to overwrite into the overlay first (copy-before-write), so reading
   the overlay shows the drive exactly as it was at the transaction while the guest keeps
   writing. The point is therefore crash-consistent: :attr:`LiveQemuSource.consistency`.
3. **Export.** QEMU serves the overlay on a private unix socket (``nbd-server-start`` +
   ``block-export-add`` with the frozen bitmap); :mod:`p2v.replication.qemu_live_io` reads
   it (``base:allocation`` + ``qemu:dirty-bitmap:p2v-<gen>`` block status, many reads in
   flight) into the target layer.
4. **Clean-up** (also when the sync fails): the export, the NBD server, the backup job, the
   overlay node and its file. Leftovers of a p2v process that died mid-sync are removed at
   the start of the next sync.

The previous bitmap is *not* removed at the end: the catalog has not committed the new
point yet. The next sync removes it (step 1), after the commit that recorded the new one.
If this sync fails, the recorded bitmap still covers every write since the committed point
(it was never disabled or cleared), so nothing is lost.

qcow2 drives get persistent bitmaps (stored in the image on a clean QEMU stop, flagged
inconsistent after a crash). Raw drives (and qcow2 v2) get in-memory bitmaps: they are lost
when QEMU restarts, and the next sync then falls back to hash mode.

The QEMU monitor accepts one client at a time: a source connects for one query or one sync
and disconnects after, so several sources (the disks of one VM) can share the socket; pass
``qmp=`` (a callable running one QMP command) when the caller holds the monitor itself. QEMU
runs one NBD server: the disks of one VM are synced one after the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from p2v.errors import Busy, InvalidInput, MissingComponent, SourceChanged, SourceNotFound, UsageError, VmError
from p2v.replication.model import (
    DEFAULT_BLOCK,
    SUB_BLOCK,
    HashMap,
    LayerTarget,
    ProgressCallback,
    SyncCounters,
    SyncResult,
)
from p2v.replication.qemu_live_io import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_REHASH_SHARE,
    ExportReader,
    PassStats,
    dirty_pass,
    full_pass,
)
from p2v.vm.qmp import QmpConnection

log = logging.getLogger(__name__)

QmpExecute = Callable[[str, dict[str, Any] | None], Any]
"""Runs one QMP command with its arguments and returns its ``return`` value (raises VmError)."""

CONSISTENCY = "crash-consistent"
BITMAP_PREFIX = "p2v-"
DEFAULT_GRANULARITY = 4096
WAIT_S = 30.0
_FLEECE_DIR_PREFIX = "p2v-fleece-"
_POLL_S = 0.05


# -- URLs ------------------------------------------------------------------------------------


def parse_qemu_url(text: str) -> tuple[Path, str]:
    """``qemu:///abs/path/qmp.sock?node=NODE`` -> (QMP socket, node). Raises :class:`UsageError`.

    NODE is a block node name (``-blockdev ...,node-name=NODE``), a ``-drive`` id or a guest
    device id; it is looked up again at every sync.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"bad QEMU source URL {text!r}: {why}", hint="expected qemu:///PATH/TO/qmp.sock?node=NODE")

    if not text.lower().startswith("qemu://"):
        raise bad("it must start with qemu://")
    parts = urllib.parse.urlsplit(text)
    if parts.netloc:
        raise bad(f"{parts.netloc!r}: only local QEMUs (qemu:///path, three slashes) are supported")
    if parts.fragment:
        raise bad("fragments are not allowed")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise bad("the QMP socket path must be absolute")
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise bad(f"query {parts.query!r} is malformed") from exc
    unknown = sorted(set(query) - {"node"})
    if unknown:
        raise bad(f"unknown parameter(s) {', '.join(unknown)}; only node= is accepted")
    nodes = query.get("node", [])
    if len(nodes) != 1 or not nodes[0]:
        raise bad("give exactly one node=NODE (the drive's block node name or id)")
    if not re.fullmatch(r"[A-Za-z0-9#/_.:-]+", nodes[0]):
        raise bad(f"node {nodes[0]!r} has characters QEMU does not allow in names")
    return Path(path), nodes[0]


def qemu_url(socket_path: Path, node: str) -> str:
    """The URL :func:`parse_qemu_url` reads back (``#`` of auto-generated node names is escaped)."""
    return f"qemu://{urllib.parse.quote(str(socket_path))}?node={urllib.parse.quote(node, safe='/')}"


# -- what QEMU reports about the drive -------------------------------------------------------


@dataclass(frozen=True)
class BitmapInfo:
    name: str
    granularity: int
    recording: bool = True
    persistent: bool = False
    busy: bool = False
    inconsistent: bool = False
    count: int = 0  # dirty bytes

    @classmethod
    def from_qmp(cls, d: dict[str, Any]) -> BitmapInfo:
        return cls(str(d["name"]), int(d["granularity"]), bool(d.get("recording", True)),
                   bool(d.get("persistent", False)), bool(d.get("busy", False)),
                   bool(d.get("inconsistent", False)), int(d.get("count", 0)))  # fmt: skip


@dataclass(frozen=True)
class DriveNode:
    """The block node a source reads: its name, format driver, size and bitmaps."""

    node_name: str
    driver: str
    size: int
    persistent_ok: bool  # qcow2 v3, writable: bitmaps can be stored in the image
    bitmaps: tuple[BitmapInfo, ...] = ()
    file: str = ""

    def bitmap(self, name: str) -> BitmapInfo | None:
        return next((b for b in self.bitmaps if b.name == name), None)

    @classmethod
    def from_qmp(cls, d: dict[str, Any]) -> DriveNode:
        image = d.get("image") or {}
        compat = ((image.get("format-specific") or {}).get("data") or {}).get("compat")
        driver = str(d.get("drv", ""))
        return cls(
            node_name=str(d["node-name"]),
            driver=driver,
            size=int(image.get("virtual-size", 0)),
            persistent_ok=driver == "qcow2" and compat != "0.10" and not d.get("ro", False),
            bitmaps=tuple(BitmapInfo.from_qmp(b) for b in d.get("dirty-bitmaps") or [] if b.get("name")),
            file=str(d.get("file", "")),
        )


def judge_bitmap(state: dict[str, Any], node: str, drive: DriveNode, granularity: int) -> str | None:
    """Why the bitmap ``state`` names cannot be trusted for an incremental sync, or None if it can.

    ``state`` is what the last committed point recorded (non-empty); ``granularity`` the one
    the bitmap is expected to have when the state does not say.
    """
    name = state.get("bitmap")
    gen = state.get("generation")
    if not isinstance(name, str) or not isinstance(gen, int) or name != f"{BITMAP_PREFIX}{gen}":
        return f"the recorded source state names no usable bitmap ({name!r}, generation {gen!r})"
    if state.get("node", node) != node:
        return f"the recorded bitmap belongs to node {state.get('node')!r}, not {node!r}"
    bm = drive.bitmap(name)
    if bm is None:
        why = "non-persistent bitmaps are lost when QEMU restarts" if not drive.persistent_ok else \
            "QEMU was restarted on another image, or the bitmap was removed"  # fmt: skip
        return f"bitmap {name} is not on node {drive.node_name} ({why})"
    if bm.inconsistent:
        return f"bitmap {name} is marked inconsistent (QEMU stopped without saving it: crash or kill)"
    if not bm.recording:
        return f"bitmap {name} is disabled (something stopped it recording writes)"
    if bm.busy:
        return f"bitmap {name} is in use by another QEMU operation"
    expected = int(state.get("granularity", granularity))
    if bm.granularity != expected:
        return f"bitmap {name} has granularity {bm.granularity}, expected {expected}"
    return None


# -- the source ------------------------------------------------------------------------------


@dataclass
class _Names:
    """Names of the temporary QEMU objects of one node's sync (QEMU node names: <= 31 chars)."""

    tag: str
    fleece: str = ""
    job: str = ""
    export_id: str = ""
    export_name: str = ""

    def __post_init__(self) -> None:
        self.fleece = f"p2v-fl-{self.tag}"
        self.job = f"p2v-job-{self.tag}"
        self.export_id = f"p2v-exp-{self.tag}"
        self.export_name = f"p2v-{self.tag}"


@dataclass
class _Fleece:
    """What one sync created in QEMU, for the clean-up."""

    tmp: Path | None = None
    node_added: bool = False
    job_started: bool = False
    server_started: bool = False
    export_added: bool = False
    socket: Path | None = None
    warnings: list[str] = field(default_factory=list)


class LiveQemuSource:
    """The drive ``node`` of the QEMU whose QMP monitor listens on ``qmp_socket``.

    ``size`` (bytes) is checked against QEMU's at every sync when given. ``granularity`` is
    the dirty bitmap's (a power of two, >= 4 KiB). ``work_dir`` holds the temporary fleecing
    overlay and the NBD socket (default: the system temp dir; QEMU must be able to create
    files there, and it grows by what the guest writes during the sync). ``block_size`` is
    informational: the geometry of the map passed to :meth:`sync` rules. ``rehash_share``
    (0..1): touched coarse blocks at least this dirty get an exact digest (their clean part read
    back from the target), sparser ones UNKNOWN_DIGEST; 0 keeps the map exact at ~2x the bitmap
    sync time for sparse random writes; see :mod:`p2v.replication.qemu_live_io`.
    """

    consistency = CONSISTENCY

    def __init__(
        self,
        qmp_socket: Path,
        node: str,
        size: int | None = None,
        *,
        block_size: int = DEFAULT_BLOCK,
        granularity: int = DEFAULT_GRANULARITY,
        work_dir: Path | None = None,
        qmp: QmpExecute | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
        rehash_share: float = DEFAULT_REHASH_SHARE,
        timeout: float = WAIT_S,
    ) -> None:
        if granularity < SUB_BLOCK or granularity & (granularity - 1):
            raise UsageError(f"dirty bitmap granularity {granularity}: use a power of two of at least {SUB_BLOCK}")
        self.qmp_socket = Path(qmp_socket)
        self.node = node
        self.url = qemu_url(self.qmp_socket, node)
        self.block_size = block_size
        self.granularity = granularity
        self.work_dir = work_dir
        self.in_flight = in_flight
        self.rehash_share = min(1.0, max(0.0, rehash_share))
        self.timeout = timeout
        self._names = _Names(hashlib.sha256(node.encode()).hexdigest()[:8])
        self._given = qmp
        self._conn: QmpConnection | None = None
        if qmp is None and not self.qmp_socket.exists():
            raise SourceNotFound(f"{self.url}: no QMP socket at {self.qmp_socket} (is the VM running?)")
        with self._monitor():
            actual = self.drive().size
        if size is not None and size != actual:
            raise SourceChanged(f"{self.url}: the drive is {actual} bytes, expected {size}")
        self.size = actual

    @property
    def _dir_prefix(self) -> str:
        return f"{_FLEECE_DIR_PREFIX}{self._names.tag}-"

    # -- lifecycle --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _monitor(self) -> Iterator[None]:
        """Hold the QMP monitor for one query or one sync only: QEMU serves one client per
        monitor socket, and the other disks of the same VM (or ``p2v vm stop``) need it too."""
        if self._given is not None or self._conn is not None:
            yield
            return
        conn = QmpConnection(self.qmp_socket, vm_name=str(self.qmp_socket), timeout=self.timeout)
        try:
            conn.connect()
        except VmError as exc:
            conn.close()
            raise VmError(f"{self.url}: {exc.message}", hint="QEMU serves one client per monitor socket: is "
                          "libvirt or another p2v process holding it? Give QEMU a second -qmp socket for "
                          "p2v") from exc  # fmt: skip
        self._conn = conn
        try:
            yield
        finally:
            self._conn = None
            conn.close()

    def _qmp(self, command: str, arguments: dict[str, Any] | None) -> Any:
        if self._given is not None:
            return self._given(command, arguments)
        if self._conn is None:
            raise VmError(f"{self.url}: QMP command {command!r} sent outside a monitor session")
        return self._conn.execute(command, arguments)

    def close(self) -> None:
        """Nothing stays open between calls (the monitor is held per query or sync); kept so a
        source is used like the others (``with`` or ``close()``)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> LiveQemuSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- queries ----------------------------------------------------------------------------
    def drive(self) -> DriveNode:
        """The node as QEMU reports it now; ``node`` may also be a -drive id or device id."""
        with self._monitor():
            return self._drive()

    def _drive(self) -> DriveNode:
        nodes = self._qmp("query-named-block-nodes", {"flat": True})
        by_name = {n["node-name"]: n for n in nodes}
        name = self.node if self.node in by_name else None
        if name is None:
            for blk in self._qmp("query-block", None):
                ids = {blk.get("device"), blk.get("qdev")}
                qdev = str(blk.get("qdev", ""))
                if qdev.startswith("/machine/peripheral/"):
                    ids.add(qdev.split("/")[3])
                if self.node in ids and blk.get("inserted"):
                    name = blk["inserted"].get("node-name")
                    break
        if name is None or name not in by_name:
            known = sorted(n for n in by_name if not n.startswith("#"))
            raise SourceNotFound(f"{self.url}: QEMU has no block node or drive named {self.node!r}",
                                 hint=f"named nodes: {', '.join(known) or 'none'}")  # fmt: skip
        return DriveNode.from_qmp(by_name[name])

    # -- sync -------------------------------------------------------------------------------
    def sync(
        self,
        target: LayerTarget,
        old: HashMap,
        state: dict[str, Any],
        *,
        progress: ProgressCallback | None = None,
    ) -> SyncResult:
        with self._monitor():
            return self._sync(target, old, state, progress)

    def _sync(self, target: LayerTarget, old: HashMap, state: dict[str, Any],
              progress: ProgressCallback | None) -> SyncResult:  # fmt: skip
        started = time.perf_counter()
        drive = self._drive()
        if drive.size != self.size or old.size != self.size:
            raise SourceChanged(f"{self.url}: the drive is {drive.size} bytes; this sync expected {self.size} "
                                f"and the hash map describes {old.size}")  # fmt: skip
        if target.size != self.size:
            raise InvalidInput(f"{self.url}: the target layer is {target.size} bytes, the drive {self.size}")
        gen = state.get("generation", 0) if state else 0
        if not isinstance(gen, int) or gen < 0:
            raise InvalidInput(f"{self.url}: recorded source state has a bad generation {gen!r}")
        keep = state.get("bitmap") if state else None
        self._remove_leftovers(drive)
        removed = self._remove_bitmaps(drive, keep=keep if isinstance(keep, str) else None)
        drive = self._drive()
        seeding = not state and old.data.count(0) == len(old.data)  # an empty map onto an empty layer
        if state:
            reason = judge_bitmap(state, self.node, drive, self.granularity)
        else:
            reason = None if seeding else "the previous point recorded no dirty bitmap for this source"
        frozen = drive.bitmap(keep) if state and reason is None and isinstance(keep, str) else None
        distrusted = drive.bitmap(keep) if reason is not None and isinstance(keep, str) else None
        if distrusted is not None and not distrusted.busy:  # never to be trusted again
            removed += self._remove_bitmaps(drive, keep=None, only=distrusted.name)
        mode = "seed" if seeding else "bitmap" if frozen is not None else "hash"
        if reason:
            log.warning("%s: %s; reading the whole drive (hash mode)", self.url, reason)
        next_bitmap = f"{BITMAP_PREFIX}{gen + 1}"
        counters = SyncCounters(mode=mode, disk_size=self.size)
        counters.extra.update(bitmap=frozen.name if frozen else None, next_bitmap=next_bitmap,
                              granularity=self.granularity, persistent=drive.persistent_ok,
                              removed_bitmaps=removed, rehash_share=self.rehash_share)  # fmt: skip
        if reason:
            counters.extra["fallback"] = reason
        new = old.copy()
        stats = PassStats()
        fleece = _Fleece()
        try:
            self._start_point(drive, fleece, next_bitmap, frozen)
            stats.tick("setup", started)
            assert fleece.socket is not None
            reader = ExportReader(str(fleece.socket), self._names.export_name, what=self.url,
                                  bitmap=frozen.name if frozen else None, in_flight=self.in_flight)  # fmt: skip
            try:
                if reader.size != self.size:
                    raise VmError(f"{self.url}: QEMU exports {reader.size} bytes, the drive has {self.size}")
                if frozen is not None:
                    dirty_pass(reader, target, old, new, stats, progress, rehash_share=self.rehash_share)
                else:
                    full_pass(reader, target, old, new, stats, progress)
            finally:
                reader.close()
        finally:
            t = time.perf_counter()
            self._teardown(fleece)
            stats.tick("cleanup", t)
        stats.fold(counters)
        if fleece.warnings:
            counters.extra["cleanup_warnings"] = fleece.warnings
        counters.wall_s = time.perf_counter() - started
        state_out = {"bitmap": next_bitmap, "generation": gen + 1, "node": self.node,
                     "granularity": self.granularity, "persistent": drive.persistent_ok}  # fmt: skip
        return SyncResult(hashmap=new, counters=counters, state=state_out)

    # -- bitmaps ----------------------------------------------------------------------------
    def _remove_bitmaps(self, drive: DriveNode, *, keep: str | None, only: str | None = None) -> list[str]:
        removed = []
        for bm in drive.bitmaps:
            if not bm.name.startswith(BITMAP_PREFIX) or bm.name == keep or (only and bm.name != only):
                continue
            self._qmp("block-dirty-bitmap-remove", {"node": drive.node_name, "name": bm.name})
            removed.append(bm.name)
        if removed:
            log.info("%s: removed bitmaps of uncommitted or superseded points: %s", self.url, ", ".join(removed))
        return removed

    # -- the point in time ------------------------------------------------------------------
    def _start_point(self, drive: DriveNode, fleece: _Fleece, next_bitmap: str, frozen: BitmapInfo | None) -> None:
        names = self._names
        fleece.tmp = Path(tempfile.mkdtemp(prefix=self._dir_prefix, dir=self.work_dir))
        image = fleece.tmp / "fleece.qcow2"
        _create_qcow2(image, self.size, what=self.url)
        self._qmp("blockdev-add", {"driver": "qcow2", "node-name": names.fleece, "backing": drive.node_name,
                                   "file": {"driver": "file", "filename": str(image)}})  # fmt: skip
        fleece.node_added = True
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": drive.node_name, "name": next_bitmap, "granularity": self.granularity,
                      "persistent": drive.persistent_ok}},
        ]  # fmt: skip
        if frozen is not None:
            actions += [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": names.fleece, "name": frozen.name, "granularity": frozen.granularity,
                          "persistent": False, "disabled": True}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": names.fleece, "target": frozen.name,
                          "bitmaps": [{"node": drive.node_name, "name": frozen.name}]}},
            ]  # fmt: skip
        actions.append({"type": "blockdev-backup", "data": {"job-id": names.job, "device": drive.node_name,
                                                             "target": names.fleece, "sync": "none"}})  # fmt: skip
        self._qmp("transaction", {"actions": actions})
        fleece.job_started = True
        fleece.socket = fleece.tmp / "nbd.sock"
        self._start_server(fleece.socket)
        fleece.server_started = True
        export: dict[str, Any] = {"type": "nbd", "id": names.export_id, "node-name": names.fleece,
                                  "name": names.export_name, "writable": False}  # fmt: skip
        if frozen is not None:
            export["bitmaps"] = [frozen.name]
        self._qmp("block-export-add", export)
        fleece.export_added = True

    def _start_server(self, socket_path: Path) -> None:
        args = {"addr": {"type": "unix", "data": {"path": str(socket_path)}}}
        try:
            self._qmp("nbd-server-start", args)
            return
        except VmError as exc:
            if "already running" not in exc.message:
                raise
            exports = [e.get("id") for e in self._qmp("query-block-exports", None)]
            if exports:
                raise Busy(f"{self.url}: QEMU already runs an NBD server with export(s) {', '.join(map(str, exports))}",
                           hint="another backup, migration or p2v sync of this VM is running; retry when it "
                                "ends") from exc  # fmt: skip
        # A server with no exports: left by a p2v sync that died before exporting.
        log.warning("%s: stopping an NBD server without exports (left by an interrupted sync)", self.url)
        self._qmp("nbd-server-stop", None)
        self._qmp("nbd-server-start", args)

    # -- clean-up ---------------------------------------------------------------------------
    def _remove_leftovers(self, drive: DriveNode) -> None:
        """Remove what an interrupted p2v sync of this node left in QEMU (export, job, overlay)."""
        names = self._names
        found = _Fleece()
        found.export_added = any(e.get("id") == names.export_id for e in self._qmp("query-block-exports", None))
        found.job_started = any(j.get("id") == names.job for j in self._qmp("query-jobs", None))
        found.node_added = any(n["node-name"] == names.fleece
                               for n in self._qmp("query-named-block-nodes", {"flat": True}))  # fmt: skip
        if found.export_added or found.job_started or found.node_added:
            log.warning("%s: removing the export/job/overlay of an interrupted sync", self.url)
            self._teardown(found)
            if found.warnings:
                raise VmError(f"{self.url}: cannot remove what an interrupted sync left in QEMU: "
                              + "; ".join(found.warnings))  # fmt: skip
        for stale in Path(self.work_dir or tempfile.gettempdir()).glob(f"{self._dir_prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _teardown(self, fleece: _Fleece) -> None:
        """Undo what :meth:`_start_point` did, in reverse; failures become warnings."""
        names = self._names

        def step(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:  # keep going: every later step still has to run
                msg = exc.message if isinstance(exc, VmError) else str(exc)
                fleece.warnings.append(f"{what}: {msg}")
                log.warning("%s: clean-up step %s failed: %s", self.url, what, msg)

        if fleece.export_added:
            step("remove the NBD export", lambda: self._remove_export(names.export_id))
        if fleece.server_started:
            step("stop the NBD server", lambda: self._qmp("nbd-server-stop", None))
        if fleece.job_started:
            step("cancel the fleecing job", lambda: self._cancel_job(names.job))
        if fleece.node_added:
            step("remove the fleecing node", lambda: self._qmp("blockdev-del", {"node-name": names.fleece}))
        if fleece.tmp is not None:
            shutil.rmtree(fleece.tmp, ignore_errors=True)

    def _remove_export(self, export_id: str) -> None:
        self._qmp("block-export-del", {"id": export_id, "mode": "hard"})
        self._wait(lambda: all(e.get("id") != export_id for e in self._qmp("query-block-exports", None)),
                   f"export {export_id} to go away")  # fmt: skip

    def _cancel_job(self, job: str) -> None:
        if any(j.get("id") == job for j in self._qmp("query-jobs", None)):
            self._qmp("block-job-cancel", {"device": job, "force": True})

        def gone() -> bool:
            jobs = [j for j in self._qmp("query-jobs", None) if j.get("id") == job]
            for j in jobs:  # a job that needs dismissing (auto-dismiss off) is dismissed
                if j.get("status") == "concluded":
                    self._qmp("job-dismiss", {"id": job})
            return not jobs

        self._wait(gone, f"job {job} to end")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise VmError(f"{self.url}: timed out after {self.timeout:.0f}s waiting for {what}")
            time.sleep(_POLL_S)


def _create_qcow2(path: Path, size: int, *, what: str) -> None:
    try:
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                              capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found on PATH", hint="apt-get install qemu-utils") from exc
    if proc.returncode != 0:
        raise VmError(f"{what}: cannot create the fleecing overlay {path}: {proc.stderr.strip()}")
