"""A rule at work: messages of its subscription go to its function's pool; outcomes are published.

The hot path is here and in the pool: no JSON decoding (the runtime does that, on the instance's
own core), no per-message threads, the payload passed along as paho delivered it.

Every message ends in `_settle`: acknowledged to the broker (QoS 1) once its outcome is published,
or left unacknowledged for the broker to deliver again when the outcome could not be published.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from typing import Deque, Dict

import paho.mqtt.client as mqtt

from .config import Function, Hub, Rule
from .errors import (FunctionLoadError, HandlerError, InstanceCrashed, InvocationError,
                     MessageTooLarge, Packet, build_envelope, error_of)
from .hub import Intake, Publisher
from .pool import Invocation, Outcome, Pool, new_request_id

log = logging.getLogger(__name__)

_NONE, _ERROR = 0, 3   # InvokeResponse.Kind values the dispatcher tells apart


class RuleRunner:
    """Connects one rule's subscription to its function's pool and publishes the outcomes."""

    def __init__(self, rule: Rule, hub: Hub, function: Function, pool: Pool,
                 publisher: Publisher) -> None:
        self.rule = rule
        self.publisher = publisher
        if rule.clientid:
            client_id, clean = rule.clientid, hub.clean_session
        elif rule.id:
            client_id, clean = f"{hub.clientid}-{rule.id}", hub.clean_session
        else:   # no stable identity: a session of its own that the broker forgets
            client_id, clean = f"{hub.clientid}-{rule.index}-{uuid.uuid4().hex[:8]}", True
        self.intake = Intake(hub, client_id, clean, rule.subscribe.topic, rule.subscribe.qos,
                             self._on_message, rule.name)
        self._publish = rule.publish
        self._error = rule.error or rule.publish
        self._retry_max = rule.retry_max
        self.use(function, pool)
        self._lock = threading.Lock()
        self.pending = 0               # received and not yet settled
        # ordered: topic -> messages waiting for the one of that topic in progress
        self._ordered = rule.ordered
        self._waiting: Dict[str, Deque[Invocation]] = {}
        self.received = 0
        self.published = 0
        self.failed = 0
        self.dropped = 0

    def use(self, function: Function, pool: Pool) -> None:
        """Send the next messages to `pool` (its function changed on reload)."""
        self.function = function
        self._message_max = function.instance.message_max
        self.pool = pool

    def start(self) -> None:
        self.intake.start()

    # -- intake (paho's network thread) -----------------------------------------------------

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        payload = message.payload
        qos = message.qos
        invocation = Invocation(new_request_id(), message.topic, qos, payload,
                                int(time.time() * 1000), message.mid, self._done, self._abandon,
                                (message.retain, message.dup, self.intake.generation))
        with self._lock:
            self.pending += 1
        if len(payload) > self._message_max:
            self._done(invocation, MessageTooLarge(
                f"the message has {len(payload)} bytes, over the limit of {self._message_max} "
                f"(instance.message.length.max of function {self.function.name})"))
            return
        if self._ordered and self._wait_turn(invocation):
            return
        pool = self.pool
        while not pool.submit(invocation, droppable=qos == 0):
            if qos == 0 or self.pool is pool:
                self._drop(invocation)
                return
            # A reload replaced the pool while this message waited for room in the old one: it
            # belongs to the new one (left unacknowledged, nothing would deliver it again).
            pool = self.pool

    def _wait_turn(self, invocation: Invocation) -> bool:
        """ordered: True when another message of the topic is in progress and this one waits."""
        with self._lock:
            waiting = self._waiting.get(invocation.topic)
            if waiting is None:
                self._waiting[invocation.topic] = collections.deque()
                return False
            if invocation.qos == 0 and len(waiting) >= self.pool.queue_max:
                self.pending -= 1
                self.dropped += 1
                return True
            waiting.append(invocation)
            return True

    def _drop(self, invocation: Invocation) -> None:
        """Not taken (saturated QoS 0, or stopping): QoS 1 stays unacknowledged at the broker."""
        self._settle(invocation, ack=False)
        if invocation.qos == 0:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("rule %s: function %s is saturated, %d QoS 0 messages dropped so far",
                            self.rule.name, self.function.name, self.dropped)

    # -- outcomes (worker threads) ----------------------------------------------------------

    def _done(self, invocation: Invocation, outcome: Outcome) -> None:
        if isinstance(outcome, InvocationError):
            if isinstance(outcome, InstanceCrashed) and invocation.attempts < self._retry_max:
                log.warning("rule %s: request %s: %s; running it again (retry %d of %d)",
                            self.rule.name, invocation.request_id, outcome.message,
                            invocation.attempts + 1, self._retry_max)
                invocation.attempts += 1
                self.pool.push(invocation, first=True)
                return
            self._fail(invocation, outcome)
            return
        kind = outcome.kind
        if kind == _ERROR:
            self._fail(invocation, error_of(outcome))
            return
        publish = self._publish
        if kind == _NONE or publish is None:
            self._settle(invocation)
            return
        self._send(invocation, publish.topic, outcome.payload, min(invocation.qos, publish.qos))

    def _fail(self, invocation: Invocation, error: InvocationError) -> None:
        self.failed += 1
        # A handler's exception is its answer; a load failure is logged once, by the pool.
        level = logging.INFO if isinstance(error, HandlerError) else (
            logging.DEBUG if isinstance(error, FunctionLoadError) else logging.WARNING)
        log.log(level, "rule %s: function %s request %s: %s: %s", self.rule.name,
                self.function.name, invocation.request_id, error.error_type, error.message)
        target = self._error
        if target is None:
            self._settle(invocation)
            return
        retain, dup, _ = invocation.context
        payload = b"" if isinstance(error, MessageTooLarge) else invocation.payload
        packet = Packet(invocation.topic, payload, invocation.qos, retain, dup, invocation.mid)
        envelope = build_envelope(error, invocation.request_id, self.function.name, packet)
        self._send(invocation, target.topic, envelope, min(invocation.qos, target.qos))

    def _send(self, invocation: Invocation, topic: str, payload: bytes, qos: int) -> None:
        if self.publisher.publish(topic, payload, qos, lambda: self._settle(invocation)):
            self.published += 1
        else:
            log.debug("rule %s: the outcome of request %s was not published", self.rule.name,
                      invocation.request_id)
            self._settle(invocation, ack=False)

    def _settle(self, invocation: Invocation, ack: bool = True) -> None:
        """The end of a message here: acknowledge it (QoS 1) and let the next of its topic go."""
        if ack and invocation.qos:
            self.intake.ack(invocation.mid, invocation.qos, invocation.context[2])
        following = None
        with self._lock:
            self.pending -= 1
            if self._ordered:
                waiting = self._waiting.get(invocation.topic)
                if waiting:
                    following = waiting.popleft()
                elif waiting is not None:
                    del self._waiting[invocation.topic]
        if following is not None:
            self.pool.push(following)

    def _abandon(self, invocation: Invocation) -> None:
        """The daemon is stopping: leave the message unacknowledged for the broker to redeliver."""
        log.debug("rule %s: request %s left to the broker", self.rule.name, invocation.request_id)
        with self._lock:
            self.pending -= 1

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every message received has settled; True when they all did."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pending <= 0

    def stats(self) -> dict:
        return {"received": self.received, "published": self.published, "failed": self.failed,
                "dropped": self.dropped, "pending": self.pending}
