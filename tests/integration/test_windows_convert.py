"""Windows conversion at registry level, proven by reading the converted hives back.

The registry-level test guests (images/windows.py) cannot boot, so every assertion is
about what a booting Windows would find: service keys, CriticalDeviceDatabase and
DriverDatabase entries, files, the first-boot service and script.

Cost control: the guests and the fake virtio-win ISO/directory come from the image cache;
copies are qcow2 overlays; ONE writable appliance converts all four guests (SOURCE_OF says
which one uses the ISO and which the directory; 2008 has no drivers and must fail) and ONE
read-only appliance reads everything back.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import hivex
import pytest

import images
from p2v.convert.windows import WindowsConversion, convert_windows, windows_facts
from p2v.disks.guestfs import open_guestfs
from p2v.errors import DriversNotFound

CONVERTED = ("windows-2019", "windows-2022", "windows-10")
FAILING = "windows-2008"
SOURCE_OF = {"windows-2019": "iso", "windows-2022": "dir", "windows-10": "iso", FAILING: "iso"}
RETRIES_OF = {"windows-2019": 3, "windows-2022": 2, "windows-10": 3}

SERVICES = "ControlSet001\\Services"
CDD = "ControlSet001\\Control\\CriticalDeviceDatabase"
CLASS_SCSI = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
VIRTIO_BLK = ("VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00", "VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01")
REG_SZ, REG_EXPAND_SZ, REG_DWORD = 1, 2, 4


@dataclass
class Readback:
    """What the read-only appliance found in one converted guest."""

    system_before: Path
    system_after: Path
    software_after: Path
    files: dict[str, bytes]  # guest path -> content, for everything under the staged dir
    boot_files: dict[str, bytes]
    script: bytes
    inspection: dict[str, Any]
    facts: dict[str, Any]


@dataclass
class Run:
    sources: dict[str, Path]
    results: dict[str, WindowsConversion] = field(default_factory=dict)
    rerun: WindowsConversion | None = None
    failure: Exception | None = None
    failing_file_sums: tuple[str, str] = ("", "")
    readback: dict[str, Readback] = field(default_factory=dict)
    failing_inspection: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - t0, 1)
        print(f"[windows-convert] {what}: {now - t0:.1f}s", file=sys.stderr)
        return now


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inspection(g: Any, root: str) -> dict[str, Any]:
    return {
        "type": g.inspect_get_type(root),
        "product": g.inspect_get_product_name(root),
        "variant": g.inspect_get_product_variant(root),
        "major": g.inspect_get_major_version(root),
        "minor": g.inspect_get_minor_version(root),
        "arch": g.inspect_get_arch(root),
        "systemroot": g.inspect_get_windows_systemroot(root),
        "osinfo": g.inspect_get_osinfo(root),
        "hostname": g.inspect_get_hostname(root),
        "drive_mappings": g.inspect_get_drive_mappings(root),
        "root": root,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("windows-convert")
    t = time.monotonic()
    sources = {"iso": images.ensure("virtio-win-iso"), "dir": images.ensure("virtio-win-dir").parent}
    names = [*CONVERTED, FAILING]
    overlays: dict[str, Path] = {}
    for name in names:
        overlays[name] = tmp / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(images.ensure(name)),
             str(overlays[name])],
            check=True,
        )  # fmt: skip
    state = Run(sources=sources)
    t = state.mark("images (cache or build)", t)
    failing_before = _sha256(overlays[FAILING])

    # -- one writable appliance converts everything ---------------------------------------------
    with open_guestfs([(overlays[n], "qcow2") for n in names], readonly=False) as g:
        t = state.mark("launch (writable)", t)
        roots = sorted(g.inspect_os())
        assert roots == [f"/dev/sd{c}1" for c in "abcd"], roots
        root_of = dict(zip(names, roots, strict=True))
        t = state.mark("inspect_os (4 guests)", t)
        for name in CONVERTED:
            root = root_of[name]
            g.umount_all()
            g.mount(root, "/")
            (tmp / name).mkdir()
            g.download("/Windows/System32/config/SYSTEM", str(tmp / name / "SYSTEM.before"))
            inspection = {
                "type": "windows",
                "product": g.inspect_get_product_name(root),
                "major": g.inspect_get_major_version(root),
                "minor": g.inspect_get_minor_version(root),
                "arch": g.inspect_get_arch(root),
            }
            state.results[name] = convert_windows(
                g, root, inspection, sources[SOURCE_OF[name]], first_boot_retries=RETRIES_OF[name]
            )
            t = state.mark(f"convert {name}", t)
        # Converting again must be harmless (same keys, nothing duplicated).
        g.umount_all()
        g.mount(root_of["windows-2022"], "/")
        state.rerun = convert_windows(
            g, root_of["windows-2022"], {}, sources["dir"], first_boot_retries=RETRIES_OF["windows-2022"]
        )
        t = state.mark("convert windows-2022 again", t)
        # The version without drivers must fail before writing anything. Mounted read-only
        # (ntfs-3g updates its journal on a read-write mount even when nothing is written): a
        # write attempt would then surface as a ConversionError instead of DriversNotFound.
        g.umount_all()
        g.mount_ro(root_of[FAILING], "/")
        try:
            convert_windows(g, root_of[FAILING], {}, sources[SOURCE_OF[FAILING]])
        except Exception as exc:  # stored for the test to assert on
            state.failure = exc
        t = state.mark("failing conversion", t)
        g.umount_all()
    t = state.mark("shutdown", t)
    state.failing_file_sums = (failing_before, _sha256(overlays[FAILING]))

    # -- one read-only appliance reads it all back ----------------------------------------------
    with open_guestfs([(overlays[n], "qcow2") for n in names], readonly=True) as g:
        t = state.mark("launch (read-only)", t)
        roots = sorted(g.inspect_os())
        root_of = dict(zip(names, roots, strict=True))
        state.failing_inspection = _inspection(g, root_of[FAILING])
        t = state.mark("inspect_os (4 guests)", t)
        for name in CONVERTED:
            root = root_of[name]
            g.umount_all()
            g.mount_ro(root, "/")
            out = tmp / name
            g.download("/Windows/System32/config/SYSTEM", str(out / "SYSTEM.after"))
            g.download("/Windows/System32/config/SOFTWARE", str(out / "SOFTWARE.after"))
            staged = state.results[name].staged_dir
            # One tar transfer: read_file costs ~0.4 s per file under TCG.
            g.tar_out(staged, str(out / "staged.tar"))
            with tarfile.open(out / "staged.tar") as tar:
                files = {
                    f"{staged}/{m.name.removeprefix('./')}": tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers()
                    if m.isfile()
                }
            boot = {p: g.read_file(p) for p in ("/Windows/System32/drivers/viostor.sys",
                                                  "/Windows/System32/drivers/vioscsi.sys")}  # fmt: skip
            state.readback[name] = Readback(
                system_before=out / "SYSTEM.before",
                system_after=out / "SYSTEM.after",
                software_after=out / "SOFTWARE.after",
                files=files,
                boot_files=boot,
                script=g.read_file("/Windows/p2v/firstboot.cmd"),
                inspection=_inspection(g, root),
                facts=windows_facts(g, root, {}),
            )
            t = state.mark(f"read back {name}", t)
        g.umount_all()
    state.mark("shutdown", t)
    return state


# -- helpers over python3-hivex -----------------------------------------------------------------


def _node(h: Any, path: str) -> int | None:
    node = h.root()
    for part in path.split("\\"):
        node = h.node_get_child(node, part)
        if not node:
            return None
    return int(node)


def _values(h: Any, path: str) -> dict[str, tuple[int, bytes]]:
    node = _node(h, path)
    assert node is not None, f"registry key {path} is missing"
    return {h.value_key(v): h.value_value(v) for v in h.node_values(node)}


def _sz(value: tuple[int, bytes]) -> str:
    assert value[0] in (REG_SZ, REG_EXPAND_SZ), value
    return value[1].decode("utf-16-le").rstrip("\0")


def _dword(value: tuple[int, bytes]) -> int:
    assert value[0] == REG_DWORD, value
    return int.from_bytes(value[1][:4], "little")


def _multi(value: tuple[int, bytes]) -> list[str]:
    return [s for s in value[1].decode("utf-16-le").split("\0") if s]


def _dump(h: Any, node: int) -> dict[str, Any]:
    return {
        "values": {h.value_key(v): h.value_value(v) for v in h.node_values(node)},
        "children": {h.node_name(c): _dump(h, c) for c in h.node_children(node)},
    }


def _hive(path: Path) -> Any:
    return hivex.Hivex(str(path))


def _folder(name: str) -> str:
    folder = images.GUESTS[name]["virtio_folder"]
    assert folder
    return str(folder)


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CONVERTED, FAILING])
def test_libguestfs_recognises_the_test_guests_after_conversion(run: Run, name: str) -> None:
    facts = images.GUESTS[name]
    got = run.readback[name].inspection if name in run.readback else run.failing_inspection
    assert got["type"] == "windows"
    assert got["product"] == facts["product_name"]
    assert (got["major"], got["minor"]) == (facts["major"], facts["minor"])
    assert got["variant"] == facts["variant"]
    assert got["systemroot"] == "/Windows"
    assert got["arch"] == "x86_64"
    assert got["hostname"] == facts["hostname"]
    assert got["drive_mappings"] == {"C": got["root"]}  # MountedDevices -> this guest's partition
    if name == "windows-2019":
        assert got["osinfo"] == "win2k19"


@pytest.mark.parametrize("name", CONVERTED)
def test_result_names_the_driver_folder_and_source(run: Run, name: str) -> None:
    res = run.results[name]
    assert res.driver_folder == _folder(name)
    assert res.virtio_win.startswith(str(run.sources[SOURCE_OF[name]]))
    assert res.virtio_win.endswith("(iso)" if SOURCE_OF[name] == "iso" else "(directory)")
    assert res.driver_dirs["viostor"] == f"viostor/{_folder(name)}/amd64"
    assert res.boot_drivers == ["viostor", "vioscsi"]
    assert set(res.services_added) == {"viostor", "vioscsi", "p2v-firstboot"}
    assert res.build == images.GUESTS[name]["build"]
    assert res.warnings == []


@pytest.mark.parametrize("name", CONVERTED)
def test_viostor_service_is_a_boot_driver(run: Run, name: str) -> None:
    h = _hive(run.readback[name].system_after)
    svc = _values(h, f"{SERVICES}\\viostor")
    assert _dword(svc["Type"]) == 1
    assert _dword(svc["Start"]) == 0
    assert _dword(svc["ErrorControl"]) == 1
    assert _sz(svc["Group"]) == "SCSI miniport"
    assert svc["ImagePath"][0] == REG_EXPAND_SZ
    assert _sz(svc["ImagePath"]) == "System32\\drivers\\viostor.sys"
    # The tag goes after every tag already used in that load-order group.
    before = _hive(run.readback[name].system_before)
    services = _node(before, SERVICES)
    assert services is not None
    used = []
    for child in before.node_children(services):
        vals = {before.value_key(v): before.value_value(v) for v in before.node_values(child)}
        if "Tag" in vals and "Group" in vals and _sz(vals["Group"]).casefold() == "scsi miniport":
            used.append(_dword(vals["Tag"]))
    assert _dword(svc["Tag"]) > max(used)
    assert _dword(_values(h, f"{SERVICES}\\viostor\\Parameters\\PnpInterface")["5"]) == 1
    assert _dword(_values(h, f"{SERVICES}\\vioscsi")["Start"]) == 0


@pytest.mark.parametrize("name", CONVERTED)
def test_boot_driver_files_come_from_the_right_folder(run: Run, name: str) -> None:
    src = run.sources["dir"]
    folder = _folder(name)
    rb = run.readback[name]
    assert (
        rb.boot_files["/Windows/System32/drivers/viostor.sys"]
        == (src / f"viostor/{folder}/amd64/viostor.sys").read_bytes()
    )
    assert (
        rb.boot_files["/Windows/System32/drivers/vioscsi.sys"]
        == (src / f"vioscsi/{folder}/amd64/vioscsi.sys").read_bytes()
    )


@pytest.mark.parametrize("name", CONVERTED)
def test_critical_device_database_maps_virtio_blk_to_viostor(run: Run, name: str) -> None:
    h = _hive(run.readback[name].system_after)
    for hwid in VIRTIO_BLK:
        parts = hwid.split("&")
        for n in (4, 3, 2):  # with SUBSYS and REV, with SUBSYS, vendor/device only
            key = "pci#" + "&".join(parts[:n]).lower()
            vals = _values(h, f"{CDD}\\{key}")
            assert _sz(vals["Service"]) == "viostor", key
            assert _sz(vals["ClassGUID"]) == CLASS_SCSI, key


@pytest.mark.parametrize("name", CONVERTED)
def test_driver_database_has_viostor_for_windows_10_boot(run: Run, name: str) -> None:
    h = _hive(run.readback[name].system_after)
    inf = _values(h, "DriverDatabase\\DriverInfFiles\\viostor.inf")
    pkg = _sz(inf["Active"])
    assert _multi(inf[""]) == [pkg]
    assert pkg.startswith("viostor.inf_amd64_")
    assert run.results[name].driver_packages["viostor.inf"] == pkg
    config = _values(h, f"DriverDatabase\\DriverPackages\\{pkg}\\Configurations\\rhelscsi_inst")
    assert _sz(config["Service"]) == "viostor"
    package = _values(h, f"DriverDatabase\\DriverPackages\\{pkg}")
    assert _sz(package["OemPath"]) == "C:\\Windows\\Drivers\\VirtIO\\viostor"
    for hwid in VIRTIO_BLK:
        assert "viostor.inf" in _values(h, f"DriverDatabase\\DeviceIds\\PCI\\{hwid}")
        desc = _values(h, f"DriverDatabase\\DriverPackages\\{pkg}\\Descriptors\\PCI\\{hwid}")
        assert _sz(desc["Configuration"]) == "rhelscsi_inst"


@pytest.mark.parametrize("name", CONVERTED)
def test_full_driver_set_of_that_version_is_staged(run: Run, name: str) -> None:
    src = run.sources["dir"]
    folder = _folder(name)
    expected: dict[str, bytes] = {}
    for driver_dir in sorted(p for p in src.iterdir() if (p / folder / "amd64").is_dir()):
        for f in sorted((driver_dir / folder / "amd64").iterdir()):
            if f.suffix != ".pdb":
                expected[f"/Windows/Drivers/VirtIO/{driver_dir.name}/{f.name}"] = f.read_bytes()
    got = run.readback[name].files
    assert sorted(got) == sorted(expected)
    mismatched = [p for p in expected if got[p] != expected[p]]
    assert mismatched == []
    assert {PurePosixPath(p).parent.name for p in got} >= {"viostor", "vioscsi", "NetKVM", "Balloon"}


@pytest.mark.parametrize("name", CONVERTED)
def test_first_boot_service_and_script(run: Run, name: str) -> None:
    res = run.results[name]
    rb = run.readback[name]
    h = _hive(rb.system_after)
    svc = _values(h, f"{SERVICES}\\p2v-firstboot")
    assert _dword(svc["Type"]) == 0x10
    assert _dword(svc["Start"]) == 2
    assert "\\p2v\\firstboot.cmd" in _sz(svc["ImagePath"])
    script = rb.script.decode("ascii")
    assert "\r\n" in script
    assert f"set MAX_ATTEMPTS={RETRIES_OF[name]}\r\n" in script
    assert "sc config p2v-firstboot start= disabled" in script
    pnputil = 'pnputil /add-driver "%SystemRoot%\\Drivers\\VirtIO\\*.inf" /subdirs /install'
    assert pnputil in script
    assert res.first_boot_commands[0] == pnputil
    guid = images.GUESTS[name]["vmware_tools_guid"]
    if guid:
        assert f"msiexec /x {guid} /qn /norestart" in script
        assert res.vmware_tools_uninstall and res.vmware_tools_guid == guid
    else:
        assert "msiexec" not in script
        assert not res.vmware_tools_uninstall


@pytest.mark.parametrize("name", CONVERTED)
def test_original_drivers_are_untouched(run: Run, name: str) -> None:
    before = _hive(run.readback[name].system_before)
    after = _hive(run.readback[name].system_after)
    facts = images.GUESTS[name]
    originals = [*facts["storage_services"], *facts["network_services"]]
    for path in [f"{SERVICES}\\{s}" for s in originals] + [
        "ControlSet001\\Control\\Class",
        "ControlSet001\\Control\\TimeZoneInformation",
        "ControlSet001\\Control\\GroupOrderList",
        "MountedDevices",
        "Select",
    ]:
        b, a = _node(before, path), _node(after, path)
        assert b is not None and a is not None, path
        assert _dump(after, a) == _dump(before, b), path
    start = _values(after, f"{SERVICES}\\{facts['storage_services'][0]}")["Start"]
    assert _dword(start) == 0


@pytest.mark.parametrize("name", CONVERTED)
def test_rtc_mode_follows_real_time_is_universal(run: Run, name: str) -> None:
    assert run.results[name].rtc_mode == images.GUESTS[name]["rtc"]
    assert run.readback[name].facts["rtc_mode"] == images.GUESTS[name]["rtc"]


@pytest.mark.parametrize("name", CONVERTED)
def test_facts_after_conversion(run: Run, name: str) -> None:
    facts = run.readback[name].facts
    guest = images.GUESTS[name]
    assert facts["product"] == guest["product_name"]
    assert facts["build"] == guest["build"]
    assert facts["variant"] == guest["variant"].lower()
    assert facts["current_control_set"] == "ControlSet001"
    assert facts["virtio_boot_ready"] is True
    assert {"viostor", "vioscsi"} <= set(facts["virtio_drivers"])
    assert set(guest["storage_services"]) <= set(facts["storage_services"])
    assert set(guest["network_services"]) <= set(facts["network_services"])
    assert facts["first_boot_pending"] is True
    assert facts["registry_clean"] is True
    assert (facts["vmware_tools"] or {}).get("guid") == guest["vmware_tools_guid"]


def test_second_conversion_changes_nothing_new(run: Run) -> None:
    first, again = run.results["windows-2022"], run.rerun
    assert again is not None
    assert again.driver_packages == first.driver_packages
    assert again.services_added == []
    assert any("viostor was already installed" in w for w in again.warnings)
    h = _hive(run.readback["windows-2022"].system_after)
    inf = _values(h, "DriverDatabase\\DriverInfFiles\\viostor.inf")
    assert len(_multi(inf[""])) == 1


def test_version_without_drivers_fails_and_leaves_the_disk_untouched(run: Run) -> None:
    exc = run.failure
    assert isinstance(exc, DriversNotFound), repr(exc)
    msg = str(exc)
    assert "Windows Server (R) 2008 Standard" in msg
    assert "6.0" in msg and "x86_64" in msg
    assert str(run.sources["iso"]) in msg
    assert exc.exit_code == 5
    before, after = run.failing_file_sums
    assert before == after
