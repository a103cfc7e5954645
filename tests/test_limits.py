"""When the input or the output is the problem: hostile payloads, chatty handlers, and results
the broker will not take. Against a real mosquitto (some configured with size limits), a real
daemon and real instances."""
from __future__ import annotations

import json
import re

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
