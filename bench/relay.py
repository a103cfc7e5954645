"""The ceiling: one Python process that subscribes, calls the handler directly, and publishes.

No isolation, no pool, no acknowledgement discipline beyond paho's own: what a Python daemon on
paho-mqtt can do at best on this machine. The benchmark drives it exactly as it drives the daemon.
"""
from __future__ import annotations

import argparse
import importlib
import socket
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from runtime_python.codec import decode_event, encode_result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--qos", type=int, default=0)
    parser.add_argument("--codedir", required=True)
    parser.add_argument("--handler", default="echo.handler")
    args = parser.parse_args()
    sys.path.insert(0, args.codedir)
    module, _, name = args.handler.rpartition(".")
    handler = getattr(importlib.import_module(module), name)
    ready = threading.Event()

    def on_message(client, userdata, message):
        kind, payload = encode_result(handler(decode_event(message.payload), {}))
        if kind:
            client.publish("bench/out", payload, min(message.qos, args.qos))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-relay")
    client.max_inflight_messages_set(100)
    client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.on_connect = lambda c, *a: c.subscribe("bench/in", args.qos)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    ready.wait(10)
    print("ready", flush=True)
    sys.stdin.read()   # runs until the benchmark closes our stdin
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
