"""One function instance: load the handler, serve the supervisor on a Unix socket, one call at a time.

Start-up talks to the supervisor over the status socket (an inherited file descriptor, JSON lines):
the supervisor first sends the function's spec (what the context reports: memory, timeout,
credentials, ... kept out of argv, which anyone on the machine can read); the runtime answers
`{"loaded": pid}` once the handler imported, `{"ready": pid}` once the initializer ran and the
server accepts calls, or `{"load_error": {...}}` before exiting with EXIT_LOAD_ERROR when the
handler or initializer cannot be loaded. The same socket is the
instance's lifeline: when the supervisor goes away it reads end-of-file, and the instance kills its
own process group, so no instance outlives the daemon, even one that was SIGKILLed.
"""
from __future__ import annotations

import argparse
import hmac
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from runtime_python import channel, codec, wsgi
from runtime_python import confine as confine_module
from runtime_python.channel import Channel
from runtime_python.confine import close_other_files, confine, prctl, take_environment
from runtime_python.context import context_class
from runtime_python.loader import LoadError, check_call, load, user_frames
from runtime_python.output import Budget, LineWriter
from runtime_python.wire import EXIT_LOAD_ERROR, LENGTH, LOAD_ERROR, LOADED, READY, SPEC, SocketFrames

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# Signals whose default action dumps core. Sent to the whole process (`os.kill(os.getpid(), ...)`)
# Linux gives one to the main thread and lets the sender run on, so a handler could still answer
# before the process dies. Blocked everywhere but in the thread running the handler, they always
# land on that thread, at once, as a real fault does.
_FATAL = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
          signal.SIGQUIT, signal.SIGTRAP, signal.SIGSYS}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="runtime_python", description=__doc__)
    # Under a supervisor these come in the spec, not on the command line anyone can read.
    parser.add_argument("--function", help="the function's name")
    parser.add_argument("--handler", help="module.function inside codedir")
    parser.add_argument("--initializer", help="module.function run once, before the first call")
    parser.add_argument("--codedir")
    parser.add_argument("--socket", help="Unix socket path to serve on")
    parser.add_argument("--instance-id", default="")
    parser.add_argument("--status-fd", type=int, help="inherited socket to the supervisor")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid")
    parser.add_argument("--timeout-ms", type=int, default=30000)
    parser.add_argument("--forked", action="store_true", help="a fork of the template (still root)")
    parser.add_argument("--check", action="store_true",
                        help="load the handler and initializer, check how they are called, run nothing")
    parser.add_argument("--kind", default="event", help="the function's type: event or http")
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def _start_arguments(args: argparse.Namespace, start: Dict[str, Any]) -> None:
    """The spec's start arguments over the command line's; the required ones must be there."""
    for key, value in start.items():
        if value is not None:
            setattr(args, key, value)
    missing = [f"--{name}" for name in ("function", "handler", "codedir", "socket")
               if not getattr(args, name)]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")


class Runtime:
    """The loaded handler and what it needs to run one invocation."""

    def __init__(self, args: argparse.Namespace, spec: Dict[str, Any], handler: Callable,
                 budget: Budget) -> None:
        self.key = spec.get("key", "")   # what the supervisor's calls carry; no one else has it
        self.instance_id = args.instance_id
        self.codedir = args.codedir
        self.handler = handler
        self.context = context_class(spec)
        self.raw_events = spec.get("event") == "raw"
        self.budget = budget

    def invoke(self, request: Any, pb: Any) -> Any:
        """Run the handler on one request; return an InvokeResponse. Never raises: a fault in
        building the answer (a lone surrogate in a user property, say) answers this request
        alone, where a raise would break the stream and take its batch mates down with it."""
        started = time.monotonic()
        try:
            response = self._run(request, pb, started)
        except Exception as exc:
            response = pb.InvokeResponse(kind=pb.InvokeResponse.ERROR, error_type="ResultEncodingError",
                                         error_message=_text(f"the outcome cannot be sent: {type(exc).__name__}: {_message(exc)}"))
        response.duration_us = int((time.monotonic() - started) * 1e6)
        response.max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return response

    def _run(self, request: Any, pb: Any, started: float) -> Any:
        self.budget.start(request.request_id)
        context = self.context(request.request_id, self.instance_id, request.topic, request.qos,
                               request.timestamp_ms, started + request.timeout_ms / 1000)
        if request.content_type:
            context.content_type = context["contentType"] = request.content_type
        context["userProperties"] = {p.name: p.value for p in request.user_properties}
        if request.call_chain:
            context.call_chain = tuple(request.call_chain)
        http = request.http if request.HasField("http") else None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FATAL)
        try:
            if http is None:
                event = request.payload if self.raw_events else codec.decode_event(request.payload)
                result = self.handler(event, context)
            else:
                status, headers, body = wsgi.call(self.handler, http, request.payload, context)
                result = pb.HttpResponse(status=status, body=body,
                                         headers=[pb.Header(name=k, value=v) for k, v in headers])
        except SystemExit as exc:
            # A handler that exits ends its instance, as a process exit would.
            flush_output()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException as exc:
            response = pb.InvokeResponse(kind=pb.InvokeResponse.ERROR, error_type=type(exc).__name__,
                                         error_message=_text(_message(exc)),
                                         stack_trace=[_text(line) for line in user_frames(exc, self.codedir)])
        else:
            try:
                if http is not None:
                    response = pb.InvokeResponse(kind=pb.InvokeResponse.NONE, http=result)
                else:
                    kind, payload = codec.encode_result(result)
                    response = pb.InvokeResponse(kind=kind, payload=payload)
            except (TypeError, ValueError, RecursionError) as exc:
                response = pb.InvokeResponse(kind=pb.InvokeResponse.ERROR,
                                             error_type="ResultEncodingError",
                                             error_message=_text(f"the result cannot be encoded: {_message(exc)}"))
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
        flush_output()
        if context.output_properties:
            response.user_properties.extend(pb.Header(name=k, value=v) for k, v in context.output_properties)
        return response


def _message(exc: BaseException) -> str:
    """str(exc), even when the exception's own __str__ raises."""
    try:
        return str(exc)
    except Exception as inner:
        return f"<{type(exc).__name__}.__str__ raised {type(inner).__name__}>"


def _text(value: str) -> str:
    """`value` as a protobuf string can carry it: lone surrogates (a JSON "\\ud800" decodes to
    one) are written as escapes."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def watch_parent(status: Optional[Channel], parent_pid: Optional[int]) -> None:
    """Die with the supervisor: PR_SET_PDEATHSIG, and end-of-file on the status channel."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)   # the supervisor died before the signal was armed
    if status is None:
        return

    def gone() -> None:
        # The supervisor is gone: take the whole process group down, handler subprocesses too.
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=status.serve, args=(gone,), name="lifeline", daemon=True).start()


def report(status: Optional[Channel], message: dict) -> None:
    if status is not None:
        status.send(message)


def load_failed(status: Optional[Channel], exc: LoadError) -> int:
    """Say why the handler cannot run (to the supervisor, else on stderr); the exit status."""
    if status is None:
        sys.__stderr__.write(exc.message + "\n")
    report(status, {LOAD_ERROR: {"message": exc.message, "stackTrace": exc.stack_trace}})
    flush_output()
    return EXIT_LOAD_ERROR


def read_spec(status: Optional[Channel]) -> Dict[str, Any]:
    """The first line the supervisor sends: what the context reports of the function."""
    if status is None:
        return {}
    try:
        message = status.read_message()
    except OSError:
        message = None
    if message is None:
        os._exit(1)   # the supervisor is gone already
    return message.get(SPEC, {})


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Before any thread starts, so that every thread inherits the mask (see _FATAL).
    signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
    status = None
    if args.status_fd is not None:
        sock = socket.socket(fileno=args.status_fd)
        sock.set_inheritable(False)   # handler subprocesses must not hold the lifeline
        status = Channel(sock)
        channel.install(status)     # context.invoke asks the supervisor over it
    spec = read_spec(status)
    if status is not None:
        status.call_max = int(spec.pop("call_max", status.call_max))
    _start_arguments(args, spec.pop("start", {}))
    process = spec.pop("process", {})
    if args.forked:
        prctl(PR_SET_NAME, args.instance_id[:15].encode("utf-8") or b"oef-instance")   # a spare no more
        close_other_files([0, 1, 2] + ([status.fileno()] if status is not None else []))
        take_environment(process.get("env", {}))
    codedir = os.path.abspath(args.codedir)
    args.codedir = codedir
    try:
        confine(process, codedir, [os.path.dirname(args.socket),
                                   os.environ.get("TMPDIR", ""), os.environ.get("HOME", ""),
                                   *spec.get("paths", [])])
    except LoadError as exc:
        return load_failed(status, exc)
    spec.setdefault("name", args.function)
    spec.setdefault("handler", args.handler)
    spec.setdefault("timeout_ms", args.timeout_ms)
    watch_parent(status, args.parent_pid)
    # What the handler prints reaches the daemon's log line by line, marked with the request id.
    budget = Budget(int(spec.get("log_max", 4096)))
    sys.stdout = LineWriter(1, budget, "<stdout>")
    sys.stderr = LineWriter(2, budget, "<stderr>")

    # The code directory first, then the function's own packages (requirements.txt), then ours.
    sys.path[0:0] = [codedir] + [path for path in spec.pop("paths", []) if path not in sys.path]
    try:
        if not args.forked:
            needs_runtime_packages()
        handler = load(args.handler, codedir, "handler")
        if args.check:   # a check of what would run: loaded and callable as called, nothing run
            check_call(handler, args.handler, codedir, "handler",
                       "environ, start_response" if args.kind == "http" else "event, context")
            if args.initializer:
                check_call(load(args.initializer, codedir, "initializer"), args.initializer, codedir,
                           "initializer", "context")
            report(status, {LOADED: os.getpid()})
            report(status, {READY: os.getpid(), "tmp": confine_module.tmp_status})
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            signal.sigwait({signal.SIGTERM, signal.SIGINT})   # the supervisor ends it when it has read
            return 0
        if args.initializer:
            initializer = load(args.initializer, codedir, "initializer")
            report(status, {LOADED: os.getpid()})
            request_id = str(uuid.uuid4())
            budget.start(request_id)
            context = context_class(spec)(request_id, args.instance_id)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FATAL)
            try:
                initializer(context)
            except BaseException as exc:
                raise LoadError(f"initializer {args.initializer} raised {type(exc).__name__}: {exc}",
                                user_frames(exc, codedir)) from None
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
                flush_output()
    except LoadError as exc:
        return load_failed(status, exc)

    try:
        return serve(Runtime(args, spec, handler, budget), args.socket,
                     lambda: report(status, {READY: os.getpid(), "tmp": confine_module.tmp_status}))
    except ImportError as exc:   # a pinned protobuf the runtime cannot work with
        return load_failed(status, LoadError(
            f"the runtime cannot import what it needs under {sys.executable}: {exc}", []))


# What the runtime itself imports, by distribution name: an interpreter given as `python:` needs them.
_RUNTIME_PACKAGES = (("google.protobuf", "protobuf"),)


def needs_runtime_packages() -> None:
    """Raise LoadError naming what this interpreter lacks of the runtime's own packages."""
    import importlib.util
    missing = []
    for module, distribution in _RUNTIME_PACKAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:   # google is not even a package here
            found = False
        if not found:
            missing.append(distribution)
    if missing:
        raise LoadError(f"{sys.executable} lacks {' and '.join(missing)}, which the runtime needs: "
                        f"install into it what it lacks ({sys.executable} -m pip install {' '.join(missing)})", [])


class _Stop(BaseException):
    """SIGTERM or SIGINT while no call runs: the instance ends."""


_HELLO_WAIT = 2.0   # seconds a connection has to say its key before it is closed


def serve(runtime: Runtime, path: str, on_ready: Callable[[], None]) -> int:
    """Serve the supervisor on the Unix socket `path` until SIGTERM or SIGINT; 0.

    The main thread reads a batch, runs the handler on each of its invocations, writes the
    results, and reads again: a message wakes this one thread, and nothing else runs (wire.py
    has the framing). A thread at the door takes new connections and admits the one that says
    the key. A signal that comes during a call ends the instance once the call's results are
    written; the supervisor escalates to SIGKILL if that takes too long."""
    from runtime_python._pb import function_pb2 as pb

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    hello = pb.PingResponse(pid=os.getpid()).SerializeToString()
    admitted: "queue.Queue[Tuple[socket.socket, SocketFrames]]" = queue.Queue()
    threading.Thread(target=_door, args=(listener, runtime.key.encode(), hello, admitted), name="door",
                     daemon=True).start()
    state = {"busy": False, "stopping": False}

    def on_term(signum: int, frame: Any) -> None:
        state["stopping"] = True
        if not state["busy"]:
            raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    on_ready()
    invoke, InvokeBatch, ResultBatch = runtime.invoke, pb.InvokeBatch, pb.ResultBatch
    try:
        while True:
            conn, frames = admitted.get()
            with conn:
                while True:
                    data = frames.read()
                    if data is None:
                        break   # the supervisor closed the stream; it may open another
                    state["busy"] = True
                    batch = InvokeBatch.FromString(data)
                    out = ResultBatch(responses=[invoke(request, pb) for request in batch.requests])
                    data = out.SerializeToString()
                    conn.sendall(LENGTH.pack(len(data)) + data)
                    state["busy"] = False
                    if state["stopping"]:
                        raise _Stop
    except _Stop:
        pass
    except OSError:   # the stream broke under a write: the supervisor is going or gone
        pass
    state["busy"] = True   # a second signal only says so again
    flush_output()
    return 0


def _door(listener: socket.socket, key: bytes, hello: bytes,
          admitted: "queue.Queue[Tuple[socket.socket, SocketFrames]]") -> None:
    """Take each connection; admit one that opens with the key (only the supervisor holds it),
    answered with `hello`; close any other unanswered."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            conn.settimeout(_HELLO_WAIT)
            frames = SocketFrames(conn)
            given = frames.read(limit=256)
            if given is not None and (not key or hmac.compare_digest(given, key)):
                conn.settimeout(None)
                conn.sendall(LENGTH.pack(len(hello)) + hello)
                admitted.put((conn, frames))
                continue
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
