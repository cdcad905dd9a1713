"""Rewrite the table-driven parts of the man pages from the tables themselves:
OPTIONS of omuscd(8) from the parameter table, KEYS of omuscd.toml(5) likewise, COMMANDS
of omuscd-commands(7) from the command table.  The prose around them is written by hand.
tests/test_docs.py fails when a page and a table disagree; run this to bring them back:

    .venv/bin/python man/sync.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omuscd.config import PARAMS, format_number
from omuscd.control.commands import COMMANDS

MAN = Path(__file__).resolve().parent
KINDS = {"str": "string", "int": "integer", "float": "number (seconds)", "bool": "boolean",
         "list": "array of strings", "cpus": "string (CPU list)"}
UNITS = {"LOAD": "load per CPU", "MB/S": "MB per second"}


def esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def options() -> str:
    out = [".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR", "Show every option with its default, "
           "and exit.", ".TP", "\\fB\\-\\-version\\fR",
           "Show the version (see VERSION NUMBERING), and exit.", ".TP",
           "\\fB\\-c\\fR, \\fB\\-\\-config\\fR \\fIFILE\\fR",
           "Configuration file. Default: /etc/omuscd.toml if it exists. Switches win over "
           "the file."]
    for p in PARAMS:
        mv = p.metavar or ("SECONDS" if p.kind == "float" else "N" if p.kind == "int" else "")
        if p.choices:
            mv = "|".join(p.choices)
        head = (f"\\fB{esc(p.short)}\\fR, " if p.short else "") + f"\\fB{esc(p.switch)}\\fR"
        if p.kind == "bool" and p.default:
            head += f", \\fB{esc('--no-' + p.switch[2:])}\\fR"
        if p.kind != "bool":
            head += f" \\fI{esc(mv)}\\fR"
        text = sentence(p.help)
        if p.default not in (None, []) and p.kind != "bool":
            text += f". Default: {p.default}"
        if p.kind == "bool" and p.default:
            text += ". Default: on"
        if p.lo is not None:
            text += f"; range {format_number(p.lo)} to {format_number(p.hi)}"
        if p.runtime:
            text += "; a tunable (set/get, reread on SIGHUP)"
        out += [".TP", head, esc(text) + "."]
    return "\n".join(out) + "\n"


def keys() -> str:
    out = []
    for p in PARAMS:
        if not p.in_file:
            continue
        text = sentence(p.help)
        if p.default not in (None, []):
            text += f". Default: {str(p.default).lower() if p.kind == 'bool' else p.default}"
        if p.lo is not None:
            text += f"; range {format_number(p.lo)} to {format_number(p.hi)}"
        if p.choices:
            text += "; one of " + ", ".join(p.choices)
        if p.runtime:
            text += "; a tunable: SIGHUP rereads it"
        kind = KINDS[p.kind]
        if p.kind == "float" and p.metavar:  # a load or a rate, not seconds
            kind = f"number ({UNITS.get(p.metavar, p.metavar)})"
        out += [".TP", f"\\fB{esc(p.name)}\\fR ({kind})", esc(text) + "."]
    return "\n".join(out) + "\n"


def commands() -> str:
    out = []
    for c in COMMANDS.values():
        out += [".TP", f"\\fB{esc(c.syntax)}\\fR", esc(sentence(c.help)) + "."]
        if c.details:
            out += [".br", esc(c.details.replace("\n", " "))]
        if c.admin:
            out += [".br", "Changes the daemon: on the Unix socket, only root or the "
                    "daemon\\(aqs user."]
    return "\n".join(out) + "\n"


def replace(page: str, section: str, body: str) -> None:
    path = MAN / page
    text = path.read_text()
    new, n = re.subn(rf"(^\.SH {re.escape(section)}\n)(.*?)(?=^\.SH )",
                     lambda m: m.group(1) + body, text, flags=re.S | re.M)
    if n != 1:
        raise SystemExit(f"{page}: no section {section}")
    if new != text:
        path.write_text(new)
        print(f"updated {page} {section}")


if __name__ == "__main__":
    replace("omuscd.8", "OPTIONS", options())
    replace("omuscd.toml.5", "KEYS", keys())
    replace("omuscd-commands.7", "COMMANDS", commands())
