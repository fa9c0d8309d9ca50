"""Point pins at a real site (qemu-img layers): a pinned point stops retention (reported as
deferred, nothing merged, every file unchanged), a pin of a dead process lapses, and the races
with a running or interrupted retention are closed from both sides."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from p2v.errors import Busy, SiteError, UsageError
from p2v.site import ProtectionPolicy, Site, retention
from p2v.site.pins import RetentionOutcome, active_pins, pin_point, release_pins, unpin
from tests.integration import test_site_chain as chains

NAME = "web1"


def site_files(root: Path) -> dict[str, str]:
    """sha256 of every layer and map of the machine."""
    folder = root / "machines" / NAME
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("disk*/*")) if p.suffix in (".qcow2", ".map")}  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.run(["true"], check=True)
    del proc
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def retain(site: Site) -> RetentionOutcome:
    """apply_retention of NAME; its result says what was deferred."""
    result = site.apply_retention(NAME)
    assert isinstance(result, RetentionOutcome)
    return result


@pytest.fixture
def chain(tmp_path: Path) -> chains.Chain:
    return chains.four_points(tmp_path / "site", ProtectionPolicy(retain_count=2))


def test_a_pinned_point_defers_retention_and_changes_no_file(chain: chains.Chain, tmp_path: Path) -> None:
    root = tmp_path / "site"
    before = site_files(root)
    with Site.open(root) as site:
        pin_point(site, NAME, 3, "run:7:web1", os.getpid())
        assert site.plan_retention(NAME) == []
        result = retain(site)
    assert (result.expired, result.kept) == ([], [1, 2, 3, 4])
    assert result.deferred == ["deferred: point 3 pinned by run:7:web1"]
    assert result.to_dict()["deferred"] == result.deferred
    assert site_files(root) == before
    assert chain.check_points(tmp_path) == [1, 2, 3, 4]
    with Site.open(root) as site:
        assert unpin(site, NAME, "run:7:web1") == 1
        result = retain(site)
    assert (result.expired, result.kept, result.deferred) == ([1, 2], [3, 4], [])
    assert chain.check_points(tmp_path) == [3, 4]


def test_a_pin_whose_process_died_lapses(chain: chains.Chain, tmp_path: Path) -> None:
    with Site.open(tmp_path / "site") as site:
        pin_point(site, NAME, 2, "run:8:web1", dead_pid())
        assert active_pins(site, NAME) == []
        assert site.catalog.query("SELECT count(*) FROM point_pins")[0][0] == 0  # removed, not only ignored
        assert retain(site).expired == [1, 2]


def test_a_pin_without_pid_holds_until_unpinned_and_repinning_replaces_it(chain: chains.Chain, tmp_path: Path) -> None:
    with Site.open(tmp_path / "site") as site:
        pin_point(site, NAME, 4, "vm:web1-dr", dead_pid())
        pin_point(site, NAME, 4, "vm:web1-dr", None)  # same holder: replaced, now without a pid
        pin_point(site, NAME, 2, "run:9:web1", os.getpid())
        pins = active_pins(site, NAME)
        assert [(p.seq, p.holder, p.pid) for p in pins] == [(2, "run:9:web1", os.getpid()), (4, "vm:web1-dr", None)]
        assert release_pins(site, "run:9:") == 1
        res = retain(site)
        assert res.expired == [] and res.deferred == ["deferred: point 4 pinned by vm:web1-dr"]
        assert unpin(site, NAME, "vm:web1-dr") == 1
        assert unpin(site, NAME, "vm:web1-dr") == 0  # idempotent
        assert retain(site).expired == [1, 2]


def test_pinning_a_missing_or_merged_point_is_refused(chain: chains.Chain, tmp_path: Path) -> None:
    with Site.open(tmp_path / "site") as site:
        with pytest.raises(SiteError) as err:
            pin_point(site, NAME, 9, "run:1:web1", None)
        assert "point 9 does not exist" in err.value.message and "1, 2, 3, 4" in (err.value.hint or "")
        retain(site)
        with pytest.raises(SiteError) as err:
            pin_point(site, NAME, 1, "run:1:web1", None)
        assert "merged away" in err.value.message and "3, 4" in (err.value.hint or "")
        with pytest.raises(UsageError):
            pin_point(site, NAME, 3, "", None)


def test_a_pin_taken_while_retention_marks_its_victim_puts_the_merge_off(
    chain: chains.Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "site"
    before = site_files(root)
    other = Site.open(root)  # another process's handle: a drill starting right now

    refused: list[str] = []

    def hook(stage: str) -> None:
        if stage == "after-start":  # point 1 is being merged into point 2
            with pytest.raises(Busy) as busy:
                pin_point(other, NAME, 2, "run:10:web1", os.getpid())
            refused.append(busy.value.message)
            pin_point(other, NAME, 3, "run:10:web1", os.getpid())

    monkeypatch.setattr(retention, "stage_hook", hook)
    try:
        with Site.open(root) as site:
            result = retain(site)
            assert (result.expired, result.kept) == ([], [1, 2, 3, 4])
            assert result.deferred == ["deferred: point 3 pinned by run:10:web1"]
            assert refused and "merging point 1 into point 2" in refused[0]
            assert site.catalog.query("SELECT count(*) FROM retention_journal")[0][0] == 0
            assert [p.seq for p in site.points(NAME)] == [1, 2, 3, 4]
    finally:
        other.close()
    assert site_files(root) == before
    assert chain.check_points(tmp_path) == [1, 2, 3, 4]


def test_an_interrupted_merge_is_not_finished_while_pinned_and_its_target_cannot_be_pinned(
    chain: chains.Chain, tmp_path: Path
) -> None:
    root = tmp_path / "site"
    child = chains.run_retention_child(root, NAME, "after-commit")  # merging 1 into 2, killed
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err.decode()
    with Site.open(root) as site:
        with pytest.raises(Busy) as busy:
            pin_point(site, NAME, 2, "run:11:web1", os.getpid())  # its layer is about to be replaced
        assert "merging point 1 into point 2" in busy.value.message
        pin_point(site, NAME, 4, "run:11:web1", os.getpid())
        before = site_files(root)
        result = retain(site)
        assert (result.resumed, result.expired) == (False, [])
        assert result.deferred == ["deferred: point 4 pinned by run:11:web1"]
        assert site_files(root) == before
        unpin(site, NAME, "run:11:web1")
        result = retain(site)
        assert result.resumed is True and result.kept == [3, 4]
    assert chain.check_points(tmp_path) == [3, 4]
