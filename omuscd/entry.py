"""The ``omuscd`` console script.  ``run`` and ``attach`` are dispatched before the
daemon's modules are imported, so that a short job starts fast; everything else goes to
:mod:`omuscd.cli`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["run"], ["attach"]):
        from omuscd import runclient

        return runclient.main(argv)
    from omuscd import cli

    return cli.main(argv)
