"""Where things are: one answer for the daemon, `new`, `run`, `status` and `invoke`.

The daemon listens for the command line on a Unix socket (api/control.py): the service's is
/run/openedge-function/control.sock; any other configuration's is named after the file's path, in
/run/openedge-function-control as root, else in a directory of the user's own under /tmp; or
where `control.socket` says.

Installed as a service (the Debian package, or the unit by hand), the configuration is
/etc/openedge-function/application.yml and relative paths in it (code directories, the log)
start at the state directory /var/lib/openedge-function, the unit's working directory; function
code lives in its functions/. Anywhere else, the configuration is application.yml in the current
directory, and relative paths start there.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import List, Optional

SYSTEM_CONFIG = "/etc/openedge-function/application.yml"
SYSTEM_STATE = "/var/lib/openedge-function"
LOCAL_CONFIG = "application.yml"
LEGACY_CONFIG = os.path.join("etc", "openedge", "application.yml")   # OpenEdge's module layout
CONFIG_ENV = "OPENEDGE_FUNCTION_CONFIG"
SYSTEM_CONTROL = "/run/openedge-function/control.sock"
FUNCTIONS = "functions"   # where `new` puts code, under the working directory

DEFAULT_HELP = (f"${CONFIG_ENV}, else {SYSTEM_CONFIG} when it exists, else {LOCAL_CONFIG} in the "
                "current directory")


def default_config() -> str:
    """The configuration a command uses when none is given."""
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    if os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    if not os.path.exists(LOCAL_CONFIG) and os.path.exists(LEGACY_CONFIG):
        return LEGACY_CONFIG
    return LOCAL_CONFIG


def is_system(config: str) -> bool:
    """Whether `config` is the service's (in /etc/openedge-function)."""
    return os.path.dirname(os.path.realpath(config)) == os.path.dirname(SYSTEM_CONFIG)


def default_workdir(config: str, given: Optional[str] = None) -> str:
    """Where the relative paths of `config` start: `given` (-w), else the state directory for the
    service's configuration, else the current directory."""
    if given:
        return os.path.abspath(given)
    if is_system(config):
        return os.environ.get("STATE_DIRECTORY") or SYSTEM_STATE
    return os.getcwd()


def control_socket(config: str, uid: Optional[int] = None) -> str:
    """Where the daemon of `config` running as `uid` (default: ours) listens for the command line,
    unless its control.socket says otherwise."""
    if is_system(config):
        return SYSTEM_CONTROL
    uid = os.geteuid() if uid is None else uid
    base = ("/run/openedge-function-control" if uid == 0
            else os.path.join(tempfile.gettempdir(), f"openedge-function-control-{uid}"))
    return os.path.join(base, hashlib.sha256(os.path.realpath(config).encode()).hexdigest()[:16] + ".sock")


def control_sockets(config: str) -> List[str]:
    """Where the command line looks for the daemon of `config`: as root's, then as ours."""
    found = [control_socket(config, 0), control_socket(config)]
    return sorted(set(found), key=found.index)
