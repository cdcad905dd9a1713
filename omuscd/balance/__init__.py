"""Balancing: where a new job runs and which job moves where.

- :mod:`.policy`: the one policy (pure logic: placement, imbalance, which job moves);
- :mod:`.core`: what the balancer knows of the nodes' loads and of its own moves in
  flight, and how it makes a move;
- :mod:`.peer` and :mod:`.controller`: the two topologies that ask the policy;
- :mod:`.reclaim`: the owner takes the node back when the owner's own load is high;
- :mod:`.balancer`: the loop that runs the topology configured, and its services.

The policy's names are re-exported here (``from omuscd import balance``;
``balance.choose_node``) for the job layer's placement.
"""

from omuscd.balance.policy import (
    EVEN_WAIT,
    MEMORY_STEP,
    PENDING_FOR,
    Candidate,
    Decision,
    JobLoad,
    NodeLoad,
    Policy,
    choose_node,
    decide,
    explain,
    imbalance,
    job_refusal,
    narrows,
    old_enough_at,
)

__all__ = ["EVEN_WAIT", "MEMORY_STEP", "PENDING_FOR", "Candidate", "Decision", "JobLoad",
           "NodeLoad", "Policy", "choose_node", "decide", "explain", "imbalance",
           "job_refusal", "narrows", "old_enough_at"]
