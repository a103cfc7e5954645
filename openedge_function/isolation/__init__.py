"""Isolation: who instances run as, where they run, and the kernel's limits on them.

users.py     the user and group of each function (dynamic ids by default, as root)
rundir.py    the run directory and each pool's private directory (sockets, TMPDIR)
cgroups.py   control groups (v2, or v1's memory and pids) for memory, processes and CPU
"""
from .cgroups import Cgroups, Group, detect
from .rundir import RunDir, Sandbox, remove_stale
from .users import RunAs, current, group_id, plan, run_as, warn_readable_secrets

__all__ = ["Cgroups", "Group", "detect", "RunDir", "Sandbox", "remove_stale", "RunAs", "current", "plan",
           "run_as", "warn_readable_secrets", "group_id"]
