"""``p2v protect add|remove``, ``p2v sync``, ``p2v points``, ``p2v status``, ``p2v verify``,
``p2v retention``: the protection commands over :mod:`p2v.protection`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console, progress_bar
from p2v.errors import UsageError
from p2v.protection import service
from p2v.protection.sources import Hooks, SshOptions
from p2v.site.units import format_duration

SITE_OPTION = typer.Option(
    None, "--site", envvar="P2V_SITE", help="DR site directory (default ./p2v-site; env P2V_SITE)."
)
IDENTITY_OPTION = typer.Option(None, "--identity", "-i", help="SSH private key for ssh:// sources.")
KNOWN_HOSTS_OPTION = typer.Option(
    None, "--known-hosts", help="known_hosts file for ssh:// sources (default: p2v's own; see `p2v trust`)."
)

SOURCES_HELP = """SOURCE is one disk of the machine: ssh://USER@HOST[:PORT]/dev/sdX (a physical Linux server;
trust it first with `p2v trust`), qemu:///PATH/TO/qmp.sock?node=NODE (a drive of a running QEMU
VM, replicated with a persistent dirty bitmap), or an image file of any format qemu reads."""

protect_app = typer.Typer(help="Register machines at the DR site and stop protecting them.", no_args_is_help=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _print_point(verb: str, name: str, point: dict[str, Any]) -> None:
    out_console.print(
        f"[bold green]{verb}[/] {name}: point {point['seq']} ({point['consistency']}, {point['mode']}) — "
        f"read {_human(point['bytes_read'])}, sent {_human(point['bytes_sent'])}, "
        f"wrote {_human(point['bytes_written'])} in {point['wall_s']:.1f}s",
        highlight=False,
        soft_wrap=True,
    )


@protect_app.command("add", help=f"Register machine NAME and seed it (the first full copy, zeros skipped).\n\n"
                     f"{SOURCES_HELP}\n\nGive one SOURCE per disk. If the seed fails nothing is registered.")
@handle_errors
def add_cmd(
    name: str = typer.Argument(..., help="Machine name at the site ([A-Za-z0-9._-], up to 63 characters)."),
    sources: list[str] = typer.Argument(..., help="One source per disk (see above)."),
    site: Path = SITE_OPTION,
    block_size: str = typer.Option("64K", "--block-size", help="Hash-map block size (4K multiple)."),
    retain: int = typer.Option(None, "--retain", min=1, help="Keep the newest N recovery points."),
    retain_for: str = typer.Option(None, "--retain-for", help="Keep points younger than this (7d, 12h, 30m)."),
    rpo: str = typer.Option("24h", "--rpo", help="RPO target: `p2v status` flags a newest point older than this."),
    consistency: str = typer.Option(
        "auto", "--consistency", help="auto | lvm-snapshot | freeze | none (how SSH sources are read)."
    ),
    compress: bool = typer.Option(False, "--compress", help="Compress data on the wire (SSH sources)."),
    bwlimit: str = typer.Option(None, "--bwlimit", help="Bandwidth limit for SSH sources, bytes/s (50M, 1G)."),
    pre_hook: list[str] = typer.Option([], "--pre-hook", help="Command run on the source before a point (repeat)."),
    post_hook: list[str] = typer.Option([], "--post-hook", help="Command run on the source once the point exists."),
    identity: Path = IDENTITY_OPTION,
    known_hosts: Path = KNOWN_HOSTS_OPTION,
    json_output: bool = JSON_OPTION,
) -> None:
    opts = service.ProtectOptions.from_text(
        block_size=block_size, retain=retain, retain_for=retain_for, rpo=rpo, consistency=consistency,
        compress=compress, bwlimit=bwlimit, hooks=Hooks(pre=list(pre_hook), post=list(post_hook)),
    )  # fmt: skip
    with progress_bar(enabled=not json_output) as prog:
        res = service.protect_add(site, name, list(sources), opts, ssh=SshOptions(identity, known_hosts),
                                  progress=prog)  # fmt: skip
    if json_output:
        emit_json(res)
        return
    _print_point("Protected", name, res["point"])


@protect_app.command("remove", help="Stop protecting NAME and delete its recovery points from the site.")
@handle_errors
def remove_cmd(
    name: str = typer.Argument(..., help="Machine name."),
    site: Path = SITE_OPTION,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_output: bool = JSON_OPTION,
) -> None:
    if not yes and not json_output:
        typer.confirm(f"Delete machine {name} and all its recovery points?", abort=True, err=True)
    elif not yes:
        raise UsageError("removing a machine deletes its recovery points: add --yes")
    res = service.protect_remove(site, name)
    if json_output:
        emit_json(res)
        return
    out_console.print(f"Removed {name} ({res['points']} points, {_human(res['bytes'])} freed)", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(protect_app, name="protect")

    @app.command("sync", help="Make a new recovery point of NAME (or of every machine with --all), moving only "
                 "blocks that changed since the newest point.")  # fmt: skip
    @handle_errors
    def sync_cmd(
        name: str = typer.Argument(None, help="Machine name (or --all)."),
        all_machines: bool = typer.Option(False, "--all", help="Sync every machine at the site, one after another."),
        site: Path = SITE_OPTION,
        identity: Path = IDENTITY_OPTION,
        known_hosts: Path = KNOWN_HOSTS_OPTION,
        bwlimit: str = typer.Option(None, "--bwlimit", help="Bandwidth limit for this sync (overrides the policy)."),
        json_output: bool = JSON_OPTION,
    ) -> None:
        if bool(name) == all_machines:
            raise UsageError("give a machine NAME or --all (not both)")
        ssh = SshOptions(identity, known_hosts)
        if name:
            with progress_bar(enabled=not json_output) as prog:
                point = service.sync(site, name, ssh=ssh, progress=prog, bwlimit=bwlimit)
            if json_output:
                emit_json(point)
                return
            _print_point("Synced", name, point)
            return
        with progress_bar(enabled=not json_output) as prog:
            results = service.sync_all(site, ssh=ssh, progress=prog, bwlimit=bwlimit)
        if json_output:
            emit_json(results)
        else:
            for r in results["machines"]:
                if r["ok"]:
                    _print_point("Synced", r["name"], r["point"])
                else:
                    err_console.print(f"[red]failed[/] {r['name']}: {r['error']['message']}", highlight=False)
        if results["failed"]:
            raise typer.Exit(results["exit_code"])

    @app.command("points", help="List the recovery points of NAME, oldest first.")
    @handle_errors
    def points_cmd(
        name: str = typer.Argument(..., help="Machine name."),
        site: Path = SITE_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        points = service.points(site, name)
        if json_output:
            emit_json(points)
            return
        table = Table("point", "time (UTC)", "age", "consistency", "mode", "read", "sent", "written", "wall")
        for p in points["points"]:
            table.add_row(str(p["seq"]), str(p["created_at"]).replace("T", " ")[:19],
                          _age(p["age_s"]), p["consistency"], p["mode"], _human(p["bytes_read"]),
                          _human(p["bytes_sent"]), _human(p["bytes_written"]), f"{p['wall_s']:.1f}s")  # fmt: skip
        out_console.print(table, soft_wrap=True)

    @app.command("status", help="Every protected machine: newest point age vs its RPO target, last sync "
                 "result, chain depth, bytes at the site. Exit 0 even when machines are late.")  # fmt: skip
    @handle_errors
    def status_cmd(site: Path = SITE_OPTION, json_output: bool = JSON_OPTION) -> None:
        st = service.status(site)
        if json_output:
            emit_json(st)
            return
        table = Table("machine", "state", "newest point", "RPO", "last sync", "points", "depth", "size")
        for m in st["machines"]:
            last = m["last_result"] or "-"
            if m.get("last_error"):
                last += f": {m['last_error'][:60]}"
            table.add_row(m["name"], m["state"], _age(m["newest_age_s"]), _age(m["rpo_seconds"]), last,
                          str(m["point_count"]), str(m["chain_depth"]), _human(m["bytes_on_disk"]))  # fmt: skip
        out_console.print(table)

    @app.command("verify", help="Recompute the hashes of a recovery point (default: the newest; --all: every "
                 "point) and compare them with its stored hash map. A mismatch exits 14.")  # fmt: skip
    @handle_errors
    def verify_cmd(
        name: str = typer.Argument(..., help="Machine name."),
        point: int = typer.Option(None, "--point", "-p", help="Point number (see `p2v points`)."),
        all_points: bool = typer.Option(False, "--all", help="Verify every point."),
        site: Path = SITE_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        with progress_bar(enabled=not json_output) as prog:
            res = service.verify(site, name, point=point, all_points=all_points, progress=prog)
        if json_output:
            emit_json(res)
        else:
            for r in res["points"]:
                state = "[green]ok[/]" if r["ok"] else "[red]MISMATCH[/]"
                out_console.print(f"point {r['seq']}: {state} ({_human(r['bytes_checked'])} checked in "
                                  f"{r['wall_s']:.1f}s) {r.get('detail', '')}", highlight=False)  # fmt: skip
        service.raise_if_mismatch(res)

    @app.command("retention", help="Merge recovery points of NAME that the retention policy no longer keeps.")
    @handle_errors
    def retention_cmd(
        name: str = typer.Argument(..., help="Machine name."),
        site: Path = SITE_OPTION,
        json_output: bool = JSON_OPTION,
    ) -> None:
        res = service.retention(site, name)
        if json_output:
            emit_json(res)
            return
        out_console.print(f"{name}: {len(res['expired'])} points merged away, {len(res['kept'])} kept",
                          highlight=False)  # fmt: skip
