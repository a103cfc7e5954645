"""A rule at work: messages of its subscription go to its function's pool; outcomes are published.

The hot path is here and in the pool: no JSON decoding (the runtime does that, on the instance's
own core), no per-message threads, the payload passed along as paho delivered it.
"""
from __future__ import annotations

import logging
import time
import uuid

import paho.mqtt.client as mqtt

from .config import Function, Hub, Rule
from .errors import (FunctionLoadError, HandlerError, InstanceCrashed, InvocationError,
                     MessageTooLarge, Packet, ResultEncodingError, build_envelope)
from .hub import HubClient
from .pool import Invocation, Outcome, Pool

log = logging.getLogger(__name__)

_NONE, _ERROR = 0, 3   # InvokeResponse.Kind values the dispatcher tells apart


class RuleRunner:
    """Connects one rule's subscription to its function's pool and publishes the outcomes."""

    def __init__(self, rule: Rule, hub: Hub, function: Function, pool: Pool) -> None:
        self.rule = rule
        self.function = function
        self.pool = pool
        if rule.clientid:
            client_id, clean = rule.clientid, hub.clean_session
        elif rule.id:
            client_id, clean = f"{hub.clientid}-{rule.id}", hub.clean_session
        else:   # no stable identity: a session of its own that the broker forgets
            client_id, clean = f"{hub.clientid}-{rule.index}-{uuid.uuid4().hex[:8]}", True
        self.client = HubClient(hub, client_id, clean, rule.subscribe.topic, rule.subscribe.qos,
                                self._on_message, rule.name)
        self._message_max = function.instance.message_max
        self._publish = rule.publish
        self._error = rule.error or rule.publish
        self._retry_max = rule.retry_max
        self.received = 0
        self.published = 0
        self.failed = 0
        self.dropped = 0

    def start(self) -> None:
        self.client.start()

    # -- intake (paho's network thread) -----------------------------------------------------

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        payload = message.payload
        qos = message.qos
        invocation = Invocation(str(uuid.uuid4()), message.topic, qos, payload,
                                int(time.time() * 1000), message.mid, self._done, self._abandon,
                                (message.retain, message.dup, self.client.generation))
        if len(payload) > self._message_max:
            self._done(invocation, MessageTooLarge(
                f"the message has {len(payload)} bytes, over the limit of {self._message_max} "
                f"(instance.message.length.max of function {self.function.name})"))
            return
        if not self.pool.submit(invocation, droppable=qos == 0):
            # QoS 1 stays unacknowledged: the broker delivers it again.
            if qos == 0:
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
                self.pool.retry(invocation)
                return
            self._fail(invocation, outcome)
            return
        kind = outcome.kind
        if kind == _ERROR:
            if outcome.error_type == "ResultEncodingError":
                error: InvocationError = ResultEncodingError(outcome.error_message)
            else:
                error = HandlerError(outcome.error_type, outcome.error_message, outcome.stack_trace)
            self._fail(invocation, error)
            return
        publish = self._publish
        if kind == _NONE or publish is None:
            self._ack(invocation)
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
            self._ack(invocation)
            return
        retain, dup, _ = invocation.context
        payload = b"" if isinstance(error, MessageTooLarge) else invocation.payload
        packet = Packet(invocation.topic, payload, invocation.qos, retain, dup, invocation.mid)
        envelope = build_envelope(error, invocation.request_id, self.function.name, packet)
        self._send(invocation, target.topic, envelope, min(invocation.qos, target.qos))

    def _send(self, invocation: Invocation, topic: str, payload: bytes, qos: int) -> None:
        then = (lambda: self._ack(invocation)) if invocation.qos else None
        if self.client.publish(topic, payload, qos, then):
            self.published += 1
        else:
            log.warning("rule %s: not connected, the outcome of request %s (QoS 0) is lost",
                        self.rule.name, invocation.request_id)

    def _ack(self, invocation: Invocation) -> None:
        if invocation.qos:
            self.client.ack(invocation.mid, invocation.qos, invocation.context[2])

    def _abandon(self, invocation: Invocation) -> None:
        """The daemon is stopping: leave the message unacknowledged for the broker to redeliver."""
        log.debug("rule %s: request %s left to the broker", self.rule.name, invocation.request_id)

    def stats(self) -> dict:
        return {"received": self.received, "published": self.published, "failed": self.failed,
                "dropped": self.dropped}

