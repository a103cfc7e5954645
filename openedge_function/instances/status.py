"""The status socket, seen from the supervisor: the spec goes out first; the runtime answers when
it loaded the handler and when it is ready (or why it cannot load); later it asks for calls to
other functions (context.invoke) and reads their replies. End-of-file means the process is going.

Frames both ways (runtime_python.wire.frame). A frame from the instance over `most` bytes is
skipped, not read into memory: the log says so once, and the framing stays in step. A reply is
written whole, waiting for the instance to read it for up to _REPLY_WAIT seconds; an instance that
does not read for that long loses its channel (and with it, its life).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any, Callable, Dict, Optional

from runtime_python.wire import CALL, LENGTH, LOAD_ERROR, LOADED, frame

from .fdwatch import FdWatcher

log = logging.getLogger("openedge_function.instance")

Reply = Callable[[Dict[str, Any]], None]
OnCall = Callable[[Dict[str, Any], Reply, Any], None]   # (call, reply, the calling instance)

_REPLY_WAIT = 30.0


class FrameReader:
    """Turns chunks into the objects of whole frames; a frame over `most` bytes is skipped."""

    def __init__(self, on_message: Callable[[Dict[str, Any]], None], on_oversized: Callable[[int], None],
                 most: int) -> None:
        self._buffer = bytearray()
        self._skip = 0
        self._on_message = on_message
        self._on_oversized = on_oversized
        self._most = most

    def feed(self, chunk: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(chunk))
            self._skip -= dropped
            chunk = chunk[dropped:]
        buffer = self._buffer
        buffer += chunk
        header = LENGTH.size
        while len(buffer) >= header:
            size = LENGTH.unpack_from(buffer)[0]
            if size > self._most:
                self._on_oversized(size)
                dropped = min(size, len(buffer) - header)
                del buffer[:header + dropped]
                self._skip = size - dropped
                if self._skip:
                    return
                continue
            if len(buffer) < header + size:
                return
            data = bytes(buffer[header:header + size])
            del buffer[:header + size]
            try:
                message = json.loads(data)
            except ValueError:
                message = None
            self._on_message(message if isinstance(message, dict) else {"unreadable": len(data)})


class StatusSocket:
    """Our end of one instance's status socket."""

    def __init__(self, instance_id: str, on_call: Optional[OnCall], on_lost: Callable[[], None],
                 owner: Any = None, most: int = 1 << 20) -> None:
        self._instance_id = instance_id
        self._on_call = on_call
        self._on_lost = on_lost
        self._owner = owner          # the instance, for the calls it makes
        self._most = most
        self._oversized = False
        self.loaded = threading.Event()    # the handler imported (or the process is gone)
        self.ready = threading.Event()     # the initializer ran, the server serves (or gone)
        self.lost = threading.Event()      # end-of-file: the process is going
        self.load_error: Optional[Dict[str, Any]] = None   # why the handler cannot load
        self.tmp = ""   # whether its temporary directories are its own ("private"), or why not
        self._out: Optional[socket.socket] = None   # for replies
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket, fdwatch: FdWatcher, spec: Dict[str, Any]) -> None:
        """Send `spec` on `sock` (its ours) and follow what the runtime says there."""
        try:
            sock.sendall(frame(spec))
        except OSError:
            pass   # it died already: the end-of-file says so
        # The fd watcher reads the socket without blocking; replies wait for room with a bound.
        self._out = socket.socket(fileno=os.dup(sock.fileno()))
        self._out.settimeout(_REPLY_WAIT)
        frames = FrameReader(self._on_message, self._on_oversized, self._most)

        def on_data(chunk: bytes) -> None:
            if chunk:
                frames.feed(chunk)
                return
            self.lost.set()
            self.loaded.set()
            self.ready.set()
            self._on_lost()

        fdwatch.add(sock.detach(), on_data)   # the fd watcher closes it at end-of-file

    def _on_oversized(self, size: int) -> None:
        if not self._oversized:
            self._oversized = True
            log.warning("instance %s: a status message of %d bytes, over the %d bytes the channel "
                        "takes, was skipped", self._instance_id, size, self._most)

    def _on_message(self, message: Dict[str, Any]) -> None:
        if CALL in message:   # context.invoke: another function, run for this one
            if self._on_call is not None:
                self._on_call(message, self.reply, self._owner)
            return
        if "unreadable" in message:
            if not self._oversized:
                self._oversized = True
                log.warning("instance %s: an unreadable status message of %d bytes", self._instance_id,
                            message["unreadable"])
            return
        if LOAD_ERROR in message:
            self.load_error = message[LOAD_ERROR]
        if "tmp" in message:
            self.tmp = str(message["tmp"])
        self.loaded.set()
        if LOADED not in message:
            self.ready.set()

    def reply(self, message: Dict[str, Any]) -> None:
        """Answer a call (blocking; from a control thread)."""
        data = frame(message)
        with self._lock:
            out = self._out
            if out is None:
                return
            try:
                out.sendall(data)
            except OSError as exc:   # gone, or not reading: a frame cut short ends the channel
                if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    log.warning("instance %s: a reply of %d bytes could not be written (%s): closing "
                                "its status socket", self._instance_id, len(data), exc)
                try:
                    out.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._out = None
                out.close()

    def close(self) -> None:
        with self._lock:
            out, self._out = self._out, None
        if out is not None:
            out.close()
