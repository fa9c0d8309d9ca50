"""The plan as a DAG: default sequential groups, explicit and cross-group dependencies, levels
in a deterministic order, cycle messages, and the text and SVG renderings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from p2v.errors import InvalidInput
from p2v.orchestration.plan import (
    PlanNode,
    RecoveryPlan,
    find_cycles,
    graph_dict,
    graph_svg,
    graph_text,
    parse_plan,
    plan_nodes,
    topological_order,
    validate_plan,
)

SVG = "{http://www.w3.org/2000/svg}"


def _plan(machines: list[str], groups: str) -> RecoveryPlan:
    body = "".join(f"  {m}: {{}}\n" for m in machines)
    return parse_plan(f"version: 1\nname: t\nmachines:\n{body}groups:\n{groups}", "t.yaml")


def _levels(plan: RecoveryPlan) -> list[list[str]]:
    return [[n.key for n in lv] for lv in topological_order(plan_nodes(plan))]


def test_groups_run_one_after_another_by_default() -> None:
    plan = _plan(["db", "cache", "web"], """\
  - {name: data, machines: [db, cache]}
  - {name: gate, approval: "go on?"}
  - {name: hook, shell: "./warm.sh"}
  - {name: front, machines: [web]}
""")
    nodes = {n.key: n for n in plan_nodes(plan)}
    assert nodes["machine:db"].after == () and nodes["machine:cache"].after == ()
    assert nodes["approval:gate"].after == ("machine:db", "machine:cache")  # a group = all its steps
    assert nodes["hook:hook"].after == ("approval:gate",)
    assert nodes["machine:web"].after == ("hook:hook",)
    assert _levels(plan) == [["machine:db", "machine:cache"], ["approval:gate"], ["hook:hook"], ["machine:web"]]
    gate = nodes["approval:gate"]
    assert (gate.kind, gate.group, gate.message, gate.on_failure) == ("approval", "gate", "go on?", "abort")
    assert nodes["hook:hook"].command == ("./warm.sh",) and nodes["machine:db"].protected == "db"


def test_explicit_after_replaces_the_default_and_machine_deps_cross_groups() -> None:
    plan = _plan(["db", "cache", "app", "web"], """\
  - {name: data, machines: [db]}
  - {name: kv, after: [], machines: [cache]}
  - name: apps
    after: [data]
    machines:
      - {name: app, after: [cache]}
      - web
""")
    nodes = {n.key: n for n in plan_nodes(plan)}
    assert nodes["machine:cache"].after == ()  # `after: []`: no dependency at all
    assert nodes["machine:app"].after == ("machine:db", "machine:cache")
    assert nodes["machine:web"].after == ("machine:db",)  # not after cache: only app waits for it
    assert _levels(plan) == [["machine:db", "machine:cache"], ["machine:app", "machine:web"]]  # plan order


def test_machines_of_one_group_can_be_ordered_with_machine_level_after() -> None:
    plan = _plan(["a", "b", "c"], "  - {name: g, machines: [{name: b, after: [a]}, a, c]}\n")
    assert _levels(plan) == [["machine:a", "machine:c"], ["machine:b"]]


def test_order_is_deterministic_and_follows_plan_order() -> None:
    names = [f"m{i:02d}" for i in range(12)]
    shuffled = names[5:] + names[:5]
    plan = _plan(shuffled, f"  - {{name: g, machines: [{', '.join(shuffled)}]}}\n")
    first = _levels(plan)
    assert first == [[f"machine:{n}" for n in shuffled]]
    assert all(_levels(plan) == first for _ in range(5))
    nodes = plan_nodes(plan)
    assert [[n.key for n in lv] for lv in topological_order(list(reversed(nodes)))] == first


def test_cycle_is_reported_with_its_path() -> None:
    plan = _plan(["db", "web"], """\
  - {name: data, after: [apps], machines: [db]}
  - {name: apps, machines: [web]}
""")
    report = validate_plan(plan, None, None)
    assert not report.ok
    assert "dependency cycle: db -> web -> db (an arrow means: runs before)" in report.errors
    with pytest.raises(InvalidInput, match="dependency cycle: db -> web -> db"):
        plan_nodes(plan)


def test_every_cycle_is_reported_once_and_longer_cycles_show_every_step() -> None:
    plan = _plan(["a", "b", "c", "x", "y"], """\
  - {name: g1, after: [g3], machines: [a]}
  - {name: g2, machines: [b]}
  - {name: g3, machines: [c]}
  - {name: g4, after: [], machines: [{name: x, after: [y]}, {name: y, after: [x]}]}
""")
    cycles = [e for e in validate_plan(plan, None, None).errors if e.startswith("dependency cycle")]
    assert cycles == ["dependency cycle: a -> b -> c -> a (an arrow means: runs before)",
                      "dependency cycle: x -> y -> x (an arrow means: runs before)"]  # fmt: skip


def test_topological_order_refuses_a_cycle_and_unknown_steps() -> None:
    a = PlanNode(key="machine:a", kind="machine", name="a", group="g", index=0, after=("machine:b",),
                 on_failure="abort", timeout=None)  # fmt: skip
    b = PlanNode(key="machine:b", kind="machine", name="b", group="g", index=1, after=("machine:a",),
                 on_failure="abort", timeout=None)  # fmt: skip
    assert find_cycles([a, b]) == ["a -> b -> a"]
    with pytest.raises(InvalidInput, match="dependency cycle: a -> b -> a"):
        topological_order([a, b])
    c = PlanNode(key="machine:c", kind="machine", name="c", group="g", index=0, after=("machine:zz",),
                 on_failure="abort", timeout=None)  # fmt: skip
    with pytest.raises(InvalidInput, match="machine:c depends on unknown step"):
        topological_order([c])


def test_text_graph_lists_levels_and_edges() -> None:
    plan = _plan(["db", "web"], "  - {name: data, machines: [db]}\n  - {name: hook, shell: 'echo hi'}\n"
                                "  - {name: apps, machines: [web]}\n")  # fmt: skip
    text = graph_text(plan)
    assert text.splitlines() == [
        "plan t: 3 steps in 3 levels (steps of one level may run in parallel)",
        "level 1:",
        "  machine db  [group data]",
        "level 2:",
        "  shell hook: echo hi  [group hook]  <- db",
        "level 3:",
        "  machine web  [group apps]  <- hook",
        "edges:",
        "  db -> hook",
        "  hook -> web",
    ]
    g = graph_dict(plan)
    assert g["levels"] == [["machine:db"], ["hook:hook"], ["machine:web"]]
    assert g["edges"] == [["machine:db", "hook:hook"], ["hook:hook", "machine:web"]]


def test_svg_is_well_formed_has_every_node_and_edge_and_escapes_names() -> None:
    plan = parse_plan("""\
version: 1
name: shop
machines:
  db: {}
  web: {}
  cache: {}
groups:
  - {name: data, machines: [db, cache]}
  - {name: ok, approval: "Is <db> & cache fine? \\"yes\\""}
  - {name: warm, shell: "./warm.sh --a=<b>"}
  - {name: apps, after: [ok], machines: [web]}
""", "t.yaml")
    svg = graph_svg(plan)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("class") == "node"}
    assert set(groups) == {"machine:db", "machine:cache", "approval:ok", "hook:warm", "machine:web"}
    assert {g.get("data-kind") for g in groups.values()} == {"machine", "approval", "shell"}
    fills = {g.get("data-kind"): g.find(f"{SVG}rect").get("fill") for g in groups.values()}  # type: ignore[union-attr]
    assert len(set(fills.values())) == 3  # one colour per kind
    titles = "".join(t.text or "" for t in root.iter(f"{SVG}title"))
    assert 'Is <db> & cache fine? "yes"' in titles and "./warm.sh --a=<b>" in titles
    edges = {(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{SVG}path") if p.get("class") == "edge"}
    assert edges == {("machine:db", "approval:ok"), ("machine:cache", "approval:ok"), ("approval:ok", "hook:warm"),
                     ("approval:ok", "machine:web")}  # fmt: skip
    # one column per level: x grows with the level
    xs = {k: float(g.find(f"{SVG}rect").get("x")) for k, g in groups.items()}  # type: ignore[union-attr,arg-type]
    assert xs["machine:db"] == xs["machine:cache"] < xs["approval:ok"] < xs["hook:warm"]
    assert xs["machine:web"] == xs["hook:warm"]
    assert graph_svg(plan) == svg  # deterministic


def test_svg_of_a_broken_plan_is_refused() -> None:
    plan = _plan(["db"], "  - {name: g, after: [nope], machines: [db]}\n")
    with pytest.raises(InvalidInput, match="'nope' is neither a group nor a machine"):
        graph_svg(plan)


def test_after_accepts_a_single_name_and_qualified_names() -> None:
    plan = _plan(["db", "web", "x"], """\
  - {name: data, machines: [db]}
  - {name: other, after: [], machines: [x]}
  - {name: apps, after: "group:other", machines: [{name: web, after: db}]}
""")
    nodes = {n.key: n for n in plan_nodes(plan)}
    assert nodes["machine:web"].after == ("machine:x", "machine:db")
    assert validate_plan(plan, None, None).errors == []


def test_ipv6_addresses_and_gateways() -> None:
    plan = parse_plan("""\
version: 1
name: v6
machines:
  db: {network: {address: "fd00:50::10/64", gateway: "fd00:50::1"}}
groups: [{name: g, machines: [db]}]
""", "t.yaml")
    iface = plan.machines["db"].network.interface
    assert iface is not None and iface.version == 6 and str(iface.network) == "fd00:50::/64"
    with pytest.raises(InvalidInput, match="gateway fd00:51::1 is outside fd00:50::/64"):
        parse_plan("version: 1\nname: v6\nmachines:\n  db: {network: {address: 'fd00:50::10/64', "
                   "gateway: 'fd00:51::1'}}\ngroups: [{name: g, machines: [db]}]\n", "t.yaml")  # fmt: skip
