"""The cluster layer: who is in the cluster and how daemons reach each other.

membership.py (pure logic, time passed in), gossip.py (the UDP half of a node: receive,
answer, gossip rounds, departure; hooks for the layers above), rounds.py (the timer
loop), settings.py (tunables at run time), the one view of which nodes may take a job,
and the cluster channel's table of operations.  It knows nothing of jobs, moves,
balancing or the control language.
"""
