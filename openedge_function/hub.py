"""The connection of one rule to the broker (paho-mqtt 2.x).

Each rule has its own client: a stable client id and a persistent session when the rule has an
id, so what arrives while the daemon is down waits at the broker. QoS 1 messages are acknowledged
by hand (`manual_ack`), only once their outcome is published, and for a QoS 1 outcome only once the
broker acknowledged that publish: at-least-once end to end.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Optional, Set

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Hub

log = logging.getLogger(__name__)

OnMessage = Callable[[mqtt.MQTTMessage], None]


class HubClient:
    """One MQTT connection: subscribes on every connect, publishes, acknowledges."""

    def __init__(self, hub: Hub, client_id: str, clean_session: bool, topic: str, qos: int,
                 on_message: OnMessage, name: str) -> None:
        self.name = name
        self._hub = hub
        self._topic, self._qos = topic, qos
        self._on_message = on_message
        self.connected = threading.Event()
        self.generation = 0        # bumped on every connect: acks belong to one connection
        self.overflows = 0         # publishes refused because the outbox was full
        self._lock = threading.Lock()
        self._waiting: Dict[mqtt.MQTTMessageInfo, Callable[[], None]] = {}
        self._early: Set[mqtt.MQTTMessageInfo] = set()

        self._clean = clean_session
        if hub.protocol == 5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=True)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=clean_session, protocol=mqtt.MQTTv311, manual_ack=True)
        if hub.username is not None:
            client.username_pw_set(hub.username, hub.password)
        if hub.tls:
            client.tls_set(ca_certs=hub.ca, certfile=hub.cert, keyfile=hub.key,
                           cert_reqs=ssl.CERT_NONE if hub.insecure_skip_verify else ssl.CERT_REQUIRED)
            if hub.insecure_skip_verify:
                client.tls_insecure_set(True)
        client.reconnect_delay_set(1, max(1, int(hub.reconnect_max)))
        client.max_inflight_messages_set(100)
        # Outcomes published while the broker is away wait in paho, up to this many; past it the
        # publish fails and the input stays unacknowledged, for the broker to deliver again.
        client.max_queued_messages_set(hub.buffer_max)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_publish = self._published
        client.on_subscribe = self._subscribed
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

    def drain(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 publish; True when it did."""
        deadline = time.monotonic() + timeout
        while self._waiting and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._waiting

    def unsubscribe(self, timeout: float = 5.0) -> None:
        """Drop the subscription from the (persistent) session: for a rule that is removed."""
        if self.connected.is_set():
            done = threading.Event()
            self._client.on_unsubscribe = lambda *args: done.set()
            if self._client.unsubscribe(self._topic)[0] == mqtt.MQTT_ERR_SUCCESS:
                done.wait(timeout)

    def stop_intake(self) -> None:
        """Take no more messages. The subscription stays (unsubscribing would drop it from the
        persistent session, and with it what arrives while the daemon is down); QoS 1 messages
        that still arrive are left unacknowledged, so the broker delivers them again."""
        self._on_message = _drop

    # -- callbacks (paho's network thread; never block) --------------------------------------

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("rule %s: broker %s refused the connection: %s", self.name, self._hub.address, reason)
            return
        self.generation += 1
        self.connected.set()
        log.info("rule %s: connected to %s (session %s), subscribing to %s (QoS %d)", self.name,
                 self._hub.address, "resumed" if flags.session_present else "new", self._topic, self._qos)
        client.subscribe(self._topic, self._qos)

    def _subscribed(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.error("rule %s: the broker refused the subscription to %s: %s", self.name, self._topic, reason)
                return
        log.info("rule %s: subscribed to %s", self.name, self._topic)

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if reason.is_failure:
            log.warning("rule %s: lost the broker (%s), reconnecting", self.name, reason)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message(message)

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
        if then is not None:
            then()

    # -- used by workers -----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, then: Callable[[], None] = None) -> bool:
        """Publish; call `then()` once the broker has it (QoS 1) or once it is queued (QoS 0).
        False when a QoS 0 message could not be sent (no connection)."""
        info = self._client.publish(topic, payload, qos)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.overflows += 1
            if self.overflows == 1 or self.overflows % 1000 == 0:
                log.warning("rule %s: %d outcomes wait for the broker already (hub.buffer.max); "
                            "their inputs will be delivered again (%d so far)", self.name,
                            self._hub.buffer_max, self.overflows)
            return False
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

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge an input message, if it came on the current connection (a message from an
        earlier one will be redelivered by the broker instead)."""
        if qos and generation == self.generation:
            self._client.ack(mid, qos)


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
