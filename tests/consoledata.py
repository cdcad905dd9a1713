"""Synthetic node and job records, shaped exactly like ``nodes --json`` and ``jobs --json``
(the console's unit tests and its benchmark render them without a daemon)."""

from __future__ import annotations

import time
from typing import Any


def node(i: int, load: float = 0.5, state: str = "alive", flags: tuple[str, ...] = ("criu",),
         me: bool = False) -> dict[str, Any]:
    doc = {"id": i, "name": f"node{i}", "address": f"198.18.0.{i % 250 + 1}", "port": 4270,
           "role": "peer", "state": state, "load": load, "util": min(100.0, load * 100),
           "runq": 1, "cpus": 2, "speed": 2600, "mem_free_mb": 20000 + i, "jobs": 1,
           "release": "1a0", "flags": list(flags), "auth": "key", "last_heard": 0.2,
           "state_since": 10.0}
    if me:
        doc["self"] = True
    return doc


def job(home: int, n: int, node_id: int, state: str = "running", cpu: float = 1.5,
        moves: list[dict[str, Any]] | None = None, cannot_move: str = "") -> dict[str, Any]:
    return {"id": f"{home}.{n}", "owner": "alice", "uid": 1000, "home": home, "node": node_id,
            "node_name": f"node{node_id}", "argv": ["bc", "-l"], "cwd": "/tmp",
            "started": time.time() - 30, "state": state, "stay": False, "restartable": False,
            "stdin": False, "cpu": cpu, "rss_mb": 12.5, "migrations": len(moves or []),
            "exit": None, "ended": None, "reason": "", "cannot_move": cannot_move,
            "node_changed": False, "generation": 0, "moves": moves or [],
            "command": "bc -l", "status": ""}


def cluster(nodes: int, jobs: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ns = [node(i + 1, load=(i % 10) / 8, me=i == 0) for i in range(nodes)]
    js = [job(i % nodes + 1, i + 1, (i * 7) % nodes + 1, cpu=i * 0.1) for i in range(jobs)]
    return ns, js
