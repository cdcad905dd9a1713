"""The lease guard: a node's leased jobs are frozen when its daemon dies.

Why: a lease (:mod:`omuscd.migrate.lease`) is enforced by the daemon of the node running
the job.  Jobs live in their own PID namespace under their init and outlive the daemon
(a crash, an OOM kill, ``kill -9`` of the daemon alone); the home then declares the node
dead and revives the job elsewhere while the old copy runs on: the job ran twice.

How: one small root ``sh`` per node (started through rootexec with its fixed
environment; it never runs a user's program nor follows a path a user chose), only while
some leased job runs here.  The daemon tells it, on its stdin (a pipe only the daemon
holds), ``+ PID`` for the init of each job as it becomes leased and ``- PID`` when it is
leased no more (so a pid used again is never hit).  EOF on its stdin means the daemon is
gone: it then stops every process of each such job's PID namespace at once
(``nsenter -p`` into it, then ``kill -STOP -1``, which inside a PID namespace reaches
that namespace only), then the init itself, as the lease's own freeze does.  A pid that
is no job's (not in a PID namespace of its own) is never acted on.  The daemon started
again holds such jobs frozen until their home renews their lease (and thaws them then),
or drops them if the home revived them meanwhile (Revival.healed).

A user who owns a job cannot stop or feed the guard: it runs as root, in no namespace of
theirs, its stdin the daemon's pipe.
"""

from __future__ import annotations

import logging
import subprocess

import trio

from omuscd import rootexec

log = logging.getLogger("omuscd.migrate")

NSENTER = rootexec.find("nsenter")

#: $1: nsenter, $2: sh (absolute, from rootexec).  A pid is kept only if it is digits, not
#: 0 or 1, and in another PID namespace than the guard's own: never kill -1 out here.
SCRIPT = r"""
trap '' INT HUP TERM QUIT
own=$(readlink /proc/self/ns/pid)
pids=" "
while read -r word pid; do
    case $pid in ""|*[!0-9]*|0|1) continue;; esac
    case $word in
        +) case $pids in *" $pid "*) ;; *) pids="$pids$pid ";; esac;;
        -) case $pids in *" $pid "*) pids="${pids%% $pid *} ${pids#* $pid }";; esac;;
    esac
done
for pid in $pids; do
    ns=$(readlink "/proc/$pid/ns/pid") || continue
    [ -n "$ns" ] && [ "$ns" != "$own" ] || continue
    ( "$1" -t "$pid" -p -- "$2" -c 'kill -s STOP -- -1; kill -s STOP -- -1'
      kill -s STOP "$pid" ) &
done
wait
"""


class Guard:
    """The daemon's end of the guard: started when a job is first watched, stopped
    (told to forget all, then EOF) when none is."""

    def __init__(self) -> None:
        self.proc: trio.Process | None = None
        self.watched: dict[str, int] = {}  # job id -> its init's pid, as told

    async def sync(self, want: dict[str, int]) -> None:
        """Have the guard watch exactly the jobs of ``want`` (job id -> init pid)."""
        if want == self.watched and (self.proc is None or self.proc.returncode is None):
            return
        if self.proc is not None and self.proc.returncode is not None:
            log.warning("the lease guard ended (%s); started again", self.proc.returncode)
            self.proc, self.watched = None, {}
        if not want:
            await self.stop()
            return
        lines = [f"- {pid}" for job, pid in self.watched.items() if want.get(job) != pid]
        lines += [f"+ {pid}" for job, pid in want.items() if self.watched.get(job) != pid]
        if self.proc is None:
            if NSENTER is None or rootexec.SH is None:
                log.warning("no lease guard: nsenter or sh not found in %s",
                            rootexec.TRUSTED_PATH)
                return
            self.proc = await trio.lowlevel.open_process(
                [rootexec.SH, "-c", SCRIPT, "omuscd-lease-guard", NSENTER, rootexec.SH],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=rootexec.HELPER_ENV,
                cwd="/", start_new_session=True)
        assert self.proc.stdin is not None
        try:
            await self.proc.stdin.send_all("".join(f"{ln}\n" for ln in lines).encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.warning("the lease guard is gone (%s); started again at the next look", e)
            self.watched = {}
            return
        self.watched = dict(want)

    async def stop(self) -> None:
        """No leased job here: the guard forgets all and ends."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            try:
                assert proc.stdin is not None
                lines = "".join(f"- {pid}\n" for pid in self.watched.values())
                await proc.stdin.send_all(lines.encode())
                await proc.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            self.watched = {}
            await proc.wait()
