"""validate_plan collects every problem: references, group membership, duplicates, addresses,
protected machines at the site, and DR capacity against the site's declared hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2v.errors import InvalidInput
from p2v.orchestration.plan import RecoveryPlan, SiteHost, load_site_hosts, local_host, parse_plan, validate_plan
from p2v.site.model import DiskSpec, ProtectionPolicy
from p2v.site.site import Site

BIG = [SiteHost("dr1", cpus=64, memory=256 << 30)]


def _plan(machines: str, groups: str) -> RecoveryPlan:
    return parse_plan(f"version: 1\nname: t\nmachines:\n{machines}groups:\n{groups}", "t.yaml")


def test_all_reference_and_membership_problems_are_collected() -> None:
    plan = _plan("  db: {}\n  web: {}\n  lost: {}\n", """\
  - {name: data, machines: [db, ghost]}
  - {name: apps, after: [dbs, data], machines: [{name: web, after: [nothere]}, db]}
  - {name: data, approval: "again?"}
""")
    report = validate_plan(plan, None, BIG)
    assert not report.ok
    errors = "\n".join(report.errors)
    expected = [
        "groups[2]: the group name data is already used by groups[0]",
        "groups[0] (data): machines[1]: ghost is not under machines: (declared: db, web, lost)",
        "machine db is listed in two groups: data and apps; a machine belongs to exactly one group",
        "machine lost is in no group; list it under the machines of a group",
        "group apps: after: 'dbs' is neither a group nor a machine of this plan (groups: data, apps; "
        "machines: db, web, lost)",
        "machine web: after: 'nothere' is neither a group nor a machine of this plan",
    ]
    for e in expected:
        assert e in errors, f"missing: {e}\nin:\n{errors}"


def test_self_references_are_errors() -> None:
    report = validate_plan(_plan("  a: {}\n  b: {}\n", """\
  - {name: g, after: [g], machines: [{name: a, after: [a]}]}
  - {name: h, after: [b], machines: [{name: b, after: [h]}]}
"""), None, BIG)
    assert "group g: after: lists the group itself" in report.errors
    assert "machine a: after: a is itself" in report.errors
    assert "machine b: after: h is its own group h" in report.errors
    assert any(e.startswith("group h: after: b is a step of this group") for e in report.errors)


def test_duplicate_protected_machines_and_addresses() -> None:
    report = validate_plan(_plan("""\
  db: {network: {address: 10.0.0.5/24}}
  db2: {protected: db, network: {address: 10.0.0.5/24}}
  web: {network: {segment: other, address: 10.0.0.5/24}}
""", "  - {name: g, machines: [db, db2, web]}\n"), None, BIG)
    assert report.errors == [
        "machines.db2.network.address: 10.0.0.5 on segment plan is already the address of machine db",
        "machines db and db2 both recover the protected machine db; a protected machine can be recovered once "
        "per plan",
    ]  # the same address on another segment is fine


def test_group_and_machine_of_the_same_name_mean_the_group_with_a_warning() -> None:
    plan = _plan("  db: {}\n  db-replica: {}\n  web: {}\n", """\
  - {name: db, machines: [db-replica]}
  - {name: other, after: [], machines: [db]}
  - {name: apps, after: [db], machines: [web]}
""")
    report = validate_plan(plan, None, BIG)
    assert report.ok
    assert report.warnings == ["group apps: after: db is both a group and a machine; it means the group "
                               "(write machine:db for the machine)"]  # fmt: skip
    explicit = _plan("  db: {}\n  db-replica: {}\n  web: {}\n", """\
  - {name: db, machines: [db-replica]}
  - {name: other, after: [], machines: [db]}
  - {name: apps, after: ["machine:db"], machines: [web]}
""")
    from p2v.orchestration.plan import plan_nodes

    assert {n.key: n.after for n in plan_nodes(explicit)}["machine:web"] == ("machine:db",)
    assert validate_plan(explicit, None, BIG).warnings == []


CAP_PLAN = """\
  db: {cpus: 8, memory: 24G}
  web: {cpus: 4, memory: 4G}
  api: {}
"""
CAP_GROUPS = "  - {name: g, machines: [db, web, api]}\n"


def test_capacity_sums_fit_the_declared_hosts() -> None:
    plan = _plan(CAP_PLAN, CAP_GROUPS)
    ok = validate_plan(plan, None, [SiteHost("dr1", 16, 32 << 30), SiteHost("dr2", 8, 16 << 30)])
    assert ok.ok, ok.errors
    assert (ok.totals["cpus"], ok.totals["memory"]) == (14, 30 << 30)  # api: default 2 CPUs, 2 GiB
    assert (ok.totals["host_cpus"], ok.totals["host_memory"]) == (24, 48 << 30)


def test_capacity_shortfalls_name_the_numbers() -> None:
    plan = _plan(CAP_PLAN, CAP_GROUPS)
    report = validate_plan(plan, None, [SiteHost("dr1", 8, 16 << 30), SiteHost("dr2", 4, 8 << 30)])
    assert report.errors == [
        "capacity: the plan needs 14 CPUs but the site has 12 (hosts dr1 (8 CPUs, 16.0G), dr2 (4 CPUs, 8.0G))",
        "capacity: the plan needs 30.0G of memory but the site has 24.0G (hosts dr1 (8 CPUs, 16.0G), dr2 (4 CPUs, "
        "8.0G))",
        "capacity: machine db needs 8 CPUs and 24.0G but no single host has that much (hosts dr1 (8 CPUs, 16.0G), "
        "dr2 (4 CPUs, 8.0G))",
    ]


def test_a_vm_must_fit_on_one_host_even_when_the_sums_fit() -> None:
    plan = _plan("  db: {cpus: 12, memory: 4G}\n", "  - {name: g, machines: [db]}\n")
    report = validate_plan(plan, None, [SiteHost("a", 8, 64 << 30), SiteHost("b", 8, 64 << 30)])
    assert report.errors == ["capacity: machine db needs 12 CPUs and 4.0G but no single host has that much "
                             "(hosts a (8 CPUs, 64.0G), b (8 CPUs, 64.0G))"]  # fmt: skip


def test_packing_failure_is_a_warning() -> None:
    plan = _plan("  a: {cpus: 3, memory: 6G}\n  b: {cpus: 3, memory: 6G}\n  c: {cpus: 2, memory: 4G}\n",
                 "  - {name: g, machines: [a, b, c]}\n")  # fmt: skip
    report = validate_plan(plan, None, [SiteHost("h1", 4, 8 << 30), SiteHost("h2", 4, 8 << 30)])
    assert report.ok
    assert report.warnings == ["capacity: the totals fit but c may not find room on any single host once the "
                               "larger VMs are placed (first fit, largest first)"]  # fmt: skip


def test_assumed_capacity_only_warns() -> None:
    plan = _plan(CAP_PLAN, CAP_GROUPS)
    here = SiteHost("here", 2, 4 << 30, assumed=True)
    report = validate_plan(plan, None, [here])
    assert report.ok
    assert any(w.startswith("capacity: the plan needs 14 CPUs but the site has 2 (assumed from this host")
               for w in report.warnings)  # fmt: skip
    assert any("declare the DR hosts in SITE/hosts.yaml" in w for w in report.warnings)
    unchecked = validate_plan(plan, None, None)
    assert unchecked.ok and "capacity was not checked" in unchecked.warnings[-1]


def test_site_hosts_file(tmp_path: Path) -> None:
    here = load_site_hosts(tmp_path)
    assert len(here) == 1 and here[0].assumed and here[0] == local_host()
    assert here[0].cpus >= 1 and here[0].memory > 64 << 20
    (tmp_path / "hosts.yaml").write_text("hosts:\n  - {name: dr1, cpus: 16, memory: 64G}\n  - {name: dr2, cpus: 8, "
                                         "memory: 32768M}\n")  # fmt: skip
    assert load_site_hosts(tmp_path) == [SiteHost("dr1", 16, 64 << 30), SiteHost("dr2", 8, 32 << 30)]
    (tmp_path / "hosts.yaml").write_text("hosts:\n  - {name: dr1, cpus: 16}\n  - {name: dr2, cpus: x, memory: 1G}\n")
    with pytest.raises(InvalidInput) as info:
        load_site_hosts(tmp_path)
    msg = info.value.message
    assert msg.startswith(f"{tmp_path / 'hosts.yaml'}: ")
    assert "hosts[0].memory: required key is missing" in msg and "hosts[1].cpus:" in msg
    (tmp_path / "hosts.yaml").write_text("hosts:\n  - {name: dr1, cpus: 1, memory: 1G}\n  - {name: dr1, cpus: 1, "
                                         "memory: 1G}\n")  # fmt: skip
    with pytest.raises(InvalidInput, match=r"hosts\[1\]\.name: host dr1 is declared twice"):
        load_site_hosts(tmp_path)


def test_protected_machines_are_checked_against_the_site(tmp_path: Path) -> None:
    plan = _plan("  db: {}\n  web: {protected: web01}\n  cache: {}\n", "  - {name: g, machines: [db, web, cache]}\n")
    with Site.open(tmp_path / "site") as site:
        for name in ("db", "cache"):
            site.add_machine(name, [DiskSpec(url="/dev/null", size=1 << 20)], ProtectionPolicy())
        (site.root / "hosts.yaml").write_text("hosts:\n  - {name: dr1, cpus: 4, memory: 4G}\n")
        report = validate_plan(plan, site, None)
    assert report.errors[0].startswith(f"machines.web.protected: no protected machine called 'web01' at the site "
                                       f"{tmp_path / 'site'} (known machines: cache, db)")  # fmt: skip
    assert "machine db: the protected machine db has no recovery point yet (run `p2v sync db`)" in report.warnings
    # capacity from the site's hosts.yaml: 3 x 2 CPUs > 4, 3 x 2G > 4G
    assert "capacity: the plan needs 6 CPUs but the site has 4 (hosts dr1 (4 CPUs, 4.0G))" in report.errors
    assert report.totals["host_list"] == [{"name": "dr1", "cpus": 4, "memory": 4 << 30, "assumed": False}]
