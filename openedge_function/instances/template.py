"""Instances forked from a template process (runtime_python.template) instead of started afresh.

The supervisor becomes a child subreaper, so each forked instance, once its intermediate parent
exits, is the supervisor's own child: it is waited for, signalled and reaped exactly like one
started with subprocess. Being a subreaper also makes the supervisor the parent of whatever an
instance's subprocesses leave orphaned; `reap_orphans()` collects those.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

import psutil

from runtime_python.confine import prctl

from ..config import Function
from .environment import RUNTIME_ROOT, base_environment
from ..isolation import RunAs
from .lifecycle import describe_exit

log = logging.getLogger("openedge_function.template")

_PR_SET_CHILD_SUBREAPER = 36
_REPLY_TIMEOUT = 30.0
_REST = 60.0   # seconds without the template after it failed to fork an instance
# Variables the interpreter reads only when it starts: a function that sets one needs a fresh one.
_START_ONLY = ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONOPTIMIZE", "PYTHONHASHSEED", "PYTHONNOUSERSITE",
               "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONMALLOC", "PYTHONWARNINGS", "PYTHONSAFEPATH",
               "PYTHONINSPECT", "PYTHONVERBOSE", "PYTHONDEVMODE", "PYTHONFAULTHANDLER",
               "PYTHONTRACEMALLOC", "PYTHONPLATLIBDIR", "PYTHONNODEBUGRANGES", "PYTHONINTMAXSTRDIGITS")

# Children the supervisor waits for itself; `reap_orphans` leaves them alone.
_owned: Set[int] = set()
_owned_lock = threading.Lock()


def own(pid: int) -> None:
    with _owned_lock:
        _owned.add(pid)


def disown(pid: int) -> None:
    with _owned_lock:
        _owned.discard(pid)


def reap_orphans() -> None:
    """Reap exited children nobody waits for (what instances' subprocesses left behind)."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        with _owned_lock:
            if child.pid in _owned:
                continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def become_subreaper() -> bool:
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def forkable(function: Function, paths: Sequence[str] = (), who: Optional[RunAs] = None) -> bool:
    """Whether an instance of `function` can be a fork of the template: the same environment (a
    `python:` of another venv is not, though its binary is ours), no variable the interpreter
    reads only at start-up, and no package of its own that the template has imported already (a
    fork would keep the template's version; a new interpreter imports the function's)."""
    if function.python and interpreter_prefix(function.python, who) != (sys.prefix, sys.version):
        return False
    if any(key in _START_ONLY or key.startswith("LD_") for key in function.env):
        return False
    return not any(shadowed(path) for path in paths)


_prefixes: Dict[Tuple[str, int], Optional[Tuple[str, str]]] = {}


def interpreter_prefix(python: str, who: Optional[RunAs]) -> Optional[Tuple[str, str]]:
    """(sys.prefix, sys.version) of the interpreter `python`, asked once, as `who` (its venv's
    .pth files run as the function's user, not ours); None when it cannot be run."""
    uid = who.uid if who is not None else os.getuid()
    if (python, uid) not in _prefixes:
        try:
            lines = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix); print(sys.version)"],
                                   capture_output=True, text=True, timeout=30, cwd="/",
                                   env=base_environment(),
                                   **(who.popen() if who is not None else {})).stdout.splitlines()
            _prefixes[(python, uid)] = (lines[0], "\n".join(lines[1:])) if len(lines) >= 2 else None
        except (OSError, subprocess.SubprocessError):
            _prefixes[(python, uid)] = None
    return _prefixes[(python, uid)]


def shadowed(path: str) -> bool:
    """Whether the packages in `path` hold a top-level module this process has imported (the
    template imports a subset of ours: protobuf and the standard library's)."""
    return any(name in sys.modules for name in top_level_names(path))


def top_level_names(path: str) -> Set[str]:
    """The importable top-level names a `pip install --target` directory holds."""
    names = set()
    try:
        entries = os.listdir(path)
    except OSError:
        return names
    for entry in entries:
        if entry.endswith((".dist-info", ".egg-info", ".data")) or entry in ("bin", "__pycache__"):
            continue
        if os.path.isdir(os.path.join(path, entry)):
            names.add(entry)
        elif entry.endswith((".py", ".so", ".pyd")):
            names.add(entry.split(".", 1)[0])
    return names


class ForkedProcess:
    """What Instance needs of subprocess.Popen, for a child it did not start itself."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: Optional[int] = None
        self._lock = threading.Lock()
        own(pid)

    def poll(self) -> Optional[int]:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = self.pid, 0
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    disown(self.pid)
            return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        assert self.returncode is not None
        return self.returncode


class Template:
    """The template process, started on first use and again if it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self._control: Optional[socket.socket] = None
        self._resting_until = 0.0

    def start(self) -> None:
        """Start the template now rather than on the first spawn (it imports for ~0.1 s)."""
        with self._lock:
            self._ensure()

    def check(self) -> None:
        """Start the template again if it died (a spawn would too, but later, and slower)."""
        with self._lock:
            process = self._process
            if process is not None and process.poll() is not None:
                log.warning("the instance template %s; starting it again",
                            describe_exit(process.returncode))
                self._ensure()

    def _ensure(self) -> socket.socket:
        if self._control is not None and self._process is not None and self._process.poll() is None:
            return self._control
        self._close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "runtime_python.template", "--control-fd", str(theirs.fileno()),
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True,
                cwd="/", env=_template_environment(),
            )
        finally:
            theirs.close()
        own(self._process.pid)
        self._control = ours
        return ours

    def spawn(self, argv: List[str], fds: Sequence[int], name: str) -> int:
        """Fork an instance running the runtime with `argv`; its pid. Raises OSError when the
        template cannot (the caller starts the instance afresh instead)."""
        request = json.dumps({"argv": argv, "name": name}).encode("utf-8")
        with self._lock:
            if time.monotonic() < self._resting_until:
                raise OSError("the template failed moments ago")
            control = self._ensure()
            try:
                socket.send_fds(control, [request], list(fds))
                reply = self._reply(control)
            except OSError:
                # A template that cannot serve (it fails at import, say) is not tried again for a
                # while: each instance would pay its start-up and the log a warning.
                self._resting_until = time.monotonic() + _REST
                self._close()
                raise
        if "pid" not in reply:
            raise OSError(reply.get("error", "the template refused"))
        return int(reply["pid"])

    def _reply(self, control: socket.socket) -> dict:
        """The next message that is not the start-up greeting."""
        control.settimeout(_REPLY_TIMEOUT)
        while True:
            message = control.recv(65536)
            if not message:
                raise OSError("the template exited")
            reply = json.loads(message)
            if "ready" not in reply:
                return reply

    def _close(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control.close()
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
            disown(process.pid)

    def close(self) -> None:
        with self._lock:
            self._close()


def _template_environment() -> Dict[str, str]:
    """The instances' base (each fork then takes its own); the runtime found through PYTHONPATH."""
    return {**base_environment(), "PYTHONPATH": RUNTIME_ROOT}
