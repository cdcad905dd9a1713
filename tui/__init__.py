"""The urwid console (``omuscd --tui`` and ``omuscd console``): a client of the core's
state and command language.  The core never imports this package; :mod:`tui.main` is the
entry point, loaded only when a console is asked for."""
