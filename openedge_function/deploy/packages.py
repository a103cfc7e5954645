"""A function's own dependencies: the `requirements.txt` in its code directory, installed for it alone.

pip installs the file with `--target` into a directory of the package cache named after what
decides its content: the file's bytes, the interpreter, the user it is for and the pip options
of `packages:`. A start with an unchanged file finds that directory and installs nothing. The
instances find it on their sys.path after the code directory and before the daemon's own
packages (a function whose packages the template has imported already starts as a new
interpreter, so the function's pinned version is the one it imports).

pip runs as the function's user, off the message path (a thread per install: one function's
install never waits for another's), with the function's code directory as its working directory,
so a `--find-links wheels` line in the file means the code directory's `wheels/`. What pip runs
(a package's build backend too) is bounded as the function's instances are: in a control group of
its own with the function's memory and pids limits (without groups: the address-space rlimit
for memory), before pip starts. At the end of the install, at `packages.timeout` and when the
daemon stops, everything in that group (without groups: pip's process group) is killed, so
nothing an install started outlives it; pip's output goes to files, so a process that holds
them open cannot hold the install. Once installed, a directory belongs to the daemon and the function's
group may only read it. Directories no function of the configuration uses are removed at start.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Optional, Set

from ..config import Function, Packages
from ..instances.environment import RUNTIME_TASKS, base_environment
from ..errors import FunctionLoadError
from ..isolation import Cgroups, Group, RunAs, current

log = logging.getLogger("openedge_function.packages")

REQUIREMENTS = "requirements.txt"
_TAIL = 4000   # characters of pip's output kept for the error
_SERIAL = iter(range(1, 1 << 62))

# Run as the function's user, before pip: wait until the daemon has put this process in its
# control group (a byte on stdin), die with the daemon, no new privileges, no core dumps, the
# address-space limit where no group bounds memory; then become pip.
_GATE = """
import ctypes, os, resource, sys
os.read(0, 1)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, 9, 0, 0, 0)
libc.prctl(38, 1, 0, 0, 0)
if os.getppid() == 1:
    os._exit(1)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


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

    def install(self, function: Function, who: RunAs, cgroups: Optional[Cgroups] = None,
                running: Optional[Dict[Any, Callable[[], None]]] = None) -> Optional[str]:
        """Install `function`'s requirements unless they are installed; their directory (None
        without a requirements.txt). Blocks for as long as pip runs, in a group of `cgroups`
        when given; `running` holds a way to kill it while it does. Raises FunctionLoadError
        carrying pip's own error line."""
        key = self.key(function, who)
        if key is None:
            return None
        final = os.path.join(self.root, key)
        if os.path.isdir(final):
            return final
        make_passable(self.root)
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
            returncode, stdout, stderr = _bounded_run(function, who, command, env, settings.timeout,
                                                      cgroups, running if running is not None else {})
            if returncode is None:
                raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: pip did not "
                                        f"finish within {settings.timeout:g}s (packages.timeout); "
                                        "what it ran was killed")
            if returncode != 0:
                raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name} does not "
                                        f"install: {pip_error(stderr, stdout)}",
                                        (stderr or stdout)[-_TAIL:].splitlines())
            seal(staging, who)
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

    def prune(self, keep: Set[str]) -> None:
        """Remove the directories (and what failed installs left) no name in `keep` names."""
        try:
            entries = os.listdir(self.root)
        except OSError:
            return
        for entry in entries:
            if entry not in keep:
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)


def make_passable(root: str) -> None:
    """`root` and the directories made for it: functions' users pass through (0711) to what is
    their own further down, without listing anything."""
    missing = []
    path = root
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o711)
        except FileExistsError:
            continue
        os.chmod(path, 0o711)   # whatever the umask


def seal(path: str, who: RunAs) -> None:
    """Ours from now on: the function's group may read what is under `path`, nobody else may
    write it."""
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


def _bounded_run(function: Function, who: RunAs, command: list, env: Dict[str, str], timeout: float,
                 cgroups: Optional[Cgroups], running: Dict[Any, Callable[[], None]]
                 ) -> "tuple[Optional[int], str, str]":
    """Run `command` (pip) bounded as the function's instances are; (exit status or None at the
    timeout, stdout, stderr). Everything it started is killed when it ends."""
    limits = function.instance
    group: Optional[Group] = None
    if cgroups is not None:
        try:
            group = cgroups.group(f"install-{function.name}.{next(_SERIAL)}", limits.memory,
                                  limits.pids + RUNTIME_TASKS, limits.cpu_share)
        except OSError as exc:
            log.warning("function %s: pip runs without a control group (%s)", function.name, exc)
    address_space = 0 if group is not None or not limits.memory else limits.memory + (512 << 20)
    python = function.python or sys.executable
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(
                [python, "-c", _GATE, str(address_space), python] + command[1:], cwd=function.codedir,
                env=env, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                **who.popen())
        except OSError as exc:
            if group is not None:
                group.remove()
            raise FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: cannot run "
                                    f"{python} -m pip: {exc.strerror or exc}") from None

        def kill() -> None:
            if group is not None:
                group.remove()   # kills everything in it, double forks too
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass

        running[process] = kill
        try:
            try:
                if group is not None:
                    group.add(process.pid)
                assert process.stdin is not None
                process.stdin.write(b"\0")
                process.stdin.close()
            except OSError as exc:
                log.warning("function %s: pip could not be started bounded (%s)", function.name, exc)
                kill()
            try:
                returncode: Optional[int] = process.wait(timeout)
            except subprocess.TimeoutExpired:
                returncode = None
        finally:
            kill()
            process.wait()
            running.pop(process, None)
        out.seek(0)
        err.seek(0)
        return (returncode, out.read(1 << 20).decode("utf-8", "replace"),
                err.read(1 << 20).decode("utf-8", "replace"))


def pip_error(*outputs: str) -> str:
    """pip's own error line: the last `ERROR:` line, else the last line it wrote."""
    lines = [line.strip() for output in outputs for line in (output or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") and line != "ERROR: Exception:"]
    return (errors or lines or ["pip failed without a word"])[-1]   # a crash: its last line


class Installer:
    """Installs requirements off the message path, each install in a thread of its own."""

    def __init__(self, cache: PackageCache, cgroups: Optional[Cgroups] = None) -> None:
        self.cache = cache
        self._cgroups = cgroups
        self._running: Dict[Any, Callable[[], None]] = {}   # pip process -> what kills it
        self._threads: Set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, function: Function, who: RunAs,
               then: Callable[[Optional[str], Optional[FunctionLoadError]], None]) -> None:
        """Install `function`'s requirements, then call `then(directory, None)` or
        `then(None, error)` from the install's thread."""
        thread = threading.Thread(target=self._run, args=(function, who, then),
                                  name=f"packages-{function.name}", daemon=True)
        with self._lock:
            if self._closed:
                return
            self._threads.add(thread)
        thread.start()

    def _run(self, function: Function, who: RunAs,
             then: Callable[[Optional[str], Optional[FunctionLoadError]], None]) -> None:
        path: Optional[str] = None
        error: Optional[FunctionLoadError] = None
        try:
            path = self.cache.install(function, who, self._cgroups, self._running)
        except FunctionLoadError as exc:
            error = exc
        except Exception as exc:   # a fault of ours: still an answer, never a held pool
            log.exception("function %s: installing its requirements failed", function.name)
            error = FunctionLoadError(f"{REQUIREMENTS} of function {function.name}: {exc}")
        with self._lock:
            self._threads.discard(threading.current_thread())
            if self._closed:
                return   # the daemon is stopping: nobody waits for it
        then(path, error)

    def close(self) -> None:
        """Kill the installs that still run (everything they started), and wait for their threads."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for kill in list(self._running.values()):
            kill()
        for thread in threads:
            thread.join(5)
