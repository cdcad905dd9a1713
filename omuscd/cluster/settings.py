"""Settings changed while the daemon runs: tunables (``set``, SIGHUP), the topology role
and the log level.  A tunable takes effect at once: SWIM's parameters, membership's
timeouts, the datagram codec's allowed clock skew and the timer loop's next wake-up are
updated together, and
every change is told as a ``config`` event through the gossip layer's publisher.
"""

from __future__ import annotations

import logging
from typing import Any

from omuscd.cluster.gossip import Gossip
from omuscd.cluster.membership import Timing
from omuscd.cluster.rounds import Rounds
from omuscd.cluster.swim import SwimParams
from omuscd.config import TUNABLES, Config
from omuscd.events import Event

log = logging.getLogger("omuscd")


def timing_of(cfg: Config) -> Timing:
    """Membership's timeouts as configured."""
    return Timing(cfg.forget_after, cfg.probe_interval, cfg.load_interval)


class Settings:
    """The runtime settings of one node."""

    def __init__(self, cfg: Config, gossip: Gossip, rounds: Rounds):
        self.cfg = cfg
        self.gossip = gossip
        self.rounds = rounds

    def set_tunable(self, name: str, value: Any) -> Any:
        return self.set_tunables({name: value})[name]

    def set_tunables(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change tunables together; ConfigError (and nothing changed) if any is bad."""
        values = self.cfg.set_many(changes)
        self.gossip.members.timing = timing_of(self.cfg)
        self.gossip.members.jump_threshold = self.cfg.balance_threshold
        self.gossip.swim.params = SwimParams.from_config(self.cfg)
        self.gossip.swim.awareness.max = self.cfg.awareness_max
        self.gossip.codec.max_skew = self.cfg.max_clock_skew
        self.gossip.on_events([Event("config", f"{name} set to {v}", {"key": name, "value": v})
                               for name, v in values.items()])
        if values:
            self.rounds.wake()
        return values

    def tunables(self) -> dict[str, Any]:
        return {name: self.cfg.values[name] for name in TUNABLES}

    def set_topology(self, role: str) -> str:
        self.cfg.values["topology"] = role
        self.gossip.members.set_role(role)
        self.gossip.on_events([Event("config", f"topology set to {role}",
                                     {"key": "topology", "value": role})])
        return f"topology {role}"

    def set_log_level(self, level: str) -> None:
        logging.getLogger("omuscd").setLevel(level.upper())
        log.info("log level set to %s", level)
