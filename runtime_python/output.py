"""What a handler prints, as whole lines marked with the request id, to the daemon's log.

sys.stdout and sys.stderr become line writers over the instance's output pipes: each line goes out
as `RS request-id US text LF`, written with one os.write, so the supervisor can tag it with the
invocation it belongs to (a subprocess writing to the same pipe sends plain lines, which the
supervisor tags with the instance's current request). Past `limit` bytes in one invocation the
rest is dropped with one marker line: a chatty handler never fills the pipe and never blocks.
"""
from __future__ import annotations

import io
import os
from typing import Any, List

from runtime_python.wire import MARK, SEPARATOR, truncation_marker

__all__ = ["Budget", "LineWriter", "MARK", "SEPARATOR", "truncation_marker"]


class Budget:
    """The request id of the invocation in progress and what it may still write."""

    __slots__ = ("request_id", "left", "limit", "truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.request_id = ""
        self.left = limit
        self.truncated = False

    def start(self, request_id: str) -> None:
        self.request_id = request_id
        self.left = self.limit
        self.truncated = False


class LineWriter(io.TextIOBase):
    """A text stream that sends whole lines, marked with the current request id, to `fd`."""

    def __init__(self, fd: int, budget: Budget, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._budget = budget
        self._pending: List[str] = []
        self._pending_length = 0
        self._name = name
        self.buffer = _BinaryFront(self)

    @property
    def name(self) -> str:
        return self._name

    @property
    def encoding(self) -> str:
        return "utf-8"

    @property
    def errors(self) -> str:
        return "replace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self._budget.truncated:   # past the limit: nothing more is kept, not even in memory
            self._pending, self._pending_length = [], 0
            return len(text)
        if "\n" not in text:
            self._pending.append(text)
            self._pending_length += len(text)
            if self._pending_length > self._budget.left:   # cut anyway: send it, keep no more
                self.flush()
            return len(text)
        *lines, rest = text.split("\n")
        if self._pending:
            lines[0] = "".join(self._pending) + lines[0]
            self._pending, self._pending_length = [], 0
        for line in lines:
            self._emit(line)
        if rest:
            self._pending.append(rest)
            self._pending_length = len(rest)
        return len(text)

    def flush(self) -> None:
        """Send a partial line (at the end of an invocation)."""
        if self._pending:
            line, self._pending, self._pending_length = "".join(self._pending), [], 0
            self._emit(line)

    def _emit(self, line: str) -> None:
        budget = self._budget
        if budget.truncated:
            return
        room = budget.left
        data = line[:room].encode("utf-8", "replace")   # a character is at least one byte
        if len(data) < room:   # the line and its newline fit
            budget.left = room - len(data) - 1
            self._write(data)
            return
        # This line reaches the limit: what fits of it, then the marker, then nothing more.
        budget.left = 0
        budget.truncated = True
        if room > 0:
            self._write(data[:room])
        self._write(truncation_marker(budget.limit).encode())

    def _write(self, data: bytes) -> None:
        record = f"{MARK}{self._budget.request_id}{SEPARATOR}".encode() + data + b"\n"
        try:
            while record:
                record = record[os.write(self._fd, record):]
        except OSError:
            pass   # the daemon went away; the lifeline ends this process


class _BinaryFront:
    """sys.stdout.buffer for code that writes bytes."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def write(self, data: Any) -> int:
        self._writer.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        self._writer.flush()
