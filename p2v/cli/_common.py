"""Shared CLI plumbing: error reporting, JSON output, progress. Only p2v.cli prints."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from p2v.errors import Interrupted, P2VError

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True)
out_console = Console()

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout (stable keys).")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def report_error(exc: P2VError, json_mode: bool) -> None:
    err_console.print(f"[bold red]p2v: error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
    if exc.hint:
        err_console.print(f"  hint: {escape(exc.hint)}", highlight=False, soft_wrap=True)
    if json_mode:
        emit_json(exc.to_dict())


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn P2VError into one line on stderr (plus a JSON object with --json) and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        json_mode = bool(kwargs.get("json_output", False))
        try:
            return fn(*args, **kwargs)
        except P2VError as exc:
            report_error(exc, json_mode)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            exc2 = Interrupted()
            report_error(exc2, json_mode)
            raise typer.Exit(exc2.exit_code) from None

    return wrapper


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


ProgressFn = Callable[[str, int, int], None]


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield ``update(label, done_bytes, total_bytes)``; draws a Rich bar on a TTY stderr only."""
    if not enabled or not err_console.is_terminal:
        yield lambda label, done, total: None
        return
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total or None)
            prog.update(tasks[label], completed=done, total=total or None)

        yield update


def status_line(msg: str) -> None:
    """A short progress message on stderr (suppressed when stderr is not a terminal)."""
    if err_console.is_terminal:
        err_console.print(f"[dim]{msg}[/]", highlight=False)
