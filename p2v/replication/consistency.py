"""Consistent recovery points of SSH sources: LVM snapshot views, fsfreeze, pre/post hooks.

A sync reads a whole source disk block by block; reading a busy disk gives a *fuzzy*
image. :func:`consistent_view` (one disk) and :func:`consistent_views` (several disks of
one machine, read at one point in time) give the replication helper a device to read
instead, and say honestly what the point will be::

    with consistent_view(session, "/dev/sda", mode="auto", hooks=hooks) as view:
        result = sync_from(view.device)        # the helper reads view.device
    record(point, view.level, view.method, view.detail)   # commit only after the block

Modes:

``lvm-snapshot``
    Every active LV on the disk gets an LVM snapshot (COW ``min(free, max(10% of LV,
    256 MiB))``), created right after a ``sync``; device-mapper suspends each origin with
    its filesystem frozen, so each snapshot holds a clean filesystem. The disk is then read
    through a read-only device-mapper view ``/dev/mapper/p2v-view-<id>-<n>``, the size of
    the disk: LV extents come from the snapshots, the LVM metadata areas from a copy taken
    before ``lvcreate`` (so the copy shows no snapshot LV), everything else (``/boot``, the
    ESP, free extents) is read live and named in ``detail``. Level ``crash-consistent``.

    The filesystems are *not* fsfrozen around ``lvcreate``: with a filesystem already
    frozen by ``fsfreeze``, ``lvcreate -s`` fails to suspend the origin (EBUSY on Linux 6.1)
    and leaves a stray ``-real`` device behind. With several LVs the snapshots are taken
    one after another; ``detail`` gives the spread (typically well under a second).

``freeze``
    ``fsfreeze -f`` on every filesystem mounted read-write from the disk for the whole read
    (for short final passes: writers block meanwhile). The holder on the source thaws when
    p2v closes its channel, when the connection drops, or after ``max_freeze_s``. Filesystems
    that cannot be frozen (vfat) are read live and named. Level ``crash-consistent``; never
    chosen by ``auto``.

``none``
    The device itself: level ``fuzzy``.

``auto``
    ``lvm-snapshot`` where possible, else ``none`` (the reason goes into ``detail``).

Hooks: ``pre`` commands run on the source before the point-in-time is taken, ``post``
commands as soon as it exists (right after the snapshots; after the thaw for ``freeze``,
since a hook writing to a frozen filesystem would block; after the read for ``none``). A
failing pre hook aborts with :class:`~p2v.errors.RemoteError`; post hooks always run once
pre hooks ran. Successful pre hooks plus a crash-consistent view make ``app-consistent``.

Everything created on the source is removed on exit, on errors too; what could not be
removed (connection gone) is listed in ``view.warnings`` and removed by the next run
(see :mod:`p2v.replication.consistency_remote`). Exiting the block checks that no snapshot
overflowed during the read and raises RemoteError if one did: the data read is not the
point-in-time then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from p2v.errors import P2VError, RemoteError, UsageError
from p2v.replication.consistency_layout import (
    DiskLayout,
    SnapshotPlan,
    SnapshotUnavailable,
    plan_snapshots,
    size_text,
    view_lines,
    view_table,
)
from p2v.replication.consistency_remote import (
    FREEZE_TOOLS,
    SNAPSHOT_TOOLS,
    FreezeHold,
    begin_run,
    create_view,
    new_run_id,
    probe_disk,
    probe_pvs,
    remove_run,
    snapshot_problems,
    take_snapshots,
    view_name,
)
from p2v.sources.ssh_session import SshSession

log = logging.getLogger(__name__)

MODES = ("auto", "lvm-snapshot", "freeze", "none")
CRASH, APP, FUZZY = "crash-consistent", "app-consistent", "fuzzy"
LEVELS = (APP, CRASH, FUZZY)
DEFAULT_MAX_FREEZE_S = 600.0


@dataclass
class Hooks:
    """Shell commands run on the source around the point-in-time (each bounded by ``timeout_s``)."""

    pre: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    timeout_s: float = 300.0


@dataclass
class ConsistentView:
    """What the replication helper reads for one disk, and what the point will be."""

    device: str  # the path to read on the source (same size as the disk)
    level: str  # "crash-consistent" | "app-consistent" | "fuzzy"
    method: str  # "lvm-snapshot" | "freeze" | "none"
    detail: str  # one line for the point's record
    source: str = ""  # the disk this view stands for, as the caller named it
    size: int = 0  # bytes
    taken_at: float | None = None  # local clock when the point-in-time was fixed (None: live read)
    warnings: list[str] = field(default_factory=list)  # also filled on exit (cleanup problems)

    def record(self) -> dict[str, Any]:
        """The consistency fields a recovery point stores."""
        return {"level": self.level, "method": self.method, "detail": self.detail, "taken_at": self.taken_at}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"consistency mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


class _HookRunner:
    """Runs the pre hooks once, and the post hooks exactly once after pre hooks started."""

    def __init__(self, session: SshSession, hooks: Hooks | None) -> None:
        self.session = session
        self.hooks = hooks or Hooks()
        self.pre_started = False
        self.pre_ok = False
        self.post_done = False
        self.warnings: list[str] = []

    def _run(self, kind: str, command: str) -> str | None:
        """None when ``command`` succeeded, else why not."""
        limit = max(1, int(self.hooks.timeout_s))
        argv = ["timeout", "-k", "5", str(limit), "sh", "-c", command]  # killed on the source too
        res = self.session.run(argv, timeout=limit + 30, check=False)
        if res.rc == 0:
            return None
        why = f"timed out after {limit} s" if res.rc == 124 else f"failed with exit status {res.rc}"
        return f"{self.session.label}: {kind} hook `{command}` {why}: {res.stderr_text[-1000:] or '(no stderr)'}"

    def pre(self) -> None:
        """Run the pre hooks; RemoteError (after running the post hooks) when one fails."""
        if not self.hooks.pre:
            return
        self.pre_started = True
        for command in self.hooks.pre:
            error = self._run("pre", command)
            if error:
                self.post()
                raise RemoteError(error, hint="no point was taken; fix the hook or remove it")
        self.pre_ok = True

    def post(self) -> None:
        """Run the post hooks (once; only if pre hooks ran, or there are none). Failures become warnings."""
        if self.post_done or (self.hooks.pre and not self.pre_started):
            return
        self.post_done = True
        for command in self.hooks.post:
            try:
                error = self._run("post", command)
            except P2VError as exc:
                error = f"{self.session.label}: post hook `{command}` could not run: {exc.message}"
            if error:
                self.warnings.append(error)

    def note(self) -> str:
        n = len(self.hooks.pre)
        return f"; {n} pre hook{'s' if n > 1 else ''} ok" if self.pre_ok else ""


def _live_text(items: Sequence[str]) -> str:
    return f"; read live: {', '.join(items)}" if items else ""


def _none_view(layout: DiskLayout, reason: str, note: str) -> ConsistentView:
    rw = [m.mountpoint for m in layout.rw_mounts()]
    busy = f"mounted read-write: {', '.join(rw)}" if rw else "nothing mounted read-write"
    detail = f"live read ({busy})" + (f"; {reason}" if reason else "") + note
    return ConsistentView(layout.device, FUZZY, "none", detail, layout.device, layout.size)


class _ViewRun:
    """One consistent_views() call: set up on the source, verify after the read, clean up."""

    def __init__(
        self, session: SshSession, devices: Sequence[str], mode: str, runner: _HookRunner, max_freeze_s: float
    ) -> None:
        self.session = session
        self.devices = list(devices)
        self.layouts: list[DiskLayout] = []
        self.mode = mode
        self.runner = runner
        self.max_freeze_s = max_freeze_s
        self.run_id = new_run_id()
        self.registered = False
        self.plan: SnapshotPlan | None = None
        self.snapshots_taken = False
        self.hold: FreezeHold | None = None
        self.views: list[ConsistentView] = []
        self.warnings: list[str] = []

    # -- set-up ---------------------------------------------------------------------------

    def open(self) -> list[ConsistentView]:
        reason = ""
        if self.mode != "none":
            reason = self._register()
        tools = {"auto": SNAPSHOT_TOOLS, "lvm-snapshot": SNAPSHOT_TOOLS, "freeze": FREEZE_TOOLS}.get(self.mode, ())
        probes = [probe_disk(self.session, d, tools) for d in self.devices]
        self.layouts = [p.layout for p in probes]
        missing = sorted({t for p in probes for t in p.missing})
        if self.mode in ("auto", "lvm-snapshot") and self.registered:
            try:
                if missing:
                    raise SnapshotUnavailable(f"{', '.join(missing)} not installed on the source")
                self.plan = plan_snapshots(self.layouts, probe_pvs(self.session))
            except (SnapshotUnavailable, RemoteError) as exc:
                reason = self._unavailable(exc)
        elif self.mode == "freeze" and missing:
            raise UsageError(f"{self.session.label}: --consistency freeze needs {', '.join(missing)} on the source")

        self.runner.pre()
        if self.plan is not None:
            try:
                self.views = self._snapshot_views()
            except RemoteError as exc:
                if self.mode == "lvm-snapshot" or not self.session.is_alive():
                    raise
                self.warnings += remove_run(self.session, self.run_id)
                self.plan, self.snapshots_taken = None, False
                reason = f"the LVM snapshot failed: {exc.message}"
                log.warning("%s", reason)
        if self.mode == "freeze":
            self.views = self._frozen_views()
        elif self.plan is None:
            self.views = [_none_view(lay, reason, self.runner.note()) for lay in self.layouts]
        for v in self.views:
            v.warnings += self.warnings
        return self.views

    def _register(self) -> str:
        """Register the run (removing dead runs' leftovers first: their snapshots would change
        what the probe sees). In auto mode a source that cannot (not root) gives the reason."""
        try:
            self.warnings += begin_run(self.session, self.run_id)
        except (SnapshotUnavailable, RemoteError) as exc:
            return self._unavailable(exc)
        self.registered = True
        return ""

    def _unavailable(self, exc: SnapshotUnavailable | RemoteError) -> str:
        """The reason for a fuzzy point in auto mode; raises in the explicit modes (and when the
        connection is gone)."""
        text = exc.message if isinstance(exc, RemoteError) else str(exc)
        if isinstance(exc, RemoteError) and (self.mode != "auto" or not self.session.is_alive()):
            raise exc
        if self.mode != "auto":
            what = "an LVM snapshot" if self.mode == "lvm-snapshot" else "freezing"
            raise UsageError(
                f"{self.session.label}: {', '.join(self.devices)}: {what} is not possible: {text}",
                hint="use --consistency auto (a fuzzy point where no snapshot is possible) or none",
            ) from exc
        return f"no LVM snapshot: {text}"

    def _snapshot_views(self) -> list[ConsistentView]:
        plan = self.plan
        assert plan is not None
        snaps = take_snapshots(self.session, self.run_id, plan, [lay.path for lay in self.layouts])
        self.snapshots_taken = True
        self.runner.post()  # the point-in-time exists
        level = APP if self.runner.pre_ok else CRASH
        views: list[ConsistentView] = []
        for n, lay in enumerate(self.layouts):
            targets = plan.targets_on(lay.path)
            if not targets:
                views.append(_none_view(lay, "no LVM volume on this disk", self.runner.note()))
                continue
            lines = view_lines(
                plan,
                lay,
                disk_device=snaps.disk_loops[lay.path],
                capture_device=snaps.capture_loop,
                snapshot_devices=snaps.devices,
            )
            path = create_view(self.session, view_name(self.run_id, n), view_table(lines), lay.size)
            what = ", ".join(f"{t.key} ({size_text(t.cow_bytes)} cow)" for t in targets)
            detail = f"snapshot{'s' if len(targets) > 1 else ''} of {what}"
            if len(plan.targets) > 1:
                detail += f", {len(plan.targets)} taken within {snaps.spread_s:.2f} s"
            detail += _live_text(plan.live.get(lay.path, [])) + self.runner.note()
            view = ConsistentView(path, level, "lvm-snapshot", detail, lay.device, lay.size, snaps.taken_at)
            view.warnings += sorted(set(plan.notes))
            views.append(view)
        return views

    def _frozen_views(self) -> list[ConsistentView]:
        mounts = list({m.majmin: m for lay in self.layouts for m in lay.rw_mounts()}.values())
        self.hold = FreezeHold(self.session, self.run_id, mounts, self.max_freeze_s)
        result = self.hold.start()
        taken_at = time.time()
        frozen = {m.majmin for m in result.frozen}
        views = []
        for lay in self.layouts:
            mine = lay.rw_mounts()
            done = [m.mountpoint for m in mine if m.majmin in frozen]
            live = [f"{m.mountpoint} ({m.fstype}: {why})" for m, why in result.live if m in mine]
            if done:
                level = APP if self.runner.pre_ok else CRASH
                detail = f"froze {', '.join(done)} for the read" + _live_text(live)
            else:
                level = FUZZY
                detail = "nothing frozen" + (_live_text(live) if live else ": nothing mounted read-write")
            view = ConsistentView(
                lay.device, level, "freeze", detail + self.runner.note(), lay.device, lay.size,
                taken_at if done else None,
            )  # fmt: skip
            views.append(view)
        return views

    # -- after the read -------------------------------------------------------------------

    def _overflowed(self) -> list[str]:
        if self.plan is None or not self.snapshots_taken or not self.session.is_alive():
            return []
        try:
            return snapshot_problems(self.session, self.run_id, self.plan)
        except P2VError as exc:
            self.warnings.append(f"cannot check the snapshots: {exc.message}")
            return []

    def verify(self) -> None:
        """After a successful read: RemoteError if the point-in-time did not hold during it."""
        if self.hold is not None:
            hold, self.hold = self.hold, None
            if not hold.release():
                raise RemoteError(
                    f"{self.session.label}: the freeze limit of {self.max_freeze_s:g} s passed before the read "
                    "finished: the filesystems were thawed and the data read is not consistent",
                    hint="raise the freeze limit, or use lvm-snapshot for long reads",
                )
        problems = self._overflowed()
        if problems:
            raise RemoteError(f"{self.session.label}: " + "; ".join(problems))

    def failed(self, exc: BaseException) -> None:
        """The read failed: raise a precise RemoteError when a snapshot overflow caused it."""
        if isinstance(exc, RemoteError) and "overflowed" in exc.message:
            return
        problems = self._overflowed()
        if problems:
            raise RemoteError(f"{self.session.label}: " + "; ".join(problems)) from exc

    def close(self) -> None:
        """Thaw, run the post hooks still due, remove everything from the source (best effort)."""
        extra: list[str] = []
        try:
            if self.hold is not None:
                hold, self.hold = self.hold, None
                try:
                    hold.release()
                except P2VError as exc:
                    extra.append(f"thawing: {exc.message}")
            self.runner.post()
        finally:
            if self.registered:
                if self.session.is_alive():
                    extra += remove_run(self.session, self.run_id)
                else:
                    extra.append(
                        f"{self.session.label}: connection lost: what p2v run {self.run_id} created on the source "
                        "(snapshots, views) stays until the next run removes it"
                    )
            extra = self.runner.warnings + extra
            for v in self.views:
                v.warnings += [w for w in extra if w not in v.warnings]
            for w in extra:
                log.warning("%s", w)


@contextmanager
def consistent_views(
    session: SshSession,
    devices: Sequence[str],
    mode: str = "auto",
    hooks: Hooks | None = None,
    *,
    max_freeze_s: float = DEFAULT_MAX_FREEZE_S,
) -> Iterator[list[ConsistentView]]:
    """Views of several disks of one source at one point in time (one per device, in order).

    Raises UsageError for a bad mode, or when ``lvm-snapshot`` (or ``freeze``) is asked for
    and the source cannot do it (the message says why); SourceNotFound when a device is not
    a block device; RemoteError when a remote step or a pre hook fails, and on exit when a
    snapshot overflowed or the freeze limit ran out during the read.
    """
    check_mode(mode)
    if not devices:
        raise UsageError("consistent_views: no device given")
    run = _ViewRun(session, devices, mode, _HookRunner(session, hooks), max_freeze_s)
    try:
        views = run.open()
        yield views
        run.verify()
    except BaseException as exc:
        run.failed(exc)
        raise
    finally:
        run.close()


@contextmanager
def consistent_view(
    session: SshSession,
    device: str,
    mode: str = "auto",
    hooks: Hooks | None = None,
    *,
    max_freeze_s: float = DEFAULT_MAX_FREEZE_S,
) -> Iterator[ConsistentView]:
    """The view of one disk; see the module documentation and :func:`consistent_views`."""
    with consistent_views(session, [device], mode, hooks, max_freeze_s=max_freeze_s) as views:
        yield views[0]
