"""The last good version of each function's code, kept where it outlives the instances, the
daemon and the machine's reboots.

When an instance of a function's code has loaded (its handler imported, its initializer ran),
that code directory is copied into the state directory (`.openedge-function/last-good/`), with the
name of the installed packages it ran with; those packages are kept from pruning while a snapshot
names them. While the code directory holds code that does not load, new instances start from the
copy instead (pool.py), and status, /healthz, the log and a metric say so.

A copy is made once per version: its manifest (each file's modification time and size) is
compared first, so a pool that loads the same code again costs one directory walk. A copy is not
made when the tree is larger than `SIZE_MAX` or holds more than `FILES_MAX` files (logged), or
when a file changed after the instance began to load (the copy could hold code that never
loaded). `KEEP` versions are kept per function, the newest first; functions no longer configured
lose theirs at the next start.

As root, the copy is root's: the function's group may read it and nobody may write it; the
directories above it let functions' users pass, not list.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..config import Function
from ..config.model import state_directory
from ..isolation import RunAs
from .codewatch import snapshot
from .packages import make_passable, seal

log = logging.getLogger("openedge_function.lastgood")

SIZE_MAX = 64 << 20     # bytes of one code directory copied at most
FILES_MAX = 10_000      # files of one code directory copied at most
KEEP = 2                # versions kept per function
_META = "meta.json"


@dataclasses.dataclass(frozen=True)
class LastGood:
    """One kept version of a function's code."""
    function: str
    codedir: str              # the code directory it is a copy of
    path: str                 # the copy's directory (instances run from it)
    version: str              # a digest of the files' names and contents
    saved: float              # when it was copied (seconds since the epoch)
    paths: Tuple[str, ...]    # the installed packages it ran with

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.saved))
        return f"version {self.version} (loaded {when})"


class LastGoodStore:
    """The kept versions of every function, in `<state>/.openedge-function/last-good`."""

    def __init__(self, workdir: str) -> None:
        self.root = os.path.join(state_directory(workdir), ".openedge-function", "last-good")
        self._warned: Set[str] = set()

    # -- reading -----------------------------------------------------------------------------

    def latest(self, function: Function) -> Optional[LastGood]:
        """The newest kept version of `function`'s code directory, if any."""
        found = self._versions(function.name)
        found = [good for good, _ in found if good.codedir == function.codedir]
        return found[0] if found else None

    def _versions(self, name: str) -> List[Tuple[LastGood, Dict[str, List[int]]]]:
        """(version, its manifest) of function `name`, the newest first."""
        found = []
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        for entry in entries:
            if entry.startswith(".") or entry.rpartition(".")[0] != name:
                continue
            path = os.path.join(self.root, entry)
            try:
                with open(os.path.join(path, _META), encoding="utf-8") as fh:
                    meta = json.load(fh)
                good = LastGood(name, meta["codedir"], os.path.join(path, "code"), meta["version"],
                                float(meta["saved"]), tuple(meta.get("paths", ())))
            except (OSError, ValueError, KeyError, TypeError):
                continue   # half written, or not ours: removed by the next prune
            if meta.get("function") == name:
                found.append((good, meta.get("manifest", {})))
        found.sort(key=lambda item: item[0].saved, reverse=True)
        return found

    def packages(self) -> Set[str]:
        """The package directories a kept version names (kept from pruning)."""
        kept = set()
        for entry in self._entries():
            try:
                with open(os.path.join(self.root, entry, _META), encoding="utf-8") as fh:
                    kept.update(json.load(fh).get("paths", ()))
            except (OSError, ValueError, AttributeError):
                continue
        return kept

    def _entries(self) -> List[str]:
        try:
            return [e for e in os.listdir(self.root) if not e.startswith(".")]
        except OSError:
            return []

    # -- writing (the daemon's thread) -----------------------------------------------------------

    def keep(self, function: Function, who: RunAs, paths: Iterable[str], loading_since: float
             ) -> Optional[LastGood]:
        """Copy `function`'s code directory as its last good version, unless the newest kept one
        is the same. `loading_since`: when the instance that proved it began to load (a file
        changed since is not proven). The kept version, or None when none was made."""
        codedir, name, paths = function.codedir, function.name, tuple(paths)
        manifest = _manifest(codedir)
        if manifest is None:
            self._warn(name, f"function {name}: {codedir} has more than {FILES_MAX} files or "
                       f"{SIZE_MAX >> 20} MB: no last good version of it is kept")
            return None
        versions = self._versions(name)
        for good, kept in versions[:1]:
            if good.codedir == codedir and kept == manifest and good.paths == paths:
                return good
        if any(mtime > loading_since * 1e9 for mtime, _ in manifest.values()):
            log.info("function %s: its code changed while an instance loaded it; no last good "
                     "version is kept of it", name)
            return None
        try:
            good = self._copy(function, who, paths, manifest)
        except OSError as exc:
            self._warn(name, f"function {name}: cannot keep its last good version in {self.root}: {exc}")
            return None
        if good is None:
            log.info("function %s: its code changed while it was copied; no last good version is kept",
                     name)
            return None
        for old, _ in versions[KEEP - 1:]:
            shutil.rmtree(os.path.dirname(old.path), ignore_errors=True)
        log.info("function %s: kept %s of %s as its last good", name, good.describe(), codedir)
        return good

    def _copy(self, function: Function, who: RunAs, paths: Tuple[str, ...],
              manifest: Dict[str, List[int]]) -> Optional[LastGood]:
        make_passable(self.root)
        staging = tempfile.mkdtemp(prefix=".new-", dir=self.root)
        try:
            code = os.path.join(staging, "code")
            digest = hashlib.sha256()
            for relative in sorted(manifest):
                source, target = os.path.join(function.codedir, relative), os.path.join(code, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(source, target)
                digest.update(relative.encode() + b"\0")
                with open(target, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
            if _manifest(function.codedir) != manifest:
                shutil.rmtree(staging, ignore_errors=True)
                return None
            version = digest.hexdigest()[:12]
            saved = time.time()
            with open(os.path.join(staging, _META), "w", encoding="utf-8") as fh:
                json.dump({"function": function.name, "codedir": function.codedir, "version": version,
                           "saved": saved, "paths": list(paths), "manifest": manifest}, fh)
            seal(staging, who)
            final = os.path.join(self.root, f"{function.name}.{version}")
            if os.path.isdir(final):   # the same version again (under other packages): replaced
                shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return LastGood(function.name, function.codedir, os.path.join(final, "code"), version, saved, paths)

    def prune(self, functions: Iterable[Function]) -> None:
        """Remove the versions of functions no longer configured, and half-made copies."""
        names = {f.name for f in functions}
        try:
            entries = os.listdir(self.root)
        except OSError:
            return
        for entry in entries:
            if entry.startswith(".new-") or entry.rpartition(".")[0] not in names:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)

    def _warn(self, name: str, text: str) -> None:
        if text not in self._warned:
            self._warned.add(text)
            log.warning("%s", text)


def _manifest(codedir: str) -> Optional[Dict[str, List[int]]]:
    """{relative path: [mtime_ns, size]} of the files imports could read, the way the code watcher
    sees them; None when over the bounds."""
    found = {path: list(stamp) for path, stamp in snapshot(codedir, regular=True).items()}
    if len(found) > FILES_MAX or sum(size for _, size in found.values()) > SIZE_MAX:
        return None
    return found
