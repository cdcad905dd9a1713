"""The man pages, --help and the tables must say the same things: these tests fail when
a switch, key, command, reply code or exit status is added to one and not the others."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from omuscd import cli, exitcodes, runclient
from omuscd.config import PARAMS
from omuscd.control import commands, protocol

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ["omuscd.8", "omuscd-commands.7", "omuscd.toml.5"]


def section(page: str, name: str) -> str:
    text = (MAN / page).read_text()
    m = re.search(rf"^\.SH {re.escape(name)}\n(.*?)(?=^\.SH |\Z)", text, re.S | re.M)
    assert m, f"{page} has no section {name}"
    return m.group(1)


def unroff(s: str) -> str:
    s = re.sub(r"^\.[BI]R? ", "", s)  # a font macro line: .B text
    return re.sub(r"\\f[BIRP]", "", s).replace("\\-", "-").replace("\\(aq", "'")


def tagged(text: str) -> list[str]:
    """The first line after each .TP, without fonts."""
    return [unroff(m) for m in re.findall(r"^\.TP\n(.*)$", text, re.M)]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed "
                    "(the README's test command installs it)")
@pytest.mark.parametrize("page", PAGES)
def test_pages_format_without_warnings(page):
    r = subprocess.run(["groff", "-man", "-z", "-ww", str(MAN / page)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_every_switch_is_in_omuscd_8_and_nothing_else():
    documented = set()
    for line in tagged(section("omuscd.8", "OPTIONS")):
        documented |= set(re.findall(r"(--[a-z][a-z-]*|-[a-z])\b", line))
    parser = cli.build_parser()
    real = {s for a in parser._actions for s in a.option_strings}
    assert documented == real


def test_every_subcommand_and_its_options_are_in_omuscd_8():
    documented = {}
    for line in tagged(section("omuscd.8", "COMMANDS")):
        name = line.split()[0]
        documented[name] = set(re.findall(r"--[a-z][a-z-]*", line))
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    real = {name: {s for a in p._actions for s in a.option_strings if s.startswith("--")}
            - {"--help"} for name, p in sub.choices.items()}
    assert documented == real


def test_every_file_key_is_in_omuscd_toml_5_and_nothing_else():
    documented = {line.split()[0] for line in tagged(section("omuscd.toml.5", "KEYS"))}
    assert documented == {p.name for p in PARAMS if p.in_file}


def test_every_command_is_in_omuscd_commands_7_with_its_syntax():
    documented = tagged(section("omuscd-commands.7", "COMMANDS"))
    assert documented == [c.syntax for c in commands.COMMANDS.values()]


def test_every_reply_code_is_documented():
    documented = {int(c) for c in tagged(section("omuscd-commands.7", "REPLIES"))}
    assert documented == set(protocol.REPLY_CODES)


def test_every_exit_status_is_documented():
    documented = {int(unroff(c)) for c in tagged(section("omuscd.8", "EXIT STATUS"))}
    daemon_codes = {exitcodes.OK, exitcodes.FAILURE, exitcodes.USAGE, exitcodes.ID_CLASH,
                    exitcodes.STATE_IN_USE}
    run_codes = {runclient.EXIT_DAEMON, runclient.EXIT_LOST, runclient.EXIT_NOT_STARTED,
                 runclient.EXIT_OUTPUT_CUT}
    assert documented == daemon_codes | run_codes
    ctl = unroff(section("omuscd.8", "EXIT STATUS"))
    for code in (exitcodes.CTL_NO_CONNECTION, exitcodes.CTL_REFUSED, exitcodes.CTL_FAILED):
        assert f" {code} " in ctl
    assert "omuscd console exits 0 when you quit, 1 when it cannot reach" in " ".join(
        ctl.split())


def test_help_lists_every_switch_with_its_default():
    out = subprocess.run([cli.sys.executable, "-m", "omuscd", "--help"],
                         capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    for p in PARAMS:
        assert p.switch in out
        if p.default not in (None, []) and p.kind != "bool":
            assert f"(default: {p.default})" in flat, p.name


def test_pip_install_gives_the_command_and_its_man_pages(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([cli.sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(ROOT)], check=True, capture_output=True)
    help_text = subprocess.run([str(venv / "bin" / "omuscd"), "--help"], check=True,
                               capture_output=True, text=True).stdout
    assert "--control-port" in help_text and "run" in help_text
    if shutil.which("man"):
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "MANPATH": ""}
        where = subprocess.run(["man", "-w", "omuscd"], capture_output=True, text=True,
                               env=env).stdout.strip()
        assert where == str(venv / "share" / "man" / "man8" / "omuscd.8")


def test_wheel_installs_the_man_pages(tmp_path):
    subprocess.run([cli.sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("omuscd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for page, sec in (("omuscd.8", 8), ("omuscd-commands.7", 7), ("omuscd.toml.5", 5)):
        assert any(n.endswith(f".data/data/share/man/man{sec}/{page}") for n in names), page
