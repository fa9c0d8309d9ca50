"""A recovery plan as a DAG of steps: one node per machine and per shell/approval group,
dependency levels, cycle detection, and renderings as text and as a self-contained SVG.

Dependencies: a group runs after the group before it unless it lists ``after`` (then after
exactly those groups or machines); a group dependency means "after every step of that group".
Machines of one group have no order between them except their own machine-level ``after``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

from p2v.errors import InvalidInput
from p2v.orchestration.checks_model import (
    AgentCheck,
    ConsoleCheck,
    HttpCheck,
    ScriptCheck,
    SshCheck,
    TcpCheck,
)
from p2v.orchestration.plan_schema import OnFailure, PlanGroup, RecoveryPlan

NodeKind = Literal["machine", "shell", "approval"]
AnyCheck = TcpCheck | SshCheck | HttpCheck | AgentCheck | ConsoleCheck | ScriptCheck
KEY_PREFIX: dict[str, str] = {"machine": "machine", "shell": "hook", "approval": "approval"}


@dataclass(frozen=True)
class PlanNode:
    """One step of the plan. ``after`` holds the keys of the steps it waits for."""

    key: str  # machine:db, hook:warm-cache, approval:approve-apps
    kind: NodeKind
    name: str  # the plan-local machine name, or the group name for hooks and gates
    group: str
    index: int  # position in plan order (groups in file order, machines in listed order)
    after: tuple[str, ...]
    on_failure: OnFailure
    timeout: int | None  # seconds: the machine's boot_timeout, or the hook's / gate's timeout
    machine: str | None = None  # plan-local machine name (machine steps)
    protected: str | None = None  # the protected machine at the site (machine steps)
    command: tuple[str, ...] = ()  # argv of a shell hook
    message: str | None = None  # the question of an approval gate
    checks: tuple[AnyCheck, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "name": self.name, "group": self.group, "index": self.index,
            "after": list(self.after), "on_failure": self.on_failure, "timeout": self.timeout,
            "machine": self.machine, "protected": self.protected, "command": list(self.command),
            "message": self.message, "checks": [c.model_dump(mode="json") for c in self.checks],
        }  # fmt: skip


@dataclass
class GraphAnalysis:
    """What :func:`analyse` found: the nodes (even when the plan has problems) and the problems."""

    nodes: list[PlanNode]
    errors: list[str]
    warnings: list[str]


def node_key(kind: NodeKind, name: str) -> str:
    return f"{KEY_PREFIX[kind]}:{name}"


def _listing(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def analyse(plan: RecoveryPlan) -> GraphAnalysis:
    """Build the nodes and collect every structural problem: duplicate group names, machines in
    two groups or none, unknown references, self-references and cycles."""
    errors: list[str] = []
    warnings: list[str] = []
    group_names: dict[str, int] = {}
    for i, g in enumerate(plan.groups):
        if g.name in group_names:
            errors.append(f"groups[{i}]: the group name {g.name} is already used by groups[{group_names[g.name]}]")
        else:
            group_names[g.name] = i

    # membership: every machine in exactly one group; groups list only declared machines
    member_of: dict[str, str] = {}
    for i, g in enumerate(plan.groups):
        for j, gm in enumerate(g.machines or ()):
            if gm.name not in plan.machines:
                errors.append(f"groups[{i}] ({g.name}): machines[{j}]: {gm.name} is not under machines: "
                              f"(declared: {_listing(list(plan.machines))})")  # fmt: skip
            elif gm.name in member_of:
                where = "twice in group " + g.name if member_of[gm.name] == g.name else \
                    f"in two groups: {member_of[gm.name]} and {g.name}"  # fmt: skip
                errors.append(f"machine {gm.name} is listed {where}; a machine belongs to exactly one group")
            else:
                member_of[gm.name] = g.name
    for name in plan.machines:
        if name not in member_of:
            errors.append(f"machine {name} is in no group; list it under the machines of a group")

    # nodes, in plan order; a group's node keys
    specs: list[tuple[PlanGroup, str, NodeKind, list[str]]] = []  # group, name, kind, machine-level refs
    group_keys: dict[str, list[str]] = {}
    seen_nodes: set[str] = set()
    for g in plan.groups:
        keys = group_keys.setdefault(g.name, [])
        if g.machines is not None:
            members: list[tuple[str, NodeKind, list[str]]] = [
                (gm.name, "machine", list(gm.after)) for gm in g.machines
                if member_of.get(gm.name) == g.name
            ]  # fmt: skip
        else:
            members = [(g.name, "approval" if g.approval is not None else "shell", [])]
        for name, kind, refs in members:
            key = node_key(kind, name)
            if key in seen_nodes:
                continue  # a duplicate group name or a machine listed twice: reported above
            seen_nodes.add(key)
            keys.append(key)
            specs.append((g, name, kind, refs))

    def resolve(ref: str, where: str) -> list[str]:
        kind, _, bare = ref.partition(":") if ref.startswith(("group:", "machine:")) else ("", "", ref)
        if kind in ("", "group") and bare in group_keys:
            if kind == "" and bare in plan.machines and group_keys[bare] != [node_key("machine", bare)]:
                warnings.append(f"{where}: after: {bare} is both a group and a machine; it means the group "
                                f"(write machine:{bare} for the machine)")  # fmt: skip
            return group_keys[bare]
        if kind in ("", "machine") and bare in plan.machines:
            return [node_key("machine", bare)] if bare in member_of else []
        errors.append(f"{where}: after: {ref!r} is neither a group nor a machine of this plan "
                      f"(groups: {_listing(list(group_keys))}; machines: {_listing(list(plan.machines))})")  # fmt: skip
        return []

    group_deps: dict[str, list[str]] = {}
    for i, g in enumerate(plan.groups):
        if g.name in group_deps:
            continue
        if g.after is None:
            group_deps[g.name] = group_keys[plan.groups[i - 1].name] if i else []
            continue
        deps: list[str] = []
        for ref in g.after:
            if ref.removeprefix("group:") == g.name and ref != f"machine:{g.name}":
                errors.append(f"group {g.name}: after: lists the group itself")
                continue
            keys = resolve(ref, f"group {g.name}")
            if set(keys) & set(group_keys[g.name]):
                errors.append(f"group {g.name}: after: {ref} is a step of this group; order machines inside a "
                              f"group with a machine-level after ({{name: web, after: [db]}})")
                continue
            deps += keys
        group_deps[g.name] = deps

    nodes: list[PlanNode] = []
    for index, (g, name, kind, refs) in enumerate(specs):
        key = node_key(kind, name)
        after = list(group_deps.get(g.name, []))
        for ref in refs:
            target = resolve(ref, f"machine {name}")
            if key in target:
                as_group = ref.removeprefix("group:") == g.name and not ref.startswith("machine:")
                own = f"its own group {g.name}" if as_group else "itself"
                errors.append(f"machine {name}: after: {ref} is {own}")
                continue
            after += target
        deduped = tuple(dict.fromkeys(k for k in after if k != key))
        if kind == "machine":
            m = plan.machines[name]
            nodes.append(PlanNode(key=key, kind=kind, name=name, group=g.name, index=index, after=deduped,
                                  on_failure=m.on_failure, timeout=m.boot_timeout, machine=name,
                                  protected=m.protected, checks=tuple(m.checks)))  # fmt: skip
        else:
            nodes.append(PlanNode(key=key, kind=kind, name=name, group=g.name, index=index, after=deduped,
                                  on_failure=g.on_failure or "abort", timeout=g.timeout,
                                  command=tuple(g.argv), message=g.approval))  # fmt: skip
    errors += [f"dependency cycle: {c} (an arrow means: runs before)" for c in find_cycles(nodes)]
    return GraphAnalysis(nodes=nodes, errors=errors, warnings=warnings)


def find_cycles(nodes: Sequence[PlanNode]) -> list[str]:
    """One cycle per strongly connected group of steps, as ``db -> web -> db`` (arrow: runs before)."""
    by_key = {n.key: n for n in nodes}
    dependents: dict[str, list[str]] = {n.key: [] for n in nodes}
    for n in nodes:
        for dep in n.after:
            if dep in dependents:
                dependents[dep].append(n.key)
    # Tarjan's strongly connected components, iterative
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0
    for root in by_key:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            succ = dependents[v]
            if i < len(succ):
                work.append((v, i + 1))
                w = succ[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    sccs.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    cycles = []
    for comp in sorted(sccs, key=lambda c: min(by_key[k].index for k in c)):
        members = set(comp)
        start = min(comp, key=lambda k: by_key[k].index)
        path = _shortest_cycle(start, dependents, members)
        cycles.append(" -> ".join(by_key[k].name for k in path))
    return cycles


def _shortest_cycle(start: str, dependents: dict[str, list[str]], members: set[str]) -> list[str]:
    """Breadth-first from ``start`` back to it inside one strongly connected component."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in dependents[v]:
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start, start]  # unreachable for a real component


def plan_nodes(plan: RecoveryPlan) -> list[PlanNode]:
    """The plan's steps in plan order. Raises InvalidInput listing every structural problem."""
    found = analyse(plan)
    if found.errors:
        raise InvalidInput(f"plan {plan.name}: " + "; ".join(found.errors),
                           hint="`p2v plan validate` lists the problems one per line")  # fmt: skip
    return found.nodes


def topological_order(nodes: Sequence[PlanNode]) -> list[list[PlanNode]]:
    """Levels of steps: every step's dependencies lie in earlier levels, and the steps of one level
    may run in parallel. Each step sits in the earliest level possible; plan order inside a level.
    Raises InvalidInput for a cycle or a dependency on an unknown step."""
    by_key = {n.key: n for n in nodes}
    for n in nodes:
        unknown = [d for d in n.after if d not in by_key]
        if unknown:
            raise InvalidInput(f"step {n.key} depends on unknown step(s): {', '.join(unknown)}")
    level: dict[str, int] = {}
    remaining = sorted(nodes, key=lambda n: n.index)
    while remaining:
        placed = [n for n in remaining if all(d in level for d in n.after)]
        if not placed:
            raise InvalidInput("dependency cycle: " + "; ".join(find_cycles(remaining)))
        for n in placed:
            level[n.key] = 1 + max((level[d] for d in n.after), default=-1)
        remaining = [n for n in remaining if n.key not in level]
    levels: list[list[PlanNode]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for n in sorted(nodes, key=lambda n: n.index):
        levels[level[n.key]].append(n)
    return levels


def plan_levels(plan: RecoveryPlan) -> list[list[PlanNode]]:
    return topological_order(plan_nodes(plan))


# -- renderings ----------------------------------------------------------------------------------


def _describe(n: PlanNode) -> str:
    if n.kind == "machine":
        return f"machine {n.name}" + (f" (protected {n.protected})" if n.protected != n.name else "")
    if n.kind == "shell":
        return f"shell {n.name}: {' '.join(n.command)}"
    return f"approval {n.name}"


def graph_text(plan: RecoveryPlan) -> str:
    """Levels and edges as indented text (``<-`` lists what a step waits for)."""
    levels = plan_levels(plan)
    by_key = {n.key: n for lv in levels for n in lv}
    steps = sum(len(lv) for lv in levels)
    lines = [f"plan {plan.name}: {steps} steps in {len(levels)} levels (steps of one level may run in parallel)"]
    for i, lv in enumerate(levels, 1):
        lines.append(f"level {i}:")
        for n in lv:
            waits = ", ".join(by_key[d].name for d in n.after)
            lines.append(f"  {_describe(n)}  [group {n.group}]" + (f"  <- {waits}" if waits else ""))
    edges = [(by_key[d].name, n.name) for lv in levels for n in lv for d in n.after]
    lines.append("edges:" if edges else "edges: none")
    lines += [f"  {a} -> {b}" for a, b in edges]
    return "\n".join(lines) + "\n"


def graph_dict(plan: RecoveryPlan) -> dict[str, Any]:
    """The graph as JSON: levels of node keys, nodes, edges ``[from, to]`` (from runs before to)."""
    levels = plan_levels(plan)
    return {
        "plan": plan.name,
        "levels": [[n.key for n in lv] for lv in levels],
        "nodes": [n.to_dict() for lv in levels for n in lv],
        "edges": [[d, n.key] for lv in levels for n in lv for d in n.after],
    }


_FILL = {"machine": "#d7e8ff", "shell": "#fff1c2", "approval": "#ffd9d9"}
_STROKE = {"machine": "#2f6db5", "shell": "#a07800", "approval": "#b53030"}
_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _MARGIN, _TOP = 200, 46, 90, 18, 24, 64
_MAX_LABEL = 26


def _clip(text: str, limit: int = _MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def graph_svg(plan: RecoveryPlan) -> str:
    """A self-contained SVG: one column per level, a box per step coloured by kind, an arrow
    from each step to the steps that wait for it. Names are XML-escaped."""
    levels = plan_levels(plan)
    pos: dict[str, tuple[int, int]] = {}
    for col, lv in enumerate(levels):
        for row, n in enumerate(lv):
            pos[n.key] = (_MARGIN + col * (_BOX_W + _GAP_X), _TOP + row * (_BOX_H + _GAP_Y))
    rows = max((len(lv) for lv in levels), default=1)
    width = max(2 * _MARGIN + len(levels) * _BOX_W + max(len(levels) - 1, 0) * _GAP_X, 560)
    height = _TOP + rows * (_BOX_H + _GAP_Y) + 40
    title = f"recovery plan {plan.name}"
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" "
        "markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#555\"/>"
        "</marker></defs>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{_MARGIN}" y="22" font-size="15" font-weight="bold">{escape(_clip(title, 70))}</text>',
    ]
    for col in range(len(levels)):
        x = _MARGIN + col * (_BOX_W + _GAP_X)
        out.append(f'<text x="{x}" y="48" fill="#666">level {col + 1}</text>')
    by_key = {n.key: n for lv in levels for n in lv}
    for n in by_key.values():
        for dep in n.after:
            (x1, y1), (x2, y2) = pos[dep], pos[n.key]
            sx, sy, ex, ey = x1 + _BOX_W, y1 + _BOX_H // 2, x2, y2 + _BOX_H // 2
            mid = (sx + ex) / 2
            out.append(f'<path class="edge" data-from={quoteattr(dep)} data-to={quoteattr(n.key)} '
                       f'd="M {sx} {sy} C {mid} {sy}, {mid} {ey}, {ex} {ey}" fill="none" stroke="#555" '
                       f'stroke-width="1.4" marker-end="url(#arrow)"/>')  # fmt: skip
    for n in by_key.values():
        x, y = pos[n.key]
        sub = {"machine": f"machine · group {n.group}", "shell": "shell hook", "approval": "approval gate"}[n.kind]
        full = _describe(n) + (f" — {n.message}" if n.message else "")
        out += [
            f'<g class="node" id={quoteattr(n.key)} data-kind="{n.kind}">',
            f"<title>{escape(full)}</title>",
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="{_FILL[n.kind]}" '
            f'stroke="{_STROKE[n.kind]}" stroke-width="1.5"/>',
            f'<text x="{x + 10}" y="{y + 19}" font-weight="bold">{escape(_clip(n.name))}</text>',
            f'<text x="{x + 10}" y="{y + 36}" fill="#444" font-size="11">{escape(_clip(sub, 32))}</text>',
            "</g>",
        ]
    lx = _MARGIN
    for kind, label in (("machine", "machine"), ("shell", "shell hook"), ("approval", "approval gate")):
        ly = height - 22
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="14" height="12" fill="{_FILL[kind]}" '
                   f'stroke="{_STROKE[kind]}"/><text x="{lx + 20}" y="{ly}">{label}</text>')  # fmt: skip
        lx += 130
    out.append("</svg>")
    return "\n".join(out) + "\n"
