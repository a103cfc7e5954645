"""Where things are: one answer for the daemon, `new`, `run`, `status` and `invoke`.

Installed as a service (the Debian package, or the unit by hand), the configuration is
/etc/openedge-function/application.yml and relative paths in it (code directories, the log)
start at the state directory /var/lib/openedge-function, the unit's working directory; function
code lives in its functions/. Anywhere else, the configuration is application.yml in the current
directory, and relative paths start there.
"""
from __future__ import annotations

import os
from typing import Optional

SYSTEM_CONFIG = "/etc/openedge-function/application.yml"
SYSTEM_STATE = "/var/lib/openedge-function"
LOCAL_CONFIG = "application.yml"
LEGACY_CONFIG = os.path.join("etc", "openedge", "application.yml")   # OpenEdge's module layout
CONFIG_ENV = "OPENEDGE_FUNCTION_CONFIG"
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
