"""The daemon's connections to the broker (paho-mqtt 2.x).

- One `Intake` per rule: its subscription, with a stable client id and a persistent session when
  the rule has an id, so what arrives while the daemon is down waits at the broker. QoS 1
  messages are acknowledged by hand (`manual_ack`), once their outcome is published.
- One `Publisher` for the daemon: every outcome goes out through it, and `then()` runs once the
  broker acknowledged a QoS 1 publish, which is when the input gets its acknowledgement.

Keeping the two apart matters: when a function's queue is full the intake's network thread waits
for room (that is how intake pauses), and that must never hold up the publishes and their
acknowledgements, which are what frees the room.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Set

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Hub

log = logging.getLogger(__name__)

OnMessage = Callable[[mqtt.MQTTMessage], None]


class _Connection:
    """A paho client set up from the hub configuration, in its own network thread."""

    def __init__(self, hub: Hub, client_id: str, clean_session: bool, name: str,
                 manual_ack: bool = False) -> None:
        self.name = name
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
        client.reconnect_delay_set(1, max(1, int(hub.reconnect_max)))
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_socket_open = _no_delay
        self._client = client

    def start(self) -> None:
        keepalive = max(5, int(self._hub.keepalive))
        if self._hub.protocol == 5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 0 if self._clean else self._hub.session_expiry
            self._client.connect_async(self._hub.host, self._hub.port, keepalive=keepalive,
                                       clean_start=self._clean, properties=properties)
        else:
            self._client.connect_async(self._hub.host, self._hub.port, keepalive=keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("%s: broker %s refused the connection: %s", self.name, self._hub.address, reason)
            return
        self.generation += 1
        self.connected.set()
        self._on_connect(client, flags)

    def _on_connect(self, client: mqtt.Client, flags: Any) -> None:
        log.info("%s: connected to %s", self.name, self._hub.address)

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            log.warning("%s: lost the broker (%s), reconnecting", self.name, reason)


class Intake(_Connection):
    """A rule's subscription: subscribes on every connect, hands messages on, acknowledges."""

    def __init__(self, hub: Hub, client_id: str, clean_session: bool, topic: str, qos: int,
                 on_message: OnMessage, name: str) -> None:
        super().__init__(hub, client_id, clean_session, f"rule {name}", manual_ack=True)
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
        self._on_message(message)

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge an input message, if it came on the current connection (a message from an
        earlier one will be redelivered by the broker instead)."""
        if qos and generation == self.generation:
            self._client.ack(mid, qos)

    def stop_intake(self) -> None:
        """Take no more messages. The subscription stays (unsubscribing would drop it from the
        persistent session, and with it what arrives while the daemon is down); QoS 1 messages
        that still arrive are left unacknowledged, so the broker delivers them again."""
        self._on_message = _drop

    def unsubscribe(self, timeout: float = 5.0) -> None:
        """Drop the subscription from the (persistent) session: for a rule that is removed."""
        if self.connected.is_set():
            done = threading.Event()
            self._client.on_unsubscribe = lambda *args: done.set()
            if self._client.unsubscribe(self._topic)[0] == mqtt.MQTT_ERR_SUCCESS:
                done.wait(timeout)


class Publisher(_Connection):
    """Publishes every outcome of the daemon; tells when the broker has each QoS 1 one."""

    def __init__(self, hub: Hub, client_id: str) -> None:
        super().__init__(hub, client_id, clean_session=True, name="publisher")
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)   # signalled as the broker acknowledges
        self._waiting: Dict[mqtt.MQTTMessageInfo, Callable[[], None]] = {}
        self._early: Set[mqtt.MQTTMessageInfo] = set()
        self._closing = False
        self._client.max_inflight_messages_set(100)
        # Outcomes published while the broker is away wait in paho, up to this many; past it,
        # publishing waits for room (and with it the pool, and then intake).
        self._client.max_queued_messages_set(self._hub.buffer_max)
        self._client.on_publish = self._published

    def publish(self, topic: str, payload: bytes, qos: int, then: Callable[[], None] = None) -> bool:
        """Publish; call `then()` once the broker has it (QoS 1) or once it is queued (QoS 0).
        False when the outcome could not be kept: QoS 0 without a connection, or stopping."""
        while True:
            info = self._client.publish(topic, payload, qos)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                break
            with self._lock:
                if self._closing:
                    return False
                self._room.wait(0.1)
        if qos == 0:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            if then is not None:
                then()
            return True
        # QoS 1: paho keeps the message (and resends it after a reconnect) until the broker acks it.
        then = then or _nothing
        with self._lock:
            early = info in self._early
            if early:
                self._early.discard(info)
            else:
                self._waiting[info] = then
        if early:
            then()
        return True

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Called with paho's outgoing-message lock held, before it forgets the message: look it up
        # to tell a QoS 1 publish (whose info we may be waiting on) from a QoS 0 one.
        message = client._out_messages.get(mid)
        if message is None:
            return
        with self._lock:
            then = self._waiting.pop(message.info, None)
            if then is None:
                self._early.add(message.info)
            self._room.notify()
        if then is not None:
            then()

    def drain(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 publish; True when it did."""
        deadline = time.monotonic() + timeout
        while self._waiting and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._waiting

    def stop(self) -> None:
        with self._lock:
            self._closing = True
            self._room.notify_all()
        super().stop()


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho leaves Nagle on; small request/response messages then wait up to 40 ms."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass   # TLS-wrapped or non-TCP sockets


def _nothing() -> None:
    pass


def _drop(message: mqtt.MQTTMessage) -> None:
    """Messages that arrive after stop_intake() are left unacknowledged: the broker redelivers them."""
