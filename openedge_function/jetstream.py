"""A rule's input from a NATS JetStream stream (`subscribe: {stream, subject}` and `nats:`).

Every daemon that runs the rule pulls from one durable consumer of the stream (competing
consumers): each message goes to one of them. A message is acknowledged once its outcome is
published, as an MQTT message is; one that is not (its daemon died, or its link was cut) is
delivered again, to whichever daemon pulls next, `ackwait` after it was handed out. A message
delivered more than `maxdeliver` times is answered with PoisonMessage instead of run.

The client is nats-py (`pip install openedge-function[nats]`) on the data plane's loop: the
intake pulls a batch when its rule has room and stops pulling while the pool or the publisher
holds it back, which is how it pauses.

It offers what a rule needs of an MQTT intake (broker.Intake): `connected`, `generation`, `start`,
`stop`, `stop_intake`, `unsubscribe`, `pause`, `resume` and `ack`; messages reach the rule as
objects with the fields of paho's (`topic`, `payload`, `qos`, `mid`, `retain`, `dup`,
`properties`), the subject as the topic.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Set

from .config import Nats, Subscription
from .dataplane import DataPlane

log = logging.getLogger("openedge_function.jetstream")

BATCH = 64          # messages pulled at most at once
_PULL_WAIT = 1.0    # seconds a pull waits for messages before it asks again


class StreamMessage:
    """A JetStream message as a rule sees an MQTT one."""

    __slots__ = ("topic", "payload", "qos", "mid", "retain", "dup", "properties", "deliveries")

    def __init__(self, topic: str, payload: bytes, mid: int, deliveries: int) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = 1
        self.mid = mid
        self.retain = False
        self.dup = deliveries > 1
        self.properties = None
        self.deliveries = deliveries


def consumer_name(subscription: Subscription, rule_id: Optional[str]) -> str:
    return subscription.consumer or f"openedge-function-{rule_id}"


async def connect(settings: Nats, suffix: str, who: str, connected: threading.Event,
                  stopping: Callable[[], bool]) -> Any:
    """A nats-py connection named `settings.name` + `suffix`, for `who` (as the log names it):
    tried every second until it is made, reconnecting for ever once it is; `connected` follows
    it. None when `stopping()` says so first."""
    import nats

    async def disconnected() -> None:
        connected.clear()
        log.warning("%s: lost the NATS server; reconnecting", who)

    async def reconnected() -> None:
        connected.set()
        log.info("%s: reconnected to %s", who, client.connected_url.netloc)

    async def error(exc: Exception) -> None:
        log.debug("%s: NATS: %s", who, exc)

    client = None
    while client is None and not stopping():
        try:
            client = await nats.connect(
                list(settings.servers), name=settings.name + suffix, user=settings.user,
                password=settings.password, token=settings.token, max_reconnect_attempts=-1,
                reconnect_time_wait=1, connect_timeout=3, disconnected_cb=disconnected,
                reconnected_cb=reconnected, error_cb=error, allow_reconnect=True)
        except Exception as exc:
            log.warning("%s: cannot reach NATS at %s (%s); trying again", who, ", ".join(settings.servers), exc)
            await asyncio.sleep(1.0)
    return client


class JetStreamIntake:
    """A rule's pull consumer of a stream, run on the data plane's loop."""

    def __init__(self, plane: DataPlane, nats: Nats, subscription: Subscription, rule_id: Optional[str],
                 on_message: Callable[[StreamMessage], None], on_poison: Callable[[StreamMessage], None],
                 name: str) -> None:
        self.name = f"rule {name}"
        self._plane = plane
        self._nats = nats
        self._subscription = subscription
        self._consumer = consumer_name(subscription, rule_id)
        self._on_message = on_message
        self._on_poison = on_poison
        self.connected = threading.Event()
        self.generation = 0
        self._mids = itertools.count(1)
        self._unacked: Dict[int, Any] = {}   # mid -> the nats message, until it is acknowledged
        self._paused: Set[str] = set()
        self._room: Optional[asyncio.Event] = None
        self._task: Optional["asyncio.Task"] = None
        self._client: Any = None
        self._taking = True

    # -- running (any thread) ----------------------------------------------------------------

    def start(self) -> None:
        self._plane.call(self._begin)

    def stop(self) -> None:
        """Stop pulling and close the connection: what is not acknowledged is delivered again,
        to another daemon, after the consumer's ack wait."""
        future = asyncio.run_coroutine_threadsafe(self._end(), self._plane.loop)
        try:
            future.result(10.0)
        except Exception as exc:   # the connection is going anyway
            log.debug("%s: closing: %s", self.name, exc)

    def stop_intake(self) -> None:
        """Take no more messages; those held go back to the stream unacknowledged."""
        self._taking = False

    def unsubscribe(self, timeout: float = 5.0) -> None:
        """Nothing to do: the durable consumer is the group's, and outlives any one member."""

    # -- on the loop ----------------------------------------------------------------------------

    def _begin(self) -> None:
        self._room = asyncio.Event()
        self._room.set()
        self._task = self._plane.spawn(self._run())

    @property
    def paused(self) -> List[str]:
        """Why pulling is paused; empty while it pulls."""
        return sorted(self._paused)

    def pause(self, reason: str) -> None:
        self._paused.add(reason)
        if self._room is not None:
            self._room.clear()

    def resume(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self._room is not None:
            self._room.set()

    def ack(self, mid: int, qos: int, generation: int) -> None:
        message = self._unacked.pop(mid, None)
        if message is not None:
            self._plane.spawn(self._acknowledge(message))

    async def _acknowledge(self, message: Any) -> None:
        try:
            await message.ack()
        except Exception as exc:   # delivered again after the ack wait: a duplicate, not a loss
            log.warning("%s: cannot acknowledge a message (%s); it will be delivered again", self.name, exc)

    async def _run(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        subscription = self._subscription
        self._client = await connect(self._nats, "", self.name, self.connected, lambda: False)
        stream = self._client.jetstream()
        config = ConsumerConfig(durable_name=self._consumer, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL, ack_wait=subscription.ack_wait,
                                filter_subject=subscription.subject, max_ack_pending=-1)
        pull = None
        while pull is None:
            try:
                pull = await stream.pull_subscribe(subscription.subject, durable=self._consumer,
                                                   stream=subscription.stream, config=config)
            except Exception as exc:
                log.warning("%s: cannot read stream %s (%s); trying again", self.name,
                            subscription.stream, exc)
                await asyncio.sleep(1.0)
        self.generation += 1
        self.connected.set()
        log.info("%s: reading stream %s, subject %s, as consumer %s", self.name, subscription.stream,
                 subscription.subject, self._consumer)
        room = self._room
        assert room is not None
        while True:
            await room.wait()
            if not self._taking:
                await asyncio.sleep(_PULL_WAIT)
                continue
            try:
                batch = await pull.fetch(BATCH, timeout=_PULL_WAIT)
            except asyncio.TimeoutError:   # nats-py's timeouts are asyncio's too
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s: pull: %s", self.name, exc)
                await asyncio.sleep(0.2)
                continue
            for message in batch:
                self._deliver(message)

    def _deliver(self, message: Any) -> None:
        if not self._taking:
            return   # delivered again after the ack wait
        try:
            deliveries = message.metadata.num_delivered
        except Exception:
            deliveries = 1
        mid = next(self._mids)
        self._unacked[mid] = message
        shown = StreamMessage(message.subject, message.data, mid, deliveries)
        if deliveries > self._subscription.max_deliver:
            self._on_poison(shown)
        else:
            self._on_message(shown)

    async def _end(self) -> None:
        self._taking = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._unacked.clear()
        if self._client is not None:
            try:
                await self._client.close()
            except Exception:
                pass
        self.connected.clear()


class NatsPublisher:
    """Publishes the outcomes of rules whose targets are NATS subjects (`publish: {subject}`):
    through JetStream when a stream takes the subject (then() once the stream has stored it),
    else plain NATS (then() once the server has it). A publish that fails for want of a server
    (a node going down, a leader election) is tried again until it goes through or the daemon
    stops: an outcome is never given up for a passing fault, and its input stays unacknowledged
    until then. The same face as broker.Publisher, for a rule."""

    v5 = False          # no MQTT 5 properties on NATS
    limit = 1 << 30     # NATS's own max_payload is checked by the server
    limit_source = "the NATS server's max_payload"
    room = limit
    exact = False

    def __init__(self, plane: DataPlane, nats: Nats) -> None:
        self._plane = plane
        self._nats = nats
        self.connected = threading.Event()
        self._client: Any = None
        self._stream: Any = None
        self._ready: Optional[asyncio.Event] = None
        self._waiting = 0
        self._closing = False
        self._intakes: list = []

    @staticmethod
    def size(topic: str, payload: bytes, qos: int, properties: Any) -> int:
        return len(payload)

    def start(self) -> None:
        self._plane.call(self._begin)

    def _begin(self) -> None:
        self._ready = asyncio.Event()
        self._plane.spawn(self._connect())

    async def _connect(self) -> None:
        self._client = await connect(self._nats, "-publisher", "NATS publisher", self.connected,
                                     lambda: self._closing)
        if self._client is None:
            return
        self._stream = self._client.jetstream()
        self.connected.set()
        assert self._ready is not None
        self._ready.set()

    def attach(self, intake: Any) -> None:
        self._intakes.append(intake)

    def detach(self, intake: Any) -> None:
        if intake in self._intakes:
            self._intakes.remove(intake)

    def publish(self, topic: str, payload: bytes, qos: int, then: Callable[[Any], None],
                properties: Any = None) -> bool:
        """Publish to subject `topic` (on the loop); then(None) once it is stored or sent."""
        if self._closing:
            return False
        self._waiting += 1
        self._plane.spawn(self._send(topic, payload, then))
        return True

    async def _send(self, subject: str, payload: bytes, then: Callable[[Any], None]) -> None:
        import nats.errors
        import nats.js.errors
        assert self._ready is not None
        delay = 0.2
        try:
            while not self._closing:
                await self._ready.wait()
                try:
                    await self._stream.publish(subject, payload, timeout=5.0)
                except nats.errors.NoRespondersError:
                    try:   # nothing takes the subject, no stream either: plain NATS, flushed
                        await self._client.publish(subject, payload)
                        await self._client.flush(timeout=5.0)
                    except Exception as exc:
                        log.debug("NATS publisher: %s: %s; trying again", subject, exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                        nats.js.errors.NoStreamResponseError, nats.js.errors.APIError, OSError) as exc:
                    log.debug("NATS publisher: %s: %s; trying again", subject, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                then(None)
                return
        finally:
            self._waiting -= 1

    def unacknowledged(self) -> int:
        return self._waiting

    def drain(self, timeout: float) -> bool:
        import time
        deadline = time.monotonic() + timeout
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._waiting

    def stop(self) -> None:
        self._closing = True
        if self._client is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._client.close(), self._plane.loop)
        try:
            future.result(10.0)
        except Exception as exc:
            log.debug("NATS publisher: closing: %s", exc)
