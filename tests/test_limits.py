"""When the input or the output is the problem: hostile payloads, chatty handlers, and results
the broker will not take. Against a real mosquitto (some configured with size limits), a real
daemon and real instances."""
from __future__ import annotations

import base64
import json
import re
import signal
import time

import pytest
import yaml

from tests.helpers import Collector, function, publish, rule, wait_until

HOSTILE = '''
def handler(event, context):
    if isinstance(event, dict) and "raise" in event:
        raise ValueError(event["raise"])
    if isinstance(event, dict) and "return" in event:
        return event["return"]
    if isinstance(event, dict) and "print" in event:
        print(event["print"])
    if event == "deep":
        result = []
        for _ in range(100000):
            result = [result]
        return result
    return {"type": type(event).__name__,
            "size": len(event) if isinstance(event, (bytes, str)) else None}
'''


def test_hostile_payloads_hurt_no_instance_and_no_batch_mate(broker, daemon_factory, collector):
    """Each payload below decodes to bytes or an event, or ends in its own envelope; the one
    instance serves them all, in batches, and its batch mates are answered as usual."""
    daemon = daemon_factory([function("hostile", "hostile.handler", instance={"max": 1})],
                            [rule("r", "in", "hostile", "out")], files={"fn/hostile.py": HOSTILE})
    cases = [
        (b"[" * 100000, {"type": "bytes", "size": 100000}),                  # deeper than json can go
        (b"{" * 5000 + b"}" * 5000, {"type": "bytes", "size": 10000}),
        (b"9" * 100000, {"type": "bytes", "size": 100000}),                  # past the digit limit
        (b"\xff\xfe{\x80}", {"type": "bytes", "size": 5}),                   # not UTF-8
        (b'"' + b"s" * (3 << 20) + b'"', {"type": "str", "size": 3 << 20}),  # a long string
        (b'"\\ud800"', {"type": "str", "size": 1}),                          # a lone surrogate
        (b'{"print": "\\ud800 printed"}', {"type": "dict", "size": None}),
        (b"1e999", {"type": "float", "size": None}),                         # inf
    ]
    failing = [
        (b'{"return": "\\udfff"}', "ResultEncodingError", "surrogates not allowed"),
        (b'"deep"', "ResultEncodingError", "recursion"),
        (b'{"raise": "bad \\ud800 input"}', "ValueError", "bad \\ud800 input"),
    ]
    client = Collector(broker, [], inflight=0)   # everything in one burst: batches form
    payloads = [payload for payload, _ in cases] + [payload for payload, _, _ in failing]
    try:
        sent = []
        for i in range(40):
            sent.append(client.client.publish("in", b'{"n": %d}' % i, 1))
            if i % 3 == 0 and payloads:
                sent.append(client.client.publish("in", payloads.pop(), 1))
        assert not payloads
        for info in sent:
            info.wait_for_publish(10)
    finally:
        client.close()
    total = 40 + len(cases) + len(failing)
    wait_until(lambda: len(collector.on("out")) >= total, 60, message=f"{total} outcomes")
    outputs = [json.loads(m.payload) for m in collector.on("out")]
    assert len(outputs) == total, outputs
    assert sum(1 for o in outputs if o == {"type": "dict", "size": None}) == 40 + 1
    for _, expected in cases:
        assert expected in outputs
    envelopes = [o for o in outputs if "errorType" in o]
    assert len(envelopes) == len(failing)
    for payload, error_type, words in failing:
        assert any(e["errorType"] == error_type and words in e["errorMessage"].lower()
                   and e["packet"]["Message"]["Payload"] for e in envelopes), (error_type, envelopes)
    log = daemon.log()
    assert "InstanceCrashed" not in log and "failed during a batch" not in log
    assert log.count("instance hostile-1: ready") == 1 and "hostile-2" not in log
    assert "? printed" in log   # the surrogate is replaced in the log line


TRUNCATED = '''
import subprocess

def handler(event, context):
    print("y" * (50 << 20))
    print("after the limit")
    return "done"

def shell(event, context):
    # A subprocess writes to the instance's stdout itself: the runtime neither marks nor counts it.
    subprocess.run(["sh", "-c", "yes from-a-subprocess | head -n 100000"], check=True)
    return "done"
'''


def test_fifty_megabytes_printed_end_in_the_truncation_marker(broker, daemon_factory, collector):
    daemon = daemon_factory([function("chatty", "chatty.handler", log={"max": "4k"})],
                            [rule("r", "in", "chatty", "out")], files={"fn/chatty.py": TRUNCATED})
    publish(broker, "in", b"{}")
    [answer] = wait_until(lambda: collector.on("out"), 60, message="the answer")
    assert answer.payload == b'"done"'
    wait_until(lambda: "[output truncated: over 4096 bytes in this invocation]" in daemon.log(), 10,
               message="the truncation marker")
    lines = [line for line in daemon.log().splitlines() if "openedge_function.handler" in line]
    assert len(lines) == 2, [line[:200] for line in lines]
    printed = re.search(r"request=[0-9a-f-]+: (y+)$", lines[0])
    assert printed and len(printed.group(1)) == 4096   # what fits of the line, then the marker
    assert lines[1].endswith("[output truncated: over 4096 bytes in this invocation]")
    assert "after the limit" not in daemon.log()


def test_what_a_subprocess_prints_has_the_same_budget(broker, daemon_factory, collector):
    daemon = daemon_factory([function("shell", "chatty.shell", log={"max": "4k"})],
                            [rule("r", "in", "shell", "out")], files={"fn/chatty.py": TRUNCATED})
    publish(broker, "in", b"{}")
    wait_until(lambda: collector.on("out"), 60, message="the answer")
    wait_until(lambda: "[output truncated: over 4096 bytes in this invocation]" in daemon.log(), 10,
               message="the truncation marker")
    lines = [line for line in daemon.log().splitlines() if "openedge_function.handler" in line]
    assert 4096 // len("from-a-subprocess\n") == len(lines) - 1
    assert lines[-1].endswith("[output truncated: over 4096 bytes in this invocation]")


SIZES = '''
def big(event, context):
    return {"data": "x" * 200000}

def small(event, context):
    return {"ok": True}
'''

LIMITED = "message_size_limit 100000\n"


def outputs_once(daemon, collector, topics, count):
    """Wait for `count` outcomes on `topics`; then check that a restart of the daemon brings no more:
    every input was acknowledged."""
    def seen():
        return [m for m in collector.messages if m.topic in topics]
    wait_until(lambda: len(seen()) >= count, 20, message=f"{count} outcomes on {topics}")
    assert daemon.stop() == 0
    daemon.start()
    time.sleep(1.5)
    assert len(seen()) == count, [m.payload[:200] for m in seen()]
    return [json.loads(m.payload) for m in seen()]


@pytest.mark.broker_config(LIMITED)
def test_a_result_over_hub_maxsize_is_answered_with_result_too_large(broker, daemon_factory, collector):
    """MQTT 3.1.1: the broker drops what is over message_size_limit and says nothing; hub.maxsize
    tells the daemon, which sends ResultTooLarge instead (the input in packet while it fits)."""
    daemon = daemon_factory(
        [function("big", "sizes.big"), function("small", "sizes.small")],
        [rule("r-big", "big/in", "big", "big/out", error={"topic": "errors", "qos": 1}),
         rule("r-small", "small/in", "small", "small/out")],
        files={"fn/sizes.py": SIZES},
        hub={"address": broker.address, "clientid": "oef-sizes", "maxsize": "100000"})
    publish(broker, "big/in", b'{"n": 1}')
    publish(broker, "big/in", b'{"pad": "' + b"p" * 90000 + b'"}')   # its envelope would be over too
    publish(broker, "small/in", b"{}", qos=0)
    publish(broker, "small/in", b"{}")
    found = outputs_once(daemon, collector, ("errors", "big/out", "small/out"), 4)
    assert found.count({"ok": True}) == 2
    envelopes = sorted((e for e in found if "errorType" in e), key=lambda e: len(e["errorMessage"]))
    assert [e["errorType"] for e in envelopes] == ["ResultTooLarge", "ResultTooLarge"]
    for envelope in envelopes:
        assert re.match(r"the result of 200012 bytes, a publish of 2000\d\d bytes to big/out, is over "
                        r"the 100000 bytes the broker takes \(hub.maxsize\)", envelope["errorMessage"])
    payloads = sorted(base64.b64decode(e["packet"]["Message"]["Payload"]) for e in envelopes)
    assert payloads == [b"", b'{"n": 1}']
    assert not collector.on("big/out")
    log = daemon.log()
    assert log.count("ResultTooLarge: the result of 200012 bytes") == 2
    assert "sending the envelope without the input's payload" in log


@pytest.mark.broker_config(LIMITED)
def test_mqtt5_a_result_the_broker_refuses_is_answered_with_publish_refused(broker, daemon_factory,
                                                                          collector):
    """MQTT 5 without hub.maxsize: the broker refuses the 200 KB result in its PUBACK."""
    daemon = daemon_factory(
        [function("big", "sizes.big")], [rule("r-big", "big/in", "big", "big/out")],
        files={"fn/sizes.py": SIZES},
        hub={"address": broker.address, "clientid": "oef-refused", "protocol": 5})
    publish(broker, "big/in", b'{"n": 1}')
    [envelope] = outputs_once(daemon, collector, ("big/out",), 1)
    assert envelope["errorType"] == "PublishRefused"
    assert envelope["errorMessage"].startswith("the broker refused the result on big/out: ")
    assert "reason code 0x" in envelope["errorMessage"]
    assert base64.b64decode(envelope["packet"]["Message"]["Payload"]) == b'{"n": 1}'


@pytest.mark.broker_config("max_packet_size 100000\n")
def test_mqtt5_the_brokers_maximum_packet_size_is_the_limit(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("big", "sizes.big")], [rule("r-big", "big/in", "big", "big/out")],
        files={"fn/sizes.py": SIZES},
        hub={"address": broker.address, "clientid": "oef-connack", "protocol": 5})
    publish(broker, "big/in", b'{"n": 1}')
    [envelope] = outputs_once(daemon, collector, ("big/out",), 1)
    assert envelope["errorType"] == "ResultTooLarge"
    assert envelope["errorMessage"].endswith(
        "is over the 100000 bytes the broker takes (the broker's Maximum Packet Size)")
    assert "the broker takes packets of up to 100000 bytes" in daemon.log()


ACL = """\
topic read #
topic readwrite in
topic readwrite errors
"""


def test_mqtt5_refused_twice_is_logged_and_acknowledged(broker, daemon_factory, tmp_path):
    """A result refused for its topic goes out as an envelope on the error topic; where that is
    refused as well, the log keeps what happened and the input is acknowledged."""
    acl = tmp_path / "broker" / "acl"
    acl.write_text(ACL)
    broker.stop()
    with open(broker.config, "a") as fh:
        fh.write(f"acl_file {acl}\n")
    broker.start()
    collector = Collector(broker, ["#"])
    daemon = daemon_factory(
        [function("small", "sizes.small")],
        [rule("r-once", "in", "small", "denied", error={"topic": "errors", "qos": 1}),
         rule("r-twice", "in", "small", "denied/too", error={"topic": "denied/errors", "qos": 1})],
        files={"fn/sizes.py": SIZES},
        hub={"address": broker.address, "clientid": "oef-acl", "protocol": 5})
    publish(broker, "in", b'{"n": 1}')
    try:
        [envelope] = outputs_once(daemon, collector, ("errors", "denied", "denied/too", "denied/errors"), 1)
    finally:
        collector.close()
    assert envelope["errorType"] == "PublishRefused"
    assert envelope["errorMessage"] == "the broker refused the result on denied: Not authorized (reason code 0x87)"
    log = daemon.log()
    assert re.search(r"rule r-twice: function small request \S+: nothing could be published for the "
                     r"message on in \(8 bytes\), which is acknowledged: the broker refused the envelope "
                     r"on denied/errors: Not authorized \(reason code 0x87\); its outcome was "
                     r"PublishRefused: the broker refused the result on denied/too", log), log[-3000:]


@pytest.mark.broker_config("max_packet_size 100000\n")
def test_mqtt311_a_broker_that_disconnects_on_size_is_named_in_the_log(broker, daemon_factory, collector):
    """mosquitto closes an MQTT 3.1.1 connection on a publish over max_packet_size, without a word:
    the log names the likely cause; hub.maxsize then answers with ResultTooLarge."""
    daemon = daemon_factory(
        [function("big", "sizes.big")], [rule("r-big", "big/in", "big", "big/out")],
        files={"fn/sizes.py": SIZES},
        hub={"address": broker.address, "clientid": "oef-v3", "interval": "1s", "protocol": "3.1.1"})
    publish(broker, "big/in", b'{"n": 1}')
    wait_until(lambda: "with a publish of 2000" in daemon.log(), 20, message="the hint in the log")
    assert "set hub.maxsize to its limit" in daemon.log()
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    with open(daemon.config_path) as fh:
        config = yaml.safe_load(fh)
    config["hub"]["maxsize"] = "100000"
    with open(daemon.config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    daemon.start()   # the input was never acknowledged: the broker delivers it again
    [envelope] = outputs_once(daemon, collector, ("big/out",), 1)
    assert envelope["errorType"] == "ResultTooLarge"
