"""The private directories instances run in.

The run directory (0711, root's) holds one directory per pool, owned by the function's user and
0700: its instances' sockets and their temporary directory (TMPDIR and HOME). Another function
cannot enter it. A lock held for the daemon's life marks a run directory as in use, so the next
start removes those that a SIGKILLed daemon left behind.
"""
from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Set

from runtime_python.wire import TMP_DIRS

from ..config import Function
from .cgroups import Cgroups
from .users import RunAs, current

log = logging.getLogger("openedge_function.isolation")

_PREFIX = "openedge-function-"
_LOCK = ".lock"

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


def sweep_tmp(name: str, uid: int) -> int:
    """Remove the entries of TMP_DIRS that `uid` owns, unless a process of `uid` still runs;
    how many were removed."""
    import psutil
    for process in psutil.process_iter(["uids"]):
        uids = process.info.get("uids")
        if uids is not None and uid in (uids.real, uids.effective):
            return 0
    removed = 0
    for directory in TMP_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)   # safe against links swapped in (fd-based)
                else:
                    os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
    if removed:
        log.info("function %s: removed %d files and directories its user (uid %d) left in %s",
                 name, removed, uid, ", ".join(TMP_DIRS))
    return removed


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
    tmp_noted: Set[str] = field(default_factory=set)   # what the log said of /tmp & co.

    def note_tmp(self, name: str, how: str) -> None:
        """Say once per pool whether its instances' /tmp, /var/tmp, /dev/shm and /run/lock are
        their own (`how` as the runtime reports it: "private", or "shared: why")."""
        if not how or how in self.tmp_noted:
            return
        self.tmp_noted.add(how)
        if how == "private":
            log.info("function %s: its instances get /tmp, /var/tmp, /dev/shm and /run/lock of their own "
                     "(tmpfs in a mount namespace, counted in their memory)", name)
        elif self.who.own:
            log.info("function %s: its instances share /tmp, /var/tmp, /dev/shm and /run/lock (%s); what "
                     "its user leaves there is removed when its last instance stops", name, how[8:])
        else:
            log.info("function %s: its instances share /tmp, /var/tmp, /dev/shm and /run/lock (%s), as %s, "
                     "whose files there stay", name, how[8:], self.who)

    def sweep(self, name: str) -> None:
        """After the pool's last instance: remove what its user left in the shared temporary
        directories, when the user is the function's own and none of its processes is left."""
        if self.who.own:
            sweep_tmp(name, self.who.uid)

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
