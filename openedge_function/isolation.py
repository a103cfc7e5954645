"""Who a function's instances run as, and the private directories they run in.

As root, the daemon never runs a handler as root. A function runs as its `user:`/`group:`, else
as `defaults.user`/`defaults.group`, else as a user id of its own from the range systemd keeps for
dynamic users (61184-65519), with a group of the same number: two functions then cannot signal,
trace or read each other, and none of them can touch the daemon, its configuration or its log.
Not as root, instances run as the daemon's user and a `user:` that differs is an error.

The run directory (0711, root's) holds one directory per pool, owned by the function's user and
0700: its instances' sockets and their temporary directory (TMPDIR and HOME). Another function
cannot enter it. A lock held for the daemon's life marks a run directory as in use, so the next
start removes those that a SIGKILLed daemon left behind.
"""
from __future__ import annotations

import fcntl
import glob
import grp
import logging
import os
import pwd
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .cgroups import Cgroups
from .config import AppConfig, Defaults, Function
from .errors import ConfigError, ConfigErrors

log = logging.getLogger(__name__)

DYNAMIC_FIRST, DYNAMIC_LAST = 61184, 65519
_PREFIX = "openedge-function-"
_LOCK = ".lock"

# Function name -> its dynamic id, for the daemon's life: a function keeps its id across reloads.
_dynamic: Dict[str, int] = {}


@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    name: str         # for messages: "nobody", "uid 61544 (the function's own)"

    @property
    def switches(self) -> bool:
        """Whether the instance runs as someone other than the daemon."""
        return self.uid != os.geteuid() or self.gid != os.getegid()

    def popen(self) -> Dict[str, Any]:
        """subprocess's arguments that start a child as this user, with no supplementary groups
        (none when that is the daemon's own user)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []} if self.switches else {}

    def __str__(self) -> str:
        return self.name


def current() -> RunAs:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    return RunAs(uid, os.getegid(), name)


def _uid(text: str) -> "tuple[int, Optional[int], str]":
    """(uid, the user's own group or None, name for messages)."""
    if text.isdigit():
        try:
            entry = pwd.getpwuid(int(text))
            return entry.pw_uid, entry.pw_gid, entry.pw_name
        except KeyError:
            return int(text), None, f"uid {text}"
    entry = pwd.getpwnam(text)
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _gid(text: str) -> int:
    return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid


def dynamic_uid(name: str) -> int:
    """An id no account and no other function of this daemon has, the same for `name` each time
    (unless taken)."""
    if name in _dynamic:
        return _dynamic[name]
    span = DYNAMIC_LAST - DYNAMIC_FIRST + 1
    taken = set(_dynamic.values())
    start = zlib.crc32(name.encode("utf-8")) % span
    for step in range(span):
        uid = DYNAMIC_FIRST + (start + step) % span
        if uid in taken:
            continue
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            pass
        _dynamic[name] = uid
        return uid
    raise RuntimeError("no free dynamic user id left")


def run_as(function: Function, defaults: Defaults, file: str = "", index: int = 0) -> RunAs:
    """Who `function`'s instances run as. Raises ConfigError naming the field."""
    user, group = function.user or defaults.user, function.group or defaults.group
    where = f"functions[{index}]" if function.user or function.group else "defaults"
    if os.geteuid() != 0:
        me = current()
        if user is not None and _uid(user)[0] != me.uid or group is not None and _gid(group) != me.gid:
            raise ConfigError(file, f"{where}.{'user' if user is not None else 'group'}",
                              f"running instances as another user needs the daemon to run as root "
                              f"(it runs as {me.name})")
        return me
    if user is None:
        uid = dynamic_uid(function.name)
        gid = _gid(group) if group is not None else uid
        return RunAs(uid, gid, f"uid {uid} (function {function.name}'s own)")
    uid, own_gid, name = _uid(user)
    if uid == 0:
        log.warning("%s.user: function %s runs as root: its handler can do anything the daemon can",
                    where, function.name)
    gid = _gid(group) if group is not None else (own_gid if own_gid is not None else uid)
    return RunAs(uid, gid, name)


class RunDir:
    """The daemon's run directory; `home()` makes a pool's private directory in it."""

    def __init__(self) -> None:
        base = os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()   # systemd's, else /tmp
        remove_stale(base)
        self.path = tempfile.mkdtemp(prefix=_PREFIX, dir=base)
        if os.geteuid() == 0:
            os.chmod(self.path, 0o711)   # others may pass through to their own directory, not list
        self._lock = os.open(os.path.join(self.path, _LOCK), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def home(self, function: Function, who: RunAs, cgroups: Optional[Cgroups] = None) -> "Sandbox":
        return Sandbox.make(self.path, function, who, cgroups)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


def remove_stale(base: str) -> None:
    """Remove the run directories of daemons that are gone: nobody holds their lock."""
    for path in glob.glob(os.path.join(base, _PREFIX + "*")):
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue
            fd = os.open(os.path.join(path, _LOCK), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue   # not ours, or from a version that kept no lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue   # a running daemon's
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a daemon that did not stop cleanly", path)


@dataclass
class Sandbox:
    """A pool's private directory (sockets and tmp), who its instances run as, and the cgroups
    their groups go in (None: rlimits and polling)."""
    path: str
    who: RunAs
    cgroups: Optional[Cgroups] = None

    @property
    def tmp(self) -> str:
        return os.path.join(self.path, "tmp")

    @classmethod
    def make(cls, rundir: str, function: Function, who: Optional[RunAs] = None,
             cgroups: Optional[Cgroups] = None) -> "Sandbox":
        who = who or current()
        # Short: a Unix socket's path has room for 107 bytes.
        path = tempfile.mkdtemp(prefix=f"{function.name[:16]}-", dir=rundir)
        os.mkdir(os.path.join(path, "tmp"), 0o700)
        if who.switches:
            for directory in (path, os.path.join(path, "tmp")):
                os.chown(directory, who.uid, who.gid)
        return cls(path, who, cgroups)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def warn_readable_secrets(config: AppConfig) -> None:
    """A configuration with a password that others can read gets a warning."""
    secrets = bool(config.hub.password) or (config.server is not None and bool(config.server.token)) \
        or any(f.credentials.access_key_secret or f.credentials.token for f in config.functions)
    try:
        mode = os.stat(config.file).st_mode
    except OSError:
        return
    if secrets and mode & 0o004:
        log.warning("%s holds a password or token and every user of this machine can read it: "
                    "chmod o-r %s", config.file, config.file)


def plan(config: AppConfig) -> Dict[str, RunAs]:
    """Who each function runs as. Raises ConfigError naming the field (ConfigErrors: each one)."""
    users, errors = {}, []
    for index, function in enumerate(config.functions):
        try:
            users[function.name] = run_as(function, config.defaults, config.file, index)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) > 1:
        raise ConfigErrors(errors)
    if errors:
        raise errors[0]
    return users
