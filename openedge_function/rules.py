"""A rule at work: messages of its subscription go to its function's pool; outcomes are published.

The hot path is here and in the pool, all of it on the data plane's loop: no JSON decoding (the
runtime does that, on the instance's own core), no threads, no locks, the payload passed along as
paho delivered it.

MQTT 5 (`hub.protocol: 5`, or `auto` with a broker that speaks it): a message with a response
topic gets its outcome there, with its correlation data, instead of on the rule's `publish` (or
`error`) topic; its user properties and content type reach the handler's context; every outcome
says its content type and carries the user properties the handler set; a QoS 1 message that
expires while it waits is acknowledged unrun; a response topic the rule does not answer on
(replies.py) is answered with `ResponseRefused`, unrun.

Every message ends in `_settle`: acknowledged to the broker (QoS 1) once its outcome is published,
or left unacknowledged for the broker to deliver again when the outcome could not be published.
An outcome the broker will not take (over its size limit, or refused in an MQTT 5 PUBACK) is never
acknowledged silently: a result becomes an envelope, an envelope goes once more without the input
(see `_not_taken`).
"""
from __future__ import annotations

import collections
import logging
import time
import uuid
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from runtime_python._pb import function_pb2 as pb

from .config import Function, Hub, Nats, Publication, Rule
from .dataplane import DataPlane
from .errors import (FunctionLoadError, InstanceCrashed, InvocationError, MessageExpired,
                     MessageTooLarge, Packet, PoisonMessage, PublishRefused, ResponseRefused, ResultTooLarge,
                     brief, build_envelope)
from .broker import Intake, Publisher
from .invocation import JSON_TYPE, NONE, Delivery, Invocation, Outcome, content_type, failure, new_request_id
from .journal import CRASHES, Journal, key
from .pool import Pool
from .replies import ReplyPolicy

log = logging.getLogger(__name__)

# An envelope on its way out: the error, the user properties the handler set, and whether it is
# the bare one (no input payload, message cut) sent when the whole one was not taken.
_Envelope = Tuple[InvocationError, Any, bool]


class RuleRunner:
    """Connects one rule's subscription to its function's pool and publishes the outcomes."""

    def __init__(self, plane: DataPlane, rule: Rule, hub: Hub, function: Function, pool: Pool,
                 publisher: Publisher, replies: ReplyPolicy, journal: Optional[Journal] = None,
                 nats: Optional[Nats] = None) -> None:
        self.rule = rule
        self.replies = replies
        self._journal = journal
        self._plane = plane
        self.publisher = publisher
        if rule.clientid:
            client_id, clean = rule.clientid, hub.clean_session
        elif rule.id:
            client_id, clean = f"{hub.clientid}-{rule.id}", hub.clean_session
        else:   # no stable identity: a session of its own that the broker forgets
            client_id, clean = f"{hub.clientid}-{rule.index}-{uuid.uuid4().hex[:8]}", True
        self.intake: Any
        if rule.subscribe.stream:
            assert nats is not None   # the parser sees to it
            from .jetstream import JetStreamIntake   # nats-py only for rules that read a stream
            self.intake = JetStreamIntake(plane, nats, rule.subscribe, rule.id, self._on_message,
                                          self._on_poison, rule.name)
        else:
            self.intake = Intake(plane, hub, client_id, clean, rule.subscribe.topic, rule.subscribe.qos,
                                 self._on_message, rule.name, rule.expiry(hub))
        self._publish = rule.publish
        self._error = rule.error or rule.publish
        self._retry_max = rule.retry_max
        self._drop_qos0 = rule.overflow == "drop"
        self.pool = pool
        self.function = function
        self._message_max = function.instance.message_max
        self.pending = 0               # received and not yet settled
        # ordered: topic -> messages waiting for the one of that topic in progress
        self._ordered = rule.ordered
        self._waiting: Dict[str, Deque[Invocation]] = {}
        self.received = 0
        self.published = 0
        self.failed = 0
        self.dropped = 0
        self.expired = 0
        self.undeliverable = 0   # not even the envelope was taken: see _not_taken
        self.refused = 0   # MQTT 5 requests not run for their response topic (replies.py)
        self.poisoned = 0  # answered with PoisonMessage instead of run
        # Told of each message answered with an error envelope: (runner, invocation, error).
        self.on_failure: Optional[Callable[["RuleRunner", Invocation, InvocationError], None]] = None

    def use(self, function: Function, pool: Pool, replies: ReplyPolicy) -> None:
        """Send the next messages to `pool` (its function changed on reload), answer requests
        as `replies` says (the rules changed). On the loop."""
        self.function = function
        self.replies = replies
        self._message_max = function.instance.message_max
        if pool is not self.pool:
            self.pool.unlisten(self._on_full)
            self.pool = pool
            pool.listen(self._on_full)

    def start(self) -> None:
        """Connect and subscribe; from any thread."""
        def attach() -> None:
            self.pool.listen(self._on_full)
            self.publisher.attach(self.intake)
        self._plane.call(attach)
        self.intake.start()

    def stop(self) -> None:
        """Disconnect (what is not acknowledged the broker delivers again); from any thread."""
        def detach() -> None:
            self.pool.unlisten(self._on_full)
            self.publisher.detach(self.intake)
        self._plane.run(detach)
        self.intake.stop()

    def _on_full(self, full: bool) -> None:
        if self._drop_qos0 and self.rule.subscribe.qos == 0:
            return   # only QoS 0 comes: what finds the queue full is dropped, intake never pauses
        if full:
            self.intake.pause("pool")
        else:
            self.intake.resume("pool")

    # -- intake (on the loop) ------------------------------------------------------------------

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        payload = message.payload
        qos = message.qos
        invocation = Invocation(new_request_id(), message.topic, qos, payload,
                                int(time.time() * 1000), message.mid, self._done, self._abandon,
                                Delivery(message.retain, message.dup, self.intake.generation))
        self.pending += 1
        journal = self._journal
        if qos and journal is not None:
            digest = key(self.rule.name, message.topic, payload)
            if journal.poison and journal.poisoned(digest):
                self._poison(invocation, f"was in flight at each of the last {CRASHES} crashes of the daemon")
                return
            invocation.slot = journal.add(digest)
        if message.properties is not None:   # MQTT 5 (3.1.1 messages have none)
            self._request(invocation, message.properties)
            if invocation.reply is not None:
                refusal = self.replies.refusal(invocation.reply[0])
                if refusal is not None:
                    self._refuse(invocation, refusal)
                    return
        if len(payload) > self._message_max:
            self._done(invocation, MessageTooLarge(
                f"the message has {len(payload)} bytes, over the limit of {self._message_max} "
                f"(instance.message.length.max of function {self.function.name})"))
            return
        if self._ordered and self._wait_turn(invocation):
            return
        if not self.pool.submit(invocation, droppable=qos == 0 and self._drop_qos0):
            self._drop(invocation)

    def _on_poison(self, message: Any) -> None:
        """A stream's message delivered more than maxdeliver times with no outcome (the daemons
        that took it died, or took longer than the ack wait): answered with PoisonMessage, not run."""
        self.received += 1
        invocation = Invocation(new_request_id(), message.topic, 1, message.payload, int(time.time() * 1000),
                                message.mid, self._done, self._abandon,
                                Delivery(message.retain, message.dup, self.intake.generation))
        self.pending += 1
        self._poison(invocation, f"was delivered {message.deliveries} times without an outcome",
                     f" (subscribe.maxdeliver: {self.rule.subscribe.max_deliver})")

    def _poison(self, invocation: Invocation, why: str, detail: str = "") -> None:
        """Answer with PoisonMessage, not run: the message `why` (and the envelope says `detail`)."""
        log.error("rule %s: the message on %s (request %s) %s: answered with PoisonMessage, not run",
                  self.rule.name, invocation.topic, invocation.request_id, why)
        self._fail(invocation, PoisonMessage(f"this message {why}{detail}; function {self.function.name} "
                                             "does not run it again"))

    @staticmethod
    def _request(invocation: Invocation, properties: Properties) -> None:
        """MQTT 5: what the message asks of its outcome, and what the handler sees of it."""
        extra = {}
        content_type = getattr(properties, "ContentType", None)
        if content_type:
            extra["content_type"] = content_type
        users = getattr(properties, "UserProperty", None)
        if users:
            extra["user_properties"] = [pb.Header(name=name, value=value) for name, value in users]
        if extra:
            invocation.extra = extra
        response = getattr(properties, "ResponseTopic", None)
        if response:
            invocation.reply = (response, getattr(properties, "CorrelationData", None))
        expiry = getattr(properties, "MessageExpiryInterval", None)
        if expiry and invocation.qos:
            invocation.expires = time.monotonic() + expiry

    def _refuse(self, invocation: Invocation, why: str) -> None:
        """The request's response topic is not one to answer on: not run, its envelope to the
        rule's error topic (none: the log says it), acknowledged."""
        topic = invocation.reply[0]
        shown = repr(topic if len(topic) <= 200 else topic[:200] + "...")
        invocation.reply = None
        self.refused += 1
        self.failed += 1
        if self.refused == 1 or self.refused % 1000 == 0:   # a requester may send many
            log.warning("rule %s: request %s on %s asks for its answer on %s, which is refused: %s; "
                        "not run, answered with ResponseRefused%s (%d such requests so far)",
                        self.rule.name, invocation.request_id, invocation.topic, shown, why,
                        "" if self._error else " in this log only (the rule has no error topic)",
                        self.refused)
        self._envelope(invocation, ResponseRefused(f"the response topic {shown} is refused: {why}"), None)

    def _wait_turn(self, invocation: Invocation) -> bool:
        """ordered: True when another message of the topic is in progress and this one waits."""
        waiting = self._waiting.get(invocation.topic)
        if waiting is None:
            self._waiting[invocation.topic] = collections.deque()
            return False
        if invocation.qos == 0 and self._drop_qos0 and len(waiting) >= self.pool.queue_max:
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

    # -- outcomes (on the loop) -------------------------------------------------------------------

    def _done(self, invocation: Invocation, outcome: Outcome) -> None:
        error = failure(outcome)
        if error is not None:
            if error is outcome:   # no answer from the handler: nothing it set goes with the envelope
                if isinstance(error, InstanceCrashed) and invocation.attempts < self._retry_max:
                    log.warning("rule %s: request %s: %s; running it again (retry %d of %d)",
                                self.rule.name, invocation.request_id, error.message,
                                invocation.attempts + 1, self._retry_max)
                    invocation.attempts += 1
                    self.pool.push(invocation, first=True)
                    return
                self._fail(invocation, error)
            else:
                self._fail(invocation, error, outcome.user_properties)
            return
        publish = self._publish
        if outcome.kind == NONE or (publish is None and invocation.reply is None):
            self._settle(invocation)
            return
        self._deliver(invocation, publish, outcome.payload, outcome.user_properties, content_type(outcome))

    def _deliver(self, invocation: Invocation, target: Optional[Publication], payload: bytes,
                 users: Any, content_type: str, envelope: Optional[_Envelope] = None) -> None:
        """Publish an outcome to `target`; under MQTT 5 to the request's response topic instead,
        if it has one, with its correlation data, the outcome's content type and `users` (the
        user properties the handler set). `envelope`: the payload is an error's envelope."""
        if not self.publisher.v5:   # without a response topic, the callers have a target
            self._send(invocation, target.topic, payload, min(invocation.qos, target.qos), None,  # type: ignore[union-attr]
                       envelope)
            return
        correlation = None
        if invocation.reply is not None:
            topic, correlation = invocation.reply
            qos = min(invocation.qos, target.qos if target is not None else 1)
        else:
            assert target is not None
            topic, qos = target.topic, min(invocation.qos, target.qos)
        properties: Properties
        if users or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = content_type
            for header in users or ():
                properties.UserProperty = (header.name, header.value)
            if correlation is not None:
                properties.CorrelationData = correlation
        else:   # the common case: the content type alone, made and packed once
            properties = _CONTENT_TYPES.get(content_type) or _content_type(content_type)
        self._send(invocation, topic, payload, qos, properties, envelope)

    def _fail(self, invocation: Invocation, error: InvocationError, users: Any = None) -> None:
        if isinstance(error, MessageExpired):
            self.expired += 1
            log.info("rule %s: request %s on %s: %s; acknowledged, not run", self.rule.name,
                     invocation.request_id, invocation.topic, error.message)
            self._settle(invocation)
            return
        self.failed += 1
        if isinstance(error, PoisonMessage):
            self.poisoned += 1
        if self.on_failure is not None:
            self.on_failure(self, invocation, error)
        # A load failure is logged once, by the pool; anything else is one warning line, a
        # handler's exception with its stack trace (its last lines, bounded).
        if isinstance(error, FunctionLoadError):
            log.debug("rule %s: function %s request %s: %s: %s", self.rule.name, self.function.name,
                      invocation.request_id, error.error_type, error.message)
        else:
            log.warning("rule %s: function %s request %s: %s: %s%s", self.rule.name, self.function.name,
                        invocation.request_id, error.error_type, error.message, _trace(error),
                        extra={"rule": self.rule.name, "function": self.function.name,
                               "request_id": invocation.request_id})
        self._envelope(invocation, error, users)

    def _envelope(self, invocation: Invocation, error: InvocationError, users: Any,
                  bare: bool = False) -> None:
        """Publish the envelope of `error` to the error topic (or the response topic). `bare`:
        without the input's payload and with the message cut, for a broker that would not take
        the whole one."""
        target = self._error
        if target is None and invocation.reply is None:
            self._settle(invocation)
            return
        delivery: Delivery = invocation.context
        if bare:
            error = brief(error)
        payload = b"" if bare or isinstance(error, MessageTooLarge) else invocation.payload
        packet = Packet(invocation.topic, payload, invocation.qos, delivery.retain, delivery.dup,
                        invocation.mid)
        envelope = build_envelope(error, invocation.request_id, self.function.name, packet)
        self._deliver(invocation, target, envelope, users, JSON_TYPE, (error, users, bare))

    def _send(self, invocation: Invocation, topic: str, payload: bytes, qos: int,
              properties: Optional[Properties] = None, envelope: Optional[_Envelope] = None) -> None:
        publisher = self.publisher
        # Near the broker's limit (or under MQTT 5 with one stated), measure the packet exactly.
        if len(payload) + 4 * len(topic) > publisher.room or (properties is not None and publisher.exact):
            size = publisher.size(topic, payload, qos, properties)
            if size > publisher.limit:
                self._not_taken(invocation, envelope, ResultTooLarge(
                    f"the {'result' if envelope is None else 'envelope'} of {len(payload)} bytes, a "
                    f"publish of {size} bytes to {topic}, is over the {publisher.limit} bytes the broker "
                    f"takes ({publisher.limit_source})"))
                return
        try:
            taken = publisher.publish(topic, payload, qos, lambda refused: self._settle(invocation)
                                      if refused is None else self._refused(invocation, topic, refused, envelope),
                                      properties)
        except ValueError as exc:   # paho's own checks of a topic (replies.py makes them moot)
            self._not_taken(invocation, envelope, PublishRefused(f"the outcome cannot be published to "
                                                                 f"{topic[:200]!r}: {exc}"))
            return
        if taken:
            self.published += 1
        else:
            log.debug("rule %s: the outcome of request %s was not published", self.rule.name,
                      invocation.request_id)
            self._settle(invocation, ack=False)

    def _refused(self, invocation: Invocation, topic: str, reason: ReasonCode,
                 envelope: Optional[_Envelope]) -> None:
        self.published -= 1
        self._not_taken(invocation, envelope, PublishRefused(
            f"the broker refused the {'result' if envelope is None else 'envelope'} on {topic}: "
            f"{reason} (reason code 0x{reason.value:02X})"))

    def _not_taken(self, invocation: Invocation, envelope: Optional[_Envelope],
                   error: InvocationError) -> None:
        """The broker will not take an outcome (too large, or refused). For a result, its
        envelope goes instead; for an envelope, the same without the input's payload. Should the
        broker refuse even that, the log holds what it said, and the input is acknowledged: left
        unacknowledged, it would come back to the same answer, and hold a place of the broker's
        in-flight window each time."""
        if envelope is None:
            self._fail(invocation, error)
            return
        failed, users, bare = envelope
        if not bare:
            log.warning("rule %s: function %s request %s: %s; sending the envelope without the "
                        "input's payload", self.rule.name, self.function.name, invocation.request_id,
                        error.message)
            self._envelope(invocation, failed, users, bare=True)
            return
        self.undeliverable += 1
        log.error("rule %s: function %s request %s: nothing could be published for the message on "
                  "%s (%d bytes), which is acknowledged: %s; its outcome was %s: %s", self.rule.name,
                  self.function.name, invocation.request_id, invocation.topic, len(invocation.payload),
                  error.message, failed.error_type, failed.message)
        self._settle(invocation)

    def _settle(self, invocation: Invocation, ack: bool = True) -> None:
        """The end of a message here: acknowledge it (QoS 1) and let the next of its topic go."""
        if ack and invocation.qos:
            self.intake.ack(invocation.mid, invocation.qos, invocation.context.generation)
        if invocation.slot >= 0:
            self._forget(invocation)
        self.pending -= 1
        if self._ordered:
            waiting = self._waiting.get(invocation.topic)
            if waiting:
                self.pool.push(waiting.popleft())
            elif waiting is not None:
                del self._waiting[invocation.topic]

    def _abandon(self, invocation: Invocation) -> None:
        """The daemon is stopping: leave the message unacknowledged for the broker to redeliver."""
        log.debug("rule %s: request %s left to the broker", self.rule.name, invocation.request_id)
        if invocation.slot >= 0:
            self._forget(invocation)
        self.pending -= 1

    def _forget(self, invocation: Invocation) -> None:
        assert self._journal is not None
        self._journal.remove(invocation.slot)
        invocation.slot = -1

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every message received has settled; True when they all did."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pending <= 0

    def stats(self) -> dict:
        return {"received": self.received, "published": self.published, "failed": self.failed,
                "dropped": self.dropped, "expired": self.expired, "undeliverable": self.undeliverable,
                "refused": self.refused, "poisoned": self.poisoned, "pending": self.pending}


class _ContentType(Properties):
    """An outcome's PUBLISH properties when they are its content type alone: made and packed once
    per content type (paho would make and pack them for each outcome)."""

    def __init__(self, content_type: str) -> None:
        super().__init__(PacketTypes.PUBLISH)
        self.ContentType = content_type
        object.__setattr__(self, "_packed", Properties.pack(self))

    def pack(self) -> bytes:
        return self._packed   # type: ignore[attr-defined, no-any-return]


_CONTENT_TYPES: Dict[str, _ContentType] = {}
_CONTENT_TYPES_MAX = 64   # handlers may set any: the first ones are kept


def _content_type(content_type: str) -> Properties:
    properties = _ContentType(content_type)
    if len(_CONTENT_TYPES) < _CONTENT_TYPES_MAX:
        _CONTENT_TYPES[content_type] = properties
    return properties


_TRACE_LINES = 30      # a handler's stack trace in the log: its last lines
_TRACE_CHARS = 4000    # and at most this much of it


def _trace(error: InvocationError) -> str:
    """The error's stack trace for a log line: its last lines, bounded; "" without one."""
    lines = [line.rstrip("\n") for line in error.stack_trace if line.strip()][-_TRACE_LINES:]
    if not lines:
        return ""
    text = "\n".join(lines)
    if len(text) > _TRACE_CHARS:
        text = "..." + text[-_TRACE_CHARS:]
    return "\n" + text
