"""A function's pool of instances: grows with the load up to `max`, shrinks to `min` when idle.

An invocation goes to the most recently idle instance (so the others can age out), else waits in
the pool's backlog while a new instance starts (when fewer than `max` exist), else waits for the
next free one. Each instance has a worker task (worker.py, whose `PoolSide` is what the pool owes
it); starting an instance happens in the control threads, so intake never stalls on it. The pool's
spawner (instances/spawner.py) makes the instances.

The pool's state belongs to the data plane's loop: intake (`submit`, `push`) and the workers call
it there. Other threads go through the loop (`offer` and `withdraw` for HTTP calls, `close`,
`abort`) or only read (`stats`, `instances`). When the backlog is full the pool tells its
listeners (the rules' intakes) to pause, and again when there is room.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import time
from typing import Any, Callable, List, Optional, Set, Tuple

from .backlog import Backlog, BatchSizer
from .config import Function
from .dataplane import DataPlane
from .errors import FunctionLoadError, InvocationError
from .instances.instance import Instance
from .instances.lifecycle import State
from .instances.memory import enforce_memory
from .instances.spawner import Spawner
from .invocation import Invocation
from .worker import Worker

log = logging.getLogger(__name__)


class WhenFull(enum.Enum):
    """What taking an invocation does when the backlog is full."""
    HOLD = "hold"        # take it all the same (intake pauses)
    DROP = "drop"        # drop it, counted (QoS 0 with overflow: drop)
    REFUSE = "refuse"    # refuse it (a direct call, which answers QueueFull)


class Refusal(enum.Enum):
    """Why a pool did not take an invocation."""
    CLOSED = "closed"      # stopped (a closed pool with a successor hands the call on)
    FULL = "full"          # no idle instance and a full backlog
    DEADLOCK = "deadlock"  # its callers hold every instance it may have

_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 60.0
_TICK = 0.05   # seconds between checks of deadlines, idle instances and `min`
_SPARE_AGAIN = 10.0   # seconds before another try at a spare, after one that could not be made


class Pool:
    """The instances of one function, and the invocations waiting for them."""

    def __init__(self, plane: DataPlane, function: Function, spawner: Spawner, queue_max: int = 0,
                 warm: bool = False, held: bool = False) -> None:
        self.plane = plane
        self.function = function
        self.spawner = spawner
        limits = function.instance
        self._min, self._max = limits.min, limits.max
        self.timeout = limits.timeout
        self.timeout_ms = int(limits.timeout * 1000)
        self.ready_timeout = max(30.0, limits.timeout)
        self.backlog = Backlog(queue_max or max(64, 16 * limits.max))
        self.sizer = BatchSizer(limits.timeout)
        self._idle: List[Worker] = []          # a stack: the most recently idle on top
        self._workers: Set[Worker] = set()     # every worker whose process is not yet reaped
        self._starting = 0
        self._retiring = 0
        self._seq = 0
        self._closed = False
        self._successor: Optional["Pool"] = None   # the same function's new code, once it took over
        self.aborting = False
        self._failure: Optional[InvocationError] = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self.retries = True   # a start that failed is tried again (the run command's pool: once)
        self.load_failures = 0   # instances that did not start (FunctionLoadError, crashes at start)
        self._full = False
        self._listeners: List[Callable[[bool], None]] = []
        self._held_at = float("-inf")
        self._tick: Optional[object] = None
        self.dropped = 0
        # A pool for new code starts one instance at once, whatever `min`, to prove the code loads.
        self._warm = 1 if warm else 0
        # Held: no instance starts until `release()` (its requirements are being installed).
        self.held = held
        # Called once, on the loop, with None when the first instance is ready or with the error
        # that kept it from starting: the hand-over to new code (deploy/handover.py).
        self.on_first: Optional[Callable[[Optional[InvocationError]], None]] = None
        # Called with (outcome, seconds) after each invocation that ran: the daemon's metrics.
        self.observe: Optional[Callable[[str, Optional[float]], None]] = None
        # The last good version of the function's code (deploy/lastgood.py): new instances start
        # from it while the code directory holds code that does not load (`code_error`).
        self.last_good: Optional[Any] = None
        self.on_last_good = False
        self.code_error: Optional[InvocationError] = None
        self._code = function   # what instances start from: the function, or its last good
        # Called on the loop with the instance once the first instance of the function's own
        # code (not its last good) is ready: the daemon keeps that code as the last good.
        self.on_loaded: Optional[Callable[[Instance], None]] = None
        # The spare: a fork of the template already in its control group, waiting for its spec,
        # made while the pool is below max; the next instance to start is this one.
        self.spares = limits.spare
        self._spare: Optional[Instance] = None
        self._spare_coming = False
        self._spare_after = 0.0   # after a spare that could not be made, the next waits
        # (code, packages) whose instances are not forks of the template: no spare for them
        self._spareless: Tuple[Optional[Function], Tuple[str, ...]] = (None, ())
        self._discards = 0        # spares being ended: join() waits for them

    @property
    def queue_max(self) -> int:
        return self.backlog.limit

    @queue_max.setter
    def queue_max(self, value: int) -> None:
        self.backlog.limit = value

    # -- on the loop: intake -------------------------------------------------------------------

    def start(self) -> None:
        """Start the `min` instances now (not at the first message) and the periodic checks."""
        if self._tick is None and not self._closed:
            self._grow()
            self._tick = self.plane.loop.call_later(_TICK, self._check)

    def listen(self, on_full: Callable[[bool], None]) -> None:
        """Call `on_full(True)` when the backlog fills, `on_full(False)` when it has room again."""
        self._listeners.append(on_full)
        if self._full:
            on_full(True)

    def unlisten(self, on_full: Callable[[bool], None]) -> None:
        if on_full in self._listeners:
            self._listeners.remove(on_full)
            if self._full:
                on_full(False)

    def submit(self, invocation: Invocation, droppable: bool = False) -> bool:
        """Hand `invocation` to an instance or queue it. A full backlog drops a `droppable`
        invocation (counted) and takes any other one, telling the listeners to pause intake.
        False when the invocation was not taken (dropped, or the pool is closed)."""
        return self._take(invocation, WhenFull.DROP if droppable else WhenFull.HOLD) is None

    def offer(self, invocation: Invocation, callers: int = 0) -> Optional[Refusal]:
        """Take a direct call (HTTP) without waiting: None when taken, else why not; DEADLOCK
        when the `callers` instances of this function that wait on this very call
        (context.invoke) are all it can have. From any thread."""
        return self.plane.run(self._take, invocation, WhenFull.REFUSE, callers)

    def _take(self, invocation: Invocation, when_full: WhenFull, callers: int = 0) -> Optional[Refusal]:
        if self._closed:   # a call that found this pool just before new code took over goes on
            if self._successor is None:
                return Refusal.CLOSED
            return self._successor._take(invocation, when_full, callers)
        if self._idle:
            self._idle.pop().assign(invocation)
            return None
        if callers >= self._max:
            return Refusal.DEADLOCK
        if self._failing() and not self._workers:
            invocation.done(invocation, self._failure)
            return None
        if self.backlog.full() and when_full is not WhenFull.HOLD:
            if when_full is WhenFull.DROP:
                self.dropped += 1
            return Refusal.FULL
        self._enqueue(invocation)
        return None

    def withdraw(self, invocation: Invocation) -> bool:
        """Take back an invocation that is still queued; False when an instance has it.
        From any thread."""
        def remove() -> bool:
            taken = self.backlog.remove(invocation)
            if taken:
                self._check_room()
            return taken
        return self.plane.run(remove)

    def push(self, invocation: Invocation, first: bool = False) -> None:
        """Queue an invocation that was already taken (a retry, the next of an ordered topic):
        whatever the backlog's length; ahead of it when `first`."""
        if self.aborting:
            invocation.abandon(invocation)
        elif self._idle:
            self._idle.pop().assign(invocation)
        else:
            self._enqueue(invocation, first)

    def _enqueue(self, invocation: Invocation, first: bool = False) -> None:
        self.backlog.append(invocation, first)
        if not self._full and self.backlog.full():
            self._full = True
            now = time.monotonic()
            if now - self._held_at > 10.0:   # once per episode, not once per message
                log.warning("function %s: all %d instances busy and %d messages queued: pausing intake",
                            self.function.name, len(self._workers), len(self.backlog))
            self._held_at = now
            for on_full in list(self._listeners):
                on_full(True)
        self._grow()

    def _check_room(self) -> None:
        if self._full and not self.backlog.full():
            self._full = False
            for on_full in list(self._listeners):
                on_full(False)

    def _failing(self) -> bool:
        return self._failure is not None and time.monotonic() < self._retry_at

    def _grow(self) -> None:
        """Start instances for queued invocations and for `min`."""
        if self._failing() or self.held:
            return
        live = len(self._workers) - self._retiring
        wanted = len(self.backlog) - self._starting
        if not self._closed:   # a closing pool still serves its backlog, but keeps no minimum
            wanted = max(wanted, max(self._min, self._warm) - live)
        if self._failure is not None:   # after a failure, retry with one instance at a time
            wanted = min(wanted, 1 - self._starting)
        for _ in range(max(0, min(wanted, self._max - len(self._workers)))):
            instance = self._take_spare()
            if instance is None:
                self._seq += 1
                instance = self.spawner.instance(self._code, self._seq, self._on_lost)
            worker = Worker(self, instance)
            self._workers.add(worker)
            self._starting += 1
            worker.task = self.plane.spawn(worker.run())
        self._prepare_spare()

    # -- the spare (on the loop) -------------------------------------------------------------------

    def _take_spare(self) -> Optional[Instance]:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.function is self._code and spare.paths == self.spawner.paths and spare.alive():
            return spare
        self._discard(spare)   # made for code or packages the pool no longer starts, or dead
        return None

    def _prepare_spare(self) -> None:
        if (not self.spares or self._spare is not None or self._spare_coming or self._closed
                or self._failure is not None or len(self._workers) >= self._max
                or time.monotonic() < self._spare_after
                or (self._spareless[0] is self._code and self._spareless[1] == self.spawner.paths)):
            return
        self._seq += 1
        spare = self.spawner.instance(self._code, self._seq, self._on_lost)
        self._spare_coming = True
        self.plane.spawn(self._make_spare(spare, self._seq))

    async def _make_spare(self, spare: Instance, seq: int) -> None:
        try:
            made = await self.plane.blocking(spare.prepare, True)
        except Exception as exc:   # FunctionLoadError, InstanceCrashed, OSError
            log.debug("function %s: no spare instance (%s)", self.function.name, exc)
            self._spare_coming = False
            self._spare_after = time.monotonic() + _SPARE_AGAIN
            return
        self._spare_coming = False
        if not made:   # its instances are new interpreters: none is made spare
            self._spareless = (spare.function, spare.paths)
            if self._seq == seq:
                self._seq -= 1   # its number goes to the next instance, as if it was never asked for
            return
        if self._closed or self._spare is not None:
            self._discard(spare)
        else:
            self._spare = spare

    def _discard(self, spare: Instance) -> None:
        self._discards += 1

        async def end() -> None:
            try:
                await self.plane.blocking(spare.discard)
            finally:
                self._discards -= 1

        self.plane.spawn(end())

    def _check(self) -> None:
        """Every _TICK: deadlines, idle instances past their idle time, `min` and retries."""
        self._tick = None
        now = time.monotonic()
        for worker in self._workers:
            instance = worker.instance
            if instance.state is State.BUSY and now > instance.deadline and not instance.timed_out:
                # The invocation is answered with FunctionTimeout at once; its worker kills it.
                instance.timed_out = True
                instance.cancel()
        self._evict_idle(now)
        self._grow()
        if not (self._closed and not self._workers):
            self._tick = self.plane.loop.call_later(_TICK, self._check)

    def _evict_idle(self, now: float) -> None:
        idletime = self.function.instance.idletime
        for worker in list(self._idle):   # the least recently idle first
            if now < worker.idle_since + idletime:
                break
            if len(self._workers) - self._retiring > self._min:
                self._idle.remove(worker)
                self._mark_retiring(worker)
                worker.assign(None)
            else:   # kept for `min`: start a new idle period
                worker.idle_since = now

    # -- on the loop: called by workers ----------------------------------------------------------

    def started(self, worker: Worker) -> Optional[List[Invocation]]:
        self._starting -= 1
        if self._failure is not None:
            log.info("function %s: instance %s started, the function works again",
                     self.function.name, worker.instance.id)
        self._failure = None
        self._backoff = _BACKOFF_FIRST
        self._warm = 0
        self._first(None)
        if not self.on_last_good:   # the function's own code loads (again)
            self.code_error = None
            on_loaded, self.on_loaded = self.on_loaded, None
            if on_loaded is not None:
                on_loaded(worker.instance)
        return self.next_batch(worker)

    def _first(self, error: Optional[InvocationError]) -> None:
        on_first, self.on_first = self.on_first, None
        if on_first is not None:
            on_first(error)

    def follow(self, predecessor: "Pool") -> None:
        """Number instances on from `predecessor`'s (the same function's previous code)."""
        self._seq = predecessor._seq

    def release(self, paths: Tuple[str, ...] = ()) -> None:
        """Start instances (with `paths` on their sys.path): the function's packages are in place."""
        self.spawner.paths = paths
        self.held = False
        self._grow()

    def use_last_good(self, error: InvocationError, quiet: bool = False) -> bool:
        """The function's code does not load (`error`): new instances start from its last good
        version, when it has one (True). `quiet`: the caller says so in the log."""
        if self.on_last_good:
            return False   # the last good version does not load either: failing, as any pool
        self.code_error = error
        good = self.last_good
        if good is None:
            return False
        self.on_last_good = True
        self._code = dataclasses.replace(self.function, codedir=good.path)
        self.spawner.paths = good.paths
        if not quiet:
            log.error("function %s: its code does not load (%s: %s); new instances start from its last "
                      "good %s until %s changes", self.function.name, error.error_type, error.message,
                      good.describe(), self.function.codedir)
        return True

    def fail(self, error: InvocationError) -> None:
        """No instance can start until the function changes (its requirements do not install):
        what waits and what comes is answered with `error`, unless the last good version serves."""
        self.held = False
        if self.use_last_good(error):
            self._grow()
            return
        self._failure = error
        self._retry_at = float("inf")
        self._first(error)
        self._answer_waiting(error)

    def _answer_waiting(self, error: InvocationError) -> None:
        """With no instance left to serve it, what waits is answered with `error`."""
        if self._workers:
            return
        doomed = self.backlog.clear()
        self._check_room()
        observe = self.observe
        for invocation in doomed:
            if observe is not None:   # answered without running: counted, with no run time
                observe(error.error_type, None)
            invocation.done(invocation, error)

    def hand_over(self, successor: "Pool") -> None:
        """Close, and give what is queued to `successor` (the same function's new code): what
        runs finishes here, nothing queued runs on the old code."""
        self._close()
        self._successor = successor
        moved = self.backlog.clear()
        self._check_room()
        for invocation in moved:
            successor.push(invocation)

    def start_failed(self, worker: Worker, error: InvocationError) -> None:
        self._starting -= 1
        self.load_failures += 1
        self._workers.discard(worker)
        known = [k.message for k in (self._failure, self.code_error) if k is not None]   # said already
        if isinstance(error, FunctionLoadError) and self.on_first is None and self.use_last_good(error):
            self._grow()   # at once: what waits is served by the last good version
            return
        # New code that does not load is the daemon's to report (the old code still serves).
        repeated = self.on_first is not None or error.message in known
        self._first(error)
        self._failure = error
        self._retry_at = time.monotonic() + self._backoff
        backoff, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF_MAX)
        if not repeated:
            log.error("function %s: %s: %s%s", self.function.name, error.error_type, error.message,
                      f" (next try in {backoff:g}s)" if self.retries else "")
        self._answer_waiting(error)

    def next_batch(self, worker: Worker) -> Optional[List[Invocation]]:
        """The next queued invocations for `worker` (a batch); [] after marking it idle; None
        when it should retire instead (its process is gone, or the pool closed)."""
        if worker.instance.lost.is_set():
            self._mark_retiring(worker)
            return None
        backlog = self.backlog
        if backlog:
            # Never more than a fair share of the backlog: the other instances take the rest.
            share = -(-len(backlog) // max(1, len(self._workers) - self._retiring))
            batch = backlog.take(min(self.sizer.limit(), share))
            self._check_room()
            return batch
        if self._closed:
            self._mark_retiring(worker)
            return None
        worker.idle_since = time.monotonic()
        self._idle.append(worker)
        return []

    def retire(self, worker: Worker) -> None:
        """`worker`'s instance is unusable: it no longer counts as live."""
        self._mark_retiring(worker)

    def _mark_retiring(self, worker: Worker) -> None:
        if not worker.retiring:
            worker.retiring = True
            self._retiring += 1

    def gone(self, worker: Worker) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
        self._workers.discard(worker)
        if worker.retiring:
            self._retiring -= 1
        if not self._workers and self.spawner.sandbox.who.own:   # what its user left in /tmp & co.
            try:
                self.plane.blocking(self.spawner.sandbox.sweep, self.function.name)
            except RuntimeError:   # the control threads are gone: the daemon is stopping
                self.spawner.sandbox.sweep(self.function.name)
        self._grow()
        if self._closed and not self._workers and self._tick is not None:
            self._tick.cancel()   # type: ignore[attr-defined]
            self._tick = None

    def _on_lost(self, instance: Instance) -> None:
        """The fd watcher (its own thread) saw an instance's process go."""
        if not self._closed:
            log.info("instance %s: process %s ended", instance.id, instance.pid)
        self.plane.call(self._lost, instance)

    def _lost(self, instance: Instance) -> None:
        for worker in self._idle:
            if worker.instance is instance:
                self._idle.remove(worker)
                self._mark_retiring(worker)
                worker.assign(None)
                break

    # -- stopping (any thread) -------------------------------------------------------------------

    def close(self) -> None:
        """Take no new invocations; instances finish the backlog, then stop."""
        self.plane.run(self._close)

    def _close(self) -> None:
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is not None:
            self._discard(spare)
        idle, self._idle = self._idle, []
        for worker in idle:
            self._mark_retiring(worker)
            worker.assign(None)
        if self._tick is None and self._workers:
            self._tick = self.plane.loop.call_later(_TICK, self._check)

    def abort(self) -> None:
        """Stop now: queued invocations are abandoned, running ones are killed and abandoned."""
        self.plane.run(self._abort)

    def _abort(self) -> None:
        self.aborting = True
        self._close()
        doomed = self.backlog.clear()
        self._check_room()
        for invocation in doomed:
            invocation.abandon(invocation)
        for worker in self._workers:
            if worker.instance.state is State.BUSY:
                worker.instance.signal_kill()

    def join(self, timeout: float) -> bool:
        """Wait for every worker to end; True when they all did (and the pool's directory, its
        sockets and temporary files, is gone)."""
        deadline = time.monotonic() + timeout
        while (self._workers or self._discards or self._spare_coming) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._workers or self._discards or self._spare_coming:
            return False
        if self._closed:
            self.spawner.sandbox.remove()
        return True

    # -- reading (any thread) ----------------------------------------------------------------------

    def stats(self) -> dict:
        workers = list(self._workers)
        states = collections.Counter(w.instance.state.value for w in workers)
        return {"instances": len(workers), "idle": len(self._idle),
                "starting": self._starting, "queued": len(self.backlog),
                "queue_peak": self.backlog.peak, "dropped": self.dropped,
                "states": dict(states), "failing": self._failure.message if self._failure else None,
                "load_failures": self.load_failures, "spare": self._spare is not None}

    @property
    def queue_peak(self) -> int:
        return self.backlog.peak

    def instances(self) -> List[Instance]:
        return [w.instance for w in list(self._workers)]

    def check_memory(self) -> None:
        """Kill instances whose resident memory (with their subprocesses) is over the limit; the
        invocation they run is answered with MemoryLimitExceeded. From the daemon's thread."""
        enforce_memory(self.instances(), self.function.instance.memory)
