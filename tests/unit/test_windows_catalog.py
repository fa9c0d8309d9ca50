"""drivers/windows.yaml and the decisions taken from it (no QEMU, no libguestfs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import hivex
import pytest
import yaml

from images import virtio_win
from images.regf import empty_hive, header_checksum
from images.windows import VMWARE_TOOLS_GUID as WINDOWS_VMWARE_GUID
from images.windows import WINDOWS_GUESTS, build_software_hive, build_system_hive
from p2v.convert.windows.bootdriver import (
    BootDriverInstall,
    install_critical_device_entries,
    install_driver_database,
    install_service,
    package_name,
)
from p2v.convert.windows.catalog import load_catalog, windows_catalog
from p2v.convert.windows.firstboot import FirstBootPlan, msi_uninstall_action, pnputil_action, render_script
from p2v.convert.windows.guest import current_control_set, find_guest_tools, hive_is_dirty, identify, rtc_mode
from p2v.convert.windows.registry import Hive, RegValue
from p2v.convert.windows.resolve import DriverSelection, resolve_drivers
from p2v.convert.windows.virtio_source import VirtioWinSource
from p2v.errors import ConversionError, DriversNotFound, InvalidInput, MissingComponent, SourceNotFound
from p2v.paths import drivers_dir

CATALOG = drivers_dir() / "windows.yaml"

# (product, major, minor, build, variant, arch) -> expected folders, most specific first
SUPPORTED = [
    ("Windows Server 2008", 6, 0, 6002, "server", "x86_64", ["2k8"]),
    ("Windows Server 2008", 6, 0, 6002, "server", "i386", ["2k8"]),
    ("Windows Server 2008 R2", 6, 1, 7601, "server", "x86_64", ["2k8R2"]),
    ("Windows 7", 6, 1, 7601, "client", "x86_64", ["w7"]),
    ("Windows 7", 6, 1, 7601, "client", "i386", ["w7"]),
    ("Windows Server 2012", 6, 2, 9200, "server", "x86_64", ["2k12"]),
    ("Windows 8", 6, 2, 9200, "client", "x86_64", ["w8"]),
    ("Windows Server 2012 R2", 6, 3, 9600, "server", "x86_64", ["2k12R2"]),
    ("Windows 8.1", 6, 3, 9600, "client", "x86_64", ["w8.1"]),
    ("Windows Server 2016", 10, 0, 14393, "server", "x86_64", ["2k16"]),
    ("Windows Server 2019", 10, 0, 17763, "server", "x86_64", ["2k19"]),
    ("Windows Server 2022", 10, 0, 20348, "server", "x86_64", ["2k22"]),
    ("Windows Server 2025", 10, 0, 26100, "server", "x86_64", ["2k25", "2k22"]),
    ("Windows 10", 10, 0, 19045, "client", "x86_64", ["w10"]),
    ("Windows 10", 10, 0, 10240, "client", "i386", ["w10"]),
    ("Windows 11", 10, 0, 22631, "client", "x86_64", ["w11", "w10"]),
]


@pytest.mark.parametrize(("product", "major", "minor", "build", "variant", "arch", "folders"), SUPPORTED)
def test_version_maps_to_its_virtio_win_folder(
    product: str, major: int, minor: int, build: int, variant: str, arch: str, folders: list[str]
) -> None:
    entry = windows_catalog().select_version(
        product=product, major=major, minor=minor, build=build, variant=variant, arch=arch
    )
    assert entry.folders == folders
    assert entry.name == product


@pytest.mark.parametrize(
    ("product", "major", "minor", "build", "variant", "arch", "reason"),
    [
        ("Windows XP Professional", 5, 1, 2600, "client", "i386", "no virtio-win driver folder is known"),
        ("Windows Server 2003", 5, 2, 3790, "server", "x86_64", "no virtio-win driver folder is known"),
        ("Windows Vista", 6, 0, 6002, "client", "x86_64", "no virtio-win driver folder is known"),
        ("Windows Server 2019", 10, 0, 17763, "server", "i386", "no virtio-win driver folder is known"),
        ("Windows Server 2019", 10, 0, None, "server", "x86_64", "build number is unknown"),
        ("Windows Server 2019", 10, 0, 17763, "server", "ppc64le", "no drivers for architecture ppc64le"),
        ("Windows 10 Technical Preview", 10, 0, 9841, "client", "x86_64", "no virtio-win driver folder"),
    ],
)
def test_unknown_version_raises_drivers_not_found(
    product: str, major: int, minor: int, build: int | None, variant: str, arch: str, reason: str
) -> None:
    with pytest.raises(DriversNotFound) as info:
        windows_catalog().select_version(
            product=product, major=major, minor=minor, build=build, variant=variant, arch=arch,
            source="/srv/virtio-win.iso",
        )  # fmt: skip
    msg = str(info.value)
    assert product in msg
    assert f"{major}.{minor}" in msg
    assert arch in msg
    assert "/srv/virtio-win.iso" in msg
    assert reason in msg
    assert info.value.exit_code == 5


def test_shipped_catalog_validates() -> None:
    cat = load_catalog(CATALOG)
    assert cat.schema_ == 1
    assert [k for k, d in cat.drivers.items() if d.required] == ["viostor"]
    assert set(cat.boot_drivers()) == {"viostor", "vioscsi"}
    for key, d in cat.boot_drivers().items():
        assert d.sys and d.inf_section and d.group, key
    # Every version entry points at folders, and no two entries claim the same build.
    for entry in cat.versions:
        assert entry.folders
        lo, hi = entry.builds
        assert lo is None or hi is None or lo <= hi


VIRTIO_PCI = {
    "viostor": {"1001", "1042"},  # virtio-blk legacy/transitional, modern
    "vioscsi": {"1004", "1048"},
    "NetKVM": {"1000", "1041"},
    "Balloon": {"1002", "1045"},
    "vioserial": {"1003", "1043"},
    "viorng": {"1005", "1044"},
}


@pytest.mark.parametrize("driver", list(windows_catalog().drivers))
def test_every_driver_serves_pci_ids(driver: str) -> None:
    spec = windows_catalog().drivers[driver]
    assert spec.pci_ids, driver
    for pci in spec.pci_ids:
        assert pci.vendor in ("1AF4", "1B36")
        assert pci.hardware_ids()[0] == f"VEN_{pci.vendor}&DEV_{pci.device}&SUBSYS_{pci.subsys}&REV_{pci.rev}"
        assert pci.hardware_ids()[-1] == f"VEN_{pci.vendor}&DEV_{pci.device}"
    if driver in VIRTIO_PCI:
        assert {p.device for p in spec.pci_ids} == VIRTIO_PCI[driver]
        assert {p.kind for p in spec.pci_ids} == {"legacy", "modern"}
        legacy = next(p for p in spec.pci_ids if p.kind == "legacy")
        modern = next(p for p in spec.pci_ids if p.kind == "modern")
        assert (legacy.rev, modern.rev, modern.subsys) == ("00", "01", "11001AF4")


def _broken_catalog(tmp_path: Path, edit: object) -> Path:
    data = yaml.safe_load(CATALOG.read_text())
    edit(data)  # type: ignore[operator]
    path = tmp_path / "windows.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["drivers"]["viostor"]["pci_ids"][0].update(device="10X1"), "drivers.viostor.pci_ids.0.device"),
        (lambda d: d.pop("versions"), "versions"),
        (lambda d: d["versions"][0].update(variant="desktop"), "versions.0.variant"),
        (lambda d: d["drivers"]["viostor"].pop("inf_section"), "drivers.viostor"),
        (lambda d: d["drivers"]["NetKVM"].update(colour="blue"), "drivers.NetKVM.colour"),
        (lambda d: d.update(schema=2), "schema"),
    ],
)
def test_invalid_catalog_names_file_and_field(tmp_path: Path, edit: object, field: str) -> None:
    path = _broken_catalog(tmp_path, edit)
    with pytest.raises(InvalidInput) as info:
        load_catalog(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_catalog_that_is_not_yaml_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "windows.yaml"
    bad.write_text("versions: [unclosed\n")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_catalog(bad)
    with pytest.raises(MissingComponent, match="missing"):
        load_catalog(tmp_path / "nope.yaml")


# -- the catalog applied to a virtio-win source -------------------------------------------------


@pytest.fixture(scope="module")
def fake_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return virtio_win.build_tree(tmp_path_factory.mktemp("virtio-win") / "root")


def _resolve(source_path: Path, build: int = 17763) -> DriverSelection:
    cat = windows_catalog()
    version = cat.select_version(
        product="Windows Server 2019", major=10, minor=0, build=build, variant="server", arch="x86_64"
    )
    with VirtioWinSource(source_path) as src:
        return resolve_drivers(cat, version, "x86_64", src, guest="Windows Server 2019 (10.0)")


def test_resolve_prefers_per_driver_folders_and_skips_pdb(fake_tree: Path) -> None:
    sel = _resolve(fake_tree)
    assert sel.version_folder == "2k19"
    drivers = sel.drivers
    assert drivers["viostor"].source_dir == "viostor/2k19/amd64"
    assert [f.name for f in drivers["viostor"].files] == ["viostor.cat", "viostor.inf", "viostor.sys"]
    assert {f.name for f in drivers["NetKVM"].files} == {"netkvm.cat", "netkvm.inf", "netkvm.sys", "netkvmco.exe"}
    assert sel.missing == []


def test_resolve_uses_the_flattened_layout_when_alone(tmp_path: Path) -> None:
    for rel in virtio_win.virtio_win_paths():
        if rel.startswith("amd64/2k19/"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(virtio_win.fake_content(rel))
    sel = _resolve(tmp_path)
    drivers = sel.drivers
    assert drivers["viostor"].source_dir == "amd64/2k19"
    # From a folder shared by all drivers, each driver takes only its own files.
    assert [f.name for f in drivers["viostor"].files] == ["viostor.cat", "viostor.inf", "viostor.sys"]
    assert {f.name for f in drivers["Balloon"].files} == {"balloon.cat", "balloon.inf", "balloon.sys", "blnsvr.exe"}


def test_resolve_without_the_version_folder_names_source_and_folders(fake_tree: Path, tmp_path: Path) -> None:
    partial = tmp_path / "no-2k19"
    shutil.copytree(fake_tree, partial)
    for d in list(partial.rglob("2k19")):
        shutil.rmtree(d)
    with pytest.raises(DriversNotFound) as info:
        _resolve(partial)
    msg = str(info.value)
    assert str(partial) in msg
    assert "viostor/2k19/amd64" in msg and "amd64/2k19" in msg
    assert "Windows Server 2019" in msg


def test_iso_and_directory_sources_list_the_same_files(fake_tree: Path, tmp_path: Path) -> None:
    iso = virtio_win.build_iso(tmp_path / "virtio-win.iso", tree=fake_tree)
    with VirtioWinSource(fake_tree) as d, VirtioWinSource(iso) as i:
        assert (d.kind, i.kind) == ("directory", "iso")
        assert [f.path for f in d.files()] == [f.path for f in i.files()] == virtio_win.virtio_win_paths()
        rel = "NetKVM/w10/x86/netkvm.sys"
        assert i.read(rel.upper()) == d.read(rel) == virtio_win.fake_content(rel)
    with pytest.raises(SourceNotFound, match="does not exist"):
        VirtioWinSource(tmp_path / "missing.iso")
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"not an iso" * 100)
    with pytest.raises(InvalidInput, match="ISO 9660"):
        VirtioWinSource(junk)


def test_fake_files_are_distinct_per_path() -> None:
    paths = virtio_win.virtio_win_paths()
    assert len({virtio_win.fake_content(p) for p in paths}) == len(paths)
    assert "viostor/2k8/amd64/viostor.sys" not in paths  # the 2008 guest must find nothing


# -- hive writer and first-boot script (data the conversion relies on) --------------------------


def test_empty_hive_opens_in_hivex_and_takes_keys(tmp_path: Path) -> None:
    data = empty_hive(root_name="ROOT")
    assert data[:4] == b"regf" and len(data) == 0x2000
    assert int.from_bytes(data[0x1FC:0x200], "little") == header_checksum(data[:0x1000])
    path = tmp_path / "SYSTEM"
    path.write_bytes(data)
    h = hivex.Hivex(str(path), write=True)
    assert h.node_name(h.root()) == "ROOT"
    node = h.node_add_child(h.root(), "Select")
    h.node_set_value(node, {"key": "Current", "t": 4, "value": (1).to_bytes(4, "little")})
    h.commit(str(path))
    again = hivex.Hivex(str(path))
    child = again.node_get_child(again.root(), "Select")
    assert again.value_dword(again.node_get_value(child, "Current")) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # python3-hivex __del__
def test_corrupt_hive_is_refused_naming_the_file(tmp_path: Path) -> None:
    data = bytearray(empty_hive())
    data[0x1FC] ^= 0xFF
    path = tmp_path / "SYSTEM"
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="/Windows/System32/config/SYSTEM: cannot open the registry hive"):
        Hive(path, label="/Windows/System32/config/SYSTEM")


def test_first_boot_script_is_bounded_and_crlf() -> None:
    plan = FirstBootPlan(retries=4)
    plan.actions.append(pnputil_action("%SystemRoot%\\Drivers\\VirtIO", modern=True))
    plan.actions.append(msi_uninstall_action("VMware Tools", "{11111111-2222-3333-4444-555555555555}"))
    text = render_script(plan).decode("ascii")
    assert text.count("\r\n") == text.count("\n")
    assert "set MAX_ATTEMPTS=4\r\n" in text
    assert "if %ATTEMPT% GTR %MAX_ATTEMPTS% goto giveup" in text
    assert text.count("sc config p2v-firstboot start= disabled") == 2  # when done, and when giving up
    assert "msiexec /x {11111111-2222-3333-4444-555555555555} /qn /norestart" in text
    legacy = render_script(FirstBootPlan([pnputil_action("C:\\D", modern=False)], 3)).decode()
    assert 'pnputil -i -a "%%F"' in legacy and "/add-driver" not in legacy


def test_dirty_hive_is_detected(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.write_bytes(empty_hive())
    dirty = bytearray(empty_hive())
    dirty[8] += 1  # secondary sequence number != primary: Windows never finished writing it
    (tmp_path / "dirty").write_bytes(bytes(dirty))
    assert not hive_is_dirty(clean)
    assert hive_is_dirty(tmp_path / "dirty")


# -- registry reading and boot-driver writing on host hives built like the test guests ----------


@pytest.fixture(scope="module")
def hives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for name in ("windows-2019", "windows-10", "windows-2008"):
        d = tmp_path_factory.mktemp(name)
        guest = WINDOWS_GUESTS[name]
        build_system_hive(d / "SYSTEM", guest)
        build_software_hive(d / "SOFTWARE", guest)
        out[name] = (d / "SYSTEM", d / "SOFTWARE")
    return out


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("windows-2019", ("Windows Server 2019 Standard", 10, 0, 17763, "server")),
        ("windows-10", ("Windows 10 Pro", 10, 0, 19045, "client")),
        # 2008 has no CurrentMajorVersionNumber: the version comes from CurrentVersion "6.0".
        ("windows-2008", ("Windows Server (R) 2008 Standard", 6, 0, 6002, "server")),
    ],
)
def test_identity_comes_from_the_software_hive(
    hives: dict[str, tuple[Path, Path]], name: str, expected: tuple[str, int, int, int, str]
) -> None:
    ident = identify(Hive(hives[name][1]), systemroot="/Windows", arch="x86_64", inspection={})
    assert (ident.product, ident.major, ident.minor, ident.build, ident.variant) == expected


def test_control_set_rtc_and_guest_tools(hives: dict[str, tuple[Path, Path]]) -> None:
    cat = windows_catalog()
    system, software = (Hive(p) for p in hives["windows-2019"])
    assert current_control_set(system) == "ControlSet001"
    assert rtc_mode(system, "ControlSet001") == "localtime"
    tools = find_guest_tools(software, cat)
    assert [(t.kind, t.guid) for t in tools] == [("vmware", WINDOWS_VMWARE_GUID)]
    system, software = (Hive(p) for p in hives["windows-10"])
    assert rtc_mode(system, "ControlSet001") == "utc"
    assert find_guest_tools(software, cat) == []  # 7-Zip is not a guest tool


def test_boot_driver_keys_on_a_host_hive(hives: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    work = tmp_path / "SYSTEM"
    shutil.copy(hives["windows-2008"][0], work)
    system = Hive(work, write=True)
    spec = windows_catalog().drivers["viostor"]
    install = BootDriverInstall(
        service="viostor", sys_name="viostor.sys", inf_name="viostor.inf", inf_bytes=b"[Version]\r\n",
        inf_section="rhelscsi_inst", description=spec.description, provider=spec.provider,
        class_guid=spec.class_guid, group="SCSI miniport",
        hardware_ids=tuple(p.full_id for p in spec.pci_ids),
        all_hardware_ids=tuple(h for p in spec.pci_ids for h in p.hardware_ids()),
        service_parameters=(("BusType", 1),), pnp_interface=5, arch_folder="amd64",
        oem_path="C:\\Windows\\Drivers\\VirtIO\\viostor",
    )  # fmt: skip
    install_service(system, "ControlSet001", install)
    install_critical_device_entries(system, "ControlSet001", install)
    pkg = install_driver_database(system, install, now=0)
    system.commit(tmp_path / "SYSTEM.new")
    after = Hive(tmp_path / "SYSTEM.new")
    svc = after.node("ControlSet001\\Services\\viostor")
    assert svc is not None
    # Tags used in "SCSI miniport" by this guest: atapi 25, msahci 33, LSI_SAS 34.
    assert after.get(svc, "Tag") == RegValue.dword(35)
    assert after.get(svc, "Start") == RegValue.dword(0)
    assert after.get(svc, "ImagePath") == RegValue.expand_sz("System32\\drivers\\viostor.sys")
    cdd = "ControlSet001\\Control\\CriticalDeviceDatabase"
    assert after.get_at(f"{cdd}\\pci#ven_1af4&dev_1042", "Service") == RegValue.sz("viostor")
    assert after.get_at(f"{cdd}\\pci#cc_0106", "Service") == RegValue.sz("msahci")  # kept
    assert pkg == package_name("viostor.inf", "amd64", b"[Version]\r\n")
    assert after.get_at("DriverDatabase\\DriverInfFiles\\viostor.inf", "Active") == RegValue.sz(pkg)
    # Only the keys written are reported, in order, from the hive root.
    assert system.changed_keys[0] == "ControlSet001\\Services\\viostor"
    assert "ControlSet001\\Services\\msahci" not in system.changed_keys
