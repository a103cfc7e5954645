"""One instance's life on the data plane's loop: start it, feed it batches, answer, stop it.

A worker is a task. Starting and stopping the process block, so they run in the control
threads; everything else (the stream, the outcomes, the next batch) happens on the loop, so an
invocation costs no thread hand-off in the supervisor. What a worker needs from its pool is
`PoolSide`; the pool (pool.py) is the one that provides it.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable, List, Optional, Protocol

from runtime_python._pb import function_pb2 as pb

from .backlog import BatchSizer
from .config import Function
from .dataplane import DataPlane
from .errors import FunctionTimeout, InstanceCrashed, InvocationError, MemoryLimitExceeded, MessageExpired
from .instances.instance import Instance, StreamBroken
from .instances.lifecycle import State
from .invocation import Invocation, label

log = logging.getLogger(__name__)
summary_log = logging.getLogger("openedge_function.summary")   # one line per invocation

_NO_FIELDS: dict = {}


class PoolSide(Protocol):
    """What a worker needs from its pool. Every method is called on the data plane's loop."""

    plane: DataPlane
    function: Function
    timeout: float              # instance.timeout, seconds
    timeout_ms: int             # the same, for the runtime
    ready_timeout: float        # how long an instance may take to start
    sizer: BatchSizer           # learns handler durations, sizes batches
    aborting: bool              # stopping now: what fails is abandoned, not answered
    observe: Optional[Callable[[str, float], None]]   # (outcome label, seconds) per invocation

    def started(self, worker: "Worker") -> Optional[List[Invocation]]:
        """`worker`'s instance is ready: its first batch ([] when idle, None to retire)."""

    def start_failed(self, worker: "Worker", error: InvocationError) -> None:
        """`worker`'s instance did not start, for `error`; the worker is done."""

    def next_batch(self, worker: "Worker") -> Optional[List[Invocation]]:
        """After a batch: the next one, [] once the worker is marked idle (it then waits for
        `assign`), None when it should retire."""

    def retire(self, worker: "Worker") -> None:
        """`worker`'s instance is not reusable (timed out, crashed, out of memory)."""

    def push(self, invocation: Invocation, first: bool = False) -> None:
        """Queue an invocation again (to run alone after its batch failed)."""

    def gone(self, worker: "Worker") -> None:
        """`worker`'s instance is stopped and reaped; the worker is done."""


class Worker:
    """Starts one instance, feeds it invocations (alone or in batches), and stops it."""

    __slots__ = ("pool", "instance", "idle_since", "retiring", "_wake", "task")

    def __init__(self, pool: PoolSide, instance: Instance) -> None:
        self.pool = pool
        self.instance = instance
        self.idle_since = 0.0
        self.retiring = False
        self._wake: Optional["asyncio.Future[Optional[Invocation]]"] = None
        self.task: Optional["asyncio.Task"] = None

    def assign(self, invocation: Optional[Invocation]) -> None:
        """Give an invocation to this idle worker, or None to make it retire."""
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(invocation)

    async def _next(self) -> Optional[Invocation]:
        self._wake = wake = self.pool.plane.loop.create_future()
        return await wake

    async def run(self) -> None:
        pool, instance, plane = self.pool, self.instance, self.pool.plane
        try:
            await plane.blocking(instance.start, pool.ready_timeout)
            await instance.open(pool.ready_timeout)
        except Exception as exc:
            if not isinstance(exc, InvocationError):   # a fault of ours: still never a stuck pool
                log.exception("instance %s: start-up failed", instance.id)
                exc = InstanceCrashed(f"instance {instance.id} could not be started: {exc}")
            await instance.close_stream()
            await plane.blocking(instance.kill)
            pool.start_failed(self, exc)
            return
        log.info("instance %s: ready (pid %s)", instance.id, instance.pid)
        try:
            batch = pool.started(self)
            while batch is not None:
                if not batch:
                    invocation = await self._next()
                    if invocation is None:
                        break
                    batch = [invocation]
                if not await self._run(batch):
                    pool.retire(self)
                    break
                batch = pool.next_batch(self)
        finally:
            # The function's timeout escalates quickly: the handler is stuck, not shutting down.
            grace = 0.5 if instance.state is State.BUSY else 3.0
            await instance.close_stream()
            await plane.blocking(instance.stop, grace)
            pool.gone(self)
            log.info("instance %s: stopped", instance.id)

    async def _run(self, batch: List[Invocation]) -> bool:
        """Run a batch on the instance and hand each invocation its outcome; False when the
        instance is not reusable (it timed out, crashed or ran out of memory)."""
        pool, instance = self.pool, self.instance
        started = time.monotonic()
        for invocation in batch:
            if invocation.expires and invocation.expires < started:
                batch = self._unexpired(batch, started)
                if not batch:
                    return True
                break
        deadline = started + pool.timeout
        message = pb.InvokeBatch()
        add = message.requests.add   # built in place: a list of requests would be copied again
        timeout_ms = pool.timeout_ms
        for invocation in batch:
            add(request_id=invocation.request_id, topic=invocation.topic, qos=invocation.qos,
                payload=invocation.payload, timestamp_ms=invocation.timestamp_ms,
                timeout_ms=timeout_ms, message_id=invocation.mid, **(invocation.extra or _NO_FIELDS))
            if invocation.until:   # a call: it ends with its caller at the latest
                invocation.running_on = instance
                if invocation.until < deadline:
                    deadline = invocation.until
        instance.deadline = deadline   # before BUSY: the deadline check reads both
        instance.running = batch
        instance.output.request_id = batch[0].request_id   # for output the runtime did not mark
        instance.lifecycle.to(State.BUSY)
        try:
            responses = await instance.invoke(message)
        except StreamBroken:
            self._ended(batch)
            await self._failed(batch, time.monotonic() - started)
            return False
        self._ended(batch)
        instance.lifecycle.to(State.IDLE)
        summaries = summary_log.isEnabledFor(logging.INFO)
        observe = pool.observe
        sizer = pool.sizer
        for invocation, response in zip(batch, responses):
            seconds = response.duration_us / 1e6
            sizer.observe(seconds)
            if summaries or observe is not None:
                outcome = label(response)
                if summaries:
                    self._summary(invocation, outcome, seconds, response.max_rss_kb << 10)
                if observe is not None:
                    observe(outcome, seconds)
            invocation.done(invocation, response)
        return True

    def _ended(self, batch: List[Invocation]) -> None:
        """The batch is over on this instance: the calls it made end with it."""
        self.instance.running = ()
        for invocation in batch:
            invocation.running_on = None
            ends = invocation.ends
            if ends:
                invocation.ends = None
                for end in ends:
                    end()

    @staticmethod
    def _unexpired(batch: List[Invocation], now: float) -> List[Invocation]:
        """MQTT 5: what expired while it waited is not run (its requester gave up on it)."""
        live = []
        for invocation in batch:
            if invocation.expires and invocation.expires < now:
                invocation.done(invocation, MessageExpired(
                    f"the message expired {now - invocation.expires:.1f}s before an instance was free"))
            else:
                live.append(invocation)
        return live

    async def _failed(self, batch: List[Invocation], seconds: float) -> None:
        """The stream broke during a batch. Alone, the invocation gets its envelope; in a batch,
        which one did it is unknown, so each runs again alone (where a repeat failure is its own)."""
        pool = self.pool
        if pool.aborting:
            for invocation in batch:
                invocation.abandon(invocation)
            return
        if len(batch) == 1:
            [invocation] = batch
            error, used = await self._failure_of(invocation)
            self._summary(invocation, error.error_type, seconds, used)
            if pool.observe is not None:
                pool.observe(error.error_type, seconds)
            invocation.done(invocation, error)
            return
        log.warning("function %s: instance %s failed during a batch of %d; running each alone",
                    pool.function.name, self.instance.id, len(batch))
        pool.sizer.reset()   # batch again only once handlers prove quick
        for invocation in reversed(batch):
            invocation.solo = True
            pool.push(invocation, first=True)

    async def _failure_of(self, invocation: Invocation) -> "tuple[InvocationError, int]":
        """Why a call got no answer, and the memory it was seen to use."""
        instance, limits = self.instance, self.pool.function.instance
        if instance.oom_peak() is not None:
            return MemoryLimitExceeded(
                f"instance {instance.id} used {instance.memory_exceeded >> 20} MB, over its "
                f"limit of {limits.memory >> 20} MB, and was killed"), instance.memory_exceeded
        if instance.timed_out:
            if invocation.until and invocation.until <= instance.deadline:
                return FunctionTimeout(
                    f"function {self.pool.function.name} was called by an invocation that ended (or ran "
                    f"out of time) before it; instance {instance.id} was killed"), 0
            return FunctionTimeout(
                f"function {self.pool.function.name} timed out after {limits.timeout:g}s; "
                f"instance {instance.id} was killed"), 0
        await self.pool.plane.blocking(instance.kill)
        return InstanceCrashed(
            f"instance {instance.id} (pid {instance.pid}) {instance.exit_description(0)} "
            f"while running request {invocation.request_id}"), 0

    def _summary(self, invocation: Invocation, outcome: str, seconds: float, used: int) -> None:
        """FunctionGraph's execution summary: one line per invocation."""
        millis = seconds * 1000
        billed = max(100, math.ceil(millis / 100) * 100)   # rounded up to 100 ms
        limit = self.pool.function.instance.memory
        summary_log.info(
            "request %s: function %s, memory %s, duration %.2f ms, used %s, billed %d ms, outcome %s",
            invocation.request_id, self.pool.function.name, f"{limit >> 20} MB" if limit else "unlimited",
            millis, f"{used >> 20} MB" if used else "unknown", billed, outcome,
            extra={"function": self.pool.function.name, "instance": self.instance.id,
                   "request_id": invocation.request_id})
