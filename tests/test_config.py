import os
import stat

import pytest

from omuscd import config
from omuscd.config import ConfigError, Interface


def test_cpu_lists_round_trip():
    assert config.parse_cpu_list("0,2-3,5") == [0, 2, 3, 5]
    assert config.format_cpu_list([0, 2, 3, 5]) == "0,2-3,5"
    for bad in ("", "3-1", "-1", "x"):
        with pytest.raises(ValueError):
            config.parse_cpu_list(bad)


def test_peer_parsing():
    assert config.parse_peer("127.0.0.5") == ("127.0.0.5", config.DEFAULT_PORT)
    assert config.parse_peer("127.0.0.5:99") == ("127.0.0.5", 99)
    with pytest.raises(ValueError):
        config.parse_peer("127.0.0.5:0")


def test_file_then_switches(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('port = 5000\ndead-timeout = 9.5\npeer = ["127.0.0.9"]\n')
    cfg = config.merge({"port": "6000"}, str(f))
    assert cfg.port == 6000  # the switch wins
    assert cfg.dead_timeout == 9.5  # dashes and underscores both name a key
    assert cfg.peer == ["127.0.0.9"]
    assert cfg.gossip_interval == 0.5  # default kept


@pytest.mark.parametrize("text,msg", [
    ("porrt = 1\n", "unknown key"),
    ("port = 70000\n", "above the maximum"),
    ("topology = 'mesh'\n", "not one of"),
    ("dead_timeout = 1.0\n", "must be greater than suspect_timeout"),
    ("port = \n", "config file"),
    ("daemon = true\n", "unknown key"),  # a switch only: the file must not detach
])
def test_bad_files_are_refused_with_the_reason(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        config.merge({}, str(f))


def test_runtime_set_is_checked_and_rolled_back():
    cfg = config.merge({}, None)
    with pytest.raises(ConfigError):
        cfg.set("dead_timeout", "2")  # not above suspect_timeout 3
    assert cfg.dead_timeout == 6.0
    assert cfg.set("dead_timeout", "8") == 8.0


IFACES = [Interface("lo", "127.0.0.1", None, True),
          Interface("eth0", "10.1.2.3", "10.1.2.255", True),
          Interface("eth1", "192.0.2.7", "192.0.2.255", True)]


def detect(cli, ifaces=IFACES, route="eth1"):
    cfg = config.merge(cli, None)
    return config.autodetect(cfg, lambda: ifaces, lambda: route)


def test_autodetect_takes_the_default_route_interface():
    cfg = detect({})
    assert (cfg.interface, cfg.address, cfg.broadcast) == ("eth1", "192.0.2.7", "192.0.2.255")
    assert cfg.node_id == 2 * 256 + 7  # the last two octets of 192.0.2.7
    assert cfg.detected["interface"] == "default route"
    assert cfg.cpus and cfg.node_name


def test_autodetect_without_default_route_uses_first_up_non_loopback():
    cfg = detect({}, route=None)
    assert cfg.interface == "eth0"
    assert "no default route" in cfg.detected["interface"]
    down = [IFACES[0], Interface("eth0", "10.1.2.3", "10.1.2.255", False), IFACES[2]]
    assert detect({}, down, route=None).interface == "eth1"


def test_autodetect_with_nothing_but_loopback_still_starts():
    cfg = detect({}, [IFACES[0]], route=None)
    assert cfg.interface == "lo" and cfg.broadcast is None


def test_loopback_addresses_need_no_interface():
    cfg = detect({"address": "127.0.0.3", "peer": ["127.0.0.2", "127.0.0.3"]})
    assert cfg.interface == "lo" and cfg.broadcast is None and cfg.node_id == 3
    assert cfg.peers == [("127.0.0.2", config.DEFAULT_PORT)]  # ourselves left out


def test_unknown_interface_or_address_is_an_error():
    with pytest.raises(ConfigError, match="eth9"):
        detect({"interface": "eth9"})
    with pytest.raises(ConfigError, match="not on any interface"):
        detect({"address": "10.9.9.9"})


def test_control_port_beyond_loopback_needs_a_secret():
    with pytest.raises(ConfigError, match="control-secret"):
        detect({"control_bind": "0.0.0.0"})
    assert detect({"control_bind": "0.0.0.0", "control_secret": "/x"}).control_bind == "0.0.0.0"


def test_cpus_must_exist():
    with pytest.raises(ConfigError, match="not available"):
        detect({"cpus": "0-4095"})
    assert detect({"cpus": "0"}).cpus == [0]


def test_keygen_writes_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "k"
    config.write_key(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(config.read_secret(str(path))) == 64
    with pytest.raises(FileExistsError):
        config.write_key(str(path))


def test_secret_files_readable_by_others_are_refused(tmp_path):
    path = tmp_path / "k"
    path.write_text("x" * 64)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.read_secret(str(path))
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 16"):
        config.read_secret(str(path))
