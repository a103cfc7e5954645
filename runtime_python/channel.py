"""The instance's own channel to the supervisor: its status socket, an inherited descriptor.

Frames both ways (wire.frame: a length, then a JSON object). The supervisor sends the spec first;
the runtime reports `loaded`, `ready` or `load_error`. After that the channel carries calls to
other functions (`context.invoke`, the SDK's `Client()` inside a function): {"call": id,
"function": ..., "body": base64, ...} out, and {"reply": id, "status": ..., "body": base64, ...}
back, in the shape of the HTTP invoke API's answers. No TCP address and no token are needed: only
the supervisor holds the other end, and it knows which invocation the instance runs, so the call
chain and the deadline of a call are its own, not what the runtime says. The channel is also the
instance's lifeline: at its end of file the supervisor is gone.

The channel belongs to the instance's process: a child the handler forks shares the socket but
not the thread that reads the replies, so a call from a child fails at once (`ChildProcessError`)
instead of waiting for a reply that its parent would read.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import threading
from typing import Any, Callable, Dict, List, Optional

from runtime_python.wire import CALL, REPLY, SocketFrames, frame


class CallTooLarge(ValueError):
    """A call's body over what a call carries (the largest instance.message.length.max)."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: Dict[int, List[Any]] = {}    # call id -> [Event, reply]
        self._lock = threading.Lock()
        self._frames = SocketFrames(sock)
        self._pid = os.getpid()
        self.call_max = 4 << 20   # the largest body of a call (the spec says)
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: dict) -> None:
        data = frame(message)
        with self._send_lock:
            self._sock.sendall(data)

    def read_message(self) -> Optional[dict]:
        """The next message from the supervisor; None at end of file."""
        data = self._frames.read()
        return None if data is None else json.loads(data)

    def call(self, function: str, body: bytes, headers: Dict[str, str], query: Dict[str, str],
             timeout: Optional[float]) -> "tuple[int, Dict[str, str], bytes]":
        """Ask the supervisor to run `function`; (status, headers, body) as the HTTP API answers.
        Raises TimeoutError, ConnectionError when the supervisor is gone, CallTooLarge for a body
        over the largest a call carries, ChildProcessError in a process the handler forked."""
        if os.getpid() != self._pid:
            raise ChildProcessError(
                f"context.invoke works in the instance's own process (pid {self._pid}), not in a "
                f"process it started (pid {os.getpid()}): call it from the handler, or pass the "
                "result to the child")
        if len(body) > self.call_max:
            raise CallTooLarge(f"the call's body of {len(body)} bytes is over the {self.call_max} bytes "
                             "a call carries (the largest instance.message.length.max)")
        call_id = next(self._ids)
        waiter = [threading.Event(), None]
        with self._lock:
            if self.closed:
                raise ConnectionError("the supervisor is gone")
            self._waiting[call_id] = waiter
        try:
            self.send({CALL: call_id, "function": function, "headers": headers, "query": query,
                       "body": base64.b64encode(body).decode("ascii")})
            # As an HTTP client's socket timeout would: the callee may still run, unanswered.
            if not waiter[0].wait(timeout):
                raise TimeoutError(f"no answer within {timeout:g}s")
        finally:
            with self._lock:
                self._waiting.pop(call_id, None)
        reply = waiter[1]
        if reply is None:
            raise ConnectionError("the supervisor is gone")
        return (int(reply["status"]), {k.lower(): v for k, v in reply.get("headers", {}).items()},
                base64.b64decode(reply.get("body", "")))

    def serve(self, on_end: Callable[[], None]) -> None:
        """Read replies until end of file, then `on_end()` (in the lifeline thread)."""
        try:
            while True:
                message = self.read_message()
                if message is None:
                    break
                if REPLY in message:
                    with self._lock:
                        waiter = self._waiting.get(message[REPLY])
                    if waiter is not None:
                        waiter[1] = message
                        waiter[0].set()
        except (OSError, ValueError):
            pass
        with self._lock:
            self.closed = True
            for waiter in self._waiting.values():
                waiter[0].set()
        on_end()


_current: Optional[Channel] = None


def current() -> Optional[Channel]:
    """The channel of the instance this process is, or None (outside the daemon)."""
    return _current


def install(channel: Optional[Channel]) -> None:
    global _current
    _current = channel
