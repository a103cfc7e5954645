"""Beyond one machine on NATS JetStream: gateways share a stream through one durable consumer, and a
gateway lost for good loses nothing. A three-node cluster on loopback ports, real daemons, numbered
messages counted by sequence number, as tests/test_reliability.py counts them."""
from __future__ import annotations

import json
import signal
import time
from typing import Any, Dict, List

import pytest
import yaml

from tests.cluster import MqttListener, NatsCluster, run_stream_case
from tests.helpers import Collector, DaemonProcess, alive, wait_until, write_handler
from tests.test_reliability import REPORT

pytest.importorskip("nats", reason="nats-py is a test dependency (pip install -e '.[test]')")

HANDLER = '''
import os, time

def handler(event, context):
    if event["seq"] == int(os.environ.get("STUCK", "-1")):
        time.sleep(3)   # longer than the ack wait, every time
    return {"seq": event["seq"], "pid": os.getpid()}
'''


@pytest.fixture
def cluster(tmp_path):
    directory = tmp_path / "nats"
    directory.mkdir()
    nodes = NatsCluster(str(directory)).start()
    nodes.streams(("SEQ", "seq.in"), ("OUT", "seq.out"))
    yield nodes
    nodes.stop()


def gateway(tmp_path, cluster: NatsCluster, broker: Any, name: str, servers: List[str] = (),
            **subscribe: Any) -> DaemonProcess:
    directory = tmp_path / name
    write_handler(str(directory / "fn"), "echo.py", HANDLER)
    config: Dict[str, Any] = {
        "hub": {"address": broker.address, "clientid": f"cluster-{name}"},
        "nats": {"servers": list(servers) or cluster.servers},
        "functions": [{"name": "echo", "handler": "echo.handler", "codedir": "fn", "instance": {"max": 4},
                       "env": {"STUCK": str(subscribe.pop("stuck", -1))}}],
        "rules": [{"id": "seq", "subscribe": {"stream": "SEQ", "subject": "seq.in", "ackwait": "2s", **subscribe},
                   "compute": {"function": "echo"}, "publish": {"subject": "seq.out"}}],
        "logger": {"level": "info"},
    }
    return DaemonProcess(str(directory), config)


def case(name: str, cluster: NatsCluster, daemons: List[DaemonProcess], count: int, rate: float,
         faults: List[Any]) -> dict:
    """run_stream_case, recorded under `name`, the daemons stopped afterwards whatever happened."""
    counts: dict = {}
    try:
        counts = run_stream_case(cluster, daemons, count, rate, faults)
    finally:
        finish(name, counts, daemons)
    return counts


def finish(name: str, counts: dict, daemons: List[DaemonProcess]) -> None:
    REPORT[name] = {key: value for key, value in counts.items() if key != "pids"}
    print(f"\n{name}: {counts}")
    pids = set()
    for daemon in daemons:
        daemon.instance_pids()
        pids.update(daemon.seen_pids)
        daemon.stop()
    wait_until(lambda: not alive(sorted(pids)), 10, message="no instance left behind")


def test_two_gateways_share_a_stream_and_one_lost_for_good_loses_nothing(tmp_path, cluster, broker):
    gateways = [gateway(tmp_path, cluster, broker, name) for name in ("a", "b")]
    lost = gateways[0]

    def kill_for_good() -> None:
        lost.instance_pids()
        lost.signal(signal.SIGKILL)
        lost.wait(10)

    def lost_has_answered(pids: dict) -> bool:   # mid-load: once it is at work, not before
        lost.instance_pids()
        return sum(n for pid, n in pids.items() if pid in lost.seen_pids) >= 20

    counts = case("NATS: two gateways on one stream, one SIGKILLed for good", cluster, gateways, 1000, 400,
                  [(lost_has_answered, kill_for_good)])
    assert counts["lost"] == 0, counts
    assert set(counts["pids"]) & lost.seen_pids, "the lost gateway had answered some before it died"
    assert set(counts["pids"]) - lost.seen_pids, "the other gateway answered the rest"


def test_a_nats_node_killed_and_restarted_mid_load_loses_nothing(tmp_path, cluster, broker):
    gateways = [gateway(tmp_path, cluster, broker, name) for name in ("a", "b")]
    node = cluster.nodes[0]

    def kill_a_node() -> None:
        node.kill()
        time.sleep(2.0)
        node.start()

    counts = case("NATS: a cluster node SIGKILLed and restarted mid-load", cluster, gateways, 1000, 400,
                  [(1.0, kill_a_node)])
    assert counts["lost"] == 0, counts


def test_a_message_delivered_too_often_is_a_poison_message(tmp_path, cluster, broker):
    daemon = gateway(tmp_path, cluster, broker, "a", stuck=7, maxdeliver=2, ackwait="1s")

    def answered_as_poison(pids: dict) -> bool:   # the third delivery may come after the first answer
        return "answered with PoisonMessage" in daemon.log()

    def poison_seen() -> None:
        pass

    counts = case("NATS: a message that outlives its ack wait, every time", cluster, [daemon], 20, 20,
                  [(answered_as_poison, poison_seen)])
    assert counts["lost"] == 0
    log = daemon.log()
    assert "was delivered 3 times without an outcome: answered with PoisonMessage" in log, log[-3000:]


def test_a_gateway_cut_off_longer_than_the_ack_wait_loses_nothing(tmp_path, cluster, broker):
    links = cluster.links()
    cut_off = gateway(tmp_path, cluster, broker, "a", servers=[link.address for link in links])
    other = gateway(tmp_path, cluster, broker, "b")

    def cut_then_restore() -> None:
        cut_off.instance_pids()
        for link in links:
            link.cut()
        time.sleep(5.0)   # the ack wait is 2 s: its messages go to the other gateway meanwhile
        for link in links:
            link.restore()

    try:
        counts = case("NATS: a gateway's link cut for 5 s (ack wait 2 s), then restored", cluster,
                      [cut_off, other], 1000, 400, [(1.0, cut_then_restore)])
    finally:
        for link in links:
            link.close()
    assert counts["lost"] == 0, counts
    assert "lost the NATS server" in cut_off.log() and "reconnected to" in cut_off.log()
    assert set(counts["pids"]) & cut_off.seen_pids, "the cut-off gateway answered before and after"


def test_devices_speak_mqtt_to_the_cluster(tmp_path, cluster, broker):
    """Devices publish with MQTT to NATS's MQTT listener (seq/in is subject seq.in, kept by stream
    SEQ); the gateway's answers go out over MQTT too (its hub is the listener) and reach an MQTT
    subscriber and stream OUT (seq/out is seq.out)."""
    mqtt_listener = MqttListener(cluster.nodes[0])
    daemon = gateway(tmp_path, cluster, mqtt_listener, "a")
    with open(daemon.config_path) as fh:
        config = yaml.safe_load(fh)
    config["rules"][0]["publish"] = {"topic": "seq/out", "qos": 1}
    config["hub"]["protocol"] = "auto"
    with open(daemon.config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    listener = Collector(mqtt_listener, ["seq/out"])
    counts: dict = {}
    try:
        daemon.start(wait=False)
        wait_until(lambda: "as consumer" in daemon.log() and "publisher: connected" in daemon.log(), 30,
                   message="the gateway on the cluster")
        device = Collector(mqtt_listener, [])
        for seq in range(200):
            device.client.publish("seq/in", json.dumps({"seq": seq}), 1).wait_for_publish(10)
        device.close()
        wait_until(lambda: len({json.loads(m.payload)["seq"] for m in listener.on("seq/out")}) == 200, 60,
                   message="200 answers over MQTT")
        counts = {"sent": 200, "answered over MQTT": len({json.loads(m.payload)["seq"] for m in listener.on("seq/out")})}
        # NATS speaks MQTT 3.1.1 only: hub.protocol: auto falls back to it.
        assert "does not speak MQTT 5: using MQTT 3.1.1 (hub.protocol: auto)" in daemon.log()
    finally:
        listener.close()
        finish("NATS: devices speak MQTT to the cluster's listener", counts, [daemon])


def test_a_stream_message_over_the_limit_is_answered_once_beside_those_that_fit(tmp_path, cluster, broker):
    """What a publisher puts in the stream is hostile input: a message over the function's
    message.length.max gets a MessageTooLarge envelope and is acknowledged (not delivered again
    after the ack wait, not run), while the messages beside it are answered."""
    import asyncio
    daemon = gateway(tmp_path, cluster, broker, "a")
    with open(daemon.config_path) as fh:
        config = yaml.safe_load(fh)
    config["functions"][0]["instance"]["message"] = {"length": {"max": "1k"}}
    with open(daemon.config_path, "w") as fh:
        yaml.safe_dump(config, fh)

    async def exchange() -> List[dict]:
        import nats
        client = await nats.connect(cluster.servers)
        stream = client.jetstream()
        for seq in range(3):
            await stream.publish("seq.in", json.dumps({"seq": seq}).encode())
        await stream.publish("seq.in", json.dumps({"seq": 99, "pad": "x" * 4000}).encode())
        pull = await stream.pull_subscribe("seq.out", durable="hostile", stream="OUT")
        answers: List[dict] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(answers) < 4:
            try:
                answers += [json.loads(m.data) for m in await pull.fetch(10, timeout=1)]
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(4)   # twice the ack wait: anything delivered again would be answered again
        try:
            answers += [json.loads(m.data) for m in await pull.fetch(10, timeout=1)]
        except asyncio.TimeoutError:
            pass
        await client.close()
        return answers

    try:
        daemon.start(wait=False)
        wait_until(lambda: "as consumer" in daemon.log(), 30, message="the gateway to read the stream")
        answers = asyncio.run(exchange())
    finally:
        finish("NATS: a message over the limit beside three that fit", {}, [daemon])
    results = sorted(a["seq"] for a in answers if "seq" in a)
    envelopes = [a for a in answers if "errorType" in a]
    assert results == [0, 1, 2], answers
    assert len(envelopes) == 1 and envelopes[0]["errorType"] == "MessageTooLarge", envelopes
