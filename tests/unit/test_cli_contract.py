"""The CLI contract: every command and option has help; the README's exit-code table is the code's."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.testing import CliRunner

from p2v import errors
from p2v.cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def _commands(cmd, prefix=()):  # type: ignore[no-untyped-def]
    yield prefix, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*prefix, name))


def test_every_command_and_option_has_help() -> None:
    root = typer.main.get_command(app)
    seen = []
    for path, cmd in _commands(root):
        seen.append(" ".join(path))
        if path:
            assert (cmd.help or "").strip(), f"p2v {' '.join(path)} has no help text"
        for p in cmd.params:
            if p.param_type_name == "option" and p.name not in ("help",):
                assert (getattr(p, "help", "") or "").strip(), f"p2v {' '.join(path)} {p.opts} has no help"
            if p.param_type_name == "argument":
                assert (getattr(p, "help", "") or "").strip(), f"p2v {' '.join(path)} argument {p.name} has no help"
    for expected in ("doctor", "inspect", "convert", "trust", "vm start", "vm stop", "vm console", "vm list",
                     "protect add", "protect remove", "sync", "points", "status", "verify", "retention"):
        assert expected in seen


def test_help_runs_for_every_command() -> None:
    runner = CliRunner()
    root = typer.main.get_command(app)
    for path, _ in _commands(root):
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        assert "Usage:" in res.output


def test_readme_exit_code_table_matches_the_code() -> None:
    text = (ROOT / "README.md").read_text()
    table = dict((int(c), m.strip()) for c, m in re.findall(r"^\| (\d+) \| (.+?) \|$", text, re.M))
    assert table == errors.EXIT_CODES


def test_every_error_class_exit_code_is_documented() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.P2VError)]
    for cls in classes:
        assert cls.exit_code in errors.EXIT_CODES, cls


def test_readme_opens_with_the_two_setup_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    cmds = re.findall(r"^make \w+", head, re.M)
    assert cmds == ["make demo", "make test"]
