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

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import PACKET_MAX, Hub
from .config.converters import PROTOCOL_AUTO
from .dataplane import DataPlane

log = logging.getLogger("openedge_function.hub")

OnMessage = Callable[[mqtt.MQTTMessage], None]
Then = Callable[[Optional[ReasonCode]], None]   # a publish's end: None when the broker has it

_MISC_EVERY = 1.0      # seconds between keep-alive checks
_UNSUPPORTED_PROTOCOL = 0x84   # CONNACK: the broker does not speak the protocol asked for
_READS_PER_EVENT = 64  # packets read in one go before the loop serves others
# A PUBLISH beyond its payload and topic: fixed header (up to 5), topic length (2), packet id (2),
# and room for MQTT 5's empty property list.
_PUBLISH_OVERHEAD = 16


class _ReasonOutsideTheSpec(ReasonCode):
    """A PUBACK reason code MQTT 5 does not list for PUBACK (paho cannot name it)."""

    _NAMES = {0x95: "Packet too large"}

    def getName(self) -> str:
        return self._NAMES.get(self.value, "Unknown error")


class _SharedProperties(Properties):
    """paho's Properties with the tables every instance holds built once, not once per packet.

    paho builds a Properties and a ReasonCode for every PUBACK it receives and for every QoS 0
    publish it reports, and a Properties for every PUBLISH under MQTT 5, each with its own copy of
    the same lookup tables: ~12 µs a message, a fifth of the supervisor's CPU for it. Nothing
    writes to the tables after they are built, so one copy serves all."""

    _TABLES: Optional[Tuple[Any, Any, Any]] = None

    def __init__(self, packetType: int) -> None:
        tables = _SharedProperties._TABLES
        if tables is None:
            template = Properties(packetType)
            tables = _SharedProperties._TABLES = (template.types, template.names, template.properties)
        setattr_ = object.__setattr__
        setattr_(self, "packetType", packetType)
        setattr_(self, "types", tables[0])
        setattr_(self, "names", tables[1])
        setattr_(self, "properties", tables[2])

    def unpack(self, buffer: Any) -> Any:
        if buffer[:1] == b"\x00" and len(self.__dict__) == 4:   # none to read, none to clear
            return self, 1
        return super().unpack(buffer)


class _SharedReasonCode(ReasonCode):
    """paho's ReasonCode sharing its class's table of names (paho copies it for each one)."""

    _BY_NAME: Dict[Tuple[int, str], int] = {}

    def __init__(self, packetType: int, aName: str = "Success", identifier: int = -1) -> None:
        self.names = type(self).names
        self.packetType = packetType
        if identifier != -1:
            self.value = identifier
            self.getName()  # check it's good, as paho does
            return
        value = self._BY_NAME.get((packetType, aName))
        if value is None:
            ReasonCode.__init__(self, packetType, aName)
            self.names = type(self).names
            self._BY_NAME[(packetType, aName)] = self.value
        else:
            self.value = value


# paho makes them through these module names; what it makes is still a Properties and a ReasonCode.
paho_packet.Properties = mqtt.Properties = _SharedProperties  # type: ignore[misc]
paho_packet.ReasonCode = mqtt.ReasonCode = _SharedReasonCode  # type: ignore[misc]


class PahoClient(mqtt.Client):
    """paho's client, and the one place that touches paho's private fields (checked against
    paho-mqtt 2.2; a paho upgrade re-runs tests/test_limits.py, which covers each of them).

    It is lenient about one thing a broker does outside the spec: mosquitto answers a PUBLISH
    over its message_size_limit with PUBACK 0x95 (Packet too large), a code MQTT 5 does not list
    for PUBACK. paho takes such a packet for malformed and drops the connection; after the
    reconnect it sends the same PUBLISH again, meets the same answer, and the publisher is stuck
    for ever. Here the publish is simply refused with that code. (MQTT 3.1.1's PUBACK has no
    reason code: nothing changes there.)"""

    def in_flight(self) -> int:
        """QoS 1 publishes paho holds until the broker acknowledges them."""
        return len(self._out_messages)

    def largest_in_flight(self) -> int:
        """The largest payload among them, in bytes."""
        return max((len(m.payload) for m in list(self._out_messages.values())), default=0)

    def close_socket(self) -> None:
        """Close the connection now (paho closes on its own only when the broker answers)."""
        self._sock_close()

    def _handle_pubackcomp(self, cmd: Any) -> Any:
        packet = self._in_packet["packet"]
        if cmd == "PUBACK" and len(packet) > 2 and packet[2] >= 0x80 and not any(
                PacketTypes.PUBACK in packets for packets in ReasonCode.names.get(packet[2], {}).values()):
            mid = int.from_bytes(packet[:2], "big")
            reason = _ReasonOutsideTheSpec(PacketTypes.PUBACK)
            reason.value = packet[2]
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, reason, Properties(PacketTypes.PUBACK))
            return mqtt.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)


class _Connection:
    """A paho client set up from the hub configuration, run by the data plane's loop."""

    def __init__(self, plane: DataPlane, hub: Hub, client_id: str, clean_session: bool, name: str,
                 manual_ack: bool = False, session_expiry: Optional[int] = None) -> None:
        self.name = name
        self._expiry = hub.session_expiry if session_expiry is None else session_expiry
        self._plane = plane
        self._loop = plane.loop
        self._hub = hub
        self._clean = clean_session
        self.connected = threading.Event()
        self.generation = 0        # bumped on every connect: acks belong to one connection
        self._client_id, self._manual_ack = client_id, manual_ack
        # MQTT 5 unless the configuration says 3.1.1; `auto` falls back to 3.1.1 when the broker
        # refuses 5 (see _connected).
        self.v5 = hub.protocol != 4
        self._client = self._make_client()
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

    def _make_client(self) -> "PahoClient":
        hub = self._hub
        if self.v5:
            client = PahoClient(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                                protocol=mqtt.MQTTv5, manual_ack=self._manual_ack)
        else:
            client = PahoClient(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                                clean_session=self._clean, protocol=mqtt.MQTTv311,
                                manual_ack=self._manual_ack)
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
        self._configure(client)
        return client

    def _configure(self, client: "PahoClient") -> None:
        """What a subclass sets on each client it gets (a new one after a fall-back to 3.1.1)."""

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
                if self.v5:
                    properties = Properties(PacketTypes.CONNECT)
                    properties.SessionExpiryInterval = 0 if self._clean else self._expiry
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
        delay, self._delay = self._delay, min(max(1.0, self._delay * 2), max(1.0, self._hub.reconnect_max))
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

    @property
    def paused(self) -> List[str]:
        """Why reading is paused (the pool, the publisher); empty while it reads."""
        return sorted(self._paused)

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
            self._client.close_socket()
        self.connected.clear()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            if reason.value == _UNSUPPORTED_PROTOCOL and self.v5 and self._hub.protocol == PROTOCOL_AUTO:
                # A 3.1.1 broker: the next attempt (after the disconnect this failure brings)
                # speaks 3.1.1, on a client made for it.
                log.info("%s: broker %s does not speak MQTT 5: using MQTT 3.1.1 (hub.protocol: auto)",
                         self.name, self._hub.address)
                self.v5 = False
                self._client = self._make_client()
                self._started = False
                self._delay = 0.0
                return
            log.error("%s: broker %s refused the connection: %s", self.name, self._hub.address, reason)
            return
        self._delay, self._failures = 1.0, 0
        self.generation += 1
        self.connected.set()
        self._on_connect(client, flags, properties)

    def _on_connect(self, client: mqtt.Client, flags: Any, properties: Any) -> None:
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
                 qos: int, on_message: OnMessage, name: str, session_expiry: Optional[int] = None) -> None:
        self._topic, self._qos = topic, qos
        self._on_message = on_message
        self._warned = False
        super().__init__(plane, hub, client_id, clean_session, f"rule {name}", manual_ack=True,
                         session_expiry=session_expiry)

    def _configure(self, client: "PahoClient") -> None:
        client.on_message = self._message
        client.on_subscribe = self._subscribed

    def _on_connect(self, client: mqtt.Client, flags: Any, properties: Any) -> None:
        log.info("%s: connected to %s (session %s), subscribing to %s (QoS %d)", self.name,
                 self._hub.address, "resumed" if flags.session_present else "new", self._topic, self._qos)
        client.subscribe(self._topic, self._qos)
        if not self.v5 and self._topic.startswith("$share/") and not self._warned:
            self._warned = True   # configured 3.1.1, or auto with a 3.1.1 broker: said once
            log.warning("%s: a shared subscription under MQTT 3.1.1 has a session without expiry: if "
                        "this daemon is lost for good, the broker may keep sending it the group's "
                        "messages and hold them there; set hub.protocol: 5 (README, \"Beyond one "
                        "machine\")", self.name)

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

        def unsubscribed(*args: Any) -> None:
            log.info("%s: unsubscribed from %s", self.name, self._topic)
            done.set()

        def send() -> bool:
            if not self.connected.is_set():
                return False
            self._client.on_unsubscribe = unsubscribed
            return self._client.unsubscribe(self._topic)[0] == mqtt.MQTT_ERR_SUCCESS

        if self._plane.run(send):
            done.wait(timeout)


class Publisher(_Connection):
    """Publishes every outcome of the daemon; tells when the broker has each QoS 1 one, or that it
    refused it (MQTT 5), and how large a publish the broker takes.

    `limit` is the largest PUBLISH packet the broker takes: hub.maxsize (MQTT's own bound when
    unset), lowered by the Maximum Packet Size of an MQTT 5 broker's CONNACK. A publish of
    `len(payload) + 4 * len(topic)` up to `room` fits whatever the topic's characters; a larger
    one, or one with MQTT 5 properties under a limit the broker stated, is measured with `size`.
    """

    def __init__(self, plane: DataPlane, hub: Hub, client_id: str) -> None:
        super().__init__(plane, hub, client_id, clean_session=True, name="publisher")
        self._waiting: Dict[int, Then] = {}   # mid -> then, for QoS 1
        # Outcomes beyond paho's buffer (hub.buffer.max, while the broker is away) wait here, and
        # the intakes pause until it empties: nothing is refused, and memory stays bounded.
        self._backlog: Deque[Tuple[str, bytes, int, Then, Optional[Properties]]] = \
            collections.deque()
        self._intakes: List[Intake] = []
        self._closing = False
        self._acked = False               # the broker acknowledged a publish on this connection
        self._unacked_connections = 0     # connections in a row that ended with none acknowledged
        self._set_limit(hub.maxsize, "hub.maxsize" if hub.maxsize < PACKET_MAX else "MQTT's own limit")

    def _configure(self, client: "PahoClient") -> None:
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(self._hub.buffer_max)
        client.on_publish = self._published

    def _set_limit(self, limit: int, source: str) -> None:
        self.limit = limit
        self.limit_source = source
        self.room = limit - _PUBLISH_OVERHEAD
        self.exact = self.v5 and limit < PACKET_MAX   # MQTT 5 properties count too

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        # A broker that closes the connection on a publish over its max_packet_size (mosquitto,
        # MQTT 3.1.1) says nothing else: paho sends the publish again after each reconnect, and
        # nothing is acknowledged any more. Name the likely cause once.
        if self._waiting and not self._acked and not self._stopped:
            self._unacked_connections += 1
            if self._unacked_connections == 3:
                largest = self._client.largest_in_flight()
                log.warning("publisher: the broker closed the connection 3 times in a row before it "
                            "acknowledged any publish, with a publish of %d bytes in flight: a broker "
                            "that limits packet sizes (mosquitto's max_packet_size) does this; set "
                            "hub.maxsize to its limit", largest)
        else:
            self._unacked_connections = 0
        self._acked = False
        super()._disconnected(client, userdata, flags, reason, properties)

    def _on_connect(self, client: mqtt.Client, flags: Any, properties: Any) -> None:
        super()._on_connect(client, flags, properties)
        stated = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if stated and stated < self._hub.maxsize:
            if stated != self.limit:
                log.info("publisher: the broker takes packets of up to %d bytes (its Maximum Packet "
                         "Size): larger outcomes are answered with ResultTooLarge", stated)
            self._set_limit(stated, "the broker's Maximum Packet Size")
        elif self.limit != self._hub.maxsize:   # a broker that no longer states one
            self._set_limit(self._hub.maxsize, "hub.maxsize")

    @staticmethod
    def size(topic: str, payload: bytes, qos: int, properties: Optional[Properties]) -> int:
        """The bytes of the PUBLISH packet paho would send."""
        remaining = 2 + len(topic.encode("utf-8")) + len(payload) + (2 if qos else 0)
        if properties is not None:
            remaining += len(properties.pack())
        header = 2 if remaining < 128 else 3 if remaining < 16384 else 4 if remaining < 2097152 else 5
        return header + remaining

    def attach(self, intake: Intake) -> None:
        """`intake` pauses while outcomes wait for room in the buffer (on the loop)."""
        self._intakes.append(intake)
        if self._backlog:
            intake.pause("publisher")

    def detach(self, intake: Intake) -> None:
        if intake in self._intakes:
            self._intakes.remove(intake)
            intake.resume("publisher")

    def publish(self, topic: str, payload: bytes, qos: int, then: Then,
                properties: Optional[Properties] = None) -> bool:
        """Publish (on the loop); call `then(None)` once the broker has it (QoS 1) or once it is
        sent (QoS 0), `then(reason)` when an MQTT 5 broker refused it (its PUBACK's reason code).
        False when the outcome could not be kept: QoS 0 without a connection, or stopping. The
        caller checks the size first (`room`, `size`, `limit`)."""
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
            then(None)
            return True
        if rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._backlog.append((topic, payload, qos, then, properties))
            log.warning("publisher: %d outcomes wait for the broker (hub.buffer.max): pausing intake",
                        self._client.in_flight())
            for intake in self._intakes:
                intake.pause("publisher")
            return True
        # Kept by paho (and sent again after a reconnect) until the broker acknowledges it.
        self._waiting[info.mid] = then
        return True

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acked = True
        then = self._waiting.pop(mid, None)
        if then is not None:
            then(reason if self.v5 and reason.is_failure else None)
            if self._backlog:
                self._loop.call_soon(self._drain_backlog)

    def _drain_backlog(self) -> None:
        """Hand what waits to paho as the broker makes room; intake resumes once all is taken."""
        backlog = self._backlog
        while backlog and self._client.in_flight() < self._hub.buffer_max:
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
