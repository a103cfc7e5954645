"""The fd watcher: one thread that reads every instance's status socket and output pipes.

Each instance has a status socket (JSON lines from the runtime; end-of-file when it dies) and two
output pipes (the handler's stdout and stderr, logged line by line). A selector over all of them
notices a dead instance at once, not at its next call. Code watching (deploy/codewatch.py) adds
its inotify descriptor here too, so it costs no thread of its own.
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable, Dict, List, Tuple

log = logging.getLogger("openedge_function.watch")

_MAX_LINE = 16384


class FdWatcher:
    """Dispatches reads on registered file descriptors to callbacks, in one daemon thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: List[Tuple[int, Callable[[bytes], None]]] = []
        self._running = True
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def add(self, fd: int, on_data: Callable[[bytes], None]) -> None:
        """Call `on_data(chunk)` for each read on `fd`, and `on_data(b"")` once at end-of-file,
        after which `fd` is closed: it is the watcher's from now on."""
        with self._lock:
            self._pending.append((fd, on_data))
        self._wake()

    def close(self) -> None:
        self._running = False
        self._wake()
        self._thread.join(timeout=2)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        callbacks: Dict[int, Callable[[bytes], None]] = {}
        while self._running:
            with self._lock:
                pending, self._pending = self._pending, []
            for fd, on_data in pending:
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ, None)
                callbacks[fd] = on_data
            for key, _ in self._selector.select(timeout=1.0):
                fd = key.fd
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                callback = callbacks[fd]
                if not chunk:
                    self._selector.unregister(fd)
                    del callbacks[fd]
                    os.close(fd)
                self._call(callback, chunk)

    @staticmethod
    def _call(callback: Callable[[bytes], None], chunk: bytes) -> None:
        try:
            callback(chunk)
        except Exception:
            log.exception("watcher callback failed")


class LineSplitter:
    """Turns chunks into whole lines (long lines are cut at _MAX_LINE)."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._buffer = b""
        self._on_line = on_line

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            if self._buffer:
                self._emit(self._buffer)
                self._buffer = b""
            return
        data = self._buffer + chunk
        *lines, self._buffer = data.split(b"\n")
        for line in lines:
            self._emit(line)
        while len(self._buffer) > _MAX_LINE:
            self._emit(self._buffer[:_MAX_LINE])
            self._buffer = self._buffer[_MAX_LINE:]

    def _emit(self, line: bytes) -> None:
        self._on_line(line.rstrip(b"\r").decode("utf-8", "replace"))
