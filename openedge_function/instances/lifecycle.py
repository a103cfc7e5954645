"""The life of an instance as an explicit state machine; depends on nothing else in the daemon."""
from __future__ import annotations

import enum
import signal
import threading
from typing import Optional


class State(enum.Enum):
    STARTING = "starting"   # process spawned, not yet proved ready
    IDLE = "idle"           # ready, waiting for an invocation
    BUSY = "busy"           # running one invocation
    STOPPING = "stopping"   # being stopped: no new work
    EXITED = "exited"       # the process is gone and reaped


_ALLOWED = {
    State.STARTING: {State.IDLE, State.STOPPING, State.EXITED},
    State.IDLE: {State.BUSY, State.STOPPING, State.EXITED},
    State.BUSY: {State.IDLE, State.STOPPING, State.EXITED},
    State.STOPPING: {State.EXITED},
    State.EXITED: set(),
}


class InvalidTransition(RuntimeError):
    """A state change the lifecycle does not allow (a bug in the daemon, never user input)."""


class Lifecycle:
    """Holds one instance's state; every change goes through `to`, which checks it."""

    __slots__ = ("_state", "_lock")

    def __init__(self) -> None:
        self._state = State.STARTING
        self._lock = threading.Lock()

    @property
    def state(self) -> State:
        return self._state

    def to(self, new: State) -> State:
        """Move to `new`; return the old state. Raises InvalidTransition when not allowed."""
        with self._lock:
            old = self._state
            if new is old and new in (State.STOPPING, State.EXITED):
                return old   # stopping twice is harmless
            if new not in _ALLOWED[old]:
                raise InvalidTransition(f"{old.value} -> {new.value}")
            self._state = new
            return old


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
