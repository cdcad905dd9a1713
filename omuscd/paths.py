"""Default places and ports, in a module of their own so that the small clients
(``omuscd run``, ``omuscd attach``) can import them without the daemon's configuration
machinery: a short job should not pay for imports it does not use."""

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
