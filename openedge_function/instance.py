"""One instance: a runtime_python process with its gRPC server on a Unix socket, and our client.

The process side (spawn, wait for the runtime to load, signal, reap) blocks and runs in the data
plane's control threads; the stream side (`open`, `invoke`, `cancel`, `close_stream`) is grpc.aio
and runs on the data plane's loop. An instance is used only after it proved ready (its status
line, then a Ping over gRPC). Stopping escalates and always reaps: SIGTERM to the process group, a
grace period, SIGKILL, wait.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import grpc
import grpc.aio

from runtime_python._pb import function_pb2 as pb
from runtime_python._pb import function_pb2_grpc as pb_grpc
from runtime_python.output import MARK, SEPARATOR, Budget, truncation_marker
from runtime_python.server import KEY_HEADER

from .cgroups import Group
from .config import Function
from .environment import RUNTIME_ROOT, base_environment
from .errors import FunctionLoadError, InstanceCrashed
from .isolation import Sandbox
from .lifecycle import Lifecycle, State, describe_exit
from .template import ForkedProcess, Template, disown, forkable, own
from .watch import LineSplitter, Watcher

log = logging.getLogger(__name__)
output_log = logging.getLogger("openedge_function.handler")   # what handlers print

_SOCKETS = itertools.count(1)
# Keep-alive pings would only wake idle instances, and bandwidth probes cost a frame per message:
# the socket is local.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.http2.bdp_probe", 0),
]


# Threads of the runtime itself (main, lifeline, gRPC's), on top of what instance.pids allows a handler.
RUNTIME_TASKS = 16


class StreamBroken(Exception):
    """The instance's stream ended during an invocation: the process died, or `cancel()`."""


def instance_environment(function: Function, instance_id: str) -> Dict[str, str]:
    """The function's env over the base; the daemon's own environment never reaches an instance."""
    env = base_environment()
    if function.python:
        env["PYTHONPATH"] = RUNTIME_ROOT
    env.update(function.env)
    env["OPENEDGE_FUNCTION_NAME"] = function.name
    env["OPENEDGE_FUNCTION_INSTANCE_ID"] = instance_id
    return env


def function_spec(function: Function) -> Dict[str, Any]:
    """What the runtime's context reports of the function; sent over the status socket, never argv."""
    limits = function.instance
    cpus = limits.cpu_share or (len(limits.cpus) if limits.cpus else os.cpu_count() or 1)
    return {
        "name": function.name, "handler": function.handler, "initializer": function.initializer,
        "event": function.event, "log_max": function.log_max,
        "timeout_ms": int(limits.timeout * 1000), "memory_mb": limits.memory >> 20,
        "cpu_millicores": int(cpus * 1000),
        "version": function.version, "alias": function.alias, "package": function.package,
        "region": function.region, "account_id": function.account_id,
        "credentials": dataclasses.asdict(function.credentials),
        "service": dataclasses.asdict(function.service),
    }


class Instance:
    """A runtime process and the gRPC client that talks to it; one invocation at a time."""

    def __init__(self, function: Function, seq: int, sandbox: Union[str, Sandbox], watcher: Watcher,
                 on_lost: Callable[["Instance"], None], template: Optional[Template] = None,
                 paths: Tuple[str, ...] = ()) -> None:
        self.function = function
        self._template = template
        self.paths = paths   # the function's own packages: after its code directory on sys.path
        self.id = f"{function.name}-{seq}"
        self.lifecycle = Lifecycle()
        # A directory alone (tests): the instance runs as the daemon's user, without cgroups.
        self.sandbox = sandbox if isinstance(sandbox, Sandbox) else Sandbox.make(sandbox, function)
        # Socket and control group names are unique across every pool of the daemon: a function
        # replaced on reload numbers its instances from 1 again while the old ones finish.
        self._serial = next(_SOCKETS)
        self.socket_path = os.path.join(self.sandbox.path, f"{self._serial}.sock")
        self.cgroup: Optional[Group] = None
        self._key = secrets.token_hex(16)   # the instance serves only calls that carry it
        self._status_out: Optional[socket.socket] = None   # our end of its status socket, for replies
        self._status_lock = threading.Lock()
        self.on_call: Optional[Callable[[Dict[str, Any], Callable[[Dict[str, Any]], None]], None]] = None
        self._metadata = ((KEY_HEADER, self._key),)
        self.process: Any = None   # a subprocess.Popen or a ForkedProcess
        self.lost = threading.Event()          # its status socket closed: the process is going
        self.memory_exceeded: Optional[int] = None   # RSS that got it killed
        self._watcher = watcher
        self._on_lost = on_lost
        self._ready = threading.Event()
        self._loaded = threading.Event()
        self.request_id = ""   # the invocation in progress, for output the runtime did not mark
        # What subprocesses print (the runtime cannot mark or count it) has the same budget per
        # invocation as the handler's own output.
        self._unmarked = Budget(function.log_max)
        self._load_error: Optional[Dict[str, Any]] = None
        self._channel: Optional[grpc.aio.Channel] = None
        self._call: Any = None     # the Session stream
        self.deadline = 0.0            # when the invocation in progress runs out of time
        self.timed_out = False

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    # -- starting ---------------------------------------------------------------------------

    def start(self, ready_timeout: float) -> None:
        """Spawn the runtime and wait until it has loaded the handler and serves (blocking).
        Raises FunctionLoadError or InstanceCrashed."""
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
        try:
            ours.sendall(json.dumps(self._spec(env)).encode("utf-8") + b"\n")
        except OSError:
            pass   # it died already: the status socket's end-of-file says so below
        self._status_out = socket.socket(fileno=os.dup(ours.fileno()))
        # From here on the watcher owns these descriptors and closes them at end-of-file.
        status = LineSplitter(self._on_status_line)
        self._watcher.add(ours.detach(), lambda chunk: self._on_status(status, chunk))
        self._watcher.add(out_r, LineSplitter(lambda line: self._on_output(line, logging.INFO)).feed)
        self._watcher.add(err_r, LineSplitter(lambda line: self._on_output(line, logging.WARNING)).feed)

        if not self._loaded.wait(ready_timeout):
            self.kill()
            raise InstanceCrashed(f"instance {self.id} did not load its handler within {ready_timeout:g}s")
        if fn.initializer and not self._ready.is_set():
            budget = fn.initializer_timeout or fn.instance.timeout
            if not self._ready.wait(budget):
                self.kill()
                raise FunctionLoadError(f"initializer {fn.initializer} did not finish within {budget:g}s "
                                        "(initializer.timeout)")
        if self._load_error is not None:
            self._end(None, 2.0)   # it is exiting with its own status; don't cut that short
            raise FunctionLoadError(self._load_error.get("message", "cannot load the handler"),
                                    self._load_error.get("stackTrace", []))
        if self.lost.is_set():
            self.kill()
            raise InstanceCrashed(f"instance {self.id} {describe_exit(self.process.returncode)} "
                                  "during start-up")

    # -- the stream (on the data plane's loop) -------------------------------------------------

    async def open(self, ready_timeout: float) -> None:
        """Connect, check that the runtime answers, and open the instance's one stream.
        Raises InstanceCrashed; the caller then stops the process."""
        self._channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}", options=_CHANNEL_OPTIONS)
        stub = pb_grpc.FunctionStub(self._channel)
        try:
            await stub.Ping(pb.PingRequest(), timeout=max(5.0, ready_timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise InstanceCrashed(f"instance {self.id} does not answer: {exc.code().name}") from None
        # One stream for the instance's life: a message costs a write and a read, not a call.
        self._call = stub.Session(metadata=self._metadata)
        self.lifecycle.to(State.IDLE)

    async def invoke(self, batch: Any) -> Any:
        """Run the invocations of an InvokeBatch, one after the other, over the instance's
        stream; their responses in order. Raises StreamBroken."""
        call = self._call
        if call is None:
            raise StreamBroken(f"instance {self.id} has no stream")
        try:
            await call.write(batch)
            result = await call.read()
        except (Exception, asyncio.CancelledError) as exc:   # AioRpcError; CancelledError after cancel()
            raise StreamBroken(str(exc) or type(exc).__name__) from None
        if result is grpc.aio.EOF:
            raise StreamBroken(f"instance {self.id} ended its stream")
        return result.responses

    def cancel(self) -> None:
        """End the stream: the invocation waiting on it raises at once."""
        if self._call is not None:
            self._call.cancel()

    async def close_stream(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def _spec(self, env: Dict[str, str]) -> Dict[str, Any]:
        """What the runtime reads first from its status socket: what it runs, as whom, within
        which limits, and what its context reports."""
        fn, who, limits = self.function, self.sandbox.who, self.function.instance
        grouped = self.cgroup is not None
        return {"spec": {
            **function_spec(fn), "key": self._key, "paths": list(self.paths),
            "start": {"function": fn.name, "handler": fn.handler, "initializer": fn.initializer,
                      "codedir": fn.codedir, "socket": self.socket_path, "instance_id": self.id,
                      "timeout_ms": int(limits.timeout * 1000)},
            "process": {
                "uid": who.uid, "gid": who.gid, "user": who.name, "env": env,
                "files": limits.files,
                # Without a group, rlimits stand in: processes of the user (all its instances)...
                "nproc": (limits.pids + RUNTIME_TASKS) * limits.max if not grouped and who.switches else 0,
                # ... and address space, a coarse stand-in for memory (polling still applies).
                "address_space": limits.memory if not grouped else 0,
            },
        }}

    def _spawn(self, argv: List[str], env: Dict[str, str], status_fd: int, out_fd: int,
               err_fd: int) -> Any:
        """A fork of the template when the function allows it, else a fresh interpreter (as the
        function's user from its first instruction)."""
        fn, who = self.function, self.sandbox.who
        if self._template is not None and forkable(fn, self.paths, who):
            try:
                pid = self._template.spawn(argv, (status_fd, out_fd, err_fd), self.id)
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

    def _on_status(self, lines: LineSplitter, chunk: bytes) -> None:
        lines.feed(chunk)
        if not chunk:
            self.lost.set()
            self._loaded.set()
            self._ready.set()
            self._on_lost(self)

    def _on_status_line(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("instance %s: unreadable status line %r", self.id, line)
            return
        if "call" in message:   # context.invoke: another function, run for this one
            if self.on_call is not None:
                self.on_call(message, self._reply)
            return
        if "load_error" in message:
            self._load_error = message["load_error"]
        self._loaded.set()
        if "loaded" not in message:
            self._ready.set()

    def _reply(self, message: Dict[str, Any]) -> None:
        """Answer a call on the status socket (blocking; from a control thread)."""
        data = json.dumps(message).encode("utf-8") + b"\n"
        with self._status_lock:
            if self._status_out is not None:
                try:
                    self._status_out.sendall(data)
                except OSError:
                    pass   # the instance is gone; so is its caller

    def _on_output(self, line: str, level: int) -> None:
        if line.startswith(MARK):
            request_id, _, line = line[1:].partition(SEPARATOR)
        else:   # written by a subprocess: it belongs to the invocation in progress
            request_id = self.request_id
            line = self._within_budget(request_id, line)
            if line is None:
                return
        output_log.log(level, "function=%s instance=%s request=%s: %s", self.function.name, self.id,
                       request_id or "-", line)

    def _within_budget(self, request_id: str, line: str) -> Optional[str]:
        """What of an unmarked line fits in its invocation's output budget (log.max), the marker
        line once it is spent, then None."""
        budget = self._unmarked
        if budget.request_id != request_id:
            budget.start(request_id)
        if budget.truncated:
            return None
        size = len(line.encode("utf-8", "replace")) + 1
        if size <= budget.left:
            budget.left -= size
            return line
        budget.truncated = True
        return truncation_marker(budget.limit)

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
        with self._status_lock:
            status, self._status_out = self._status_out, None
        if status is not None:
            status.close()
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
