"""Health-check definitions as a recovery plan writes them (the shared contract).

A machine in a plan lists checks; each is one of the models below, written in YAML as a
one-key mapping, e.g. ``- tcp: {port: 5432}`` or ``- ssh: {command: "systemctl is-active db"}``.
:mod:`p2v.orchestration.checks` runs them against a booted VM; :mod:`p2v.orchestration.plan`
parses and validates them. Ports are *guest* ports: the runtime forwards each one to a free
port on 127.0.0.1 (drills) or reaches the VM's address directly (bridged sites).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TIMEOUT_S = 300.0


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=86_400, description="seconds until the check fails")
    interval: float = Field(default=2.0, gt=0, le=600, description="seconds between attempts")
    name: str | None = Field(default=None, description="label in reports (default: derived from the check)")


class TcpCheck(_Check):
    kind: Literal["tcp"] = "tcp"
    port: int = Field(ge=1, le=65535)


class SshCheck(_Check):
    kind: Literal["ssh"] = "ssh"
    command: str = Field(min_length=1)
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    expect_exit: int = 0
    expect_output: str | None = Field(default=None, description="regex the command's stdout must match")


class HttpCheck(_Check):
    kind: Literal["http"] = "http"
    port: int = Field(default=80, ge=1, le=65535)
    path: str = "/"
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_text: str | None = Field(default=None, description="regex the body must match")


class AgentCheck(_Check):
    kind: Literal["agent"] = "agent"


class ConsoleCheck(_Check):
    kind: Literal["console"] = "console"
    pattern: str = Field(min_length=1, description="regex searched in the serial console output")


class ScriptCheck(_Check):
    kind: Literal["script"] = "script"
    run: str = Field(min_length=1, description="command line run on the DR host (shlex-split, no shell)")


CheckSpec = Annotated[
    TcpCheck | SshCheck | HttpCheck | AgentCheck | ConsoleCheck | ScriptCheck,
    Field(discriminator="kind"),
]
CHECK_KINDS = ("tcp", "ssh", "http", "agent", "console", "script")


def check_label(check: TcpCheck | SshCheck | HttpCheck | AgentCheck | ConsoleCheck | ScriptCheck) -> str:
    """A short human label: the check's ``name`` or ``kind`` plus its main parameter."""
    if check.name:
        return check.name
    if isinstance(check, TcpCheck):
        return f"tcp:{check.port}"
    if isinstance(check, SshCheck):
        return f"ssh:{check.command}"
    if isinstance(check, HttpCheck):
        return f"http:{check.port}{check.path}"
    if isinstance(check, ConsoleCheck):
        return f"console:{check.pattern}"
    if isinstance(check, ScriptCheck):
        return f"script:{check.run}"
    return "agent"
