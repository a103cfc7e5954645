"""The template: a process that has imported the runtime (protobuf included) and forks instances.

Starting Python and importing protobuf costs most of an instance's cold start; a fork of a process that
did it already costs a few milliseconds, and the forks share the imported code's pages.

The supervisor talks to it over a SOCK_SEQPACKET socket (`--control-fd`). Each request is one
JSON message, {"argv": [...], "name": ...}, carrying three descriptors: the instance's status
socket, its stdout and its stderr. Nothing of a function (its environment, its code) passes through
the template: the fork reads that from its own status socket, so no fork can find another
function's secrets in what it inherited. The template forks twice and answers
{"pid": N} once the middle process is reaped, so the instance has been handed to the supervisor
(a child subreaper) by then and is the supervisor's child like any other. The template stays
single-threaded, so forking it is safe. It exits when the supervisor closes the socket or dies.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from runtime_python import server
from runtime_python.confine import prctl
from runtime_python.server import PR_SET_NAME, PR_SET_PDEATHSIG, flush_output
from runtime_python.wire import ERROR, PID, TEMPLATE_READY

_MAX_FDS = 3
NAME = "oef-template"   # its process name (comm); each fork renames itself after its instance


def _preload() -> None:
    """Import what every instance imports before it loads its handler."""
    import queue  # noqa: F401
    import resource  # noqa: F401
    import uuid  # noqa: F401

    from runtime_python._pb import function_pb2  # noqa: F401
    from runtime_python.confine import libc
    libc()   # prctl and the mounts of a private /tmp, in every fork


def _become_instance(request: Dict[str, Any], fds: List[int], control: socket.socket) -> None:
    """In the forked instance: take the descriptors of the request, then run the runtime as
    `python -m runtime_python` would. It reads its spec (environment, user, limits) from the
    status socket and confines itself before it imports handler code. Never returns."""
    code = 1
    try:
        control.close()
        os.setsid()
        status_fd, out_fd, err_fd = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((devnull, 0), (out_fd, 1), (err_fd, 2)):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        argv = [str(a) for a in request["argv"]]
        # The status socket keeps its number: argv names it.
        argv[argv.index("--status-fd") + 1] = str(status_fd)
        argv.append("--forked")
        sys.argv = ["runtime_python"] + argv
        code = server.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        flush_output()
        os._exit(code)


def _fork_instance(request: Dict[str, Any], fds: List[int], control: socket.socket) -> int:
    """Fork twice; the pid of the instance, whose parent has exited and been reaped."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            # Named before the fork, so the instance carries its name from its first moment.
            prctl(PR_SET_NAME, str(request.get("name", ""))[:15].encode("utf-8") or NAME.encode())
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _become_instance(request, fds, control)
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    for fd in fds:
        os.close(fd)
    data = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(middle, 0)
    if not data:
        raise OSError("the instance could not be forked")
    return int(data)


def serve(control: socket.socket) -> int:
    control.sendall(json.dumps({TEMPLATE_READY: os.getpid()}).encode())
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 20, _MAX_FDS)
        except OSError:
            return 0
        if not message:
            return 0   # the supervisor is gone
        try:
            request = json.loads(message)
            if len(fds) != _MAX_FDS:
                raise ValueError(f"expected {_MAX_FDS} descriptors, got {len(fds)}")
            reply: Dict[str, Any] = {PID: _fork_instance(request, fds, control)}
        except Exception as exc:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            reply = {ERROR: f"{type(exc).__name__}: {exc}"}
        try:
            control.sendall(json.dumps(reply).encode("utf-8"))
        except OSError:
            return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="runtime_python.template", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    # Terminal signals are for the supervisor; the template ends with its control socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_NAME, NAME.encode())
    if os.getppid() != args.parent_pid:
        return 1
    control = socket.socket(fileno=args.control_fd)
    _preload()
    # Objects that exist now are never collected: the collector would otherwise touch, and so
    # copy, the pages every fork shares.
    gc.freeze()
    return serve(control)


if __name__ == "__main__":
    sys.exit(main())
