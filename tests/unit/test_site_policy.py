"""Durations and sizes on the command line, policy validation, which points retention expires."""

from __future__ import annotations

import pytest

from p2v.errors import UsageError
from p2v.site import ProtectionPolicy, format_duration, format_size, parse_duration, parse_size
from p2v.site.retention import select_expired


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("90s", 90), ("90", 90), ("2w", 14 * 86400),
     ("1d12h", 129600), ("1H", 3600), (" 5m ", 300)],
)  # fmt: skip
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-5m", "1.5h", "0s", "0", "7d garbage", "h7"])
def test_bad_durations_name_the_text(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_duration(text, what="--retain-for")
    assert repr(text) in err.value.message and "--retain-for" in err.value.message
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "size"),
    [("64K", 65536), ("1M", 1 << 20), ("50M", 50 << 20), ("4096", 4096), ("2G", 2 << 30), ("64k", 65536),
     ("64KiB", 65536), ("1MB", 1 << 20), ("1T", 1 << 40)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "64Q", "1.5M", "-1M", "0", "0K", "64 K B x"])
def test_bad_sizes_name_the_text(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_size(text, what="--bwlimit")
    assert repr(text) in err.value.message and "--bwlimit" in err.value.message


def test_formatting_reads_back() -> None:
    assert format_duration(45) == "45s"
    assert format_duration(3600 + 20 * 60) == "1h20m"
    assert format_duration(2 * 86400 + 4 * 3600) == "2d4h"
    assert format_size(512) == "512B"
    assert format_size(1536 << 20) == "1.5G"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"block_size": 1000}, "block size 1000"), ({"block_size": 128 << 20}, "block size"),
     ({"retain_count": 0}, "retain count 0"), ({"retain_seconds": -1}, "retain-for -1"),
     ({"consistency": "snapshot"}, "'snapshot'"), ({"rpo_seconds": 0}, "RPO 0"), ({"bwlimit": 0}, "bwlimit 0")],
)  # fmt: skip
def test_policy_validation_names_the_bad_value(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(UsageError) as err:
        ProtectionPolicy(**kwargs)  # type: ignore[arg-type]
    assert fragment in err.value.message


def test_policy_round_trips_and_ignores_unknown_keys() -> None:
    p = ProtectionPolicy(block_size=16384, retain_count=5, rpo_seconds=900, compress=True,
                         hooks={"pre": ["sync"], "timeout_s": 300})  # fmt: skip
    assert ProtectionPolicy.from_dict({**p.to_dict(), "added_later": 1}) == p


NOW = 1_000_000.0
DAY = 86400.0


def _pts(*ages_days: float) -> list[tuple[int, float]]:
    return [(i + 1, NOW - a * DAY) for i, a in enumerate(ages_days)]


def test_retention_by_count_keeps_the_newest_n() -> None:
    assert select_expired(_pts(5, 4, 3, 2, 1), retain_count=2, retain_seconds=None, now=NOW) == [1, 2, 3]
    assert select_expired(_pts(5, 4), retain_count=2, retain_seconds=None, now=NOW) == []


def test_retention_by_age_never_removes_the_newest_point() -> None:
    assert select_expired(_pts(30, 20, 10), retain_count=None, retain_seconds=int(7 * DAY), now=NOW) == [1, 2]
    assert select_expired(_pts(3, 2, 1), retain_count=None, retain_seconds=int(7 * DAY), now=NOW) == []


def test_retention_with_both_limits_keeps_a_point_that_either_keeps() -> None:
    pts = _pts(30, 20, 10, 5, 1)
    assert select_expired(pts, retain_count=3, retain_seconds=int(7 * DAY), now=NOW) == [1, 2]
    assert select_expired(pts, retain_count=1, retain_seconds=int(15 * DAY), now=NOW) == [1, 2]


def test_retention_without_limits_keeps_everything() -> None:
    assert select_expired(_pts(300, 200, 1), retain_count=None, retain_seconds=None, now=NOW) == []
    assert select_expired([], retain_count=1, retain_seconds=None, now=NOW) == []


def test_retention_only_expires_the_oldest_run() -> None:
    # a point kept by age sits before expired-looking points (clock went back): only the
    # points older than the oldest kept point can be merged away
    pts = [(1, NOW - 30 * DAY), (2, NOW - 1 * DAY), (3, NOW - 40 * DAY), (4, NOW)]
    assert select_expired(pts, retain_count=None, retain_seconds=int(7 * DAY), now=NOW) == [1]
