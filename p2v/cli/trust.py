"""``p2v trust HOST[:PORT]``: record an SSH host's key in p2v's known_hosts, explicitly."""

from __future__ import annotations

from pathlib import Path

import typer

from p2v.cli._common import JSON_OPTION, emit_json, err_console, handle_errors, out_console
from p2v.errors import ChangedHostKey, HostKeyError
from p2v.sources.ssh_trust import (
    default_known_hosts,
    fetch_host_key,
    lookup_host_keys,
    parse_host_port,
    record_host_key,
)


@handle_errors
def trust(
    host: str = typer.Argument(
        ..., metavar="HOST[:PORT]", help="Host name or address, [IPv6]:PORT, or an ssh:// source URL."
    ),
    known_hosts: Path | None = typer.Option(
        None,
        "--known-hosts",
        metavar="FILE",
        help="p2v's known_hosts file (default: $P2V_KNOWN_HOSTS or ~/.config/p2v/known_hosts).",
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Record the key without asking."),
    replace: bool = typer.Option(False, "--replace", help="Replace a different key already recorded for this host."),
    timeout: float = typer.Option(15.0, "--timeout", help="Connection timeout in seconds."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Fetch HOST's SSH host key, show its fingerprint and, once confirmed, trust it.

    p2v connects only to hosts recorded this way. If the host's key changed since it
    was recorded, nothing is written unless --replace is given.
    """
    hostname, port = parse_host_port(host)
    path = known_hosts or default_known_hosts()
    info = fetch_host_key(hostname, port, timeout)
    recorded = lookup_host_keys(hostname, port, path)
    result = {**info.to_dict(), "known_hosts": str(path)}
    if any(k.same_key(info) for k in recorded):
        if json_output:
            emit_json({**result, "status": "unchanged"})
        else:
            out_console.print(
                f"{info.label} is already trusted ({info.key_type} {info.fingerprint}).",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return
    if recorded and not replace:
        old = recorded[0]
        raise ChangedHostKey(
            f"{info.label}: the host key changed: {path} has {old.key_type} {old.fingerprint}, "
            f"the host now offers {info.key_type} {info.fingerprint}; nothing was written",
            hint=f"if the change is expected (host reinstalled), run: p2v trust --replace {info.label}",
        )
    console = err_console if json_output else out_console
    if recorded:
        console.print(
            f"{info.label}: replacing {recorded[0].key_type} {recorded[0].fingerprint}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"{info.label} offers {info.key_type} key {info.fingerprint}", markup=False, highlight=False, soft_wrap=True
    )
    if not yes and not _confirm("Is this the right fingerprint? Trust this host", err=json_output):
        raise HostKeyError(
            f"{info.label}: not trusted (not confirmed); nothing was written",
            hint="compare the fingerprint with the host's own `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub`",
        )
    status = record_host_key(info, path, replace=replace)
    if json_output:
        emit_json({**result, "status": status})
    else:
        out_console.print(
            f"{'Replaced' if status == 'replaced' else 'Recorded'} {info.label} in {path}.",
            markup=False,
            highlight=False,
        )


def _confirm(question: str, *, err: bool) -> bool:
    try:
        return bool(typer.confirm(question, default=False, err=err))
    except typer.Abort:  # end of input (not a terminal): treat as "no"
        return False


def register(app: typer.Typer) -> None:
    app.command("trust")(trust)
