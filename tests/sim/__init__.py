"""A simulator that runs the real membership code (omuscd/cluster/swim.py) for many nodes in
one process, over an in-memory network, on a simulated clock.

Why: the failure detector must hold at 1000 nodes (issue #19), and 1000 real daemons do not
fit on a test machine.  The protocol is sans-IO (time is an argument, randomness injected),
so the same object the daemon drives can be driven here by a heap of timed events: datagram
deliveries and each node's next_due().  Every datagram is encoded and decoded with the real
wire.Codec under a key (HMAC included), so byte counts are real datagram sizes.

    from tests.sim import Simulator, NetConfig, swim_factory
    sim = Simulator(swim_factory(), NetConfig(loss=0.01))

``python -m tests.sim --help`` runs one scenario from the command line.
"""

from tests.sim.clock import Clock
from tests.sim.metrics import Metrics, Watch
from tests.sim.network import NetConfig, Network
from tests.sim.node import SimNode
from tests.sim.protocol import Factory, Protocol, swim_factory
from tests.sim.simulator import Simulator

__all__ = ["Clock", "Factory", "Metrics", "NetConfig", "Network", "Protocol", "SimNode",
           "Simulator", "Watch", "swim_factory"]
