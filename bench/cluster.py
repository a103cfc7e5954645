"""make bench-cluster: gateways sharing a NATS JetStream stream, with one, two and three daemons.

A three-node NATS cluster on loopback ports (streams of three replicas), and N daemons whose rule
reads stream SEQ (subject seq.in) through the one durable consumer they share and publishes the
echo to seq.out (stream OUT). For each N:
  1. flat out: `--count` messages published as fast as JetStream takes them; throughput is
     answers per second from the first publish to the last answer;
  2. latency at `--rate` messages per second for `--duration` seconds: from the publish to the
     answer stored in OUT;
  3. CPU per message: supervisors and instances of all N daemons, from /proc.
On one machine the daemons, the three NATS nodes and this driver share the cores: more daemons
cannot move more here, and the figure that carries over to real gateways (one daemon each) is
the CPU per message. Results: a table on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import cpu_seconds  # noqa: E402  (bench/bench.py, beside this file)
from tests.cluster import NatsCluster  # noqa: E402  (the tests' cluster)
from tests.helpers import Broker, terminate, wait_until  # noqa: E402

ECHO = "import os\n\ndef handler(event, context):\n    return event\n"
CONSUMER = "openedge-function-seq"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Gateway:
    """One daemon reading SEQ, as a gateway of the group."""

    def __init__(self, workdir: str, tag: str, servers: List[str], broker: Broker, max_instances: int) -> None:
        self.workdir = os.path.join(workdir, tag)
        os.makedirs(os.path.join(self.workdir, "fn"), exist_ok=True)
        with open(os.path.join(self.workdir, "fn", "echo.py"), "w") as fh:
            fh.write(ECHO)
        config = {
            "hub": {"address": broker.address, "clientid": f"bench-{tag}"},
            "nats": {"servers": servers},
            "rules": [{"id": "seq", "subscribe": {"stream": "SEQ", "subject": "seq.in"},
                       "compute": {"function": "echo"}, "publish": {"subject": "seq.out"}}],
            "functions": [{"name": "echo", "handler": "echo.handler", "codedir": "fn",
                           "instance": {"min": 1, "max": max_instances}}],
            "logger": {"level": "info", "summary": False, "path": "daemon.log", "console": False},
        }
        self.config = os.path.join(self.workdir, "application.yml")
        with open(self.config, "w") as fh:
            yaml.safe_dump(config, fh)
        self.process = subprocess.Popen([sys.executable, "-m", "openedge_function", "-c", self.config],
                                        cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "daemon.log")) as fh:
                return fh.read()
        except OSError:
            return ""

    def cpu(self) -> Dict[str, float]:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        terminate(self.process, 30)


async def _phase(servers: List[str], count: int, rate: float, tag: str) -> dict:
    """Publish `count` messages (at `rate` per second; 0: flat out) and collect their answers."""
    import nats
    client = await nats.connect(servers)
    stream = client.jetstream()
    arrived: Dict[int, float] = {}
    sent_at: Dict[int, float] = {}
    from nats.js.api import ConsumerConfig, DeliverPolicy
    pull = await stream.pull_subscribe("seq.out", durable=f"bench-{tag}", stream="OUT",
                                       config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))

    async def collect() -> None:
        while len(arrived) < count:
            try:
                batch = await pull.fetch(512, timeout=0.5)
            except Exception:
                continue
            now = time.monotonic()
            for message in batch:
                answer = json.loads(message.data)
                if "seq" not in answer:
                    raise RuntimeError(f"not an echo: {answer}")
                arrived.setdefault(answer["seq"], now)
                await message.ack()

    collector = asyncio.ensure_future(collect())
    start = time.monotonic()
    pending = []
    for seq in range(count):
        if rate:
            delay = start + seq / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        sent_at[seq] = time.monotonic()
        pending.append(stream.publish("seq.in", json.dumps({"seq": seq}).encode(), timeout=10))
        if len(pending) >= (1 if rate else 256):
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    try:
        await asyncio.wait_for(collector, 120)
    finally:
        await client.close()
    latencies = sorted((arrived[seq] - sent_at[seq]) * 1000 for seq in arrived)
    return {"answered": len(arrived), "seconds": max(arrived.values()) - start,
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2)}


async def _reset(servers: List[str]) -> None:
    """Empty both streams and remove the shared consumer, between one group of gateways and the next."""
    import nats
    client = await nats.connect(servers)
    stream = client.jetstream()
    for name in ("SEQ", "OUT"):
        await stream.purge_stream(name)
    try:
        await stream.delete_consumer("SEQ", CONSUMER)
    except Exception:
        pass
    await client.close()


def measure(workdir: str, cluster: NatsCluster, broker: Broker, gateways: int, args: argparse.Namespace) -> dict:
    asyncio.run(_reset(cluster.servers))
    group = [Gateway(workdir, f"g{gateways}-{i}", cluster.servers, broker, args.max) for i in range(gateways)]
    try:
        for gateway in group:
            wait_until(lambda: "as consumer" in gateway.log(), 30, message="a gateway to read the stream")
        asyncio.run(_phase(cluster.servers, 200, 0, f"warm-{gateways}"))   # instances up, paths warm
        before = [g.cpu() for g in group]
        flat = asyncio.run(_phase(cluster.servers, args.count, 0, f"flat-{gateways}"))
        after = [g.cpu() for g in group]
        fixed = asyncio.run(_phase(cluster.servers, int(args.rate * args.duration), args.rate,
                                   f"rate-{gateways}"))
    finally:
        for gateway in group:
            gateway.stop()
    cpu = {part: round(sum(a[part] - b[part] for a, b in zip(after, before)) * 1000 / args.count, 3)
           for part in ("supervisor", "instances")}
    return {"gateways": gateways, "throughput": round(flat["answered"] / flat["seconds"], 1),
            "answered": flat["answered"], "latency": fixed, "cpu_ms_per_message": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000, help="messages per flat-out run")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second for latency")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds at that rate")
    parser.add_argument("--max", type=int, default=2, help="instance.max of each gateway's function")
    parser.add_argument("--gateways", default="1,2,3", help="the group sizes to measure")
    parser.add_argument("--out", default=os.path.join(ROOT, "var", "bench-cluster.json"))
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="oef-bench-cluster-")
    os.chmod(workdir, 0o755)   # functions' own users pass through to their code
    os.makedirs(os.path.join(workdir, "nats"))
    os.makedirs(os.path.join(workdir, "broker"))
    cluster = NatsCluster(os.path.join(workdir, "nats")).start()
    broker = Broker(os.path.join(workdir, "broker")).start()
    results = []
    try:
        cluster.streams(("SEQ", "seq.in"), ("OUT", "seq.out"))
        for size in (int(n) for n in args.gateways.split(",")):
            say(f"{size} gateway(s)")
            results.append(measure(workdir, cluster, broker, size, args))
            say(f"  {results[-1]}")
    finally:
        broker.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": {"cpus": os.cpu_count()}, "args": vars(args), "results": results}, fh, indent=2)
    print(f"| gateways | flat out, msg/s | p50 / p99 at {args.rate:g}/s, ms | CPU per message, ms: supervisors / instances |")
    print("| --- | --- | --- | --- |")
    for result in results:
        cpu, latency = result["cpu_ms_per_message"], result["latency"]
        print(f"| {result['gateways']} | {result['throughput']:.0f} | {latency['p50_ms']} / {latency['p99_ms']} "
              f"| {cpu['supervisor']} / {cpu['instances']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
