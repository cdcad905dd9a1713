"""Default places and ports, in a module of their own so that the small clients
(``omuscd run``, ``omuscd attach``) can import them without the daemon's configuration
machinery: a short job should not pay for imports it does not use."""

import errno
import os

DEFAULT_PORT = 4270
DEFAULT_CONTROL_PORT = 4271
DEFAULT_CONFIG_FILE = "/etc/omuscd.toml"
DEFAULT_KEY_FILE = "/etc/omuscd.key"
SYSTEM_STATE_DIR = "/var/lib/omuscd"


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "omuscd")


def default_socket() -> str:
    """The local daemon's Unix socket: $OMUSCD_SOCKET, else ours, else the system
    daemon's."""
    if os.environ.get("OMUSCD_SOCKET"):
        return os.environ["OMUSCD_SOCKET"]
    path = os.path.join(default_state_dir(), "control.sock")
    system = os.path.join(SYSTEM_STATE_DIR, "control.sock")
    return path if os.path.exists(path) or not os.path.exists(system) else system


def open_root_dir(path: str, inner: int = 0) -> int:
    """Open the directory ``path`` (absolute) for a root daemon that writes there: walked
    from ``/`` one name at a time, never through a link (O_NOFOLLOW at every step), each
    directory refused unless root (or this process's user) owns it and neither its group
    nor others may write to it (an ancestor may be sticky, as /tmp is: a user cannot
    replace root's entry there).  ``inner``: the last so many names (directories the
    daemon made itself) must moreover be 0700.  Returns the descriptor (the caller
    closes it); OSError saying which directory and why."""
    if not path.startswith("/") or os.path.normpath(path) != path.rstrip("/") or \
            "/.." in path:
        raise OSError(f"{path[:200]!r} is not an absolute, normalized path")
    names = [n for n in path.split("/") if n]
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for i, name in enumerate(["/", *names]):
            if i:
                try:
                    nxt = os.open(name, flags, dir_fd=fd)
                except OSError as e:
                    where = "/" + "/".join(names[:i])
                    link = e.errno in (errno.ENOTDIR, errno.ELOOP)
                    raise OSError(f"{where}: {e.strerror}{' (a link?)' if link else ''}"
                                  ) from None
                os.close(fd)
                fd = nxt
            _root_owned(fd, "/" + "/".join(names[:i]), last=i == len(names),
                        private=i > len(names) - inner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _root_owned(fd: int, where: str, last: bool, private: bool) -> None:
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise OSError(f"{where} belongs to uid {st.st_uid}, not to root")
    mode = st.st_mode & 0o7777
    if mode & 0o022 and (last or not mode & 0o1000):
        raise OSError(f"{where} is writable by group or others (mode {mode & 0o777:o}): a "
                      "user could put a link or another's files there")
    if private and mode & 0o077:
        raise OSError(f"{where} is open to others (mode {mode & 0o777:o}), not 0700")
