"""What an instance does to itself before it imports any handler code.

The supervisor's spec (read from the status socket) says who the instance runs as and its limits.
A fork of the template is still root here: it closes what the template held, takes the function's
environment, drops to the function's user and group (no supplementary groups), and then, like an
instance started afresh (already that user), forbids new privileges (no setuid programs), makes
itself undumpable (another process of the same user cannot read its memory or environment), and
sets its rlimits: open files, no core dumps, and, where the kernel has no group for it, processes
and address space. Problems the function's author can fix come back as LoadError.

Still root, a fork also takes temporary directories of its own (spec `private_tmp`: their size),
as systemd's PrivateTmp does for a service: a mount namespace of its own, with a size-limited tmpfs
on /tmp, /var/tmp, /dev/shm and /run/lock. What it writes there is counted in its memory group and
goes with its last process. What it needs from under those directories (its code, its socket and
TMPDIR, the runtime's own packages) is bound back in at the same paths. `tmp_status` says how it
went, for the supervisor's log.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from runtime_python.loader import LoadError
from runtime_python.wire import TMP_DIRS

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
# Room for the handler's threads and their stacks above what the instance maps at start, when
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


_libc: Any = None


def libc() -> Any:
    """The C library, through ctypes (loaded once; the template loads it for its forks)."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def prctl(option: int, value: Any) -> bool:
    """Linux prctl(2) with one argument; False where it fails or does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return libc().prctl(option, value, 0, 0, 0) == 0
    except Exception:
        return False


_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000

tmp_status = "shared: not set up"   # "private", or "shared: why not"


def reachable(path: str, uid: int, gid: int) -> bool:
    """Whether user `uid` (group `gid`, no other groups) may pass down to `path` and read it, by
    the mode bits (checked as root, before becoming that user)."""
    return uid == 0 or _first_stop(path, lambda directory, need: _may(directory, uid, gid, need)) is None


def _first_stop(path: str, may: Callable[[str, int], bool]) -> Optional[Tuple[str, int]]:
    """The first place on the way down to `path` that `may(place, need)` refuses, and the need it
    refused (0o1: pass through; 0o5 or 0o4: read the directory or file itself); None: nothing."""
    path = os.path.abspath(path)
    above, current = [], path
    while current != os.path.dirname(current):
        current = os.path.dirname(current)
        above.append(current)
    for directory in reversed(above):
        if not may(directory, 0o1):
            return directory, 0o1
    need = 0o5 if os.path.isdir(path) else 0o4
    return None if may(path, need) else (path, need)


def _may(path: str, uid: int, gid: int, need: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & need == need


def private_tmp(size: int, keep: Iterable[str], uid: int = 0, gid: int = 0, codedir: str = "") -> str:
    """A mount namespace with a tmpfs of `size` bytes on each of TMP_DIRS, and `keep` (paths
    that must stay reachable) bound back in, those that user `uid` may reach; "private", or why it
    could not be. A code directory the user may not reach is left to the error that says so."""
    if codedir and not reachable(codedir, uid, gid):
        return "shared: its code directory is out of its user's reach"
    import ctypes
    c = libc()

    def mount(source: Any, target: Any, kind: Any, flags: int, data: Any) -> None:
        if c.mount(source, target, kind, flags, data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target!r}: {os.strerror(err)}")

    if c.unshare(_CLONE_NEWNS) != 0:
        return f"shared: no mount namespace of its own ({os.strerror(ctypes.get_errno())})"
    try:
        mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)   # nothing goes back to the machine
    except OSError as exc:   # nothing is mounted yet: the namespace is the machine's view
        return f"shared: {exc.strerror}"
    try:
        masked = [d for d in TMP_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        held = []
        for path in sorted({os.path.realpath(p) for p in keep if p and os.path.exists(p)}):
            if any(path == d or path.startswith(d + "/") for d in masked) and not any(
                    path.startswith(kept + "/") for kept, _ in held) and reachable(path, uid, gid):
                held.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
        for directory in masked:
            mount(b"tmpfs", directory.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                  f"size={size},mode=1777".encode())
        for path, fd in held:
            is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
            _passable(path if is_dir else os.path.dirname(path))
            if not is_dir:
                open(path, "a").close()
            mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
            os.close(fd)
    except OSError as exc:
        # Half done is not done: the process cannot go on in a namespace it cannot trust.
        raise LoadError(f"the instance's private temporary directories could not be made: {exc}", [])
    return "private"


def _passable(path: str) -> None:
    """Make `path` and the directories above it that are missing: root's, 0711 (the way in to
    what is bound back, passable and not listable)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
        os.chmod(directory, 0o711)


def confine(process: Dict[str, Any], codedir: str, keep: Iterable[str] = ()) -> None:
    """Become the user the spec names, take its limits and enter `codedir`; `keep`: paths the
    instance needs, should its temporary directories be private. Raises LoadError."""
    global tmp_status
    uid, gid, who = process.get("uid"), process.get("gid"), process.get("user", "")
    if process.get("private_tmp") and os.geteuid() == 0:
        tmp_status = private_tmp(int(process["private_tmp"]),
                                 [codedir, *keep, *sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix,
                                  os.path.dirname(os.path.dirname(__file__))],
                                 uid if uid is not None else 0, gid if gid is not None else 0, codedir)
    elif process.get("private_tmp"):
        tmp_status = "shared: a new interpreter, started as the function's user"
    else:
        tmp_status = "shared: the daemon does not run as root"
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
                        f"{blocker(library)}; install Python where the function's user can read it", [])
    try:
        os.chdir(codedir)
        os.listdir(codedir)
    except OSError as exc:
        raise LoadError(f"code directory {codedir} cannot be read by {who or 'this user'} "
                        f"({exc.strerror}): {blocker(codedir)}, or set the function's user: to one "
                        "that may read it", []) from None
    sys.path[0] = codedir   # as `python -m` run there has it


def blocker(path: str) -> str:
    """What stops this process's user from reading directory `path`: the first directory on the
    way down that it may not pass (or `path` itself, which it may not list), with the command
    that lets it."""
    stop = _first_stop(path, os.access)   # os.R_OK and os.X_OK are the mode bits 0o4 and 0o1
    if stop is None:
        return f"{path} is readable now"
    directory, need = stop
    return _stops(directory, "pass through", "o+x") if need == 0o1 else _stops(directory, "read", "-R o+rX")


def _stops(directory: str, what: str, mode: str) -> str:
    try:
        st = os.stat(directory)
        about = f" (mode {st.st_mode & 0o7777:04o}, uid {st.st_uid}, gid {st.st_gid})"
    except OSError:
        about = ""
    return (f"{directory}{about} is what it may not {what}; `chmod {mode} {directory}` lets it "
            "(or give it a group that may)")


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
