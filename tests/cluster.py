"""A NATS cluster with JetStream on loopback ports, and clients that feed and count through it:
for the tests of rules that read a stream (tests/test_cluster.py)."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from typing import Any, Callable, List, Optional

from tests.helpers import free_port, terminate, wait_until


def nats_binary() -> str:
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsNode:
    def __init__(self, directory: str, name: str, port: int, route_port: int, routes: List[int]) -> None:
        self.name, self.port = name, port
        self.mqtt_port = free_port()   # NATS's MQTT listener: devices speak MQTT to the cluster
        self.config = os.path.join(directory, f"{name}.conf")
        self.log = os.path.join(directory, f"{name}.log")
        with open(self.config, "w") as fh:
            fh.write(textwrap.dedent(f"""\
                server_name: {name}
                listen: 127.0.0.1:{port}
                jetstream {{ store_dir: "{directory}/{name}-js" }}
                mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}
                cluster {{
                  name: oef
                  # Clients use the addresses they were given (a gateway's link, tests/cluster.Link)
                  no_advertise: true
                  listen: 127.0.0.1:{route_port}
                  routes: [{", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)}]
                }}
                """))
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.process = subprocess.Popen([nats_binary(), "-c", self.config, "-l", self.log],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 15, message=f"nats-server {self.name}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        terminate(self.process, 10)


class MqttListener:
    """A node's MQTT listener, where an MQTT broker is expected (a hub, a Collector)."""

    def __init__(self, node: NatsNode) -> None:
        self.host, self.port = "127.0.0.1", node.mqtt_port

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class Link:
    """A gateway's network link to one NATS node: a TCP relay on a port of its own that the test
    can cut (every connection through it dropped, new ones refused) and restore."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._cut = False
        self._open: List[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data or self._cut:
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._cut = True
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        self._cut = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


class NatsCluster:
    """Three nats-server processes routed to each other, JetStream on; streams of three replicas."""

    def __init__(self, directory: str, size: int = 3) -> None:
        ports = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.nodes = [NatsNode(directory, f"n{i + 1}", ports[i], routes[i], routes) for i in range(size)]

    @property
    def servers(self) -> List[str]:
        return [f"nats://127.0.0.1:{node.port}" for node in self.nodes]

    def links(self) -> List[Link]:
        """A link to each node, for one gateway."""
        return [Link(node.port) for node in self.nodes]

    def start(self) -> "NatsCluster":
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def streams(self, *specs: "tuple[str, str]") -> None:
        """Make the streams (name, subject), three replicas each, once the cluster has a leader."""
        async def make() -> None:
            import nats
            from nats.js.api import StreamConfig
            client = await nats.connect(self.servers)
            try:
                stream = client.jetstream()
                for name, subject in specs:
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            await stream.add_stream(StreamConfig(name=name, subjects=[subject],
                                                                 num_replicas=len(self.nodes)))
                            break
                        except Exception:
                            if time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.5)
            finally:
                await client.close()
        asyncio.run(make())


class _Background(threading.Thread):
    """A nats-py client on an event loop of its own."""

    def __init__(self, servers: List[str]) -> None:
        super().__init__(daemon=True)
        self.servers = servers
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.failure: Optional[BaseException] = None

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.main())
        except BaseException as exc:   # the test reads it
            self.failure = exc
            self.ready.set()

    async def connect(self) -> Any:
        import nats
        return await nats.connect(self.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.5)

    async def main(self) -> None:
        raise NotImplementedError


class StreamFeeder(_Background):
    """Publishes {"seq": n} for n < count to `subject` at `rate` per second through JetStream,
    each until the stream has it (a publish that meets a fault is tried again)."""

    def __init__(self, servers: List[str], subject: str, count: int, rate: float) -> None:
        super().__init__(servers)
        self.subject, self.count, self.rate = subject, count, rate
        self.done = threading.Event()

    async def main(self) -> None:
        client = await self.connect()
        stream = client.jetstream()
        start = time.monotonic()
        for seq in range(self.count):
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while True:
                try:
                    await stream.publish(self.subject, json.dumps({"seq": seq}).encode(), timeout=2)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
        self.done.set()
        await client.close()


class StreamLedger(_Background):
    """Counts the answers stored in a stream (results by "seq", envelopes by their packet)."""

    def __init__(self, servers: List[str], stream: str, subject: str) -> None:
        super().__init__(servers)
        self.stream_name, self.subject = stream, subject
        self.seqs: collections.Counter = collections.Counter()
        self.envelopes: List[dict] = []
        self.pids: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.stopping = False

    async def main(self) -> None:
        import base64
        client = await self.connect()
        stream = client.jetstream()
        pull = await stream.pull_subscribe(self.subject, durable=f"ledger-{os.getpid()}", stream=self.stream_name)
        self.ready.set()
        while not self.stopping:
            try:
                batch = await pull.fetch(256, timeout=0.5)
            except Exception:
                continue
            for message in batch:
                answer = json.loads(message.data)
                with self._lock:
                    if "packet" in answer:
                        self.envelopes.append(answer)
                        seq = json.loads(base64.b64decode(answer["packet"]["Message"]["Payload"]))["seq"]
                    else:
                        seq = answer["seq"]
                        self.pids[answer.get("pid")] += 1
                    self.seqs[seq] += 1
                await message.ack()
        await client.close()

    def counts(self, sent: int) -> dict:
        with self._lock:
            received = sum(self.seqs.values())
            unique = len([s for s in self.seqs if 0 <= s < sent])
            return {"sent": sent, "received": received, "lost": sent - unique,
                    "duplicated": received - unique, "envelopes": len(self.envelopes)}


def run_stream_case(cluster: NatsCluster, daemons: List[Any], count: int, rate: float,
                    faults: List["tuple[Any, Callable[[], None]]"], timeout: float = 120) -> dict:
    """Feed `count` numbered messages into SEQ, apply `faults` on the way, wait for every answer
    in OUT; the counts. A fault comes at a time after the feed began (seconds), or once a
    condition on the answers so far holds (a callable given the pids that answered and how often)."""
    ledger = StreamLedger(cluster.servers, "OUT", "seq.out")
    ledger.start()
    assert ledger.ready.wait(30) and ledger.failure is None, ledger.failure
    try:
        for daemon in daemons:
            daemon.start(wait=False)
        for daemon in daemons:
            wait_until(lambda: "as consumer" in daemon.log(), 30, message="the daemons to read the stream")
        feeder = StreamFeeder(cluster.servers, "seq.in", count, rate)
        started = time.monotonic()
        feeder.start()
        for at, action in faults:
            if callable(at):
                wait_until(lambda: at(dict(ledger.pids)), timeout, message=f"the moment for {action.__name__}")
            else:
                time.sleep(max(0.0, started + at - time.monotonic()))
            action()
        assert feeder.done.wait(timeout), f"the feeder could not publish everything ({feeder.failure})"
        wait_until(lambda: len(ledger.counts(count)) and ledger.counts(count)["lost"] == 0, timeout,
                   message=f"answers to {count} messages (lost so far: {ledger.counts(count)['lost']})")
        time.sleep(1.0)   # late duplicates
        counts = ledger.counts(count)
        counts["pids"] = dict(ledger.pids)   # the instances that answered
        return counts
    finally:
        ledger.stopping = True
        ledger.join(5)
