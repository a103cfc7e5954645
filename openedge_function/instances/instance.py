"""One instance: a runtime_python process serving the supervisor on a Unix socket.

The process side (spawn, wait for the runtime to load, signal, reap) blocks and runs in the data
plane's control threads; the stream (stream.py) runs on the data plane's loop. An instance is used
only after it proved ready (its status socket says so, then it answers the key on its own socket).
Stopping escalates and always reaps: SIGTERM to the process group, a grace period, SIGKILL, wait.

What else an instance has is in modules of its own: its status socket (status.py), its output
pipes (output.py), its spec and environment (environment.py), its state machine (lifecycle.py).
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from runtime_python.wire import SPARE_NAME, frame_max

from ..config import Function
from ..errors import FunctionLoadError, InstanceCrashed
from ..isolation import Group, Sandbox
from .environment import RUNTIME_TASKS, instance_environment, start_spec
from .fdwatch import FdWatcher
from .lifecycle import Lifecycle, State, describe_exit
from .output import HandlerOutput
from .status import OnCall, StatusSocket
from .stream import Stream, StreamBroken
from .template import ForkedProcess, Template, disown, forkable, own

__all__ = ["Instance", "StreamBroken"]

log = logging.getLogger("openedge_function.instance")

_SOCKETS = itertools.count(1)


class Instance:
    """A runtime process and the stream that talks to it; one invocation at a time."""

    def __init__(self, function: Function, seq: int, sandbox: Sandbox, fdwatch: FdWatcher,
                 on_lost: Callable[["Instance"], None], template: Optional[Template] = None,
                 paths: Tuple[str, ...] = (), on_call: Optional[OnCall] = None,
                 call_max: int = 4 << 20) -> None:
        self.function = function
        self._template = template
        self.paths = paths   # the function's own packages: after its code directory on sys.path
        self.id = f"{function.name}-{seq}"
        self.lifecycle = Lifecycle()
        self.sandbox = sandbox
        # Socket and control group names are unique across every pool of the daemon: a function
        # replaced on reload numbers its instances from 1 again while the old ones finish.
        self._serial = next(_SOCKETS)
        self.socket_path = os.path.join(sandbox.path, f"{self._serial}.sock")
        self.cgroup: Optional[Group] = None
        self._key = secrets.token_hex(16)   # the instance serves only calls that carry it
        self._call_max = call_max   # the largest body of a call it makes (context.invoke)
        self.status = StatusSocket(self.id, on_call, lambda: on_lost(self), self, frame_max(call_max))
        self.output = HandlerOutput(function.name, self.id, function.log_max)
        self._fdwatch = fdwatch
        self.stream = Stream(self.id, self.socket_path, self._key)
        self.process: Any = None   # a subprocess.Popen or a ForkedProcess
        self.memory_exceeded: Optional[int] = None   # RSS that got it killed
        self.deadline = 0.0            # when the invocation in progress runs out of time
        self.running: Sequence[Any] = ()   # the invocations in progress (a batch), for its calls
        self.timed_out = False
        self.started_at = 0.0   # when start() began (seconds since the epoch)
        self.check = False      # only load the handler, run nothing (deploy/check.py)
        self._prepared: Optional[Tuple[socket.socket, int, int, Any]] = None   # prepare()'s, for start()
        self._name = self.id    # its process name (comm), a fork of the template's

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    @property
    def lost(self) -> Any:
        """Set once its status socket closed: the process is going."""
        return self.status.lost

    # -- starting ---------------------------------------------------------------------------

    def start(self, ready_timeout: float) -> None:
        """Spawn the runtime (unless `prepare()` did) and wait until it has loaded the handler and
        serves (blocking). Raises FunctionLoadError or InstanceCrashed."""
        self.started_at = time.time()   # what it loads is the code as it was from then on
        self.prepare()
        assert self._prepared is not None
        (ours, out_r, err_r, env), self._prepared = self._prepared, None
        fn = self.function
        # From here on the fd watcher owns these descriptors and closes them at end-of-file.
        self.status.attach(ours, self._fdwatch, start_spec(
            fn, self.id, self.sandbox.who, env, self._key, self.paths, self.socket_path,
            self.cgroup is not None, self._call_max, self.check))
        self.output.attach(self._fdwatch, out_r, err_r)
        self._wait_ready(ready_timeout)

    def forks(self) -> bool:
        """Whether it will be a fork of the template (else a new interpreter)."""
        return self._template is not None and forkable(self.function, self.paths, self.sandbox.who)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def prepare(self, spare: bool = False) -> bool:
        """Spawn the runtime and put it in its control group, where it waits for its spec: what
        `start()` does before the function's code is involved. A pool prepares its `spare` ahead
        of need, so that the fork and the kernel's wait on a move into a memory group are paid
        before a message waits on them (a spare is named SPARE_NAME until it starts). Only a fork
        of the template is made spare (a new interpreter would hold all its memory while it
        waits): False, and nothing spawned, for a spare that would not be one. Blocking (whether
        it forks may ask the function's interpreter); raises FunctionLoadError or InstanceCrashed."""
        if self._prepared is not None:
            return True
        if spare and not self.forks():
            return False
        self._name = SPARE_NAME if spare else self.id
        fn, sandbox = self.function, self.sandbox
        limits = fn.instance
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        # Names only, so that `ps` tells instances apart; the rest travels in the spec.
        argv = ["--function", fn.name, "--instance-id", self.id, "--status-fd", str(theirs.fileno()),
                "--parent-pid", str(os.getpid())]
        env = instance_environment(fn, self.id)
        for key in ("TMPDIR", "HOME"):
            if key not in fn.env:
                env[key] = sandbox.tmp
        if sandbox.cgroups is not None:
            try:
                self.cgroup = sandbox.cgroups.group(f"{self.id}.{self._serial}", limits.memory,
                                                    limits.pids + RUNTIME_TASKS, limits.cpu_share)
            except OSError as exc:
                log.warning("instance %s: cannot make its control group (%s); it runs without",
                            self.id, exc)
        try:
            self.process = self._spawn(argv, env, theirs.fileno(), out_w, err_w)
            if self.cgroup is not None:
                self.cgroup.add(self.process.pid)   # before it reads its spec: no handler code yet
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            ours.close()
            if self.process is not None:
                self._end(None, 0.0)
            self.lifecycle.to(State.EXITED)
            self._remove_cgroup()
            python = fn.python or sys.executable
            if isinstance(exc, PermissionError) and sandbox.who.switches:
                raise FunctionLoadError(f"{python} cannot be run by {sandbox.who}: {exc.strerror}; "
                                        "install Python where the function's user can run it") from None
            raise InstanceCrashed(f"instance {self.id}: cannot start {python}: {exc}") from None
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        log.debug("instance %s: started pid %s (%s)", self.id, self.process.pid,
                  "a fork of the template" if isinstance(self.process, ForkedProcess) else "a new interpreter")
        if limits.cpus:
            try:
                os.sched_setaffinity(self.process.pid, limits.cpus)
            except OSError as exc:
                log.warning("instance %s: cannot pin to CPUs %s: %s", self.id, limits.cpus, exc)
        self._prepared = (ours, out_r, err_r, env)
        return True

    def discard(self) -> None:
        """End a prepared instance that was never started (blocking)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared[0].close()
            for fd in prepared[1:3]:
                os.close(fd)
        self.kill()

    def _wait_ready(self, ready_timeout: float) -> None:
        fn, status = self.function, self.status
        if not status.loaded.wait(ready_timeout):
            self.kill()
            raise InstanceCrashed(f"instance {self.id} did not load its handler within {ready_timeout:g}s")
        if fn.initializer and not status.ready.is_set():
            budget = fn.initializer_timeout or fn.instance.timeout
            if not status.ready.wait(budget):
                self.kill()
                raise FunctionLoadError(f"initializer {fn.initializer} did not finish within {budget:g}s "
                                        "(initializer.timeout)")
        if status.load_error is not None:
            self._end(None, 2.0)   # it is exiting with its own status; don't cut that short
            raise FunctionLoadError(status.load_error.get("message", "cannot load the handler"),
                                    status.load_error.get("stackTrace", []))
        if status.lost.is_set():
            self.kill()
            raise InstanceCrashed(f"instance {self.id} {describe_exit(self.process.returncode)} "
                                  "during start-up")
        self.sandbox.note_tmp(fn.name, status.tmp)

    def _spawn(self, argv: List[str], env: Any, status_fd: int, out_fd: int, err_fd: int) -> Any:
        """A fork of the template when the function allows it, else a fresh interpreter (as the
        function's user from its first instruction)."""
        fn, who = self.function, self.sandbox.who
        if self.forks():
            try:
                pid = self._template.spawn(argv, (status_fd, out_fd, err_fd), self._name)
                return ForkedProcess(pid, argv)
            except (OSError, ValueError) as exc:
                log.warning("instance %s: the template cannot fork it (%s); starting a new "
                            "interpreter", self.id, exc)
        process = subprocess.Popen(
            [fn.python or sys.executable, "-m", "runtime_python"] + argv, cwd="/", env=env,
            stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
            pass_fds=(status_fd,), start_new_session=True, **who.popen(),
        )
        own(process.pid)
        return process

    # -- the stream (on the data plane's loop) -------------------------------------------------

    async def open(self, ready_timeout: float) -> None:
        """Prove that the runtime answers and open the instance's one stream; it is then IDLE.
        Raises InstanceCrashed; the caller then stops the process."""
        await self.stream.open(ready_timeout)
        self.lifecycle.to(State.IDLE)

    async def invoke(self, batch: Any) -> Any:
        """The responses to an InvokeBatch, in order. Raises StreamBroken."""
        return await self.stream.invoke(batch)

    def cancel(self) -> None:
        """End the stream: the invocation waiting on it raises StreamBroken at once."""
        self.stream.cancel()

    async def close_stream(self) -> None:
        await self.stream.close()

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, wait up to `grace`, then SIGKILL; always reap."""
        self._end(signal.SIGTERM, grace)

    def kill(self) -> None:
        """SIGKILL the process group (handler subprocesses too) and reap."""
        self._end(None, 0.0)

    def _end(self, first: Optional[int], grace: float) -> None:
        """Send `first` to the group, give it `grace` seconds, SIGKILL what is left, reap."""
        if self.state is not State.EXITED:
            self.lifecycle.to(State.STOPPING)
        proc = self.process
        if proc is not None and proc.returncode is None:
            if first is not None:
                self._signal_group(first)
            if grace > 0 and not self._exited_within(grace):
                log.warning("instance %s: still running %gs after %s, killing it", self.id, grace,
                            signal.Signals(first).name if first else "its load failure")
            # The leader is not reaped yet, so its pid still names our group, not a stranger's.
            self._signal_group(signal.SIGKILL)
            proc.wait()
        if proc is not None:
            disown(proc.pid)
        self.status.close()
        self._remove_cgroup()
        self.lifecycle.to(State.EXITED)

    def _remove_cgroup(self) -> None:
        """Kill what is left in the group (a subprocess that left the process group) and remove it."""
        group, self.cgroup = self.cgroup, None
        if group is not None:
            group.remove()

    def oom_peak(self) -> Optional[int]:
        """The group's peak memory if the kernel killed in it for memory, else None; it then also
        counts as memory_exceeded."""
        group = self.cgroup
        if self.memory_exceeded is None and group is not None and group.memory and group.oom_kills():
            self.memory_exceeded = group.peak() or group.memory
        return self.memory_exceeded

    def _exited_within(self, seconds: float) -> bool:
        """Wait for the process to exit without reaping it (its group id stays ours)."""
        assert self.process is not None
        deadline = time.monotonic() + seconds
        while True:
            try:
                if os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG):
                    return True
            except ChildProcessError:
                return True   # already reaped
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def signal_kill(self) -> None:
        """SIGKILL the process group without reaping (from any thread); the worker reaps it."""
        proc = self.process
        if proc is not None and proc.returncode is None:
            self._signal_group(signal.SIGKILL)

    def exit_description(self, wait: float = 1.0) -> str:
        """How the process ended, waiting up to `wait` for it to be gone."""
        if self.process is None:
            return "never started"
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        return describe_exit(self.process.returncode)
