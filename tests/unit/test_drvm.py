"""Recovery VM settings and records without QEMU: MACs per machine, drill networks,
guest-file paths, bad settings refused before the site or the work folder is touched, and the
record a resumed run reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2v.convert.linux.network import NicConfig
from p2v.convert.nics import plan_nics
from p2v.convert.pipeline import check_guest_files
from p2v.errors import OutputError, UsageError
from p2v.recovery.drvm import (
    RecoverySettings,
    RecoveryVm,
    load_recovery_vm,
    prepare_recovery_vm,
    record_path,
)
from p2v.site import Site
from p2v.sources.model import SourceNic
from p2v.vm.spec import mac_from_seed


def test_nic_macs_come_from_the_guest_or_the_machine_never_the_vm_name() -> None:
    """With no NICs given, the guest's config decides (convert_in_place(nics=[], nic_seed=machine)):
    a MAC it binds is kept, an unbound interface gets a MAC seeded by the machine's name."""
    assert RecoverySettings(vm_name="db-drill-3", drill=True).nics_for("db") == []
    given = [SourceNic(mac="00:1b:21:3a:4f:5e", name="eth0")]
    assert RecoverySettings(vm_name="db", nics=given).nics_for("db") == given
    bound = [NicConfig("eth0", mac="00:1b:21:3a:4f:5e")]
    unbound = [NicConfig("eth0")]
    assert [n.mac for n in plan_nics("db", [], bound, {"*": "isolated"})[0]] == ["00:1b:21:3a:4f:5e"]
    first, _ = plan_nics("db", [], unbound, {"*": "isolated"})
    again, _ = plan_nics("db", [], unbound, {"*": "default"})
    other, _ = plan_nics("web", [], unbound, {"*": "isolated"})
    assert first[0].mac == again[0].mac == mac_from_seed("db/eth0") != other[0].mac
    assert (first[0].guest_name, first[0].network) == ("eth0", "isolated")


def test_drills_default_to_the_isolated_network() -> None:
    assert RecoverySettings(vm_name="a", drill=True).dr_network() == "isolated"
    assert RecoverySettings(vm_name="a").dr_network() == "default"
    assert RecoverySettings(vm_name="a", drill=True, network="seg-1").dr_network() == "seg-1"
    assert RecoverySettings(vm_name="a").holder() == "vm:a"
    assert RecoverySettings(vm_name="a", pin_holder="run:4:db").holder() == "run:4:db"


@pytest.mark.parametrize("path", ["etc/hosts", "/etc/../root/x", "/etc/network/", "/etc//hosts", "/./x", "/"])
def test_guest_file_paths_must_be_absolute_and_normalised(path: str) -> None:
    with pytest.raises(UsageError) as err:
        check_guest_files({path: "x"})
    assert repr(path) in err.value.message


def test_normal_guest_file_paths_are_accepted() -> None:
    files = {"/etc/network/interfaces.d/drill": "auto eth0\n", "/root/.drill": ""}
    assert check_guest_files(files) == files


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (RecoverySettings(vm_name="bad name"), "'bad name'"),
        (RecoverySettings(vm_name="db", cpus=0), "cpus 0"),
        (RecoverySettings(vm_name="db", memory_mib=16), "16 MiB"),
        (RecoverySettings(vm_name="db", extra_files={"../x": ""}), "'../x'"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path: Path, settings: RecoverySettings,
                                                              needle: str) -> None:  # fmt: skip
    with Site.open(tmp_path / "site") as site, pytest.raises(UsageError) as err:
        prepare_recovery_vm(site, "db", None, tmp_path / "work", settings)
    assert needle in err.value.message
    assert not (tmp_path / "work").exists()


def test_the_record_reads_back_and_a_damaged_one_means_prepare_again(tmp_path: Path) -> None:
    rvm = RecoveryVm(
        vm_name="db-dr", machine="db", site_root=str(tmp_path / "site"), workdir=str(tmp_path),
        spec_path=str(tmp_path / "db-dr.vm.json"), overlays=[str(tmp_path / "db-dr-disk0.qcow2")],
        point={"seq": 3, "created_at": 1.5, "consistency": "crash-consistent", "layers": ["/s/rp-000003.qcow2"]},
        conversion={"timings": {"total": 20.0}, "bytes_allocated": 4096}, pin_holder="run:1:db", drill=False,
    )  # fmt: skip
    rvm.save()
    assert load_recovery_vm(tmp_path, "db-dr") == rvm
    assert load_recovery_vm(tmp_path, "other") is None
    record_path(tmp_path, "db-dr").write_text("{not json")
    assert load_recovery_vm(tmp_path, "db-dr") is None


def test_a_stopped_failover_vm_is_never_replaced_by_another_preparation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2V_STATE", str(tmp_path / "state"))
    overlay = tmp_path / "db-dr-disk0.qcow2"
    overlay.write_bytes(b"changes made at DR")
    spec = tmp_path / "db-dr.vm.json"
    spec.write_text("{}")
    RecoveryVm(vm_name="db-dr", machine="db", site_root=str(tmp_path / "site"), workdir=str(tmp_path),
               spec_path=str(spec), overlays=[str(overlay)], point={"seq": 3}, conversion={},
               pin_holder="vm:db-dr", drill=False).save()  # fmt: skip
    with Site.open(tmp_path / "site") as site, pytest.raises(OutputError) as err:
        prepare_recovery_vm(site, "db", 2, tmp_path, RecoverySettings(vm_name="db-dr"))
    assert "failover VM" in err.value.message and "point 3" in err.value.message
    assert overlay.read_bytes() == b"changes made at DR"
