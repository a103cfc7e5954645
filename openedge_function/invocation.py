"""One message (or HTTP call) on its way to a function, the id it is known by, and its outcome.

An outcome is an InvokeResponse from the instance, or the InvocationError that stands instead of
one. `failure()` is the one place that tells a result from an error (the handler's own, carried
in an ERROR response, included); `label()` names an outcome for the summary line and the metrics.
"""
from __future__ import annotations

import random
from typing import Any, Callable, NamedTuple, Optional, Union

from runtime_python._pb import function_pb2 as pb

from .errors import InvocationError, error_of

Outcome = Union[Any, InvocationError]   # an InvokeResponse, or why there is none

# The kinds of an InvokeResponse (function.proto), named once for the whole supervisor.
NONE, BYTES, JSON, ERROR = (pb.InvokeResponse.NONE, pb.InvokeResponse.BYTES, pb.InvokeResponse.JSON,
                            pb.InvokeResponse.ERROR)
JSON_TYPE, BYTES_TYPE = "application/json", "application/octet-stream"

_bits = random.Random().getrandbits   # seeded from os.urandom


def new_request_id() -> str:
    """A random (version 4) UUID, as str(uuid.uuid4()) gives, at a quarter of its cost: no
    urandom call and no UUID object per message."""
    n = _bits(128) & ~(0xc000 << 48) | (0x8000 << 48)   # the RFC 4122 variant
    n = n & ~(0xf000 << 64) | (4 << 76)                  # version 4
    h = "%032x" % n
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def failure(outcome: Outcome) -> Optional[InvocationError]:
    """The error an outcome stands for, None for a result (a value, bytes or None)."""
    if isinstance(outcome, InvocationError):
        return outcome
    if outcome.kind == ERROR:
        return error_of(outcome)
    return None


def label(response: Any) -> str:
    """An instance's response as the summary line and the metrics count it: `ok`, `none`, or
    the error type."""
    kind = response.kind
    return response.error_type if kind == ERROR else "none" if kind == NONE else "ok"


def content_type(response: Any) -> str:
    """The content type of a result's payload."""
    return BYTES_TYPE if response.kind == BYTES else JSON_TYPE


class Delivery(NamedTuple):
    """What a rule keeps of an MQTT message beside its invocation."""
    retain: bool
    dup: bool
    generation: int   # the intake's connection it came on: acknowledged only on that one


class Invocation:
    """One message on its way through a pool; `done(invocation, outcome)` is called exactly once,
    or `abandon(invocation)` when the daemon is stopping and the message is left to the broker.
    Both are called on the data plane's loop."""

    __slots__ = ("request_id", "topic", "qos", "payload", "timestamp_ms", "mid", "done", "abandon",
                 "context", "attempts", "solo", "extra", "slot", "reply", "expires", "until", "ends",
                 "running_on")

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
        self.context = context   # what its caller keeps with it (a rule: its Delivery)
        self.attempts = 0
        self.solo = False   # runs in a batch of its own (after a batch it was in failed)
        self.extra: Optional[dict] = None   # more InvokeRequest fields (HTTP: content_type, http, ...)
        self.slot = -1      # its slot in the in-flight journal, -1 for none
        self.reply: Any = None    # MQTT 5: (response topic, correlation data) of a request
        self.expires = 0.0        # MQTT 5: when (monotonic) it expires unrun; 0 for never
        # A call of one function to another (context.invoke): when (monotonic) its caller's
        # invocation runs out of time, 0 for none; it is stopped then at the latest.
        self.until = 0.0
        self.ends: Optional[list] = None   # what runs when it ends: ending its own calls
        self.running_on: Any = None        # the instance running it, while one does
