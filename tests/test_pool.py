"""The pool with real runtime processes: scaling, eviction, min, timeouts. No broker involved."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import psutil
import pytest

from openedge_function.config import Function, Limits
from openedge_function.errors import FunctionTimeout, InvocationError
from openedge_function.invocation import Invocation
from openedge_function.pool import Pool
from openedge_function.instances.fdwatch import FdWatcher as Watcher
from openedge_function.instances.spawner import Spawner
from openedge_function.isolation import Sandbox
from tests.helpers import alive, wait_until, write_handler

HANDLERS = '''
import os, time

def sleepy(event, context):
    time.sleep(event.get("sleep", 1))
    return os.getpid()

def spin(event, context):
    while True:
        pass

def c_blocked(event, context):
    # One C call that holds the GIL for minutes: Python-level signal handlers never get to run.
    return sum(range(10 ** 12))

def pid(event, context):
    return os.getpid()
'''


@pytest.fixture
def watcher():
    w = Watcher()
    yield w
    w.close()


class Harness:
    """A pool of one function, its outcomes, and the runtime processes it started."""

    def __init__(self, tmp_path, watcher, plane, handler: str, **limits) -> None:
        codedir = tmp_path / "code"
        write_handler(str(codedir), "handlers.py", HANDLERS)
        rundir = tmp_path / "run"
        rundir.mkdir(mode=0o700, exist_ok=True)
        # A unique function name tells this test's processes apart from any other's.
        self.name = f"f{uuid.uuid4().hex[:10]}"
        self.function = Function(name=self.name, handler=handler, codedir=str(codedir),
                                 instance=Limits(**limits))
        self.plane = plane
        self.pool = Pool(plane, self.function, Spawner(Sandbox.make(str(rundir), self.function), watcher))
        plane.run(self.pool.start)   # as the daemon does: min instances at boot
        self.outcomes = {}
        self.finished = {}
        self.lock = threading.Lock()
        self.seen = set()

    def submit(self, request_id: str, event: dict) -> None:
        invocation = Invocation(request_id, "t", 1, json.dumps(event).encode(), 0, 1,
                                self._done, lambda inv: None)
        invocation.context = time.monotonic()
        assert self.plane.run(self.pool.submit, invocation)

    def _done(self, invocation, outcome) -> None:
        with self.lock:
            self.outcomes[invocation.request_id] = outcome
            self.finished[invocation.request_id] = time.monotonic() - invocation.context

    def wait(self, *request_ids: str, timeout: float = 30):
        wait_until(lambda: all(r in self.outcomes for r in request_ids), timeout,
                   message=f"outcomes of {request_ids}")
        return [self.outcomes[r] for r in request_ids]

    def processes(self):
        """The runtime processes of this pool that are alive now."""
        found = []
        for child in psutil.Process().children(recursive=True):
            try:
                if self.name in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child.pid)
            except psutil.Error:
                pass
        self.seen.update(found)
        return found

    def close(self) -> None:
        self.pool.close()
        assert self.pool.join(20)
        wait_until(lambda: not alive(sorted(self.seen)) and not self.processes(), 10,
                   message="every instance to be gone")


@pytest.fixture
def harness(tmp_path, watcher, plane):
    made = []

    def make(handler: str, **limits) -> Harness:
        h = Harness(tmp_path / str(len(made)), watcher, plane, handler, **limits)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def pid_of(outcome) -> int:
    assert not isinstance(outcome, InvocationError), outcome
    return json.loads(outcome.payload)


def test_a_burst_scales_up_to_max_and_not_beyond_then_idles_away(harness):
    h = harness("handlers.sleepy", max=4, idletime=1.5)
    counts = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counts.append(len(h.processes()))
            time.sleep(0.02)

    counter = threading.Thread(target=count)
    counter.start()
    started = time.monotonic()
    ids = [f"r{i}" for i in range(8)]
    for request_id in ids:
        h.submit(request_id, {"sleep": 1})
    outcomes = h.wait(*ids)
    elapsed = time.monotonic() - started
    stop.set()
    counter.join()
    pids = {pid_of(o) for o in outcomes}
    # Eight one-second calls on four instances: two rounds, not eight.
    assert len(pids) == 4
    assert elapsed < 3.8, elapsed
    assert max(counts) == 4
    # After idletime, with min 0, every instance is stopped and reaped.
    wait_until(lambda: not h.processes(), timeout=8, message="idle instances to be stopped")
    assert not alive(sorted(pids))
    wait_until(lambda: h.pool.stats()["instances"] == 0, message="the pool to count none")


def test_the_most_recently_idle_instance_is_used_first(harness):
    h = harness("handlers.pid", max=3)
    for i in range(3):
        h.submit(f"warm{i}", {})
    h.wait("warm0", "warm1", "warm2")
    wait_until(lambda: h.pool.stats()["idle"] == h.pool.stats()["instances"] > 1,
               message="several instances, all idle")
    h.submit("a", {})
    [a] = h.wait("a")
    h.submit("b", {})
    [b] = h.wait("b")
    assert pid_of(a) == pid_of(b)   # sequential calls keep landing on one instance


def test_min_instances_start_at_boot_and_a_killed_one_is_replaced(harness):
    h = harness("handlers.pid", min=2, max=3, idletime=0.5)
    first = wait_until(lambda: len(h.processes()) == 2 and h.processes(), message="two warm instances")
    wait_until(lambda: h.pool.stats()["idle"] == 2, message="both ready")
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    # Noticed at once, reaped (not a zombie), and replaced to keep min.
    wait_until(lambda: victim not in h.processes() and len(h.processes()) == 2, timeout=10,
               message="the killed instance to be replaced")
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(victim).status()
    # min stays even well past idletime.
    time.sleep(1.5)
    assert len(h.processes()) == 2
    h.submit("x", {})
    assert pid_of(h.wait("x")[0]) in h.processes()


@pytest.mark.parametrize("handler", ["handlers.sleepy", "handlers.spin", "handlers.c_blocked"])
def test_a_timeout_answers_at_once_and_kills_the_instance(harness, handler):
    h = harness(handler, max=1, timeout=1.0)
    h.submit("slow", {"sleep": 60})
    [outcome] = h.wait("slow", timeout=20)
    assert isinstance(outcome, FunctionTimeout)
    # Answered within about a second of the timeout, whatever the handler is doing.
    assert h.finished["slow"] < 1.0 + 1.5 + 2.0, h.finished["slow"]   # + start-up of the instance
    victims = sorted(h.seen | set(h.processes()))
    wait_until(lambda: not alive(victims), timeout=5, message="the timed-out instance to die")
    # Never reused: the next message gets a fresh instance.
    h.submit("next", {"sleep": 0})
    if handler == "handlers.sleepy":
        assert pid_of(h.wait("next")[0]) not in victims
    else:
        assert isinstance(h.wait("next")[0], FunctionTimeout)


def test_a_full_queue_pauses_intake_and_drops_only_what_may_be_dropped(harness):
    h = harness("handlers.sleepy", max=1)
    h.pool.queue_max = 2
    signals = []
    h.plane.run(h.pool.listen, signals.append)
    h.submit("busy", {"sleep": 0.5})
    wait_until(lambda: h.pool.stats()["queued"] == 0 and h.pool.stats()["instances"] == 1,
               message="the first call to start")
    h.submit("q1", {"sleep": 0})
    assert signals == []
    h.submit("q2", {"sleep": 0})
    assert signals == [True]   # full: the intakes watching it pause
    dropped = Invocation("drop", "t", 0, b"{}", 0, 0, h._done, lambda inv: None)
    assert h.plane.run(h.pool.submit, dropped, True) is False
    assert h.pool.dropped == 1
    h.submit("q3", {"sleep": 0})   # what was read already is taken, never refused
    assert h.pool.queue_peak == 3
    h.wait("busy", "q1", "q2", "q3")
    assert signals == [True, False]   # room again: intake resumes
    assert "drop" not in h.outcomes


def test_a_failed_batch_is_split_so_only_the_guilty_message_fails(harness, caplog):
    h = harness("handlers.sleepy", max=1, timeout=1.0)
    for i in range(5):   # quick calls teach the pool that batching is safe
        h.submit(f"warm{i}", {"sleep": 0})
        h.wait(f"warm{i}")
    h.submit("busy", {"sleep": 0.3})
    wait_until(lambda: h.pool.stats()["queued"] == 0, message="the first call to start")
    names = ["a", "b", "hang", "c"]
    for name in names:
        h.submit(name, {"sleep": 5 if name == "hang" else 0})
    outcomes = dict(zip(names, h.wait(*names, timeout=30)))
    assert isinstance(outcomes["hang"], FunctionTimeout)
    for name in ("a", "b", "c"):
        assert not isinstance(outcomes[name], InvocationError), (name, outcomes[name])
    assert "failed during a batch of 4; running each alone" in caplog.text


def test_request_ids_are_distinct_version_4_uuids():
    import uuid

    from openedge_function.invocation import new_request_id
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:100]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
