"""The protection operations behind the CLI: add (register + seed), sync, points, status,
verify, retention, remove. Each returns plain data (dicts ready for ``--json``) and raises
:class:`p2v.errors.P2VError` subclasses.

A sync of a machine: take the machine's lock, let the site clean up what an interrupted
run left and open a partial layer per disk on top of the newest point, let each source
write what changed into its layer, then hand everything to the site, which seals the layers
and commits the point in one catalog transaction. Any failure (or Ctrl-C, or kill -9)
before that commit leaves the earlier points exactly as they were.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2v.errors import OutputError, P2VError, SourceChanged, UsageError, VerifyFailed
from p2v.protection.sources import Hooks, OpenedDisk, SshOptions, open_sources, source_kind, worst
from p2v.replication.model import DEFAULT_BLOCK, SUB_BLOCK, SyncResult

log = logging.getLogger(__name__)

CONSISTENCY_MODES = ("auto", "lvm-snapshot", "freeze", "none")
Progress = Callable[[str, int, int], None]


@dataclass
class ProtectOptions:
    block_size: int = DEFAULT_BLOCK
    retain_count: int | None = None
    retain_seconds: int | None = None
    rpo_seconds: int = 86400
    consistency: str = "auto"
    compress: bool = False
    bwlimit: int | None = None
    hooks: Hooks = field(default_factory=Hooks)

    @classmethod
    def from_text(cls, *, block_size: str, retain: int | None, retain_for: str | None, rpo: str, consistency: str,
                  compress: bool, bwlimit: str | None, hooks: Hooks) -> ProtectOptions:  # fmt: skip
        from p2v.site.units import parse_duration, parse_size

        bs = parse_size(block_size)
        if bs % SUB_BLOCK or bs < SUB_BLOCK or bs > 16 * 1024 * 1024:
            raise UsageError(f"--block-size {block_size}: must be a multiple of 4K between 4K and 16M")
        if consistency not in CONSISTENCY_MODES:
            raise UsageError(f"--consistency {consistency!r}: choose one of {', '.join(CONSISTENCY_MODES)}")
        return cls(
            block_size=bs, retain_count=retain, retain_seconds=parse_duration(retain_for) if retain_for else None,
            rpo_seconds=parse_duration(rpo), consistency=consistency, compress=compress,
            bwlimit=parse_size(bwlimit) if bwlimit else None, hooks=hooks,
        )  # fmt: skip

    def to_policy(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size, "retain_count": self.retain_count,
            "retain_seconds": self.retain_seconds, "rpo_seconds": self.rpo_seconds,
            "consistency": self.consistency, "compress": self.compress, "bwlimit": self.bwlimit,
            "hooks": {"pre": self.hooks.pre, "post": self.hooks.post, "timeout_s": self.hooks.timeout_s},
        }  # fmt: skip


def _site(path: Path | None) -> Any:
    from p2v.site.site import Site

    return Site.open(path)


def _policy_options(policy: dict[str, Any]) -> ProtectOptions:
    hooks = policy.get("hooks") or {}
    return ProtectOptions(
        block_size=policy.get("block_size") or DEFAULT_BLOCK, retain_count=policy.get("retain_count"),
        retain_seconds=policy.get("retain_seconds"), rpo_seconds=policy.get("rpo_seconds") or 86400,
        consistency=policy.get("consistency") or "auto", compress=bool(policy.get("compress")),
        bwlimit=policy.get("bwlimit"),
        hooks=Hooks(pre=list(hooks.get("pre", [])), post=list(hooks.get("post", [])),
                    timeout_s=float(hooks.get("timeout_s", 300))),
    )  # fmt: skip


def _no_space(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(exc) or "ENOSPC" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _run_point(site: Any, name: str, urls: list[str], opts: ProtectOptions, ssh: SshOptions,
               progress: Progress | None) -> dict[str, Any]:  # fmt: skip
    """One sync of ``name`` (the caller holds the lock): returns the committed point as a dict."""
    t0 = time.monotonic()
    tx = site.begin_point(name)
    try:
        results: list[SyncResult] = []
        details: list[str] = []
        with open_sources(urls, block_size=opts.block_size, consistency=opts.consistency, hooks=opts.hooks,
                          ssh=ssh, compress=opts.compress, bwlimit=opts.bwlimit) as opened:  # fmt: skip
            for disk, src in zip(tx.disks, opened, strict=True):
                _check_size(disk.size, src)
                results.append(_sync_disk(disk, src, progress))
                details.append(src.detail)
            consistency = worst([o.consistency for o in opened])
        point = tx.commit(results, consistency=consistency,
                          meta={"detail": "; ".join(d for d in details if d), "wall_s": time.monotonic() - t0})
    except BaseException as exc:
        msg = exc.message if isinstance(exc, P2VError) else f"{type(exc).__name__}: {exc}"
        tx.abort(msg)
        if not isinstance(exc, P2VError) and _no_space(exc):
            raise OutputError(f"no space left on the DR site at {site.root}; {name} keeps its earlier points",
                              hint="free space or run `p2v retention`") from exc  # fmt: skip
        if isinstance(exc, P2VError) and not isinstance(exc, OutputError) and _no_space(exc):
            raise OutputError(f"no space left on the DR site at {site.root}: {exc.message}") from exc
        raise
    return _point_dict(site, name, point)


def _check_size(recorded: int, src: OpenedDisk) -> None:
    if src.size != recorded:
        raise SourceChanged(
            f"{src.url} is now {src.size} bytes, the site recorded {recorded} bytes (size changed)",
            hint="a resized disk needs a new seed: `p2v protect remove` and `p2v protect add` it again",
        )


def _sync_disk(disk: Any, src: OpenedDisk, progress: Progress | None) -> SyncResult:
    from p2v.disks.nbd import open_layer

    label = f"{src.url}"

    def cb(done: int, total: int) -> None:
        if progress:
            progress(label, done, total)

    with open_layer(disk.partial_path) as layer:
        res = src.source.sync(layer, disk.old_map, disk.state, progress=cb)
        layer.flush()
    return res


def _point_dict(site: Any, name: str, point: Any) -> dict[str, Any]:
    d: dict[str, Any] = point.to_dict()
    d["layers"] = [
        {"disk": i, "path": str(site.point_image(name, point.seq, i))} for i in range(len(point.layers))
    ]
    return d


# -- operations ----------------------------------------------------------------------------


def protect_add(site_path: Path | None, name: str, urls: list[str], opts: ProtectOptions, *,
                ssh: SshOptions | None = None, progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Register ``name`` with one disk per source URL and seed it. On failure nothing stays registered."""
    from p2v.site.site import DiskSpec, ProtectionPolicy

    ssh = ssh or SshOptions()
    if not urls:
        raise UsageError("give at least one SOURCE")
    for u in urls:
        source_kind(u)
    site = _site(site_path)
    sizes = _probe_sizes(urls, opts, ssh)
    machine = site.add_machine(name, [DiskSpec(url=u, size=s) for u, s in zip(urls, sizes, strict=True)],
                               ProtectionPolicy.from_dict(opts.to_policy()))  # fmt: skip
    try:
        with site.lock(name):
            point = _run_point(site, name, urls, opts, ssh, progress)
    except BaseException:
        try:
            site.remove_machine(name)
        except P2VError as exc:  # pragma: no cover - reported, the first error wins
            log.warning("could not unregister %s after the failed seed: %s", name, exc.message)
        raise
    return {"machine": machine.to_dict() if hasattr(machine, "to_dict") else {"name": name}, "point": point}


def _probe_sizes(urls: list[str], opts: ProtectOptions, ssh: SshOptions) -> list[int]:
    from p2v.protection.sources import file_size

    sizes = []
    for url in urls:
        kind = source_kind(url)
        if kind == "file":
            sizes.append(file_size(Path(url)))
        elif kind == "qemu":
            from p2v.replication.qemu_live import LiveQemuSource, parse_qemu_url

            sock, node = parse_qemu_url(url)
            live = LiveQemuSource(sock, node, block_size=opts.block_size)
            try:
                sizes.append(live.size)
            finally:
                live.close()
        else:
            from p2v.sources.ssh import parse_ssh_url
            from p2v.sources.ssh_copy import remote_device_size

            target = parse_ssh_url(url)
            with target.session(identity=ssh.identity, known_hosts=ssh.known_hosts) as session:
                sizes.append(remote_device_size(session, target.device))
    return sizes


def sync(site_path: Path | None, name: str, *, ssh: SshOptions | None = None, progress: Progress | None = None,
         bwlimit: str | None = None) -> dict[str, Any]:  # fmt: skip
    site = _site(site_path)
    return _sync_one(site, name, ssh or SshOptions(), progress, bwlimit)


def _sync_one(site: Any, name: str, ssh: SshOptions, progress: Progress | None, bwlimit: str | None) -> dict[str, Any]:
    from p2v.site.units import parse_size

    machine = site.machine(name)
    opts = _policy_options(machine.policy.to_dict() if hasattr(machine.policy, "to_dict") else machine.policy)
    if bwlimit:
        opts.bwlimit = parse_size(bwlimit)
    with site.lock(name):
        return _run_point(site, name, [d.url for d in machine.disks], opts, ssh, progress)


def sync_all(site_path: Path | None, *, ssh: SshOptions | None = None, progress: Progress | None = None,
             bwlimit: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Sync every machine in turn; one failing machine does not stop the others."""
    site = _site(site_path)
    out: list[dict[str, Any]] = []
    codes: list[int] = []
    for m in site.machines():
        try:
            out.append({"name": m.name, "ok": True, "point": _sync_one(site, m.name, ssh or SshOptions(), progress,
                                                                        bwlimit)})  # fmt: skip
        except P2VError as exc:
            out.append({"name": m.name, "ok": False, "error": exc.to_dict()})
            codes.append(exc.exit_code)
    return {"machines": out, "failed": len(codes), "exit_code": codes[0] if codes else 0}


def points(site_path: Path | None, name: str) -> dict[str, Any]:
    site = _site(site_path)
    now = time.time()
    pts = []
    for p in site.points(name):
        d = _point_dict(site, name, p)
        d["age_s"] = now - p.created_at
        pts.append(d)
    return {"machine": name, "points": pts}


def status(site_path: Path | None) -> dict[str, Any]:
    site = _site(site_path)
    return {"site": str(site.root), "machines": [s.to_dict() for s in site.status(time.time())]}


def verify(site_path: Path | None, name: str, *, point: int | None = None, all_points: bool = False,
           progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Recompute every block hash of the chosen points and compare with their stored maps."""
    from p2v.replication.model import HashMap
    from p2v.replication.verify import verify_point

    if point is not None and all_points:
        raise UsageError("give --point or --all, not both")
    site = _site(site_path)
    pts = site.points(name)
    if point is not None:
        pts = [p for p in pts if p.seq == point]
        if not pts:
            raise UsageError(f"machine {name} has no point {point}", hint=f"see `p2v points {name}`")
    elif not all_points:
        pts = pts[-1:]
    reports = []
    for p in pts:
        ok = True
        checked = 0
        wall = 0.0
        unknown = 0
        details: list[str] = []
        for i in range(len(p.layers)):
            rep = verify_point(site.point_image(name, p.seq, i), HashMap.load(site.point_map(name, p.seq, i)))
            ok = ok and rep.ok
            checked += rep.bytes_checked
            unknown += rep.unknown_skipped
            wall += rep.wall_s
            if not rep.ok:
                offs = ", ".join(str(o) for o in rep.mismatched_offsets)
                details.append(f"disk{i}: {rep.mismatches} blocks differ (offsets {offs})")
        reports.append({"seq": p.seq, "ok": ok, "bytes_checked": checked, "wall_s": wall, "unknown_skipped": unknown,
                        "detail": "; ".join(details)})  # fmt: skip
    return {"machine": name, "points": reports, "ok": all(r["ok"] for r in reports)}


def raise_if_mismatch(res: dict[str, Any]) -> None:
    bad = [r for r in res["points"] if not r["ok"]]
    if bad:
        raise VerifyFailed(f"machine {res['machine']}: point(s) {', '.join(str(r['seq']) for r in bad)} do not "
                           f"match their hashes: {bad[0]['detail']}")  # fmt: skip


def retention(site_path: Path | None, name: str) -> dict[str, Any]:
    site = _site(site_path)
    res = site.apply_retention(name, time.time())
    out: dict[str, Any] = res.to_dict()
    return out


def protect_remove(site_path: Path | None, name: str) -> dict[str, Any]:
    site = _site(site_path)
    m = site.machine(name)
    pts = site.points(name)
    nbytes = int(getattr(m, "total_bytes", 0) or 0)
    site.remove_machine(name)
    return {"machine": name, "removed": True, "points": len(pts), "bytes": nbytes}
