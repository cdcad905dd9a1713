"""The cluster layer: who is in the cluster and how daemons reach each other.

membership (pure logic, time passed in), the UDP half of a node (gossip rounds, receive,
departure), the one view of which nodes may take a job, and the cluster channel's table
of operations.  It knows nothing of jobs, moves, balancing or the control language.
"""
