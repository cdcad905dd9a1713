"""The package as pip installs it (not the editable install the tests run from): the
README's first command is ``pip install .`` and then ``omuscd``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_plain_install_has_every_module_and_starts(tmp_path):
    # from a copy of what a clone has: a build/ left in the work tree by an earlier
    # install would hide a package the configuration leaves out
    src = tmp_path / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("omuscd", "tui", "man"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "README"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--disable-pip-version-check", "--target", str(target),
                            str(src)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    missing = [str(f.relative_to(ROOT)) for top in ("omuscd", "tui")
               for f in (ROOT / top).rglob("*.py")
               if not (target / f.relative_to(ROOT)).is_file()]
    assert missing == []
    # and the daemon's whole import graph loads from there, as `omuscd` would
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, "
                          f"{str(target)!r}); import omuscd.daemon, omuscd.entry, tui.app; "
                          "print(omuscd.daemon.__file__)"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(target))


def test_the_run_client_imports_only_what_it_needs():
    """`omuscd run` starts a Python process per job: what it imports is paid by every job
    (a batch of clients starting at once delays its first job by the sum).  None of these
    is needed to start and attach to a job without --stdin."""
    heavy = ["typing", "threading", "dataclasses", "trio", "psutil", "omuscd.cli",
             "omuscd.config", "omuscd.daemon"]
    code = ("import sys; from omuscd import entry, runclient; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
    assert r.stdout.split() == []
