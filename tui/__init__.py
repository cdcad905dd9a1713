"""The urwid console (``omuscd --tui`` and ``omuscd console``): a client of the core's
state and command language.  Arrives with the console issue; the core never imports it."""
