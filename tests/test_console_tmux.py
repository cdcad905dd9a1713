"""The console end to end, in a real terminal: tmux runs ``omuscd --tui`` as one node of a
loopback cluster (the other nodes are headless daemons), keys go in with ``send-keys`` and
the screen comes back with ``capture-pane``.  Migration is real (CRIU)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from omuscd import config
from tests.cluster import PYTHON, criu_problem, start_daemon, wait_for

REASON = "tmux is not installed" if shutil.which("tmux") is None else criu_problem()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PORT = 24370
CTL = 24371
REPO = Path(__file__).resolve().parent.parent
MARKER = "omuscd-console-test"


def base(addr: str, key: Path) -> list[str]:
    return ["--address", addr, "--port", str(PORT), "--control-bind", addr, "--control-port",
            str(CTL), "--gossip-interval", "0.2", "--key-file", str(key), "--peer",
            f"127.0.0.22:{PORT}", "--no-balancing"]


class Terminal:
    """One tmux server of our own (its own socket), one session per program."""

    def __init__(self, workdir: Path):
        self.sock = f"omt{os.getpid()}"
        self.workdir = workdir

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr}")
        return r.stdout

    def start(self, name: str, argv: list[str], cols: int = 100, rows: int = 30) -> Path:
        """Run ``argv`` in a new session; its exit status lands in the returned file."""
        status = self.workdir / f"{name}.exit"
        cmd = (f"cd {shlex.quote(str(REPO))} && {shlex.join(argv)}; "
               f"echo $? > {shlex.quote(str(status))}; sleep 600")
        self.tmux("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), cmd)
        return status

    def keys(self, name: str, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", name, *(["-l"] if literal else []), *keys)
        time.sleep(0.3)  # urwid waits a moment after Esc for the rest of a sequence

    def screen(self, name: str, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", name)

    def wait(self, name: str, pattern: str, timeout: float = 15) -> str:
        found: list[str] = []

        def seen() -> bool:
            text = self.screen(name)
            if re.search(pattern, text, re.M):
                found.append(text)
                return True
            return False
        try:
            wait_for(seen, timeout, f"{pattern!r} on the screen")
        except AssertionError:
            raise AssertionError(f"{pattern!r} not on the screen:\n{self.screen(name)}"
                                 ) from None
        return found[-1]

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def row(screen: str, name: str) -> str:
    return next(ln for ln in screen.splitlines() if re.search(rf"\b{name}\b +alive", ln))


@pytest.fixture
def lab(workdir, reaper):
    key = workdir / "cluster.key"
    config.write_key(str(key))
    for i in (22, 23):
        reaper.append(start_daemon(f"n{i}", base(f"127.0.0.{i}", key), workdir))
    term = Terminal(workdir)
    try:
        yield term, workdir, key, {d.name: d for d in reaper}
    finally:
        term.close()
        subprocess.run(["pkill", "-f", MARKER], capture_output=True)


def test_tui_node_shows_the_cluster_answers_commands_and_migrates(lab):
    term, work, key, n = lab
    tui = [PYTHON, "-m", "omuscd", "--tui", *base("127.0.0.21", key), "--state-dir",
           str(work / "n21"), "--node-name", "n21"]
    status = term.start("tui", tui)
    # the other nodes appear
    screen = term.wait("tui", r"n23 +alive")
    assert re.search(r"\*21 n21 +alive", screen) and "n22" in screen
    assert "3 nodes (3 alive)" in screen
    assert re.search(r"join +node 22 \(n22\)", screen)

    # a command typed at the command line answers
    term.keys("tui", ":")
    term.keys("tui", "status", literal=True)
    term.keys("tui", "Enter")
    screen = term.wait("tui", r"node: n21 \(id 21")
    assert "migration: criu 4" in screen
    term.keys("tui", "Escape")
    term.keys("tui", ":")
    term.keys("tui", "noda", literal=True)
    term.keys("tui", "Enter")
    term.wait("tui", r"400 unknown command 'noda'")

    # a job started elsewhere shows up; 'm' moves it here
    job = subprocess.run([PYTHON, "-m", "omuscd", "run", "--connect", n["n22"].socket,
                          "--home", "--detach", "--", "sh", "-c", "while :; do sleep 1; done",
                          MARKER], capture_output=True, text=True, cwd="/tmp")
    assert job.returncode == 0, job.stderr
    job_id = re.search(r"\d+\.\d+", job.stdout + job.stderr).group(0)
    term.wait("tui", rf"^{re.escape(job_id)} +root +n22 +n22 +running")
    term.keys("tui", "Tab")  # to the jobs
    term.keys("tui", "m")
    screen = term.wait("tui", rf"migrate job {re.escape(job_id)} from n22 to")
    assert "best: where there is most room" in screen and "n23 (id 23)" in screen
    term.keys("tui", "Down")
    term.keys("tui", "Down")  # best, home, n21
    term.keys("tui", "Enter")
    screen = term.wait("tui", rf"job {re.escape(job_id)} n22 -> n21: frozen \d\.\d+s")
    screen = term.wait("tui", rf"^{re.escape(job_id)} +root +n22 +n21 +running .* 1 ")
    assert n["n22"].json(f"job {job_id}")["node_name"] == "n21"

    # 'b' blocks the selected node, over the cluster channel, and unblocks it again
    term.keys("tui", "Tab")  # the events
    term.keys("tui", "Tab")  # the nodes
    term.keys("tui", "Down")  # n22
    term.keys("tui", "b")
    wait_for(lambda: "blocked" in n["n23"].nodes()["n22"]["flags"], 10, "n22 blocked")
    assert re.search(r"n22 +alive .* B ", term.wait("tui", r"n22 +alive .* B "))
    term.keys("tui", "b")
    wait_for(lambda: "blocked" not in n["n23"].nodes()["n22"]["flags"], 10, "n22 open")

    # colours by default
    assert re.search(r"\x1b\[(3|9)\dm", term.screen("tui", escapes=True))

    # q asks, s stops the daemon too: it says goodbye to the others and exits 0
    term.keys("tui", "q")
    term.wait("tui", "s: stop the daemon too")
    term.keys("tui", "s")
    wait_for(status.exists, 15, "omuscd --tui to exit")
    assert status.read_text().strip() == "0"
    wait_for(lambda: "n21" not in n["n22"].nodes(), 3, "n22 to see n21 leave")
    assert "quit from the console" in (work / "n21" / "omuscd.log").read_text()


def test_console_attaches_to_a_running_daemon(lab):
    term, work, key, n = lab
    status = term.start("con", [PYTHON, "-m", "omuscd", "console", f"127.0.0.22:{CTL}",
                                "--mono"], 80, 24)
    screen = term.wait("con", r"n23 +alive")
    assert "node n22 (id 22" in screen and "127.0.0.22:24371" in screen
    # monochrome: attributes only, no colour
    assert not re.search(r"\x1b\[[0-9;]*(3|4|9|10)[0-7]m", term.screen("con", escapes=True))
    term.keys("con", ":")
    term.keys("con", "nodes", literal=True)
    term.keys("con", "Enter")
    term.wait("con", r"3 nodes: this one and 2 alive|2 nodes: this one and 1 alive")
    term.keys("con", "Escape")
    term.keys("con", "q")
    wait_for(status.exists, 10, "omuscd console to exit")
    assert status.read_text().strip() == "0"
    assert n["n22"].alive()  # a console's quit leaves the daemon alone

    # a control port with a password: the console answers the challenge with --secret
    secret = work / "control.secret"
    config.write_key(str(secret))
    locked = start_daemon("n24", [*base("127.0.0.24", key), "--control-secret", str(secret)],
                          work)
    try:
        ok = term.start("pw", [PYTHON, "-m", "omuscd", "console", f"127.0.0.24:{CTL}",
                               "--secret", str(secret)])
        term.wait("pw", r"node n24 \(id 24")
        term.keys("pw", "q")
        wait_for(ok.exists, 10, "the console to quit")
        refused = term.start("nopw", [PYTHON, "-m", "omuscd", "console",
                                      f"127.0.0.24:{CTL}"])
        wait_for(refused.exists, 10, "the console to give up")
        assert refused.read_text().strip() == "1"
        assert "asks for a password" in term.screen("nopw")
    finally:
        locked.stop()

    gone = term.start("gone", [PYTHON, "-m", "omuscd", "console", "127.0.0.1:1"])
    wait_for(gone.exists, 10, "omuscd console to give up")
    assert gone.read_text().strip() == "1"
    assert "cannot connect to 127.0.0.1:1" in term.screen("gone")


def test_console_needs_a_terminal():
    r = subprocess.run([PYTHON, "-m", "omuscd", "console"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "needs a terminal" in r.stderr
    r = subprocess.run([PYTHON, "-m", "omuscd", "--tui", "--insecure", "--address",
                        "127.0.0.1"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "needs a terminal" in r.stderr
