"""One function instance: load the handler, serve gRPC on a Unix socket, answer one call at a time.

Start-up talks to the supervisor over the status socket (an inherited file descriptor): one JSON
line, `{"ready": pid}` once the server accepts calls, or `{"load_error": {...}}` before exiting with
EXIT_LOAD_ERROR when the handler or initializer cannot be loaded. The same socket is the
instance's lifeline: when the supervisor goes away it reads end-of-file, and the instance kills its
own process group, so no instance outlives the daemon, even one that was SIGKILLed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Any, Callable, List, Optional

from runtime_python import codec
from runtime_python.context import Context
from runtime_python.loader import LoadError, load, user_frames

EXIT_LOAD_ERROR = 4
_PR_SET_PDEATHSIG = 1
# Signals whose default action dumps core. Sent to the whole process (`os.kill(os.getpid(), ...)`)
# Linux gives one to the main thread and lets the sender run on, so a handler could still answer
# before the process dies. Blocked everywhere but in the thread running the handler, they always
# land on that thread, at once, as a real fault does.
_FATAL = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
          signal.SIGQUIT, signal.SIGTRAP, signal.SIGSYS}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="runtime_python", description=__doc__)
    parser.add_argument("--function", required=True, help="the function's name")
    parser.add_argument("--handler", required=True, help="module.function inside codedir")
    parser.add_argument("--initializer", help="module.function run once, before the first call")
    parser.add_argument("--codedir", required=True)
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--instance-id", default="")
    parser.add_argument("--status-fd", type=int, help="inherited socket to the supervisor")
    parser.add_argument("--parent-pid", type=int, help="the supervisor's pid")
    parser.add_argument("--timeout-ms", type=int, default=30000)
    return parser.parse_args(argv)


class Runtime:
    """The loaded handler and what it needs to run one invocation."""

    def __init__(self, args: argparse.Namespace, handler: Callable) -> None:
        self.function = args.function
        self.instance_id = args.instance_id
        self.codedir = args.codedir
        self.handler = handler

    def invoke(self, request: Any, pb: Any) -> Any:
        """Run the handler on one request; return an InvokeResponse (never raises)."""
        event = codec.decode_event(request.payload)
        context = Context(self.function, self.instance_id, request.request_id,
                          request.topic, request.qos, request.timestamp_ms)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FATAL)
        try:
            result = self.handler(event, context)
        except SystemExit as exc:
            # A handler that exits ends its instance, as a process exit would.
            _flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        except BaseException as exc:
            return pb.InvokeResponse(kind=pb.InvokeResponse.ERROR, error_type=type(exc).__name__,
                                     error_message=str(exc),
                                     stack_trace=user_frames(exc, self.codedir))
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
        try:
            kind, payload = codec.encode_result(result)
        except (TypeError, ValueError) as exc:
            return pb.InvokeResponse(kind=pb.InvokeResponse.ERROR, error_type="ResultEncodingError",
                                     error_message=f"the result cannot be encoded: {exc}")
        return pb.InvokeResponse(kind=kind, payload=payload)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def watch_parent(status: Optional[socket.socket], parent_pid: Optional[int]) -> None:
    """Die with the supervisor: PR_SET_PDEATHSIG, and end-of-file on the status socket."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)   # the supervisor died before the signal was armed
    if status is None:
        return

    def lifeline() -> None:
        try:
            while status.recv(4096):
                pass
        except OSError:
            pass
        # The supervisor is gone: take the whole process group down, handler subprocesses too.
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(1)

    threading.Thread(target=lifeline, name="lifeline", daemon=True).start()


def report(status: Optional[socket.socket], message: dict) -> None:
    if status is not None:
        status.sendall(json.dumps(message).encode("utf-8") + b"\n")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Before any thread starts, so that every thread inherits the mask (see _FATAL).
    signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
    status = None
    if args.status_fd is not None:
        status = socket.socket(fileno=args.status_fd)
        status.set_inheritable(False)   # handler subprocesses must not hold the lifeline
    watch_parent(status, args.parent_pid)
    # Lines reach the daemon's log as they are printed, not when a buffer fills.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except AttributeError:
            pass

    codedir = os.path.abspath(args.codedir)
    args.codedir = codedir
    try:
        handler = load(args.handler, codedir, "handler")
        if args.initializer:
            initializer = load(args.initializer, codedir, "initializer")
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FATAL)
            try:
                initializer(Context(args.function, args.instance_id, str(uuid.uuid4())))
            except BaseException as exc:
                raise LoadError(f"initializer {args.initializer} raised {type(exc).__name__}: {exc}",
                                user_frames(exc, codedir)) from None
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, _FATAL)
    except LoadError as exc:
        if status is None:
            print(exc.message, file=sys.stderr)
        report(status, {"load_error": {"message": exc.message, "stackTrace": exc.stack_trace}})
        _flush()
        return EXIT_LOAD_ERROR

    server = serve(Runtime(args, handler), args.socket)
    report(status, {"ready": os.getpid()})

    stopping = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stopping.wait(3600):
        pass
    # Let a call in progress finish; the supervisor escalates to SIGKILL if it takes too long.
    server.stop(grace=None).wait()
    _flush()
    return 0


def serve(runtime: Runtime, path: str) -> Any:
    """Start the gRPC server on the Unix socket `path`."""
    from concurrent import futures

    import grpc

    from runtime_python._pb import function_pb2 as pb
    from runtime_python._pb import function_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.FunctionServicer):
        def Invoke(self, request: Any, context: Any) -> Any:
            return runtime.invoke(request, pb)

        def Ping(self, request: Any, context: Any) -> Any:
            return pb.PingResponse(pid=os.getpid())

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="invoke"),
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    pb_grpc.add_FunctionServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server


if __name__ == "__main__":
    sys.exit(main())
