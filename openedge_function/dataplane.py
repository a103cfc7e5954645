"""The data plane: one event loop, in one thread, that every message travels through.

The broker connections (paho-mqtt, driven through its socket callbacks), the pools' queues and
the streams to the instances all live on this loop, so a message goes from the
intake socket to an instance's stream and from the stream to the publisher's socket without
waking another Python thread. What may block (starting and reaping processes, reading /proc)
runs elsewhere: `blocking()` hands it to a small thread pool, and the daemon's own thread
polls memory.

Other threads reach the loop through `call()` (fire and forget) and `run()` (wait for the result).
Depends on nothing else in the daemon.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Threads for blocking control work: instance start-ups (which wait for the runtime to load) and
# stops (which wait for the process to exit). Created on demand, so an idle daemon holds few.
_BLOCKING_THREADS = 32


class DataPlane:
    """The loop thread and the thread pool for blocking work."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="dataplane", daemon=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_BLOCKING_THREADS, thread_name_prefix="control")
        self.loop.set_default_executor(self._executor)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon; from any thread."""
        if self.in_loop():
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def run(self, fn: Callable[..., T], *args: Any, timeout: Optional[float] = None) -> T:
        """Run `fn(*args)` on the loop and return its result (or raise its exception); from a
        thread other than the loop's, or directly when already on it."""
        if self.in_loop() or not self._thread.is_alive():
            return fn(*args)
        future: "concurrent.futures.Future[T]" = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:   # handed to the waiting thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return future.result(timeout)

    def spawn(self, coroutine: Any) -> "asyncio.Task":
        """Start a task on the loop (from the loop's thread)."""
        return self.loop.create_task(coroutine)

    def blocking(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Run blocking `fn(*args)` in the control threads; await the result on the loop."""
        return self.loop.run_in_executor(self._executor, fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (what it still runs is abandoned) and the control threads."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        self._executor.shutdown(wait=False)
