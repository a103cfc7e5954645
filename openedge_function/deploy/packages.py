"""A function's own dependencies: the `requirements.txt` in its code directory, installed for it alone.

pip installs the file with `--target` into a directory of the package cache named after what
decides its content: the file's bytes, the interpreter, the user it is for and the pip options
of `packages:`. A start with an unchanged file finds that directory and installs nothing. The
instances find it on their sys.path after the code directory and before the daemon's own
packages (a function whose packages the template has imported already starts as a new
interpreter, so the function's pinned version is the one it imports).

pip runs as the function's user, off the message path (one installer thread), with the function's
code directory as its working directory, so a `--find-links wheels` line in the file means the
code directory's `wheels/`. Once installed, a directory belongs to the daemon and the function's
group may only read it. Directories no function of the configuration uses are removed at start.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Set, Tuple

from ..config import Function, Packages
from ..instances.environment import base_environment
from ..errors import FunctionLoadError
from ..isolation import RunAs, current

log = logging.getLogger("openedge_function.packages")

REQUIREMENTS = "requirements.txt"
_TAIL = 4000   # characters of pip's output kept for the error


def requirements_of(function: Function) -> Optional[str]:
    path = os.path.join(function.codedir, REQUIREMENTS)
    return path if os.path.isfile(path) else None


class PackageCache:
    """Installs and finds functions' packages under one directory."""

    def __init__(self, settings: Packages) -> None:
        self.settings = settings
        self.root = settings.cache

    def key(self, function: Function, who: RunAs) -> Optional[str]:
        """The directory name for `function`'s requirements as they are now; None without a file."""
        path = requirements_of(function)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except OSError:
            return None
        digest = hashlib.sha256(text)
        settings = self.settings
        for part in (function.python or sys.executable, sys.version if not function.python else "",
                     str(who.uid), str(who.gid), repr(settings.find_links), repr(settings.index)):
            digest.update(b"\0" + part.encode())
        return f"{function.name}-{digest.hexdigest()[:16]}"

    def installed(self, key: Optional[str]) -> Optional[str]:
        """The directory of `key` (from `key()`), if it is installed already."""
        if key is None:
            return None
        path = os.path.join(self.root, key)
        return path if os.path.isdir(path) else None

    def install(self, function: Function, who: RunAs) -> Optional[str]:
        """Install `function`'s requirements unless they are installed; their directory (None
        without a requirements.txt). Blocks for as long as pip runs. Raises FunctionLoadError
        carrying pip's own error line."""
        key = self.key(function, who)
        if key is None:
            return None
        final = os.path.join(self.root, key)
        if os.path.isdir(final):
            return final
        self._make_root()
        staging = os.path.join(self.root, f".{key}.{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(staging, ignore_errors=True)
        home = staging + ".home"
        for path in (staging, home):
            os.mkdir(path, 0o700)
            if who.switches:
                os.chown(path, who.uid, who.gid)
        python = function.python or sys.executable
        command = [python, "-m", "pip", "install", "--target", staging, "--no-input",
                   "--disable-pip-version-check", "--no-warn-script-location", "--progress-bar", "off",
                   "-r", REQUIREMENTS]
        settings = self.settings
        for link in settings.find_links:
            command += ["--find-links", link]
        if settings.index == "":
            command.append("--no-index")
        elif settings.index:
            command += ["--index-url", settings.index]
        env = {**base_environment(), "HOME": home, "TMPDIR": home,
               # An operator's pip settings (an index mirror, a proxy) hold for every function.
               **{k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.endswith("_proxy")
                  or k.endswith("_PROXY")}}
        env.pop("PYTHONDONTWRITEBYTECODE", None)   # compiled once here: instances cannot write
        started = time.monotonic()
        log.info("function %s: installing %s as %s", function.name,
                 os.path.join(function.codedir, REQUIREMENTS), who)
        try:
            try:
                done = subprocess.run(command, cwd=function.codedir, env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, errors="replace",
                                      timeout=settings.timeout, **who.popen())
            except subprocess.TimeoutExpired:
                raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: pip did not "
                                        f"finish within {settings.timeout:g}s (packages.timeout)") from None
            except OSError as exc:
                raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: cannot run "
                                        f"{python} -m pip: {exc.strerror or exc}") from None
            if done.returncode != 0:
                raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name} does not "
                                        f"install: {pip_error(done.stderr, done.stdout)}",
                                        (done.stderr or done.stdout)[-_TAIL:].splitlines())
            self._seal(staging, who)
            try:
                os.rename(staging, final)
            except OSError:
                if not os.path.isdir(final):   # else another install of the same file won
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
        log.info("function %s: %s installed in %.1fs (%s)", function.name, REQUIREMENTS,
                 time.monotonic() - started, final)
        return final

    def _make_root(self) -> None:
        """The cache and the directories made for it: functions' users pass through (0711) to
        their own packages, without listing anything."""
        missing = []
        path = self.root
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o711)
            except FileExistsError:
                continue
            os.chmod(path, 0o711)   # whatever the umask

    @staticmethod
    def _seal(path: str, who: RunAs) -> None:
        """Ours from now on: the function's group may read what pip wrote, nobody else may write."""
        if not who.switches:
            return
        me = current()
        for top, dirs, files in os.walk(path):
            for name in [top] + [os.path.join(top, entry) for entry in dirs + files]:
                st = os.lstat(name)
                os.lchown(name, me.uid, who.gid)
                if not os.path.islink(name):
                    owner = st.st_mode & 0o700
                    os.chmod(name, (owner & 0o700) | ((owner & 0o500) >> 3))

    def prune(self, keep: Set[str]) -> None:
        """Remove the directories (and what failed installs left) no name in `keep` names."""
        try:
            entries = os.listdir(self.root)
        except OSError:
            return
        for entry in entries:
            if entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)


def pip_error(*outputs: str) -> str:
    """pip's own error line: the last `ERROR:` line, else the last line it wrote."""
    lines = [line.strip() for output in outputs for line in (output or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") and line != "ERROR: Exception:"]
    return (errors or lines or ["pip failed without a word"])[-1]   # a crash: its last line


class Installer:
    """One thread that installs requirements in turn, off the message path."""

    def __init__(self, cache: PackageCache) -> None:
        self.cache = cache
        self._queue: "queue.Queue[Optional[Tuple[Function, RunAs, Callable[..., None]]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="packages", daemon=True)
        self._thread.start()

    def submit(self, function: Function, who: RunAs,
               then: Callable[[Optional[str], Optional[FunctionLoadError]], None]) -> None:
        """Install `function`'s requirements, then call `then(directory, None)` or
        `then(None, error)` from the installer's thread."""
        self._queue.put((function, who, then))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            function, who, then = job
            try:
                path = self.cache.install(function, who)
            except FunctionLoadError as exc:
                then(None, exc)
            except Exception as exc:   # a fault of ours: still an answer, never a held pool
                log.exception("function %s: installing its requirements failed", function.name)
                then(None, FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: {exc}"))
            else:
                then(path, None)

    def close(self) -> None:
        self._queue.put(None)
