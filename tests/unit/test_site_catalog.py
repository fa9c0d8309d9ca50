"""Site catalog: migrations, refusal of newer schemas, damaged files, status from summary rows."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2v.errors import Busy, SiteError, UnknownMachine, UsageError
from p2v.site import DiskSpec, ProtectionPolicy, Site
from p2v.site import catalog as catalog_mod
from p2v.site.catalog import LATEST, Catalog


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_new_catalog_is_created_at_the_latest_version_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    cat = Catalog.open(path)
    try:
        assert cat.version() == LATEST
        assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert cat.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert cat.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    finally:
        cat.close()
    assert {"schema_version", "machines", "disks", "points", "point_layers", "retention_journal"} <= _tables(path)


def test_migrating_from_version_1_keeps_the_data_and_fills_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    old = Catalog.open(path, target=1)
    assert old.version() == 1
    assert "retention_journal" not in _tables(path)
    with old.transaction() as db:  # rows as version 1 wrote them
        db.execute("INSERT INTO machines (name, created_at, policy) VALUES ('db1', ?, ?)",
                   (time.time(), json.dumps({"rpo_seconds": 900, "block_size": 65536})))  # fmt: skip
        db.execute("INSERT INTO disks (machine_id, idx, source_url, size) VALUES (1, 0, 'ssh://root@db1/dev/sda', ?)",
                   (1 << 30,))  # fmt: skip
    old.close()

    site = Site.open(tmp_path)  # migrates to the latest version
    try:
        assert site.catalog.version() == LATEST
        rec = site.machine("db1")
        assert rec.policy.rpo_seconds == 900
        assert rec.disks[0].url == "ssh://root@db1/dev/sda" and rec.disks[0].size == 1 << 30
        # the v2 column was filled from the v1 policy JSON, so status shows the RPO target
        assert [s.rpo_seconds for s in site.status()] == [900]
    finally:
        site.close()
    assert "retention_journal" in _tables(path)


def test_catalog_from_a_newer_p2v_is_refused_with_a_hint(tmp_path: Path) -> None:
    Catalog.open(tmp_path / "catalog.sqlite").close()
    with sqlite3.connect(tmp_path / "catalog.sqlite") as db:
        db.execute("UPDATE schema_version SET version = ?", (LATEST + 5,))
    with pytest.raises(SiteError) as err:
        Site.open(tmp_path)
    assert f"schema version {LATEST + 5}" in err.value.message
    assert str(tmp_path / "catalog.sqlite") in err.value.message
    assert err.value.hint and "upgrade p2v" in err.value.hint
    assert err.value.exit_code == 12


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog.open(path, target=1).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(catalog_mod, "MIGRATIONS", (catalog_mod.MIGRATIONS[0], broken))
    with pytest.raises(SiteError):
        Catalog.open(path, target=2)
    monkeypatch.undo()
    assert "half_done" not in _tables(path)
    cat = Catalog.open(path, target=1)
    assert cat.version() == 1
    cat.close()


def test_a_file_that_is_not_a_catalog_is_reported_as_damaged(tmp_path: Path) -> None:
    (tmp_path / "catalog.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SiteError) as err:
        Site.open(tmp_path)
    assert "catalog.sqlite" in err.value.message and "damaged" in err.value.message


def test_site_is_created_on_first_use_at_P2V_SITE(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2V_SITE", str(tmp_path / "dr"))
    with Site.open() as site:
        assert site.root == (tmp_path / "dr").absolute()
    assert (tmp_path / "dr" / "catalog.sqlite").is_file()
    assert (tmp_path / "dr" / "machines").is_dir()


@pytest.mark.parametrize("name", ["", "-web", ".hidden", "a/b", "../x", "x" * 64, "caf\u00e9", "a b"])
def test_bad_machine_names_are_refused(tmp_path: Path, name: str) -> None:
    with Site.open(tmp_path) as site, pytest.raises(UsageError) as err:
        site.add_machine(name, [DiskSpec("file:///d.img", 1 << 20)], ProtectionPolicy())
    assert repr(name) in err.value.message
    assert not any((tmp_path / "machines").iterdir())


def test_machines_add_list_and_unknown_name_hint(tmp_path: Path) -> None:
    with Site.open(tmp_path) as site:
        for n in ("web1", "db.prod-2", "A_9"):
            site.add_machine(n, [DiskSpec(f"file:///{n}.img", 1 << 20)], ProtectionPolicy(retain_count=3))
        assert [m.name for m in site.machines()] == ["A_9", "db.prod-2", "web1"]
        assert site.machine("web1").policy.retain_count == 3
        assert (tmp_path / "machines" / "web1" / "disk0").is_dir()
        with pytest.raises(SiteError) as dup:
            site.add_machine("web1", [DiskSpec("file:///x.img", 1 << 20)], ProtectionPolicy())
        assert "already protected" in dup.value.message
        with pytest.raises(UnknownMachine) as unk:
            site.machine("web2")
        assert "'web2'" in unk.value.message
        assert unk.value.hint and "web1" in unk.value.hint and "db.prod-2" in unk.value.hint


def _fake_point(site: Site, name: str, seq: int, created_at: float, layer_bytes: int = 1000) -> None:
    mid = site.catalog.machine_row(name)["id"]  # type: ignore[index]
    with site.catalog.transaction() as db:
        site.catalog.insert_point(db, mid, seq=seq, created_at=created_at, committed_at=created_at + 1,
                                  consistency="fuzzy", mode="hash", wall_s=1.0,
                                  layers=[(0, f"rp-{seq:06d}.qcow2", f"rp-{seq:06d}.map", layer_bytes,
                                           {"bytes_sent": 10})])  # fmt: skip


def test_status_states_from_summary_rows(tmp_path: Path) -> None:
    now = 1_000_000.0
    with Site.open(tmp_path) as site:
        for n in ("fresh", "late", "never", "norpo"):
            rpo = None if n == "norpo" else 3600
            site.add_machine(n, [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy(rpo_seconds=rpo))
        _fake_point(site, "fresh", 1, now - 7200)
        _fake_point(site, "fresh", 2, now - 60, layer_bytes=500)
        _fake_point(site, "late", 1, now - 7200)
        _fake_point(site, "norpo", 1, now - 10 * 86400)
        rows = {s.name: s for s in site.status(now)}
    assert rows["fresh"].state == "ok" and rows["fresh"].newest_seq == 2
    assert rows["fresh"].newest_age_s == pytest.approx(60)
    assert rows["fresh"].chain_depth == 2 and rows["fresh"].point_count == 2 and rows["fresh"].bytes_on_disk == 1500
    assert rows["late"].state == "late" and rows["late"].newest_age_s == pytest.approx(7200)
    assert rows["never"].state == "never" and rows["never"].newest_age_s is None
    assert rows["norpo"].state == "ok"
    assert rows["fresh"].last_result == "ok"
    assert rows["never"].last_result is None


def test_status_reports_a_sync_whose_process_died_as_failed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)  # fmt: skip
    pid = int(dead.stdout)
    with Site.open(tmp_path) as site:
        site.add_machine("m", [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy())
        site.add_machine("live", [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy())
        with site.catalog.transaction() as db:
            site.catalog.set_sync_state(db, site.catalog.machine_row("m")["id"], "running", pid=pid)  # type: ignore[index]
            site.catalog.set_sync_state(db, site.catalog.machine_row("live")["id"], "running", pid=os.getpid())  # type: ignore[index]
        rows = {s.name: s for s in site.status()}
    assert rows["m"].last_result == "failed"
    assert rows["m"].last_error and f"pid {pid}" in rows["m"].last_error
    assert rows["live"].last_result == "running"


def test_to_dict_is_json_with_iso_times(tmp_path: Path) -> None:
    with Site.open(tmp_path) as site:
        site.add_machine("m", [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy(retain_seconds=86400))
        _fake_point(site, "m", 1, 1_700_000_000.0)
        out = json.loads(json.dumps([s.to_dict() for s in site.status(1_700_000_100.0)]))
        pts = json.loads(json.dumps([p.to_dict() for p in site.points("m", 1_700_000_100.0)]))
        rec = json.loads(json.dumps(site.machine("m").to_dict()))
    assert out[0]["newest_point_at"] == "2023-11-14T22:13:20+00:00"
    assert out[0]["newest_age_s"] == pytest.approx(100)
    assert pts[0]["seq"] == 1 and pts[0]["layers"][0]["layer"] == "rp-000001.qcow2" and pts[0]["bytes_sent"] == 10
    assert rec["policy"]["retain_seconds"] == 86400


def test_busy_catalog_is_reported_as_busy(tmp_path: Path) -> None:
    with Site.open(tmp_path) as site:
        other = sqlite3.connect(tmp_path / "catalog.sqlite", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            site.catalog.db.execute("PRAGMA busy_timeout = 100")
            with pytest.raises(Busy) as err:
                site.add_machine("m", [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy())
            assert "catalog.sqlite" in err.value.message
        finally:
            other.execute("ROLLBACK")
            other.close()


def test_status_is_readable_while_another_process_writes(tmp_path: Path) -> None:
    with Site.open(tmp_path) as site:
        site.add_machine("m", [DiskSpec("file:///d", 1 << 20)], ProtectionPolicy())
    other = sqlite3.connect(tmp_path / "catalog.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE machines SET last_result = 'running'")
    try:
        t0 = time.monotonic()
        with Site.open(tmp_path) as site:
            assert [s.last_result for s in site.status()] == [None]  # the uncommitted write is not seen
        assert time.monotonic() - t0 < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
