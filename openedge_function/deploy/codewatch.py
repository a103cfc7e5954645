"""Watching functions' code directories, so that an edit takes effect without a signal or a restart.

inotify, through inotify_simple (a thin ctypes wrapper, no thread of its own): its descriptor joins
the fd watcher's selector (instances/fdwatch.py), so watching costs nothing until a file changes.
Where inotify is missing, or the user's inotify watches run out, a directory is polled instead:
its files' modification times, once a second.

What is watched is the code directory's own tree: symbolic links in it are not followed (a link
to `.` would loop, a link to `/` would take every inotify watch of the machine; a directory a link
points to inside the tree is watched where it is), and at most `DIRS_MAX` directories of one tree
are watched (the log says when a tree has more). An edit behind a link out of the code directory
is not seen: touch a file of the code directory, or send SIGHUP.

Changes are debounced: a function is reported once its directory has been quiet for `QUIET`
seconds (an editor's save, a `git pull`, an `rsync` of many files: one report), or after `LONGEST`
while writes keep coming. What no import reads is ignored: `__pycache__`, editors' swap and backup
files, hidden files and directories (`.git`).
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

from ..instances.fdwatch import FdWatcher

try:
    import inotify_simple
except ImportError:   # not Linux, or not installed: poll
    inotify_simple = None

log = logging.getLogger("openedge_function.codewatch")

QUIET = 0.3          # seconds without a change before a function's change is reported
LONGEST = 5.0        # seconds after a first change at most, while changes keep coming
POLL_EVERY = 1.0     # seconds between polls of directories that inotify does not cover
DIRS_MAX = 1000      # directories of one code directory watched (or polled) at most

_SKIP_DIRS = ("__pycache__",)
_SKIP_SUFFIXES = ("~", ".swp", ".swx", ".swo", ".pyc", ".pyo", ".tmp", ".part")


def ignored(name: str) -> bool:
    """Names no import reads: caches, hidden files, editors' swap, backup and probe files."""
    return (name.startswith(".") or name in _SKIP_DIRS or name.endswith(_SKIP_SUFFIXES)
            or name == "4913")   # vim's probe of whether it may write the directory


Snapshot = Dict[str, Tuple[int, int]]


def snapshot(root: str, regular: bool = False) -> Snapshot:
    """{relative path: (mtime_ns, size)} of what `root` holds that imports could read (`regular`:
    of its regular files only, links to them included)."""
    found: Snapshot = {}
    for path, dirs, files in _walk(root, DIRS_MAX):
        for name in files:
            if ignored(name):
                continue
            full = os.path.join(path, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            if regular and not stat.S_ISREG(st.st_mode):
                continue
            found[os.path.relpath(full, root)] = (st.st_mtime_ns, st.st_size)
    return found


def _walk(top: str, most: int):
    """os.walk of `top` without following links, skipping what imports ignore, `most` directories
    at most (breadth first: the top levels are the ones kept)."""
    queue = [top]
    seen = 0
    while queue and seen < most:
        path = queue.pop(0)
        seen += 1
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        dirs, files = [], []
        for entry in entries:
            if ignored(entry.name):
                continue
            try:
                (dirs if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
            except OSError:
                continue
        yield path, dirs, files
        queue.extend(os.path.join(path, d) for d in dirs)
    if queue:
        log.warning("code directory %s has more than %d directories: only the first %d are watched "
                    "for edits", top, most, most)


class CodeWatch:
    """Reports, through `due()`, the functions whose code directory changed and then went quiet."""

    def __init__(self, fdwatch: Optional[FdWatcher]) -> None:
        self._lock = threading.Lock()
        self._names: Dict[str, Set[str]] = {}        # code directory -> functions served from it
        self._changed: Dict[str, Tuple[float, float]] = {}   # directory -> (first, last) change
        self._wds: Dict[int, Tuple[str, Optional[str]]] = {}  # watch -> (its directory, the code
        #   directory it belongs to; None for a code directory's parent, watched for swaps)
        self._polled: Dict[str, Snapshot] = {}
        self._polled_at = 0.0
        self._inotify = None
        if inotify_simple is not None and fdwatch is not None:
            try:
                self._inotify = inotify_simple.INotify(nonblocking=True)
            except OSError as exc:
                log.warning("code directories are polled every %gs (no inotify: %s)", POLL_EVERY, exc)
            else:
                fdwatch.add(os.dup(self._inotify.fileno()), self._on_events)
        self.how = "inotify" if self._inotify is not None else f"polled every {POLL_EVERY:g}s"

    # -- which directories (the daemon's thread) -----------------------------------------------

    def follow(self, name: str, codedir: str) -> None:
        """Report changes of `codedir` as changes of function `name`."""
        with self._lock:
            names = self._names.setdefault(codedir, set())
            fresh = not names
            names.add(name)
        if fresh:
            self._cover(codedir)

    def unfollow(self, name: str) -> None:
        with self._lock:
            for codedir, names in list(self._names.items()):
                names.discard(name)
                if not names:
                    del self._names[codedir]
                    self._changed.pop(codedir, None)
                    self._polled.pop(codedir, None)
                    for wd, (_, owner) in list(self._wds.items()):
                        if owner == codedir:
                            self._forget(wd)

    def followed(self) -> Dict[str, Set[str]]:
        """{code directory: the functions served from it}."""
        with self._lock:
            return {codedir: set(names) for codedir, names in self._names.items()}

    def _cover(self, codedir: str) -> None:
        """Watch every directory under `codedir` (and its parent, for a swapped directory or
        symlink); poll it where inotify cannot."""
        if self._inotify is not None:
            try:
                self._add(os.path.dirname(codedir) or "/", None)
                self._add_tree(codedir, codedir)
                return
            except OSError as exc:
                log.warning("code directory %s is polled every %gs (inotify: %s)", codedir,
                            POLL_EVERY, exc.strerror or exc)
        with self._lock:
            self._polled[codedir] = snapshot(codedir)

    def _add_tree(self, top: str, codedir: str) -> None:
        """Watch `top` and what is under it, a directory of `codedir` (the whole tree again when
        `top` is `codedir`: watches it has already are the same watches)."""
        most = DIRS_MAX
        if top != codedir:   # a new directory in the tree: what the tree has not used yet
            with self._lock:
                most -= sum(1 for _, owner in self._wds.values() if owner == codedir)
        for path, _, _ in _walk(top, most):
            self._add(path, codedir)

    def _add(self, path: str, codedir: Optional[str]) -> None:
        assert self._inotify is not None
        flags = inotify_simple.flags
        mask = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.DELETE
                | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF)
        if codedir is None:   # the parent: only entries coming and going
            mask = flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.DELETE
        wd = self._inotify.add_watch(path, mask)
        with self._lock:
            previous = self._wds.get(wd)
            if previous is None or previous[1] is None:
                self._wds[wd] = (path, codedir)

    def _forget(self, wd: int) -> None:
        path, _ = self._wds.pop(wd)
        if self._inotify is not None and not any(p == path for p, _ in self._wds.values()):
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass   # its directory is gone already

    # -- events (the fd watcher's thread) ---------------------------------------------------------

    def _on_events(self, chunk: bytes) -> None:
        if not chunk:
            return
        flags = inotify_simple.flags
        now = time.monotonic()
        grown: List[Tuple[str, str]] = []
        with self._lock:
            for event in inotify_simple.parse_events(chunk):
                where = self._wds.get(event.wd)
                if where is None:
                    continue
                path, codedir = where
                if event.mask & flags.IGNORED:
                    del self._wds[event.wd]
                    continue
                if codedir is None:   # a parent: did one of our code directories come or go?
                    full = os.path.join(path, event.name)
                    if full in self._names:
                        self._note(full, now)
                    continue
                if event.name and ignored(event.name):
                    continue
                if event.mask & flags.ISDIR and event.mask & (flags.CREATE | flags.MOVED_TO):
                    grown.append((os.path.join(path, event.name), codedir))
                self._note(codedir, now)
        for path, codedir in grown:
            try:
                self._add_tree(path, codedir)
            except OSError:
                pass   # gone again already

    def _note(self, codedir: str, now: float) -> None:
        if codedir in self._names:
            first, _ = self._changed.get(codedir, (now, now))
            self._changed[codedir] = (first, now)

    # -- reporting (the daemon's thread) -------------------------------------------------------

    def due(self, now: Optional[float] = None) -> List[Tuple[str, float]]:
        """(function, when its directory first changed) for each function whose directory changed
        and has been quiet since (or kept changing for LONGEST): each change is reported once."""
        now = time.monotonic() if now is None else now
        if self._polled and now - self._polled_at >= POLL_EVERY:
            self._polled_at = now
            self._poll(now)
        found: List[Tuple[str, float]] = []
        swapped: List[str] = []
        with self._lock:
            for codedir, (first, last) in list(self._changed.items()):
                if now - last >= QUIET or now - first >= LONGEST:
                    del self._changed[codedir]
                    found.extend((name, first) for name in sorted(self._names.get(codedir, ())))
                    if codedir not in self._polled:
                        swapped.append(codedir)
        for codedir in swapped:   # what is there now (a new directory, a new symlink target)
            if os.path.isdir(codedir):
                try:
                    self._add_tree(codedir, codedir)
                except OSError:
                    pass
        return found

    def _poll(self, now: float) -> None:
        with self._lock:
            polled = list(self._polled.items())
        for codedir, before in polled:
            after = snapshot(codedir) if os.path.isdir(codedir) else {}
            if after != before:
                with self._lock:
                    if codedir in self._polled:
                        self._polled[codedir] = after
                        self._note(codedir, now)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

