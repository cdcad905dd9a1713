"""Dependencies point down (issue #17): a layer imports nothing above it, counting imports
inside functions and under TYPE_CHECKING, and only the command line imports the daemon.

The rules name the layers whose shape is settled; a layer joins the table when it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package prefix -> prefixes it must never import (every import, wherever it is)
LEAVES = ["omuscd.wire", "omuscd.channel", "omuscd.config", "omuscd.load", "omuscd.events",
          "omuscd.ids", "omuscd.rootexec", "omuscd.proctab"]
ABOVE_LEAVES = ["omuscd.cluster", "omuscd.jobs", "omuscd.migrate", "omuscd.balance",
                "omuscd.control", "omuscd.daemon", "omuscd.cli", "tui"]
#: balance/ but its policy
BALANCING = ["omuscd.balance.core", "omuscd.balance.peer", "omuscd.balance.controller",
             "omuscd.balance.reclaim", "omuscd.balance.balancer"]
FORBIDDEN = {
    **{leaf: ABOVE_LEAVES for leaf in LEAVES},
    "omuscd.cluster": ["omuscd.balance", "omuscd.control", "omuscd.daemon",
                       "omuscd.jobs", "omuscd.migrate", "tui"],
    # the jobs place new jobs and migrate chooses targets by the one policy
    # (balance/policy.py, pure logic): that module alone of balance/ is theirs to use
    "omuscd.jobs": ["omuscd.migrate", *BALANCING, "omuscd.control", "omuscd.daemon", "tui"],
    "omuscd.migrate": [*BALANCING, "omuscd.control", "omuscd.daemon", "tui"],
    "omuscd.balance.policy": ["omuscd.cluster", "omuscd.jobs", "omuscd.migrate",
                              "omuscd.balance.core", *ABOVE_LEAVES[4:]],
    "omuscd.balance": ["omuscd.control", "omuscd.daemon", "tui"],
    "omuscd.control": ["omuscd.daemon", "omuscd.balance", "tui"],
    "tui": ["omuscd.daemon"],
}


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, wherever the import statement is."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return sorted([*(ROOT / "omuscd").rglob("*.py"), *(ROOT / "tui").rglob("*.py")])


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_one_above_it(layer):
    wrong = []
    for path in sources():
        mod = module_name(path)
        if not under(mod, layer):
            continue
        for imp in imports_of(path):
            if any(under(imp, bad) for bad in FORBIDDEN[layer]):
                wrong.append(f"{mod} imports {imp}")
    assert wrong == []


def test_the_rule_sees_imports_inside_functions_and_type_checking(tmp_path):
    """The check itself: an import hidden in a function or under TYPE_CHECKING counts."""
    p = tmp_path / "m.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from omuscd.daemon import Daemon\n"
                 "def f():\n    import omuscd.control.commands\n")
    assert {"omuscd.daemon.Daemon", "omuscd.control.commands"} <= imports_of(p)


def test_only_the_command_line_imports_the_daemon():
    importers = sorted(module_name(p) for p in sources()
                       if any(under(i, "omuscd.daemon") for i in imports_of(p))
                       and module_name(p) != "omuscd.daemon")
    assert importers == ["omuscd.cli"]
