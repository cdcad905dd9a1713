"""The control language: what users and the console say to a daemon.

- :mod:`.protocol`: reply codes, the reply's wire form, the binary attach frames;
- :mod:`.commands`: the one command table (name, syntax, help, bounds, who may run it)
  and its handlers;
- :mod:`.services`: what handlers and sessions may use of the node, as protocols;
- :mod:`.session`: sessions on TCP (telnet's IAC filter, bounded lines) and on the Unix
  socket, and the control servers;
- :mod:`.identity`: who the caller is (SO_PEERCRED; on loopback TCP, the kernel's owner
  of the client's socket via sock_diag) and what they may do;
- :mod:`.status`: the views of ``status``, ``version``, ``nodes`` and ``node``.

Nothing here imports the daemon; this package imports nothing at import time, so a
client may import :mod:`.protocol` alone.
"""
