"""Recovery plan files: parsing, defaults, the errors a user sees (file, YAML path, problem),
the canonical JSON round trip, and the example plans shipped in examples/plans/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2v.errors import InvalidInput, UnsafeInput, UsageError
from p2v.orchestration.checks_model import AgentCheck, ConsoleCheck, SshCheck, TcpCheck
from p2v.orchestration.plan import (
    RecoveryPlan,
    SiteHost,
    load_plan,
    parse_plan,
    plan_nodes,
    topological_order,
    validate_plan,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "plans").glob("*.yaml"))

GOOD = """\
version: 1
name: shop
description: optional text
rto_target: 15m
machines:
  db:
    cpus: 2
    memory: 2G
    network:
      segment: app
      address: 192.168.50.10/24
      gateway: 192.168.50.1
    boot_timeout: 10m
    on_failure: abort
    checks:
      - tcp: {port: 5432, timeout: 120}
      - ssh: {command: "systemctl is-active postgresql"}
      - console: {pattern: "login:"}
  web:
    protected: web01
    checks:
      - agent
      - http: {port: 8080, timeout: 2m}
groups:
  - name: databases
    machines: [db]
  - name: approve-apps
    approval: "Check the database before the web tier starts"
  - name: warm-cache
    shell: "./warm.sh --fast 'two words'"
    timeout: 5m
    on_failure: continue
  - name: apps
    after: [databases]
    machines:
      - web
"""


def _plan(machines: str, groups: str, extra: str = "") -> str:
    return f"version: 1\nname: t\n{extra}machines:\n{machines}groups:\n{groups}"


def _error(text: str, source: str = "plan.yaml") -> str:
    with pytest.raises(InvalidInput) as info:
        parse_plan(text, source)
    message = info.value.message
    assert "\n" not in message, "the error is one line"
    assert message.startswith(f"{source}:"), message
    return message


def test_good_plan_parses_with_units_checks_and_defaults() -> None:
    plan = parse_plan(GOOD, "shop.yaml")
    assert plan.name == "shop" and plan.rto_target == 900
    db, web = plan.machines["db"], plan.machines["web"]
    assert (db.protected, db.cpus, db.memory, db.boot_timeout) == ("db", 2, 2 << 30, 600)
    assert (db.network.segment, db.network.address, db.network.gateway) == ("app", "192.168.50.10/24", "192.168.50.1")
    assert [type(c) for c in db.checks] == [TcpCheck, SshCheck, ConsoleCheck]
    assert isinstance(db.checks[0], TcpCheck) and db.checks[0].port == 5432 and db.checks[0].timeout == 120
    assert isinstance(db.checks[1], SshCheck) and db.checks[1].command == "systemctl is-active postgresql"
    # defaults: protected = the key, segment "plan", no overrides, on_failure abort; "2m" in a check
    assert (web.protected, web.cpus, web.memory, web.network.segment, web.on_failure) == \
        ("web01", None, None, "plan", "abort")  # fmt: skip
    assert isinstance(web.checks[0], AgentCheck) and web.checks[1].timeout == 120
    hook = plan.group("warm-cache")
    assert hook.kind == "shell" and hook.argv == ["./warm.sh", "--fast", "two words"] and hook.timeout == 300
    assert plan.group("approve-apps").kind == "approval" and plan.groups[0].after is None


def test_canonical_json_round_trips() -> None:
    plan = parse_plan(GOOD, "shop.yaml")
    stored = plan.to_json()
    again = RecoveryPlan.model_validate(json.loads(stored))
    assert again == plan
    assert RecoveryPlan.model_validate_json(stored) == plan
    assert again.to_json() == stored  # canonical: stable text
    assert json.loads(stored)["machines"]["db"]["memory"] == 2 << 30
    assert json.loads(stored)["machines"]["db"]["checks"][0]["kind"] == "tcp"
    # the stored form keeps the difference between "after the previous group" and "after nothing"
    nodes = {n.key: n for n in plan_nodes(again)}
    assert nodes["hook:warm-cache"].after == ("approval:approve-apps",)
    assert nodes["machine:web"].after == ("machine:db",)


def test_load_plan_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"plan file .*nope\.yaml does not exist"):
        load_plan(tmp_path / "nope.yaml")
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    assert load_plan(path).name == "shop"
    path.write_bytes(b"version: 1\nname: \xff\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        load_plan(path)


def test_yaml_syntax_error_gives_line_and_column() -> None:
    msg = _error("version: 1\nname: x\nmachines: {db: {}\ngroups: []\n")
    assert msg.startswith("plan.yaml:4:1: YAML syntax error:"), msg


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    msg = _error(_plan("  db: {}\n  web: {}\n  db: {cpus: 4}\n", "  - {name: g, machines: [db, web]}\n"))
    assert "plan.yaml:6:3:" in msg and "duplicate key 'db' (first at line 4)" in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("version: 2\nname: x\n", "plan.yaml: version: 2 is not supported; this p2v reads plan version 1"),
    ("version: '1'\nname: x\n", "plan.yaml: version: '1' is not supported"),
    ("version: true\nname: x\n", "plan.yaml: version: True is not supported"),
    ("name: x\n", "plan.yaml: version: required key is missing"),
    ("", "plan.yaml: the plan is empty"),
    ("- db\n", "plan.yaml: a plan is a YAML mapping"),
])  # fmt: skip
def test_version_and_shape(text: str, expected: str) -> None:
    assert _error(text).startswith(expected)


M = "  web: {}\n"
G = "  - {name: g, machines: [web]}\n"


@pytest.mark.parametrize(("machines", "groups", "expected"), [
    ("  web:\n    checks:\n      - ssh: {command: ls}\n      - tcp: {port: 70000}\n", G,
     "machines.web.checks[1].tcp.port: input should be less than or equal to 65535, got 70000"),
    ("  web:\n    checks:\n      - tcpp: {port: 7}\n", G,
     "machines.web.checks[0]: unknown check kind 'tcpp'; known kinds: tcp, ssh, http, agent, console, script"),
    ("  web:\n    checks:\n      - {tcp: {port: 7}, ssh: {command: x}}\n", G,
     "machines.web.checks[0]: a check has exactly one key (its kind), found 2: tcp, ssh"),
    ("  web:\n    checks:\n      - ssh: {command: ls, shell: bash}\n", G,
     "machines.web.checks[0].ssh.shell: unknown key"),
    ("  web:\n    checks:\n      - ssh: {}\n", G, "machines.web.checks[0].ssh.command: required key is missing"),
    ("  web: {cpuz: 2}\n", G, "machines.web.cpuz: unknown key"),
    ("  web: 3\n", G, "machines.web: expected a mapping (key: value), got 3"),
    (M, "  - {name: g, machines: [web], after: 5}\n", "groups[0].after: expected a list, got 5"),
    ("  web: {cpus: 0}\n", G, "machines.web.cpus: input should be greater than or equal to 1, got 0"),
    ("  web: {memory: 2048}\n", G, "machines.web.memory: 2048 bytes is below the 32.0M minimum"),
    ("  web: {memory: lots}\n", G, "machines.web.memory: 'lots' is not a size"),
    ("  web: {boot_timeout: soon}\n", G, "machines.web.boot_timeout: 'soon' is not a duration"),
    ("  web: {on_failure: retry}\n", G,
     "machines.web.on_failure: 'retry' is not allowed here; expected 'abort', 'continue' or 'approval'"),
    ("  web: {network: {address: 10.0.0.5/24, gateway: 10.0.1.1}}\n", G,
     "machines.web.network: gateway 10.0.1.1 is outside 10.0.0.0/24"),
    ("  web: {network: {address: 10.0.0.5}}\n", G, "machines.web.network: address '10.0.0.5' needs a prefix length"),
    ("  web: {network: {address: 10.0.0.300/24}}\n", G, "machines.web.network: address '10.0.0.300/24' is not an IP"),
    ("  web: {network: {gateway: 10.0.0.1}}\n", G, "machines.web.network: gateway is set without an address"),
    ("  web: {network: {segment: 'a b'}}\n", G, "machines.web.network.segment: 'a b' is not a valid name"),
    ("  'we b': {}\n", "  - {name: g, machines: ['we b']}\n", "machines['we b'] (the key): 'we b' is not a valid name"),
    (M, "  - {name: g, machines: [web], shell: ls}\n",
     "groups[0]: group g: give exactly one of machines, approval or shell (it has machines and shell)"),
    (M, G + "  - {name: h}\n", "groups[1]: group h: give exactly one of machines, approval or shell (it has none)"),
    (M, "  - {name: g, machines: [web], timeout: 5m}\n", "groups[0]: group g: timeout applies to shell and approval"),
    (M, G + "  - {name: h, shell: 'echo \"x'}\n", "groups[1]: group h: shell 'echo \"x' cannot be split"),
    (M, "  - {name: g, machines: []}\n", "groups[0].machines: list should have at least 1 item"),
    (M, "  - {name: g, machines: [{name: web, before: [x]}]}\n", "groups[0].machines[0].before: unknown key"),
])  # fmt: skip
def test_each_error_names_the_yaml_path(machines: str, groups: str, expected: str) -> None:
    msg = _error(_plan(machines, groups))
    assert f"plan.yaml: {expected}" in msg, msg


def test_all_schema_errors_are_listed_on_one_line() -> None:
    msg = _error(_plan("  web: {cpus: 0, memory: lots}\n  db: {on_failure: later}\n", G))
    for path in ("machines.web.cpus", "machines.web.memory", "machines.db.on_failure"):
        assert path in msg
    assert "machines['we b'].protected" not in _error(_plan("  'we b': {}\n", G))  # said once, on the key


def test_alias_bomb_and_huge_files_are_refused() -> None:
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
    )
    with pytest.raises(UnsafeInput, match="expands to more than"):
        parse_plan(bomb + "version: 1\n", "bomb.yaml")
    with pytest.raises(UnsafeInput, match="larger than"):
        parse_plan("# " + "x" * (1 << 20) + "\nversion: 1\n", "big.yaml")


def test_check_short_forms_and_duration_timeouts() -> None:
    text = _plan("  web:\n    checks: [agent, {agent: null}, {tcp: {port: 80, timeout: 1m30s, interval: 5s}}]\n", G)
    checks = parse_plan(text, "p.yaml").machines["web"].checks
    assert [c.kind for c in checks] == ["agent", "agent", "tcp"]
    assert (checks[2].timeout, checks[2].interval) == (90, 5)
    assert "machines.web.checks[0]: a check is a one-key mapping" in _error(_plan("  web:\n    checks: [42]\n", G))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plans_validate(path: Path) -> None:
    plan = load_plan(path)
    report = validate_plan(plan, None, [SiteHost("dr1", cpus=16, memory=64 << 30)])
    assert report.ok, report.errors
    assert report.warnings == []
    assert topological_order(plan_nodes(plan))


def test_demo_plan_is_db_then_web_with_ssh_and_tcp_checks() -> None:
    plan = load_plan(ROOT / "examples" / "plans" / "demo.yaml")
    levels = topological_order(plan_nodes(plan))
    assert [[n.key for n in lv] for lv in levels] == [["machine:db"], ["machine:web"]]
    for m in plan.machines.values():
        assert {c.kind for c in m.checks} == {"ssh", "tcp"}
    assert len(EXAMPLES) >= 2
