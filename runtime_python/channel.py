"""The instance's own channel to the supervisor: its status socket, an inherited descriptor.

JSON lines both ways. The supervisor sends the spec first; the runtime reports `loaded`, `ready` or
`load_error`. After that the channel carries calls to other functions (`context.invoke`, the SDK's
`Client()` inside a function): {"call": id, "function": ..., "body": base64, ...} out, and
{"reply": id, "status": ..., "body": base64, ...} back, in the shape of the HTTP invoke API's
answers. No TCP address and no token are needed: only the supervisor holds the other end. The
channel is also the instance's lifeline: at its end of file the supervisor is gone.
"""
from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
from typing import Any, Callable, Dict, List, Optional

from runtime_python.wire import CALL, REPLY


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: Dict[int, List[Any]] = {}    # call id -> [Event, reply]
        self._lock = threading.Lock()
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode("utf-8") + b"\n"
        with self._send_lock:
            self._sock.sendall(data)

    def read_line(self) -> Optional[dict]:
        """The next message from the supervisor; None at end of file."""
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def call(self, function: str, body: bytes, headers: Dict[str, str], query: Dict[str, str],
             timeout: Optional[float]) -> "tuple[int, Dict[str, str], bytes]":
        """Ask the supervisor to run `function`; (status, headers, body) as the HTTP API answers.
        Raises TimeoutError, or ConnectionError when the supervisor is gone."""
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
                message = self.read_line()
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
