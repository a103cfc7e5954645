"""Calls to a function by name: the HTTP invoke API's and those of one function to another.

A function's `context.invoke` (and the SDK's `Client()` inside a function) asks over its
instance's status socket; `Calls` answers there, in the HTTP API's shape (status, content type,
body), so the SDK reads both alike. What both paths share lives here: finding the function,
refusing what cannot run (unknown, too large, a call that could only deadlock, a full queue), and
the answer an outcome makes.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from runtime_python.sdk import REQUEST_ID_HEADER

from ..config import Function
from ..dataplane import DataPlane
from ..errors import HTTP_STATUS, InvocationError, build_envelope
from ..invocation import NONE, Invocation, Outcome, content_type, failure, new_request_id
from ..pool import Pool, Refusal

log = logging.getLogger("openedge_function.calls")


class Refused(InvocationError):
    """A call answered with an error before any function ran (or without one, at shutdown)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def find(pools: Dict[str, Pool], name: str, qualifier: str = "",
         namespace: str = "") -> Tuple[Function, Pool]:
    """The function `name` (at `qualifier`, in `namespace`) and its pool. Raises Refused."""
    pool = pools.get(name)
    if pool is None:
        raise Refused("UnknownFunction", f"no function named {name!r}")
    function = pool.function
    if qualifier and qualifier.lstrip("$") not in ("LATEST", function.version, function.alias):
        raise Refused("UnknownFunction", f"function {name!r} has no version or alias {qualifier!r}")
    if namespace and namespace not in ("default", function.package):
        raise Refused("UnknownFunction", f"no function named {name!r} in namespace {namespace!r}")
    return function, pool


def check_size(function: Function, length: int) -> None:
    limit = function.instance.message_max
    if length > limit:
        raise Refused("MessageTooLarge", f"the request body of {length} bytes is over the "
                      f"limit of {limit} bytes (instance.message.length.max)")


def chain_of(header: str) -> List[str]:
    """The functions waiting on a call, from its call-chain header."""
    return [part for part in header.split(",") if part]


def wait_of(header: str) -> Optional[float]:
    """How long the caller waits, from its deadline header (milliseconds); None: no limit."""
    try:
        return max(0.001, int(header) / 1000) if header else None
    except ValueError:
        return None


def offer(pool: Pool, invocation: Invocation, chain: List[str]) -> None:
    """Queue the call on `pool`, or raise Refused saying why it cannot be."""
    function = pool.function
    refusal = pool.offer(invocation, callers=chain.count(function.name))
    if refusal is Refusal.DEADLOCK:
        raise Refused("InvokeDeadlock", f"function {function.name!r} was called by "
                      f"{' -> '.join(chain)}, which hold all its {function.instance.max} instances "
                      "(instance.max) while they wait for this call: it could never run")
    if refusal is Refusal.FULL:
        raise Refused("QueueFull", f"function {function.name!r} has all {function.instance.max} "
                      f"instances busy and {pool.queue_max} calls queued")
    if refusal is Refusal.CLOSED:
        raise Refused("Unavailable", f"function {function.name!r} is being replaced or stopped; retry")


def timed_out(function: Function, wait: float) -> Refused:
    return Refused("InvokeTimeout", f"no instance of {function.name!r} became free within the "
                   f"caller's {wait:g}s")


def error_answer(error: InvocationError, request_id: str, name: str) -> Tuple[int, str, bytes]:
    """The error envelope (the MQTT one without `packet`) with the status that fits."""
    return (HTTP_STATUS.get(error.error_type, 500), "application/json",
            build_envelope(error, request_id, name, None))


def event_answer(outcome: Outcome, request_id: str, name: str) -> Tuple[int, str, bytes]:
    """(status, content type, body) for an event function's outcome."""
    error = failure(outcome)
    if error is not None:
        return error_answer(error, request_id, name)
    if outcome.kind == NONE:
        return 204, "", b""
    return 200, content_type(outcome), outcome.payload


class Calls:
    """Answers the calls that instances send over their status sockets; on the data plane's loop."""

    def __init__(self, plane: DataPlane, pools: Callable[[], Dict[str, Pool]]) -> None:
        self.plane = plane
        self._pools = pools

    def handle(self, message: Dict[str, Any], reply: Callable[[Dict[str, Any]], None], caller: Any) -> None:
        """A call from instance `caller` (any thread); `reply` sends the answer back to it."""
        self.plane.call(self._start, message, reply, caller)

    @staticmethod
    def _parent(caller: Any) -> Tuple[List[str], Optional[float], Optional[Invocation]]:
        """What the caller runs, as the supervisor knows it (never what the runtime says): the
        call chain (its function after the chain of the invocation it runs), when that invocation
        runs out of time (monotonic; None when it runs none) and the invocation."""
        running = getattr(caller, "running", ())
        if not running:   # a thread of its own, after the handler returned: a call of its own
            return [caller.function.name] if caller is not None else [], None, None
        parent = max(running, key=lambda invocation: len((invocation.extra or {}).get("call_chain", ())))
        chain = list((parent.extra or {}).get("call_chain", ())) + [caller.function.name]
        return chain, caller.deadline, parent

    def _start(self, message: Dict[str, Any], reply: Callable[[Dict[str, Any]], None], caller: Any) -> None:
        request_id = new_request_id()
        name = str(message.get("function", ""))

        def answer(status: int, content_type: str, body: bytes) -> None:
            headers = {REQUEST_ID_HEADER: request_id}
            if content_type:
                headers["Content-Type"] = content_type
            # A send can wait on the instance's reading: off the loop.
            self.plane.blocking(reply, {"reply": message.get("call"), "status": status, "headers": headers,
                                        "body": base64.b64encode(body).decode("ascii")})

        try:
            headers = {str(k).lower(): str(v) for k, v in (message.get("headers") or {}).items()}
            query = message.get("query") or {}
            function, pool = find(self._pools(), name, str(query.get("qualifier", "")),
                                  str(query.get("namespace", "")))
            if function.type != "event":
                raise Refused("NotAnEventFunction", f"function {name!r} is an HTTP function")
            body = base64.b64decode(message.get("body", ""))
            check_size(function, len(body))
            chain, until, parent = self._parent(caller)
            wait = None if until is None else until - time.monotonic()
            if wait is not None and wait <= 0:
                raise Refused("InvokeTimeout", "the calling invocation has run out of time")
        except Refused as refused:
            answer(*error_answer(refused, request_id, name))
            return
        except (ValueError, TypeError) as exc:
            answer(*error_answer(Refused("BadRequest", f"unreadable call: {exc}"), request_id, name))
            return
        timer: List[Any] = []
        finished: List[bool] = []

        def done(invocation: Invocation, outcome: Any) -> None:
            finished.append(True)
            for handle in timer:
                handle.cancel()
            answer(*event_answer(outcome, request_id, name))

        def abandon(invocation: Invocation) -> None:
            done(invocation, Refused("Unavailable", "the daemon is stopping"))

        invocation = Invocation(request_id, "", 0, body, int(time.time() * 1000), 0, done, abandon)
        invocation.extra = {"call_chain": chain} if chain else {}
        if headers.get("content-type"):
            invocation.extra["content_type"] = headers["content-type"]
        try:
            offer(pool, invocation, chain)
        except Refused as refused:
            answer(*error_answer(refused, request_id, name))
            return
        if parent is not None and until is not None:
            invocation.until = until

            def end() -> None:   # the caller's invocation ended: so does this call
                if finished:
                    return
                invocation.until = time.monotonic()
                if pool.withdraw(invocation):
                    done(invocation, Refused("InvokeTimeout", "the calling invocation ended first"))
                elif invocation.running_on is not None:
                    running_on = invocation.running_on
                    running_on.deadline = min(running_on.deadline, invocation.until)
                else:
                    return
                log.info("function %s: request %s, called by %s (request %s), is stopped: the calling "
                         "invocation ended", name, request_id, chain[-1], parent.request_id)
            if parent.ends is None:
                parent.ends = []
            parent.ends.append(end)
        if wait is not None:
            def expire() -> None:
                timer.clear()
                if pool.withdraw(invocation):   # still queued; once it runs, it answers in time
                    answer(*error_answer(timed_out(function, wait), request_id, name))
            timer.append(self.plane.loop.call_later(wait, expire))
