"""What the supervisor and the runtime must agree on, beyond function.proto. Depends on nothing
but the standard library: the supervisor imports this module, never the runtime's server.

The status socket carries frames: a 4-byte big-endian length, then that many bytes of a JSON
object (`frame()`; frames of any size alike, and one never runs into the next). The object's one
key says what it is: the supervisor sends SPEC first; the runtime answers LOADED (the handler imported), READY (the
initializer ran, the server accepts calls) or LOAD_ERROR (then exits with EXIT_LOAD_ERROR).
After that, CALL goes out (context.invoke) and REPLY comes back. The template's control socket
answers a fork request with PID or ERROR, after a TEMPLATE_READY greeting.

The instance's own socket (a Unix stream socket) carries frames of the same length and then a
protobuf message of function.proto: the supervisor opens with its key (the frame holds the key's
bytes), the instance answers with a PingResponse, then every InvokeBatch the supervisor writes is
answered with one ResultBatch. A connection that opens with another key is closed unanswered.
"""

import json
import socket
import struct
from typing import Optional

# The runtime's exit status when the handler or initializer cannot be loaded.
EXIT_LOAD_ERROR = 4

# Status socket messages.
SPEC = "spec"
LOADED = "loaded"
READY = "ready"
LOAD_ERROR = "load_error"
CALL = "call"
REPLY = "reply"

# The framing of both sockets, and the largest frame the supervisor reads from an instance: a
# call's body travels base64-encoded, so a frame of `frame_max(call_max)` carries a body of up to
# `call_max` bytes (the largest instance.message.length.max), with room for the rest.
LENGTH = struct.Struct(">I")


class SocketFrames:
    """The frames that come on a blocking socket (the runtime's ends of both sockets). What a read
    brings beyond one frame is kept for the next, so a small frame costs one read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def read(self, limit: int = 1 << 32) -> Optional[bytes]:
        """The next frame's message; None at end of file, or for a frame over `limit` bytes
        (what follows is then out of step: the connection is to be closed). Raises OSError."""
        if not self._fill(LENGTH.size):
            return None
        size = LENGTH.unpack_from(self._buffer)[0]
        if size > limit or not self._fill(LENGTH.size + size):
            return None
        data = bytes(self._buffer[LENGTH.size:LENGTH.size + size])
        del self._buffer[:LENGTH.size + size]
        return data

    def _fill(self, size: int) -> bool:
        buffer = self._buffer
        while len(buffer) < size:
            chunk = self._sock.recv(max(65536, size - len(buffer)))
            if not chunk:
                return False
            buffer += chunk
        return True


def frame(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return LENGTH.pack(len(data)) + data


def frame_max(call_max: int) -> int:
    return (call_max + 2) // 3 * 4 + (64 << 10)


# The machine's shared temporary directories: an instance's own where it can (confine.py), else
# cleared of what a function's user left there (the supervisor's isolation/rundir.py).
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


# The process name of a fork of the template that waits for its spec, a pool's spare, until the
# spec names its instance.
SPARE_NAME = "oef-spare"

# The template's control socket.
TEMPLATE_READY = "ready"
PID = "pid"
ERROR = "error"

# A handler's output line, as the runtime writes it: MARK request-id SEPARATOR text.
MARK, SEPARATOR = "\x1e", "\x1f"


def truncation_marker(limit: int) -> str:
    """The line that replaces what an invocation prints past `limit` bytes."""
    return f"[output truncated: over {limit} bytes in this invocation]"
