"""The status socket, seen from the supervisor: the spec goes out first; the runtime answers when
it loaded the handler and when it is ready (or why it cannot load); later it asks for calls to
other functions (context.invoke) and reads their replies. End-of-file means the process is going.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any, Callable, Dict, Optional

from runtime_python.wire import CALL, LOAD_ERROR, LOADED

from .fdwatch import FdWatcher, LineSplitter

log = logging.getLogger("openedge_function.instance")

Reply = Callable[[Dict[str, Any]], None]
OnCall = Callable[[Dict[str, Any], Reply], None]


class StatusSocket:
    """Our end of one instance's status socket."""

    def __init__(self, instance_id: str, on_call: Optional[OnCall], on_lost: Callable[[], None]) -> None:
        self._instance_id = instance_id
        self._on_call = on_call
        self._on_lost = on_lost
        self.loaded = threading.Event()    # the handler imported (or the process is gone)
        self.ready = threading.Event()     # the initializer ran, the server serves (or gone)
        self.lost = threading.Event()      # end-of-file: the process is going
        self.load_error: Optional[Dict[str, Any]] = None   # why the handler cannot load
        self._out: Optional[socket.socket] = None   # for replies
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket, fdwatch: FdWatcher, spec: Dict[str, Any]) -> None:
        """Send `spec` on `sock` (its ours) and follow what the runtime says there."""
        try:
            sock.sendall(json.dumps(spec).encode("utf-8") + b"\n")
        except OSError:
            pass   # it died already: the end-of-file says so
        self._out = socket.socket(fileno=os.dup(sock.fileno()))
        lines = LineSplitter(self._on_line)

        def on_data(chunk: bytes) -> None:
            lines.feed(chunk)
            if not chunk:
                self.lost.set()
                self.loaded.set()
                self.ready.set()
                self._on_lost()

        fdwatch.add(sock.detach(), on_data)   # the fd watcher closes it at end-of-file

    def _on_line(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("instance %s: unreadable status line %r", self._instance_id, line)
            return
        if CALL in message:   # context.invoke: another function, run for this one
            if self._on_call is not None:
                self._on_call(message, self.reply)
            return
        if LOAD_ERROR in message:
            self.load_error = message[LOAD_ERROR]
        self.loaded.set()
        if LOADED not in message:
            self.ready.set()

    def reply(self, message: Dict[str, Any]) -> None:
        """Answer a call (blocking; from a control thread)."""
        data = json.dumps(message).encode("utf-8") + b"\n"
        with self._lock:
            if self._out is not None:
                try:
                    self._out.sendall(data)
                except OSError:
                    pass   # the instance is gone; so is its caller

    def close(self) -> None:
        with self._lock:
            out, self._out = self._out, None
        if out is not None:
            out.close()
