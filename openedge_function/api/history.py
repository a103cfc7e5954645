"""What the console (api/console.py) shows of the recent past, kept in the daemon in bounded
rings, so that a page shows history from the moment it opens:

- `Samples`: each function's invocation counts (api/metrics.py's `Counts`), copied once a second
  by the daemon's thread, SAMPLES of them: throughput, errors and run-time quantiles over the
  last minutes. The message path does not see it.
- `Failures`: the last FAILURES messages and calls answered with an error envelope, with their
  stack trace and packet (bounded); recorded where the envelope is made, off the path of
  messages that succeed.
- `LogTail`: a logging handler that keeps the last LOG_LINES lines of each function (those the
  daemon logs with a `function` field: what handlers print, tagged with their request ids, their
  failures, the execution summaries).

Each entry of the last two carries a sequence number: a page asks for what came after the last
one it has.
"""
from __future__ import annotations

import base64
import collections
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, List, Mapping, Optional, Tuple

from .metrics import Counts, quantile

if TYPE_CHECKING:
    from ..errors import InvocationError
    from ..invocation import Invocation

SAMPLES = 300          # one a second: five minutes
FAILURES = 50          # the last failures kept
LOG_LINES = 500        # the last lines kept per function
LOG_FUNCTIONS = 256    # functions whose lines are kept (a reload may bring new ones)
PAYLOAD_MAX = 4096     # bytes of a failed message's payload kept
TRACE_LINES = 60       # lines of a stack trace kept (its last)
LINE_MAX = 4096        # characters of a log line kept
MESSAGE_MAX = 2048     # characters of an error message kept

# (time, invocations, errors, run-time buckets): cumulative since the daemon started.
Sample = Tuple[float, int, int, Tuple[int, ...]]


class Samples:
    """Each function's counts, once a second."""

    def __init__(self, functions: Mapping[str, Counts]) -> None:
        self._functions = functions
        self._rings: Dict[str, Deque[Sample]] = {}

    def sample(self, names: Iterable[str], now: Optional[float] = None) -> None:
        """Copy the counts of the functions `names` (those configured now; the daemon's thread,
        once a second); the rings of others go."""
        now = round(time.time() if now is None else now, 3)   # as pages see it: `since` compares alike
        wanted = set(names)
        for name in [name for name in self._rings if name not in wanted]:
            del self._rings[name]
        for name in wanted:
            counts = self._functions.get(name)
            if counts is None:
                continue
            ring = self._rings.get(name)
            if ring is None:
                ring = self._rings[name] = collections.deque(maxlen=SAMPLES)
            buckets = tuple(counts.buckets)
            if ring and ring[-1][3] == buckets:
                buckets = ring[-1][3]   # nothing ran: the same tuple, no new memory
            ring.append((now, sum(counts.outcomes.values()), counts.errors(), buckets))

    def series(self, name: str, since: float = 0.0) -> List[Dict[str, Any]]:
        """Function `name`'s samples after time `since`, each as the second before it: messages
        per second, errors, and p50/p99 run time in milliseconds (None when nothing ran)."""
        ring = list(self._rings.get(name, ()))
        points = []
        for before, after in zip(ring, ring[1:]):
            if after[0] <= since:
                continue
            span = max(after[0] - before[0], 1e-3)
            delta = [b - a for a, b in zip(before[3], after[3])]
            points.append({"t": after[0], "rate": round((after[1] - before[1]) / span, 2),
                           "errors": after[2] - before[2], "p50_ms": _ms(quantile(0.5, delta)),
                           "p99_ms": _ms(quantile(0.99, delta))})
        return points

    def last(self, name: str, seconds: float = 60.0) -> Dict[str, Any]:
        """Function `name` over the last `seconds`: messages, errors, p50/p99 run time (ms)."""
        ring = self._rings.get(name)
        if not ring:
            return {"messages": 0, "errors": 0, "p50_ms": None, "p99_ms": None}
        latest = ring[-1]
        first = next((sample for sample in ring if sample[0] >= latest[0] - seconds), latest)
        delta = [b - a for a, b in zip(first[3], latest[3])]
        return {"messages": latest[1] - first[1], "errors": latest[2] - first[2],
                "p50_ms": _ms(quantile(0.5, delta)), "p99_ms": _ms(quantile(0.99, delta))}

def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


class Failures:
    """The last FAILURES error envelopes, newest last."""

    def __init__(self) -> None:
        self._ring: Deque[Dict[str, Any]] = collections.deque(maxlen=FAILURES)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record(self, error: "InvocationError", function: str, request_id: str, source: str,
               topic: str = "", payload: Optional[bytes] = None, qos: int = 0) -> None:
        """A message or call answered with `error` (from any thread)."""
        trace = [line.rstrip("\n") for line in error.stack_trace if line.strip()]
        entry: Dict[str, Any] = {
            "time": round(time.time(), 3), "function": function, "source": source, "topic": topic,
            "requestId": request_id, "errorType": error.error_type,
            "errorMessage": error.message[:MESSAGE_MAX], "stackTrace": trace[-TRACE_LINES:],
            "poison": error.error_type == "PoisonMessage"}
        if payload is not None:
            entry["packet"] = {"topic": topic, "qos": qos, "size": len(payload), **_payload(payload)}
        with self._lock:
            entry["seq"] = next(self._seq)
            self._ring.append(entry)

    def after(self, seq: int) -> List[Dict[str, Any]]:
        with self._lock:
            return [entry for entry in self._ring if entry["seq"] > seq]

    def on_rule_failure(self, runner: Any, invocation: "Invocation", error: "InvocationError") -> None:
        """RuleRunner.on_failure: a message answered with an envelope."""
        self.record(error, runner.function.name, invocation.request_id, f"rule {runner.rule.name}",
                    invocation.topic, invocation.payload, invocation.qos)


def _payload(payload: bytes) -> Dict[str, Any]:
    """A payload as the console shows it: text when it is UTF-8, else base64; bounded."""
    kept = payload[:PAYLOAD_MAX]
    try:
        return {"text": kept.decode("utf-8"), "truncated": len(payload) > PAYLOAD_MAX}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(kept).decode("ascii"), "truncated": len(payload) > PAYLOAD_MAX}


class LogTail(logging.Handler):
    """Keeps the last LOG_LINES log lines of each function. With execution summaries on, every
    invocation logs a line: a line is kept as its record's parts, formatted when a page reads it."""

    def __init__(self) -> None:
        super().__init__()
        # function -> (seq, time, level, instance, request id, logger, msg, args)
        self._rings: Dict[str, Deque[Tuple[Any, ...]]] = {}
        self._seq = itertools.count(1)

    def handle(self, record: logging.LogRecord) -> bool:   # type: ignore[override]
        """No filters and no lock: appending to a deque and counting are atomic."""
        fields = record.__dict__
        function = fields.get("function")
        if not function:
            return False
        ring = self._rings.get(function)
        if ring is None:
            if len(self._rings) >= LOG_FUNCTIONS:
                return False
            ring = self._rings[function] = collections.deque(maxlen=LOG_LINES)
        ring.append((next(self._seq), record.created, record.levelname, fields.get("instance") or "",
                     fields.get("request_id") or "", record.name, record.msg, record.args))
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def after(self, function: str, seq: int, limit: int) -> List[Dict[str, Any]]:
        """Function `function`'s lines after `seq`, the last `limit` of them."""
        kept = [line for line in list(self._rings.get(function, ())) if line[0] > seq][-limit:]
        return [{"seq": number, "time": round(created, 3), "level": level.lower(), "instance": instance,
                 "requestId": request_id, "line": _text(logger, msg, args)[:LINE_MAX]}
                for number, created, level, instance, request_id, logger, msg, args in kept]


def _text(logger: str, msg: Any, args: Any) -> str:
    """A kept line's text, as the log has it; what a handler printed without the tags around it."""
    if logger == "openedge_function.handler" and isinstance(args, tuple) and args:
        return str(args[-1])
    try:
        return str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        return f"{msg} {args}"


class History:
    """The three rings, as the daemon keeps them while it has a server."""

    def __init__(self, functions: Mapping[str, Counts]) -> None:
        self.samples = Samples(functions)
        self.failures = Failures()
        self.logs = LogTail()
