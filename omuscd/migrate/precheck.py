"""Refuse a move before the freeze: what the job needs at the target, and whether it is there.

A restore fails, after the job was frozen, dumped and sent, when the target lacks what the
job's processes hold by path: CRIU reopens each process's working directory, its
executable, the files it maps (libraries) and its open files by the same path, and refuses
a mapped file of another build, and a restore on a CPU without an instruction set the job
may use.  So, before the freeze, the source gathers these facts from ``/proc`` (the job
runs on: nothing is frozen; a few ms) with :func:`gather`, sends them to the target
(``precheck``, see :mod:`omuscd.cluster.rpc`), and the target answers with :func:`check`:
the first missing thing, named ("node b: working directory /srv/x does not exist").

Executables and the files mapped with code (libraries) must be the same build; files
mapped as data, like open files, need only be there (the job may be writing them, and a
file being written is the same file on a shared file system all the same).
"The same build" is the file's size and a hash of its first and last 4 KiB, not its
mtime: a binary copied to each node without keeping its mtime is the same build, and a
rebuilt one differs in the ELF headers and build-id note (first page, where CRIU looks for
the build-id it compares) or in the section headers (last page).  Two reads per file.

The CPU is compared by the instruction-set flags of ``/proc/cpuinfo`` (:data:`ISA`), the
ones a program may test once at its start and then use: ``criu cpuinfo dump``/``check``
needs a CRIU run on each side and an image sent across, for what these flags tell.

Every fact is a path the job's user chose: the target only stats them, and reads 8 KiB of
a regular file (opened without blocking, never a FIFO or a device), to answer one bit.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, TypeGuard

from omuscd.proctab import tree

EDGE = 4096  # bytes hashed at each end of a mapped file
MAX_PATHS = 4096  # facts beyond this many are not checked
BUDGET = 256 << 10  # characters of paths in one message (a frame is at most 1 MiB)
# instruction-set flags of /proc/cpuinfo (x86 "flags", arm64 "Features"): by prefix
ISA = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "adx", "aes", "vaes", "pclmul",
       "vpclmul", "gfni", "sha", "popcnt", "lzcnt", "abm", "movbe", "xsave", "amx", "rdrand",
       "rdseed", "cx16", "erms", "fsrm", "mmx", "3dnow", "sve", "asimd", "fp", "atomics",
       "crc32", "lse", "dotprod", "i8mm", "bf16")


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _real(path: str | None) -> TypeGuard[str]:
    """A path a restore reopens: absolute, not an unlinked file (CRIU carries those)."""
    return path is not None and path.startswith("/") and not path.endswith(" (deleted)")


def build(path: str) -> list[Any] | None:
    """``[size, digest]`` of a regular file, or None if there is none at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256(os.pread(fd, EDGE, 0))
        h.update(os.pread(fd, EDGE, max(0, st.st_size - EDGE)))
        return [st.st_size, h.hexdigest()[:32]]
    except OSError:
        return None
    finally:
        os.close(fd)


def _mapped(pid: int) -> tuple[set[str], set[str]]:
    """The files ``pid`` maps: those with code (its libraries: compared by build), and the
    others (data, which the job may write: only their presence is checked)."""
    code: set[str] = set()
    data: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and _real(path := parts[5].rstrip("\n")):
                    (code if "x" in parts[1] else data).add(path)
    except OSError:
        pass
    return code, data - code


def _opened(pid: int, skip: set[str]) -> set[str]:
    """The regular files open in ``pid`` (not the job's spool: the target gives its own)."""
    out: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        path = _link(f"/proc/{pid}/fd/{fd}")
        if not _real(path) or path in skip or path.startswith("/dev/"):
            continue
        try:
            if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                out.add(path)
        except OSError:
            pass
    return out


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's instruction-set flags (see :data:`ISA`)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return sorted(w for w in value.split() if w.startswith(ISA))
    except OSError:
        pass
    return []


def gather(init_pid: int, skip: set[str] | None = None) -> dict[str, Any]:
    """What the job's processes need at the target, read from ``/proc`` as it runs:
    ``cwd`` (directories), ``builds`` (executables and the files they map with code: path
    -> size and digest), ``open`` (regular files open or mapped as data, which the job may
    be writing: their ends change), ``cpu`` (instruction-set flags)."""
    skip = skip or set()
    cwds: set[str] = set()
    exes: set[str] = set()
    opened: set[str] = set()
    for pid in tree(init_pid):
        if _real(cwd := _link(f"/proc/{pid}/cwd")):
            cwds.add(cwd)
        if _real(exe := _link(f"/proc/{pid}/exe")):
            exes.add(exe)
        code, data = _mapped(pid)
        exes |= code
        opened |= data | _opened(pid, skip)
    budget = [BUDGET]
    cwd = _within(sorted(cwds), budget)  # what matters most first
    builds = {p: b for p in _within(sorted(exes), budget) if (b := build(p)) is not None}
    return {"cwd": cwd, "builds": builds, "open": _within(sorted(opened - exes), budget),
            "cpu": cpu_flags()}


def _within(paths: list[str], budget: list[int]) -> list[str]:
    """As many of ``paths`` as the rest of ``budget`` (characters) holds; a job with
    more is checked in part, and CRIU's restore still says what is missing."""
    out = []
    for p in paths[:MAX_PATHS]:
        budget[0] -= len(p) + 48
        if budget[0] < 0:
            break
        out.append(p)
    return out


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value[:MAX_PATHS] if isinstance(v, str) and _real(v)]


def check(facts: Any, node: str, cpu: list[str] | None = None) -> str | None:
    """Why a job with these ``facts`` (from :func:`gather`, at the source) could not be
    restored on this node named ``node``, or None; ``cpu``: this node's flags."""
    if not isinstance(facts, dict):
        return None  # nothing said: nothing to check
    for d in _strings(facts.get("cwd")):
        if not os.path.isdir(d):
            return f"node {node}: working directory {d} does not exist"
    builds = facts.get("builds")
    for path, theirs in list(builds.items())[:MAX_PATHS] if isinstance(builds, dict) else []:
        if not isinstance(path, str) or not _real(path):
            continue
        ours = build(path)
        if ours is None:
            return f"node {node}: {path} (the job's program or a library it uses) is missing"
        if theirs != ours:
            return f"node {node}: {path} is another build than the job's (size or contents)"
    for path in _strings(facts.get("open")):
        if not os.path.exists(path):
            return f"node {node}: {path}, a file the job has open, does not exist"
    wanted = {f for f in _strings_any(facts.get("cpu")) if f.startswith(ISA)}
    lacking = sorted(wanted - set(cpu_flags() if cpu is None else cpu))
    if lacking:
        return f"node {node}: its CPU lacks {', '.join(lacking[:8])}, which the job may use"
    return None


def _strings_any(value: Any) -> list[str]:
    return [v for v in value[:512] if isinstance(v, str)] if isinstance(value, list) else []
