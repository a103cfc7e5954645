"""What an instance does to itself before it imports any handler code.

The supervisor's spec (read from the status socket) says who the instance runs as and its limits.
A fork of the template is still root here: it closes what the template held, takes the function's
environment, drops to the function's user and group (no supplementary groups), and then, like an
instance started afresh (already that user), forbids new privileges (no setuid programs), makes
itself undumpable (another process of the same user cannot read its memory or environment), and
sets its rlimits: open files, no core dumps, and, where the kernel has no group for it, processes
and address space. Problems the function's author can fix come back as LoadError.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Any, Dict, Iterable

from runtime_python.loader import LoadError

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
# Room for the gRPC server's threads and their stacks above what the instance maps at start, when
# RLIMIT_AS stands in for a memory group.
_ADDRESS_SPACE_ROOM = 512 << 20


def close_other_files(keep: Iterable[int]) -> None:
    """Close every descriptor but `keep` (what the template held must not reach a handler)."""
    kept = sorted(set(keep))
    low = 0
    for fd in kept + [os.sysconf("SC_OPEN_MAX")]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def take_environment(env: Dict[str, str]) -> None:
    """A fork's environment and sys.path, as `python -m runtime_python` with `env` has them."""
    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))


def prctl(option: int, value: Any) -> bool:
    """Linux prctl(2) with one argument; False where it fails or does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except Exception:
        return False


def confine(process: Dict[str, Any], codedir: str) -> None:
    """Become the user the spec names, take its limits and enter `codedir`. Raises LoadError."""
    uid, gid, who = process.get("uid"), process.get("gid"), process.get("user", "")
    if uid is not None and os.geteuid() == 0 and (uid, gid) != (0, 0):
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    prctl(_PR_SET_DUMPABLE, 0)
    _limit(resource.RLIMIT_CORE, 0)
    if process.get("files"):
        _limit(resource.RLIMIT_NOFILE, int(process["files"]))
    if process.get("nproc"):
        _limit(resource.RLIMIT_NPROC, int(process["nproc"]))
    if process.get("address_space"):
        _limit(resource.RLIMIT_AS, _mapped() + int(process["address_space"]) + _ADDRESS_SPACE_ROOM)
    library = os.path.dirname(os.__file__)
    if not os.access(library, os.R_OK | os.X_OK):
        raise LoadError(f"the interpreter's library {library} cannot be read by {who or 'this user'}: "
                        "install Python where the function's user can read it", [])
    try:
        os.chdir(codedir)
        os.listdir(codedir)
    except OSError as exc:
        raise LoadError(f"code directory {codedir} cannot be read by {who or 'this user'}: "
                        f"{exc.strerror}; make it readable for that user (chmod -R o+rX, or a "
                        "group it is in) or set the function's user:", []) from None
    sys.path[0] = codedir   # as `python -m` run there has it


def _limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _mapped() -> int:
    """Bytes of address space the process maps now."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
