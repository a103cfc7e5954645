"""The daemon's connections to the broker (paho-mqtt 2.x), driven by the data plane's loop.

- One `Intake` per rule: its subscription, with a stable client id and a persistent session when
  the rule has an id, so what arrives while the daemon is down waits at the broker. QoS 1
  messages are acknowledged by hand (`manual_ack`), once their outcome is published.
- One `Publisher` for the daemon: every outcome goes out through it, and `then()` runs once the
  broker acknowledged a QoS 1 publish, which is when the input gets its acknowledgement.

No paho network threads: the loop watches each client's socket and calls `loop_read`,
`loop_write` and `loop_misc` (paho's external-loop interface), reconnecting with a back-off.
Writes queued while the loop handles one event go out together at the end of it.

An intake pauses by no longer reading its socket (TCP then holds the broker back, which buffers
or drops under its own limits); it never holds up the publisher, whose acknowledgements are what
frees the room.
"""
from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Hub
from .dataplane import DataPlane

log = logging.getLogger(__name__)

OnMessage = Callable[[mqtt.MQTTMessage], None]

_MISC_EVERY = 1.0      # seconds between keep-alive checks
_READS_PER_EVENT = 64  # packets read in one go before the loop serves others


class _Connection:
    """A paho client set up from the hub configuration, run by the data plane's loop."""

    def __init__(self, plane: DataPlane, hub: Hub, client_id: str, clean_session: bool, name: str,
                 manual_ack: bool = False) -> None:
        self.name = name
        self._plane = plane
        self._loop = plane.loop
        self._hub = hub
        self._clean = clean_session
        self.connected = threading.Event()
        self.generation = 0        # bumped on every connect: acks belong to one connection
        if hub.protocol == 5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=clean_session, protocol=mqtt.MQTTv311,
                                 manual_ack=manual_ack)
        if hub.username is not None:
            client.username_pw_set(hub.username, hub.password)
        if hub.tls:
            client.tls_set(ca_certs=hub.ca, certfile=hub.cert, keyfile=hub.key,
                           cert_reqs=ssl.CERT_NONE if hub.insecure_skip_verify else ssl.CERT_REQUIRED)
            if hub.insecure_skip_verify:
                client.tls_insecure_set(True)
        # The loop waits for a connect: keep it short (the broker is usually on this machine).
        client.connect_timeout = max(0.5, min(hub.connect_timeout, 5.0))
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_socket_open = self._socket_opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        self._client = client
        self._sock: Any = None
        self._flush_due = False
        self._flushing = False
        self._writer = False
        self._reader = False
        self._paused: Set[str] = set()   # why reading is paused; empty: reading
        self._stopped = False
        self._started = False
        self._delay = 1.0
        self._failures = 0
        self._misc: Optional[Any] = None
        self._received = 0   # messages delivered (an intake's), to tell when a read found one

    # -- running (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        self._plane.call(self._connect)

    def stop(self) -> None:
        """Disconnect cleanly; from any thread."""
        self._plane.run(self._stop)

    # -- on the loop -----------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._stopped:
            return
        client = self._client
        try:
            if not self._started:
                self._started = True
                keepalive = max(5, int(self._hub.keepalive))
                if self._hub.protocol == 5:
                    properties = Properties(PacketTypes.CONNECT)
                    properties.SessionExpiryInterval = 0 if self._clean else self._hub.session_expiry
                    client.connect_async(self._hub.host, self._hub.port, keepalive=keepalive,
                                         clean_start=self._clean, properties=properties)
                else:
                    client.connect_async(self._hub.host, self._hub.port, keepalive=keepalive)
            client.reconnect()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning("%s: cannot reach the broker %s (%s); trying again", self.name,
                            self._hub.address, exc)
            self._retry()
            return
        if self._misc is None:
            self._misc = self._loop.call_later(_MISC_EVERY, self._keepalive)

    def _retry(self) -> None:
        """Connect again after the back-off (1 s doubling up to hub.interval)."""
        if self._stopped:
            return
        delay, self._delay = self._delay, min(self._delay * 2, max(1.0, self._hub.reconnect_max))
        self._loop.call_later(delay, self._connect)

    def _keepalive(self) -> None:
        self._misc = None
        if self._stopped or self._sock is None:
            return
        # A paused intake reads nothing, PINGRESP included: paho would take the silence for a
        # dead broker. Its acknowledgements keep the broker's side of the keep-alive going.
        if not self._paused:
            self._client.loop_misc()
        self._misc = self._loop.call_later(_MISC_EVERY, self._keepalive)

    def _socket_opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        self._sock = sock
        self._read_again()

    def _socket_closed(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._reader:
            self._loop.remove_reader(sock)
            self._reader = False
        if self._writer:
            self._loop.remove_writer(sock)
            self._writer = False
        self._sock = None

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Written at the end of this turn of the loop: what else it queues goes out with it.
        if not self._flush_due and not self._flushing and not self._writer:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _no_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._writer:
            self._loop.remove_writer(sock)
            self._writer = False

    def _flush(self) -> None:
        self._flush_due = False
        if self._sock is None:
            return
        self._flushing = True
        try:
            self._client.loop_write()
        finally:
            self._flushing = False
        if self._sock is not None and self._client.want_write() and not self._writer:
            # The socket's buffer is full: wait until it drains.
            self._loop.add_writer(self._sock, self._on_writable)
            self._writer = True

    def _on_writable(self) -> None:
        if self._writer and self._sock is not None:
            self._loop.remove_writer(self._sock)
        self._writer = False
        self._flush()

    def _read_again(self) -> None:
        if self._sock is not None and not self._paused and not self._reader:
            self._loop.add_reader(self._sock, self._on_readable)
            self._reader = True
            # Bytes paho or TLS holds already would not make the socket readable again.
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        client = self._client
        for _ in range(_READS_PER_EVENT):
            if self._sock is None or self._paused:
                break
            before = self._received
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            pending = getattr(self._sock, "pending", None)
            if self._received == before and not (pending and pending()):
                break   # nothing more to read now
        if self._paused and self._reader and self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._reader = False

    def pause(self, reason: str) -> None:
        """Stop reading until `resume(reason)` (on the loop): the function or the publisher is
        saturated."""
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            self._read_again()

    def _stop(self) -> None:
        self._stopped = True
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._sock is not None:
            self._client.disconnect()
            self._flush()
        if self._sock is not None:
            self._client._sock_close()   # paho closes on its own only when the broker answers
        self.connected.clear()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("%s: broker %s refused the connection: %s", self.name, self._hub.address, reason)
            return
        self._delay, self._failures = 1.0, 0
        self.generation += 1
        self.connected.set()
        self._on_connect(client, flags)

    def _on_connect(self, client: mqtt.Client, flags: Any) -> None:
        log.info("%s: connected to %s", self.name, self._hub.address)

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if self._stopped:
            return
        if reason.is_failure:
            log.warning("%s: lost the broker (%s), reconnecting", self.name, reason)
        self._retry()


class Intake(_Connection):
    """A rule's subscription: subscribes on every connect, hands messages on, acknowledges."""

    def __init__(self, plane: DataPlane, hub: Hub, client_id: str, clean_session: bool, topic: str,
                 qos: int, on_message: OnMessage, name: str) -> None:
        super().__init__(plane, hub, client_id, clean_session, f"rule {name}", manual_ack=True)
        self._topic, self._qos = topic, qos
        self._on_message = on_message
        self._client.on_message = self._message
        self._client.on_subscribe = self._subscribed

    def _on_connect(self, client: mqtt.Client, flags: Any) -> None:
        log.info("%s: connected to %s (session %s), subscribing to %s (QoS %d)", self.name,
                 self._hub.address, "resumed" if flags.session_present else "new", self._topic, self._qos)
        client.subscribe(self._topic, self._qos)

    def _subscribed(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("%s: the broker refused the subscription to %s: %s", self.name, self._topic, reason)
                return
        log.info("%s: subscribed to %s", self.name, self._topic)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._received += 1
        self._on_message(message)

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge an input message, if it came on the current connection (a message from an
        earlier one will be redelivered by the broker instead). On the loop."""
        if qos and generation == self.generation:
            self._client.ack(mid, qos)

    def stop_intake(self) -> None:
        """Take no more messages. The subscription stays (unsubscribing would drop it from the
        persistent session, and with it what arrives while the daemon is down); QoS 1 messages
        that still arrive are left unacknowledged, so the broker delivers them again."""
        self._on_message = _drop

    def unsubscribe(self, timeout: float = 5.0) -> None:
        """Drop the subscription from the (persistent) session: for a rule that is removed.
        From a thread other than the loop's."""
        done = threading.Event()

        def send() -> bool:
            if not self.connected.is_set():
                return False
            self._client.on_unsubscribe = lambda *args: done.set()
            return self._client.unsubscribe(self._topic)[0] == mqtt.MQTT_ERR_SUCCESS

        if self._plane.run(send):
            done.wait(timeout)


class Publisher(_Connection):
    """Publishes every outcome of the daemon; tells when the broker has each QoS 1 one."""

    def __init__(self, plane: DataPlane, hub: Hub, client_id: str) -> None:
        super().__init__(plane, hub, client_id, clean_session=True, name="publisher")
        self._waiting: Dict[int, Callable[[], None]] = {}   # mid -> then, for QoS 1
        # Outcomes beyond paho's buffer (hub.buffer.max, while the broker is away) wait here, and
        # the intakes pause until it empties: nothing is refused, and memory stays bounded.
        self._backlog: Deque[Tuple[str, bytes, int, Callable[[], None], Optional[Properties]]] = \
            collections.deque()
        self._intakes: List[Intake] = []
        self._closing = False
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(self._hub.buffer_max)
        self._client.on_publish = self._published

    def attach(self, intake: Intake) -> None:
        """`intake` pauses while outcomes wait for room in the buffer (on the loop)."""
        self._intakes.append(intake)
        if self._backlog:
            intake.pause("publisher")

    def detach(self, intake: Intake) -> None:
        if intake in self._intakes:
            self._intakes.remove(intake)
            intake.resume("publisher")

    def publish(self, topic: str, payload: bytes, qos: int, then: Callable[[], None],
                properties: Optional[Properties] = None) -> bool:
        """Publish (on the loop); call `then()` once the broker has it (QoS 1) or once it is sent
        (QoS 0). False when the outcome could not be kept: QoS 0 without a connection, or stopping."""
        if self._closing:
            return False
        if self._backlog:
            if qos == 0:
                return False
            self._backlog.append((topic, payload, qos, then, properties))
            return True
        info = self._client.publish(topic, payload, qos, properties=properties)
        rc = info.rc
        if qos == 0:
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            then()
            return True
        if rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._backlog.append((topic, payload, qos, then, properties))
            log.warning("publisher: %d outcomes wait for the broker (hub.buffer.max): pausing intake",
                        len(self._client._out_messages))
            for intake in self._intakes:
                intake.pause("publisher")
            return True
        # Kept by paho (and sent again after a reconnect) until the broker acknowledges it.
        self._waiting[info.mid] = then
        return True

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        then = self._waiting.pop(mid, None)
        if then is not None:
            then()
            if self._backlog:
                self._loop.call_soon(self._drain_backlog)

    def _drain_backlog(self) -> None:
        """Hand what waits to paho as the broker makes room; intake resumes once all is taken."""
        backlog = self._backlog
        while backlog and len(self._client._out_messages) < self._hub.buffer_max:
            topic, payload, qos, then, properties = entry = backlog.popleft()
            info = self._client.publish(topic, payload, qos, properties=properties)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                backlog.appendleft(entry)
                return
            self._waiting[info.mid] = then
        if not backlog:
            for intake in self._intakes:
                intake.resume("publisher")

    def unacknowledged(self) -> int:
        return len(self._waiting) + len(self._backlog)

    def drain(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 publish; True when it did. From a
        thread other than the loop's."""
        deadline = time.monotonic() + timeout
        while self.unacknowledged() and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.unacknowledged()

    def stop(self) -> None:
        self._closing = True
        super().stop()


def _no_delay(sock: Any) -> None:
    """paho leaves Nagle on; small request/response messages then wait up to 40 ms."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass   # TLS-wrapped or non-TCP sockets


def _drop(message: mqtt.MQTTMessage) -> None:
    """Messages that arrive after stop_intake() are left unacknowledged: the broker redelivers them."""
