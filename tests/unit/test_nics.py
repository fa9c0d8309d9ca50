import pytest

from p2v.convert.linux.network import NicConfig, link_file_text
from p2v.convert.nics import parse_net_map, plan_nics
from p2v.errors import UsageError
from p2v.sources.model import SourceNic


def test_source_mac_kept_and_name_matched_by_mac():
    nics, warns = plan_nics(
        "vm",
        [SourceNic(mac="00:1B:21:3A:4F:5E", model="e1000", network="VM Network")],
        [NicConfig("eth0", mac="00:1b:21:3a:4f:5e", source="/etc/udev/rules.d/70-persistent-net.rules")],
        {"VM Network": "dr-lan"},
    )
    assert len(nics) == 1
    assert nics[0].mac == "00:1b:21:3a:4f:5e"
    assert nics[0].guest_name == "eth0"
    assert nics[0].network == "dr-lan"
    assert warns == []


def test_unbound_config_name_pinned_to_source_nic_in_order():
    nics, _ = plan_nics("vm", [SourceNic(mac="00:50:56:01:02:03")], [NicConfig("ens192", method="static")], {})
    assert nics[0].guest_name == "ens192" and nics[0].mac == "00:50:56:01:02:03"


def test_no_source_metadata_generates_stable_macs():
    a, _ = plan_nics("vm", [], [NicConfig("ens192")], {"*": "isolated"})
    b, _ = plan_nics("vm", [], [NicConfig("ens192")], {"*": "isolated"})
    assert a[0].mac == b[0].mac and a[0].mac.startswith("52:54:00:")
    assert a[0].network == "isolated"


def test_no_nics_anywhere_still_gives_one_nic():
    nics, _ = plan_nics("vm", [], [], {})
    assert len(nics) == 1 and nics[0].guest_name is None


def test_unknown_source_network_in_map_warns():
    _, warns = plan_nics("vm", [SourceNic(mac="00:50:56:01:02:03", network="A")], [], {"B": "x"})
    assert any("'B'" in w for w in warns)


@pytest.mark.parametrize("bad", ["novalue", "=x", "x="])
def test_bad_net_map_names_the_item(bad):
    with pytest.raises(UsageError, match="--net"):
        parse_net_map([bad])


def test_link_file_binds_name_to_mac():
    text = link_file_text("eth0", "00:1b:21:3a:4f:5e")
    assert "[Match]\nMACAddress=00:1b:21:3a:4f:5e" in text and "[Link]\nName=eth0" in text
