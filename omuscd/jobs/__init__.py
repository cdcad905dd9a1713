"""Cluster jobs: records and their one state transition (:mod:`.record`), spool files
(:mod:`.spool`), the processes of jobs running here (:mod:`.process`, :mod:`.jobinit`),
the books both sides share (:mod:`.books`), the home side (:mod:`.home`: start, follow,
output home, listing, acting for a user) and the guest side (:mod:`.guest`: exec, run,
pump output, signals), put together for the daemon in :mod:`.node`."""
