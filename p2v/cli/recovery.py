"""``p2v drill``, ``p2v failover`` and ``p2v fallback``: runs of a recovery plan.

Each prints its steps as they happen (stderr), then the run's steps as a table, or the run as
JSON with ``--json``. Exit 0 when the run succeeded (or waits for an approval with
``--no-wait``), 16 when it failed, 130 when it was aborted; `p2v run resume RUN` continues it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from p2v.cli._common import JSON_OPTION, emit_json, handle_errors
from p2v.cli.run import _print_run, outcome, print_event
from p2v.orchestration.drill import start_drill
from p2v.orchestration.failover import start_failover
from p2v.orchestration.fallback import start_fallback
from p2v.orchestration.journal import RunRecord
from p2v.orchestration.plan import load_plan
from p2v.site.site import Site

SITE_OPTION = typer.Option(None, "--site", envvar="P2V_SITE", help="DR site directory (default ./p2v-site).")
PLAN_ARG = typer.Argument(..., help="Recovery plan file (YAML; see docs/recovery-plans.md).")
IDENTITY = typer.Option(None, "--identity", "-i", help="SSH private key for sources, targets and ssh checks.")
KNOWN_HOSTS = typer.Option(None, "--known-hosts", help="known_hosts file for sources and targets.")
PARALLEL = typer.Option(4, "--parallel", min=1, help="Steps run at once at most.")
QUIET = typer.Option(False, "--quiet", "-q", help="No step-by-step progress on stderr.")


def _finish(run: RunRecord, json_output: bool) -> None:
    if json_output:
        emit_json(run.to_dict())
    else:
        _print_run(run)
    outcome(run)


@handle_errors
def drill(
    plan: Path = PLAN_ARG,
    point: str = typer.Option("latest", "--point", help="latest, a point number, or a time (ISO 8601)."),
    site: Path = SITE_OPTION,
    identity: Path = IDENTITY,
    parallel: int = PARALLEL,
    no_wait: bool = typer.Option(False, "--no-wait", help="Return at an approval gate instead of waiting."),
    quiet: bool = QUIET,
    json_output: bool = JSON_OPTION,
) -> None:
    rp = load_plan(plan)
    with Site.open(site) as s:
        run = start_drill(s, rp, plan, point=point, identity=identity, parallel=parallel, wait_approvals=not no_wait,
                          on_event=None if quiet else print_event)  # fmt: skip
    _finish(run, json_output)


@handle_errors
def failover(
    plan: Path = PLAN_ARG,
    planned: bool = typer.Option(False, "--planned", help="Production is alive: final sync, stop it, then boot."),
    disaster: bool = typer.Option(False, "--disaster", help="Production is gone: boot the newest (or --point) points."),
    point: str = typer.Option("latest", "--point", help="--disaster: latest, a point number, or a time."),
    confirm_fenced: bool = typer.Option(False, "--confirm-fenced",
                                        help="--disaster: production still answers but is fenced off."),  # fmt: skip
    site: Path = SITE_OPTION,
    identity: Path = IDENTITY,
    known_hosts: Path = KNOWN_HOSTS,
    parallel: int = PARALLEL,
    quiet: bool = QUIET,
    json_output: bool = JSON_OPTION,
) -> None:
    from p2v.errors import UsageError

    if planned == disaster:
        raise UsageError("say --planned (production alive) or --disaster (production gone)")
    rp = load_plan(plan)
    with Site.open(site) as s:
        run = start_failover(s, rp, plan, planned=planned, point=point, confirm_fenced=confirm_fenced,
                             identity=identity, known_hosts=known_hosts, parallel=parallel,
                             on_event=None if quiet else print_event)  # fmt: skip
    _finish(run, json_output)


@handle_errors
def fallback(
    plan: Path = PLAN_ARG,
    target: list[str] = typer.Option(..., "--target", "-t",
                                     help="MACHINE=TARGET: ssh://user@host/dev/sdX or an image file (repeat; a "
                                          "machine's disks in order)."),  # fmt: skip
    run_id: int = typer.Option(None, "--run", help="The failover run to fall back from (default: the newest)."),
    discard_production_changes: bool = typer.Option(
        False, "--discard-production-changes", help="Overwrite a target that changed after failover."
    ),
    boot_production: bool = typer.Option(
        False, "--boot-production", help="Image-file targets: boot them (IDE/e1000) and run the checks."
    ),
    site: Path = SITE_OPTION,
    identity: Path = IDENTITY,
    known_hosts: Path = KNOWN_HOSTS,
    parallel: int = PARALLEL,
    quiet: bool = QUIET,
    json_output: bool = JSON_OPTION,
) -> None:
    rp = load_plan(plan)
    with Site.open(site) as s:
        run = start_fallback(s, rp, plan, target, failover_run=run_id,
                             discard_production_changes=discard_production_changes,
                             boot_production=boot_production, identity=identity, known_hosts=known_hosts,
                             parallel=parallel, on_event=None if quiet else print_event)  # fmt: skip
    _finish(run, json_output)


def register(app: typer.Typer) -> None:
    app.command("drill", help="Boot a plan's recovery points in an isolated network, run its checks, clean up.")(drill)
    app.command("failover", help="Bring a plan's machines up at DR in order (--planned or --disaster).")(failover)
    app.command("fallback", help="Send DR changes back to production, switch back, re-protect (no reseed).")(fallback)
