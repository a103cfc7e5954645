"""Test helpers: a real mosquitto, a real daemon, a real MQTT client. No mocks."""
from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime_python.template import NAME as TEMPLATE_NAME
from runtime_python.wire import SPARE_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def request(port: int, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
            timeout: float = 30) -> Tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP request to the daemon's server on 127.0.0.1:`port`: (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not found:
        raise RuntimeError("mosquitto is not installed (make test installs it)")
    return found


class Broker:
    """A mosquitto of our own on a free loopback port, stopped and restarted by PID."""

    def __init__(self, directory: str, persistence: bool = False, extra: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config = os.path.join(directory, "mosquitto.conf")
        self.log = os.path.join(directory, "mosquitto.log")
        # As root, mosquitto would switch to its own user, who cannot read the test's private
        # directory (its log, password file, certificates): "user root" keeps ours instead.
        with open(self.config, "w") as fh:
            fh.write(textwrap.dedent(f"""\
                listener {self.port} 127.0.0.1
                allow_anonymous true
                persistence {'true' if persistence else 'false'}
                persistence_location {directory}/
                max_queued_messages 100000
                max_inflight_messages 100
                set_tcp_nodelay true
                log_dest file {self.log}
                """) + ("user root\n" if os.geteuid() == 0 else "") + extra)

        self.process: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def start(self) -> "Broker":
        self.process = subprocess.Popen([mosquitto_binary(), "-c", self.config],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, message=f"mosquitto on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.process.returncode}; see {self.log}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        terminate(self.process, 5)
        self.process = None


def terminate(process: Optional[subprocess.Popen], grace: float) -> None:
    """SIGTERM `process`, and SIGKILL it after `grace` seconds; reaped either way."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Collector:
    """An MQTT client that records what arrives on some topics (with no topics: a publisher)."""

    def __init__(self, broker: Broker, topics: Sequence[str], qos: int = 1, inflight: int = 20) -> None:
        self.messages: List[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{os.getpid()}-{id(self)}")
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(inflight)   # 0: publish without waiting for acks
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_connect = lambda c, *a: (c.subscribe([(t, qos) for t in topics]) if topics
                                                else self._subscribed.set())
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not connect and subscribe")

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def wait_for(self, count: int, timeout: float = 15.0) -> List[mqtt.MQTTMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout,
                   message=f"{count} messages (have {len(self.messages)})")
        with self._lock:
            return list(self.messages)

    def on(self, topic: str) -> List[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class V5Client:
    """An MQTT 5 client that records what arrives, properties included."""

    def __init__(self, broker: Broker, topics: List[str]) -> None:
        self.messages: List[mqtt.MQTTMessage] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"v5-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, message: self.messages.append(message)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._ready.wait(10)

    def request(self, topic: str, payload: bytes, **props: Any) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        for key, value in props.items():
            if key == "UserProperty":
                for pair in value:
                    properties.UserProperty = pair
            else:
                setattr(properties, key, value)
        self.client.publish(topic, payload, 1, properties=properties).wait_for_publish(10)

    def on(self, topic: str) -> List[mqtt.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: Broker, topic: str, payload: Any, qos: int = 1, count: int = 1) -> None:
    """Publish and wait until the broker has each message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{time.monotonic_ns()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for _ in range(count):
            info = client.publish(topic, payload, qos)
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def function(name: str, handler: str, codedir: str = "fn", **extra: Any) -> Dict[str, Any]:
    """A function's configuration, as application.yml has it."""
    return {"name": name, "handler": handler, "codedir": codedir, **extra}


def rule(rule_id: str, topic: str, fn: str, out: str, qos: int = 1, out_qos: int = 1,
         **extra: Any) -> Dict[str, Any]:
    """A rule's configuration: `topic` into function `fn`, outcomes to `out`."""
    return {"id": rule_id, "subscribe": {"topic": topic, "qos": qos}, "compute": {"function": fn},
            "publish": {"topic": out, "qos": out_qos}, **extra}


def write_handler(directory: str, name: str, source: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as fh:
        fh.write(textwrap.dedent(source))
    return path


class DaemonProcess:
    """`python -m openedge_function -c application.yml`, started as a user would."""

    def __init__(self, directory: str, config: Dict[str, Any]) -> None:
        self.directory = directory
        self.config_path = os.path.join(directory, "application.yml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(config, fh, allow_unicode=True)
        self.log_path = os.path.join(directory, "daemon.log")
        self.process: Optional[subprocess.Popen] = None
        self.seen_pids: set = set()
        self.rules = len(config.get("rules") or [])

    def start(self, wait: bool = True, env: Optional[Dict[str, str]] = None) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        already = self.log().count(": subscribed to ")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "openedge_function", "-c", self.config_path],
            cwd=self.directory, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            wait_until(lambda: self.log().count(": subscribed to ") >= already + self.rules, 20,
                       message="the daemon to subscribe every rule")
        return self

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def instance_pids(self, spares: bool = False) -> List[int]:
        """The runtime processes this daemon started, alive now, without its pools' spares unless
        asked (all remembered for the teardown)."""
        if self.process is None:
            return []
        pids, spare_pids = [], []
        for proc in psutil.process_iter(["cmdline", "ppid", "name"]):
            if proc.info["ppid"] == self.process.pid and is_instance(proc.info["cmdline"] or [],
                                                                    proc.info["name"]):
                (spare_pids if proc.info["name"] == SPARE_NAME else pids).append(proc.pid)
        self.seen_pids.update(pids + spare_pids)
        return pids + spare_pids if spares else pids

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> Optional[int]:
        if self.process is None:
            return None
        self.instance_pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def is_instance(cmdline: Sequence[str], name: str) -> bool:
    """Whether a child of the daemon with this command line and name is an instance. Forks of the
    template share its command line but carry their instance's name; the template's own name is
    its executable's until it renames itself."""
    if "runtime_python" in cmdline:
        return True
    if "runtime_python.template" in cmdline:
        return name not in (TEMPLATE_NAME, os.path.basename(cmdline[0])[:15])
    return False


def alive(pids: Sequence[int]) -> List[int]:
    """The pids of `pids` that still run (zombies count as gone)."""
    result = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.append(pid)
        except psutil.NoSuchProcess:
            pass
    return result


def make_wheel(directory: str, name: str, version: str, source: str) -> str:
    """A pure-Python wheel file, built by hand (no build backend needed offline)."""
    os.makedirs(directory, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": source.encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as wheel:
        for name_in, data in files.items():
            wheel.writestr(name_in, data)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path
