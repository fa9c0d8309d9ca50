"""``p2v doctor`` on this host, for real (the libguestfs appliance is launched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from p2v.cli.main import app
from p2v.doctor import run_checks
from p2v.errors import MissingComponent
from p2v.vm.accel import probe

COMPONENTS = [
    "qemu-system-x86_64",
    "qemu-img",
    "qemu-nbd",
    "libguestfs",
    "libnbd",
    "hivex",
    "OVMF (UEFI guests)",
    "ssh client",
    "paramiko",
    "acceleration",
]


def path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH holding links to the tools p2v runs, except ``missing``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "ssh"):
        real = shutil.which(tool)
        if tool not in missing and real:
            (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def test_doctor_json_reports_every_component_and_the_accel_verdict() -> None:
    res = CliRunner().invoke(app, ["doctor", "--json"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0, res.stdout
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == COMPONENTS
    assert all(c["ok"] for c in checks.values() if c["essential"])
    assert checks["qemu-img"]["detail"][0].isdigit(), "the version, not the tool's whole banner"

    verdict = probe()  # cached by the doctor run just above
    assert report["accel"]["accel"] == verdict.accel
    if verdict.accel == "tcg":  # this host: /dev/kvm exists but a KVM boot hangs
        assert report["accel"]["summary"].startswith("KVM unusable, using TCG (")
        assert "force_tcg" in checks["libguestfs"]["detail"]
    assert "appliance launched in" in checks["libguestfs"]["detail"]
    assert checks["libguestfs"]["seconds"] > 0


def test_missing_qemu_img_fails_with_exit_8(tmp_path: Path) -> None:
    runner = CliRunner()
    # P2V_ACCEL: the probe is not under test, and a PATH of links would make it probe again (15 s)
    env = {"PATH": path_without(tmp_path, "qemu-img"), "P2V_ACCEL": "tcg"}
    res = runner.invoke(app, ["doctor", "--json", "--no-launch"], env=env)
    assert res.exit_code == MissingComponent.exit_code == 8
    report = json.loads(res.stdout)
    assert report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["qemu-img"]["ok"] is False and checks["qemu-img"]["essential"] is True
    assert "not found on PATH" in checks["qemu-img"]["detail"]
    assert checks["qemu-img"]["fix"] == "apt-get install qemu-utils"
    assert checks["qemu-system-x86_64"]["ok"] is True

    table = runner.invoke(app, ["doctor", "--no-launch"], env=env)
    assert table.exit_code == 8
    assert "MISSING" in table.stdout and "qemu-utils" in table.stdout


def test_missing_optional_component_keeps_report_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without(tmp_path, "ssh"))
    monkeypatch.setenv("P2V_ACCEL", "tcg")
    report = run_checks(launch_appliance=False)
    ssh = next(c for c in report.checks if c.name == "ssh client")
    assert not ssh.ok and not ssh.essential
    assert report.ok is True
    assert "launch skipped" in next(c for c in report.checks if c.name == "libguestfs").detail
