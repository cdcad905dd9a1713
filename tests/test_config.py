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
    assert cfg.gossip_interval == 0.2  # default kept


@pytest.mark.parametrize("text,msg", [
    ("porrt = 1\n", "unknown key"),
    ("port = 70000\n", "above the maximum"),
    ("topology = 'mesh'\n", "not one of"),
    ("dead_timeout = 0.5\n", "must be at least twice probe_interval"),
    ("probe_timeout = 0.5\n", "must be less than probe_interval"),
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
        cfg.set("dead_timeout", "0.9")  # less than twice probe_interval 0.5
    assert cfg.dead_timeout == 10.0
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


# --------------------------------------------------------------------------- bounds
# Every number from a switch, the file or 'set' must be finite and within its range: NaN
# passes every '<' test, and 'set gossip_interval nan' once crashed the daemon in seconds.
FLOATS = [p.name for p in config.PARAMS if p.kind == "float"]
INTS = [p.name for p in config.PARAMS if p.kind == "int"]


def test_every_numeric_parameter_has_both_bounds():
    for p in config.PARAMS:
        if p.kind in ("int", "float"):
            assert p.lo is not None and p.hi is not None, p.name
            assert p.lo <= p.hi, p.name


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400",
                                 float("nan"), float("inf")])
def test_set_refuses_non_finite_floats_and_changes_nothing(name, bad):
    cfg = config.merge({}, None)
    before = dict(cfg.values)
    with pytest.raises(ConfigError) as e:
        cfg.set(name, bad)
    msg = str(e.value)
    assert msg.startswith(f"{name}: ") and "allowed: " in msg and "finite" in msg
    assert cfg.values == before


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize("bad", ["nan", "inf", "1e400", "9" * 5000, str(2**70), 2**70,
                                 float("inf"), 1.5, "-" + "9" * 30])
def test_set_refuses_absurd_integers(name, bad):
    cfg = config.merge({}, None)
    before = dict(cfg.values)
    with pytest.raises(ConfigError) as e:
        cfg.set(name, bad)
    assert str(e.value).startswith(f"{name}: ") and "allowed: " in str(e.value)
    assert cfg.values == before


@pytest.mark.parametrize("text,msg", [
    ("gossip_interval = nan\n", "gossip_interval: 'nan' is not a finite number"),
    ("dead_timeout = inf\n", "dead_timeout: 'inf' is not a finite number"),
    ("reclaim_above = -inf\n", "reclaim_above: '-inf' is not a finite number"),
    ("transfer_rate = 1e400\n", "transfer_rate: 'inf' is not a finite number"),
    ("port = inf\n", "port: 'inf' is not an integer"),
    ("port = 123456789012345678901234567890\n", "port: 123456789012345678901234567890 is "
     "above the maximum 65535"),
    ("post_copy_mb = -99999999999999999999\n", "below the minimum 0"),
    ("node_id = 99999999999\n", "above the maximum 4294967294"),
])
def test_toml_non_finite_and_huge_numbers_are_refused(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.merge({}, str(f))
    assert str(f) in str(e.value) and msg in str(e.value) and "allowed: " in str(e.value)


@pytest.mark.parametrize("cpus", ["0-99999999999", "0-8192", "99999999999",
                                  "0-" + "9" * 5000, "1-0x10", "0-3,+4", "\u0663"])
def test_cpu_lists_are_bounded_before_they_are_expanded(tmp_path, cpus):
    """Refused from the text, in a process limited to 512 MB and 20 s: building the list
    first (10^11 numbers) once took 23 GB before the kernel killed the daemon."""
    import resource
    import subprocess
    import sys

    f = tmp_path / "c.toml"
    f.write_text(f'cpus = "{cpus}"\n')
    code = ("import sys; from omuscd import config\n"
            "try:\n    config.merge({}, sys.argv[1])\n"
            "except config.ConfigError as e:\n    print(e); sys.exit(2)\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True,
                       timeout=20, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-500:]
    assert str(f) in r.stdout and "cpus: " in r.stdout and "(allowed: a CPU list" in r.stdout


def test_largest_cpu_list_is_still_taken():
    assert config.parse_cpu_list(f"0-{config.MAX_CPU}")[-1] == config.MAX_CPU


def test_non_utf8_file_names_the_file(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(b"# caf\xe9\nport = 5000\n")
    with pytest.raises(ConfigError) as e:
        config.merge({}, str(f))
    assert str(f) in str(e.value) and "not UTF-8" in str(e.value) and "line 1" in str(e.value)


def test_huge_file_is_refused_without_reading_it_all(tmp_path):
    f = tmp_path / "big.toml"
    f.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        config.merge({}, str(f))


def test_set_many_is_all_or_nothing():
    cfg = config.merge({}, None)
    before = dict(cfg.values)
    with pytest.raises(ConfigError):
        cfg.set_many({"indirect_checks": 8, "load_interval": "nan"})
    with pytest.raises(ConfigError):
        cfg.set_many({"probe_interval": 0.2})  # probe_timeout 0.25 is not less
    assert cfg.values == before
    # together they are consistent, though neither alone would be
    assert cfg.set_many({"probe_interval": 0.2, "probe_timeout": 0.1})
    assert (cfg.probe_interval, cfg.probe_timeout) == (0.2, 0.1)
