"""A function's pool of instances: grows with the load up to `max`, shrinks to `min` when idle.

Each instance has one worker thread that starts it, serves invocations one at a time, and stops
it. An invocation goes to the most recently idle instance (so the others can age out), else waits
in the pool's queue while a new instance starts (when fewer than `max` exist), else waits for the
next free one. Starting an instance happens in its own thread, so intake never stalls on it.
"""
from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Union

import grpc
import psutil

from runtime_python._pb import function_pb2 as pb

from .config import Function
from .errors import (FunctionTimeout, InstanceCrashed, InvocationError,
                     MemoryLimitExceeded)
from .instance import Instance
from .lifecycle import State
from .template import Template
from .watch import Watcher

log = logging.getLogger(__name__)
summary_log = logging.getLogger("openedge_function.summary")   # one line per invocation

Outcome = Union[Any, InvocationError]   # an InvokeResponse, or why there is none

_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 60.0
# Queued invocations go to an instance together, one stream message for several (the instance
# still runs them one after the other), as long as recent handler durations keep a batch's
# expected run time under a quarter of the timeout.
_BATCH_MAX, _BATCH_BYTES = 16, 1 << 20
_NONE: dict = {}


_bits = random.Random().getrandbits   # seeded from os.urandom


def new_request_id() -> str:
    """A random (version 4) UUID, as str(uuid.uuid4()) gives, at a quarter of its cost: no
    urandom call and no UUID object per message."""
    n = _bits(128) & ~(0xc000 << 48) | (0x8000 << 48)   # the RFC 4122 variant
    n = n & ~(0xf000 << 64) | (4 << 76)                  # version 4
    h = "%032x" % n
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Invocation:
    """One message on its way through a pool; `done(invocation, outcome)` is called exactly once,
    or `abandon(invocation)` when the daemon is stopping and the message is left to the broker."""

    __slots__ = ("request_id", "topic", "qos", "payload", "timestamp_ms", "mid", "done", "abandon",
                 "context", "attempts", "solo", "extra")

    def __init__(self, request_id: str, topic: str, qos: int, payload: bytes, timestamp_ms: int,
                 mid: int, done: Callable[["Invocation", Outcome], None],
                 abandon: Callable[["Invocation"], None], context: Any = None) -> None:
        self.request_id = request_id
        self.topic = topic
        self.qos = qos
        self.payload = payload
        self.timestamp_ms = timestamp_ms
        self.mid = mid
        self.done = done
        self.abandon = abandon
        self.context = context
        self.attempts = 0
        self.solo = False   # runs in a batch of its own (after a batch it was in failed)
        self.extra: Optional[dict] = None   # more InvokeRequest fields (HTTP: content_type, http, ...)


class Pool:
    """The instances of one function, and the invocations waiting for them."""

    def __init__(self, function: Function, rundir: str, watcher: Watcher, queue_max: int = 0,
                 template: Optional[Template] = None, runtime_env: Optional[Dict[str, str]] = None) -> None:
        self.function = function
        self._template = template
        self._runtime_env = runtime_env or {}
        self._rundir = rundir
        self._watcher = watcher
        limits = function.instance
        self._min, self._max = limits.min, limits.max
        self._timeout = limits.timeout
        self._timeout_ms = int(limits.timeout * 1000)
        self._ready_timeout = max(30.0, limits.timeout)
        self.queue_max = queue_max or max(64, 16 * limits.max)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)   # signalled when the queue shrinks
        self._queue: Deque[Invocation] = collections.deque()
        self._idle: List[_Worker] = []          # a stack: the most recently idle on top
        self._workers: Set[_Worker] = set()     # every worker whose process is not yet reaped
        self._starting = 0
        self._retiring = 0
        self._seq = 0
        self._closed = False
        self._aborting = False
        self._failure: Optional[InvocationError] = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self.dropped = 0
        self.queue_peak = 0
        # Called with (outcome, seconds) after each invocation that ran: the daemon's metrics.
        self.observe: Optional[Callable[[str, float], None]] = None
        watcher.every(0.05, self.check_deadlines)
        self._held_at = float("-inf")
        self._handler_seconds: Optional[float] = None   # moving average of handler durations

    # -- intake ----------------------------------------------------------------------------

    def submit(self, invocation: Invocation, droppable: bool = False) -> bool:
        """Hand `invocation` to an instance or queue it. When the queue is full, a `droppable`
        (QoS 0) invocation is dropped and any other one waits for room: the caller is the
        broker connection's thread, so intake pauses and QoS 1 messages stay at the broker.
        False when the invocation was not taken (dropped, or the pool is closed)."""
        return self._take(invocation, "drop" if droppable else "hold") is None

    def offer(self, invocation: Invocation, callers: int = 0) -> Optional[str]:
        """Take a direct call (HTTP) without blocking: None when taken, else why not: `closed`,
        `full` (no idle instance and a full queue), or `deadlock` when the `callers` instances
        of this function that wait on this very call (context.invoke) are all it can have."""
        return self._take(invocation, "refuse", callers)

    def _take(self, invocation: Invocation, when_full: str, callers: int = 0) -> Optional[str]:
        """Assign, queue or refuse `invocation`; None when taken, else `closed`, `full` or
        `deadlock`. A full queue drops it (counted), refuses it, or holds the caller for room."""
        failure = None
        with self._lock:
            if self._closed:
                return "closed"
            if self._idle:
                self._idle.pop().assign(invocation)
                return None
            if callers >= self._max:
                return "deadlock"
            if self._failing() and not self._workers:
                failure = self._failure
            else:
                if len(self._queue) >= self.queue_max:
                    if when_full != "hold":
                        if when_full == "drop":
                            self.dropped += 1
                        return "full"
                    self._hold()
                    if self._closed:
                        return "closed"
                self._enqueue(invocation)
        if failure is not None:
            invocation.done(invocation, failure)
        return None

    def withdraw(self, invocation: Invocation) -> bool:
        """Take back an invocation that is still queued; False when an instance has it."""
        with self._lock:
            try:
                self._queue.remove(invocation)
            except ValueError:
                return False
            self._space.notify()
            return True

    def push(self, invocation: Invocation, first: bool = False) -> None:
        """Queue an invocation that was already taken (a retry, the next of an ordered topic):
        whatever the queue's length, without blocking; ahead of the queue when `first`."""
        with self._lock:
            aborting = self._aborting
            if not aborting:
                if self._idle:
                    self._idle.pop().assign(invocation)
                else:
                    self._enqueue(invocation, first)
        if aborting:
            invocation.abandon(invocation)

    def _enqueue(self, invocation: Invocation, first: bool = False) -> None:
        if first:
            self._queue.appendleft(invocation)
        else:
            self._queue.append(invocation)
        if len(self._queue) > self.queue_peak:
            self.queue_peak = len(self._queue)
        self._grow()

    def _hold(self) -> None:
        """Wait (lock held) until the queue has room or the pool closes."""
        now = time.monotonic()
        if now - self._held_at > 10.0:   # once per episode, not once per message
            log.warning("function %s: all %d instances busy and %d messages queued: pausing intake",
                        self.function.name, len(self._workers), len(self._queue))
        self._held_at = now
        while len(self._queue) >= self.queue_max and not self._closed:
            self._space.wait(1.0)

    def maintain(self) -> None:
        """Start the `min` instances: at boot (not at the first message), and periodically, to
        replace lost ones and to try again once a failure's back-off has passed."""
        with self._lock:
            self._grow()

    def _failing(self) -> bool:
        return self._failure is not None and time.monotonic() < self._retry_at

    def _grow(self) -> None:
        """Start instances for queued invocations and for `min` (lock held)."""
        if self._failing():
            return
        live = len(self._workers) - self._retiring
        wanted = len(self._queue) - self._starting
        if not self._closed:   # a closing pool still serves its queue, but keeps no minimum
            wanted = max(wanted, self._min - live)
        if self._failure is not None:   # after a failure, retry with one instance at a time
            wanted = min(wanted, 1 - self._starting)
        for _ in range(max(0, min(wanted, self._max - len(self._workers)))):
            self._seq += 1
            instance = Instance(self.function, self._seq, self._rundir, self._watcher, self._on_lost,
                                self._template, self._runtime_env)
            worker = _Worker(self, instance)
            self._workers.add(worker)
            self._starting += 1
            worker.start()

    # -- called by workers -------------------------------------------------------------------

    def _started(self, worker: "_Worker") -> List[Invocation]:
        with self._lock:
            self._starting -= 1
            if self._failure is not None:
                log.info("function %s: instance %s started, the function works again",
                         self.function.name, worker.instance.id)
            self._failure = None
            self._backoff = _BACKOFF_FIRST
            return self._next(worker)

    def _start_failed(self, worker: "_Worker", error: InvocationError) -> None:
        with self._lock:
            self._starting -= 1
            self._workers.discard(worker)
            repeated = self._failure is not None and self._failure.message == error.message
            self._failure = error
            self._retry_at = time.monotonic() + self._backoff
            backoff, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF_MAX)
            doomed: List[Invocation] = []
            if not self._workers:
                doomed, self._queue = list(self._queue), collections.deque()
        if not repeated:
            log.error("function %s: %s: %s (next try in %gs)", self.function.name,
                      error.error_type, error.message, backoff)
        for invocation in doomed:
            invocation.done(invocation, error)

    def _next(self, worker: "_Worker") -> List[Invocation]:
        """The next queued invocations for `worker` (a batch), or [] after marking it idle
        (lock held)."""
        if self._queue:
            first = self._queue.popleft()
            batch = [first]
            if not first.solo:
                # Never more than a fair share of the queue: the other instances take the rest.
                share = -(-(len(self._queue) + 1) // max(1, len(self._workers) - self._retiring))
                limit, size = min(self._batch_limit(), share), len(first.payload)
                queue = self._queue
                while queue and len(batch) < limit and not queue[0].solo and size < _BATCH_BYTES:
                    invocation = queue.popleft()
                    batch.append(invocation)
                    size += len(invocation.payload)
            self._space.notify(len(batch))
            return batch
        worker.idle_since = time.monotonic()
        self._idle.append(worker)
        return []

    def _batch_limit(self) -> int:
        average = self._handler_seconds
        if average is None:
            return 1
        return max(1, min(_BATCH_MAX, int(self._timeout / (4 * max(average, 1e-6)))))

    def _after(self, worker: "_Worker") -> List[Invocation]:
        with self._lock:
            return self._next(worker)

    def _wait(self, worker: "_Worker") -> Optional[Invocation]:
        """Block until `worker` gets an invocation; None when it should retire instead."""
        idletime = self.function.instance.idletime
        while True:
            with self._lock:
                if worker.slot is not None:
                    invocation, worker.slot = worker.slot, None
                    return invocation
                now = time.monotonic()
                expired = now >= worker.idle_since + idletime
                live = len(self._workers) - self._retiring
                if self._closed or worker.instance.lost.is_set() or (expired and live > self._min):
                    self._idle.remove(worker)
                    self._mark_retiring(worker)
                    return None
                if expired:   # kept for `min`: start a new idle period
                    worker.idle_since = now
                # Cleared under the lock: an assign() from here on sets it again.
                worker.wake.clear()
                remaining = worker.idle_since + idletime - now
            worker.wake.wait(remaining)

    def _retire(self, worker: "_Worker") -> None:
        """Mark `worker` as leaving because its instance is unusable (lock not held)."""
        with self._lock:
            self._mark_retiring(worker)

    def _mark_retiring(self, worker: "_Worker") -> None:
        """`worker` leaves: it no longer counts as live, though its process is not reaped yet
        (lock held)."""
        if not worker.retiring:
            worker.retiring = True
            self._retiring += 1

    def _gone(self, worker: "_Worker") -> None:
        with self._lock:
            self._workers.discard(worker)
            if worker.retiring:
                self._retiring -= 1
            self._grow()

    def _on_lost(self, instance: Instance) -> None:
        """The watcher saw an instance's process go: wake its worker if it is idle."""
        with self._lock:
            for worker in self._idle:
                if worker.instance is instance:
                    worker.wake.set()
        if not self._closed:
            log.info("instance %s: process %s ended", instance.id, instance.pid)

    def run(self, worker: "_Worker", batch: List[Invocation]) -> bool:
        """Run a batch on `worker`'s instance and hand each invocation its outcome; False when
        the instance is not reusable (it timed out, crashed or ran out of memory)."""
        instance = worker.instance
        started = time.monotonic()
        instance.deadline = started + self._timeout   # before BUSY: the watchdog reads both
        instance.request_id = batch[0].request_id
        instance.lifecycle.to(State.BUSY)
        message = pb.InvokeBatch()
        add = message.requests.add   # built in place: a list of requests would be copied again
        for invocation in batch:
            add(request_id=invocation.request_id, topic=invocation.topic, qos=invocation.qos,
                payload=invocation.payload, timestamp_ms=invocation.timestamp_ms,
                timeout_ms=self._timeout_ms, message_id=invocation.mid, **(invocation.extra or _NONE))
        try:
            responses = instance.invoke(message)
        except grpc.RpcError:
            self._failed(instance, batch, time.monotonic() - started)
            return False
        instance.lifecycle.to(State.IDLE)
        summaries = summary_log.isEnabledFor(logging.INFO)
        observe = self.observe
        average = self._handler_seconds
        for invocation, response in zip(batch, responses):
            seconds = response.duration_us / 1e6
            average = seconds if average is None else 0.9 * average + 0.1 * seconds
            if summaries or observe is not None:
                outcome = response.error_type if response.kind == pb.InvokeResponse.ERROR else (
                    "none" if response.kind == pb.InvokeResponse.NONE else "ok")
                if summaries:
                    self._summary(invocation, outcome, seconds, response.max_rss_kb << 10)
                if observe is not None:
                    observe(outcome, seconds)
            invocation.done(invocation, response)
        self._handler_seconds = average
        return True

    def _failed(self, instance: Instance, batch: List[Invocation], seconds: float) -> None:
        """The stream broke during a batch. Alone, the invocation gets its envelope; in a batch,
        which one did it is unknown, so each runs again alone (where a repeat failure is its own)."""
        if self._aborting:
            for invocation in batch:
                invocation.abandon(invocation)
            return
        if len(batch) == 1:
            [invocation] = batch
            error, used = self._failure_of(instance, invocation)
            self._summary(invocation, error.error_type, seconds, used)
            if self.observe is not None:
                self.observe(error.error_type, seconds)
            invocation.done(invocation, error)
            return
        log.warning("function %s: instance %s failed during a batch of %d; running each alone",
                    self.function.name, instance.id, len(batch))
        self._handler_seconds = None   # batch again only once handlers prove quick
        for invocation in reversed(batch):
            invocation.solo = True
            self.push(invocation, first=True)

    def _failure_of(self, instance: Instance, invocation: Invocation) -> "tuple[InvocationError, int]":
        """Why a call got no answer, and the memory it was seen to use."""
        if instance.memory_exceeded is not None:
            return MemoryLimitExceeded(
                f"instance {instance.id} used {instance.memory_exceeded >> 20} MB, over its "
                f"limit of {self.function.instance.memory >> 20} MB, and was killed"), instance.memory_exceeded
        if instance.timed_out:
            return FunctionTimeout(
                f"function {self.function.name} timed out after {self._timeout:g}s; "
                f"instance {instance.id} was killed"), 0
        instance.kill()
        return InstanceCrashed(
            f"instance {instance.id} (pid {instance.pid}) {instance.exit_description()} "
            f"while running request {invocation.request_id}"), 0

    def _summary(self, invocation: Invocation, outcome: str, seconds: float, used: int) -> None:
        """FunctionGraph's execution summary: one line per invocation."""
        millis = seconds * 1000
        billed = max(100, math.ceil(millis / 100) * 100)   # rounded up to 100 ms
        limit = self.function.instance.memory
        summary_log.info(
            "request %s: function %s, memory %s, duration %.2f ms, used %s, billed %d ms, outcome %s",
            invocation.request_id, self.function.name, f"{limit >> 20} MB" if limit else "unlimited",
            millis, f"{used >> 20} MB" if used else "unknown", billed, outcome)

    # -- stopping ----------------------------------------------------------------------------

    def close(self) -> None:
        """Take no new invocations; instances finish the queue, then stop."""
        with self._lock:
            self._closed = True
            self._space.notify_all()
            for worker in self._idle:
                worker.wake.set()

    def abort(self) -> None:
        """Stop now: queued invocations are abandoned, running ones are killed and abandoned."""
        with self._lock:
            self._closed = True
            self._aborting = True
            self._space.notify_all()
            doomed, self._queue = list(self._queue), collections.deque()
            workers = list(self._workers)
            for worker in self._idle:
                worker.wake.set()
        for invocation in doomed:
            invocation.abandon(invocation)
        for worker in workers:
            if worker.instance.state is State.BUSY:
                worker.instance.kill()

    def join(self, timeout: float) -> bool:
        """Wait for every worker to end; True when they all did."""
        deadline = time.monotonic() + timeout
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        return not self._workers

    def stats(self) -> dict:
        with self._lock:
            states = collections.Counter(w.instance.state.value for w in self._workers)
            return {"instances": len(self._workers), "idle": len(self._idle),
                    "starting": self._starting, "queued": len(self._queue),
                    "queue_peak": self.queue_peak, "dropped": self.dropped,
                    "states": dict(states), "failing": self._failure.message if self._failure else None}

    def check_deadlines(self) -> None:
        """Cancel the stream of an instance whose invocation ran past its timeout: the invocation
        is answered with FunctionTimeout at once, and its worker kills the instance."""
        now = time.monotonic()
        for instance in self.instances():
            if instance.state is State.BUSY and now > instance.deadline and not instance.timed_out:
                instance.timed_out = True
                instance.cancel()

    def check_memory(self) -> None:
        """Kill instances whose resident memory (with their subprocesses) is over the limit; the
        invocation they run is answered with MemoryLimitExceeded."""
        limit = self.function.instance.memory
        if not limit:
            return
        for instance in self.instances():
            if instance.state not in (State.IDLE, State.BUSY) or instance.pid is None:
                continue
            rss = _tree_rss(instance.pid)
            if rss > limit:
                log.warning("instance %s: %d MB resident, over its limit of %d MB: killing it",
                            instance.id, rss >> 20, limit >> 20)
                instance.memory_exceeded = rss
                instance.kill()

    def instances(self) -> List[Instance]:
        with self._lock:
            return [w.instance for w in self._workers]


def _tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants, in bytes (0 when it is gone)."""
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


class _Worker(threading.Thread):
    """Starts one instance, feeds it invocations one at a time, and stops it."""

    def __init__(self, pool: Pool, instance: Instance) -> None:
        super().__init__(name=f"instance-{instance.id}", daemon=True)
        self.pool = pool
        self.instance = instance
        self.wake = threading.Event()
        self.slot: Optional[Invocation] = None
        self.idle_since = 0.0
        self.retiring = False

    def assign(self, invocation: Invocation) -> None:
        """Give an invocation to this idle worker (pool lock held)."""
        self.slot = invocation
        self.wake.set()

    def run(self) -> None:
        pool, instance = self.pool, self.instance
        try:
            instance.start(pool._ready_timeout)
        except InvocationError as exc:
            pool._start_failed(self, exc)
            return
        log.info("instance %s: ready (pid %s)", instance.id, instance.pid)
        try:
            batch = pool._started(self)
            while True:
                if not batch:
                    invocation = pool._wait(self)
                    if invocation is None:
                        break
                    batch = [invocation]
                if not pool.run(self, batch):
                    pool._retire(self)
                    break
                batch = pool._after(self)
        finally:
            # The function's timeout escalates quickly: the handler is stuck, not shutting down.
            instance.stop(grace=0.5 if instance.state is State.BUSY else 3.0)
            pool._gone(self)
            log.info("instance %s: stopped", instance.id)
