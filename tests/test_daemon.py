"""End to end: the daemon started as a user starts it, a real mosquitto, real instances."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import time

import pytest

from tests.helpers import Collector, alive, function, publish, rule, wait_until

SAYHI = '''
import os

def handler(event, context):
    event['functionName'] = context['functionName']
    event['functionInvokeID'] = context['functionInvokeID']
    event['functionInstanceID'] = context['functionInstanceID']
    event['messageQOS'] = context['messageQOS']
    event['messageTopic'] = context['messageTopic']
    event['messageTimestamp'] = context['messageTimestamp']
    event['invokeid'] = context['invokeid']
    event['USER_ID'] = os.environ.get('USER_ID')
    event['environ'] = dict(os.environ)
    event['pid'] = os.getpid()
    event['sayhi'] = '你好，世界！'
    return event
'''

TOOLS = '''
import os

def reverse(event, context):
    return event[::-1] if isinstance(event, bytes) else {"not": "bytes"}

def nothing(event, context):
    with open(os.path.join(os.environ["COUNT_DIR"], "calls"), "a") as fh:
        fh.write(repr(event) + "\\n")
    return None

def fail(event, context):
    if event == {"ok": True}:
        return {"pid": os.getpid()}
    return divide(1, 0)

def divide(a, b):
    return a / b

def unencodable(event, context):
    return {1, 2, 3}

def echo(event, context):
    return event

def hog(event, context):
    import time
    block = bytearray(event["mb"] << 20)
    time.sleep(event.get("hold", 10))
    return len(block)

def crash_once(event, context):
    marker = os.path.join(os.environ["COUNT_DIR"], "crashed")
    with open(os.path.join(os.environ["COUNT_DIR"], "calls"), "a") as fh:
        fh.write("call\\n")
    if event.get("always") or not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(7)
    return {"survived": True}

def raise_counted(event, context):
    with open(os.path.join(os.environ["COUNT_DIR"], "calls"), "a") as fh:
        fh.write("call\\n")
    raise KeyError("missing")

def slow_echo(event, context):
    import time
    time.sleep(0.01)
    return event

def sleep(event, context):
    import time
    time.sleep(event.get("sleep", 60))
    return {"slept": True}
'''


def test_json_in_json_out_with_every_context_key_and_env(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("sayhi", "sayhi.handler", env={"USER_ID": "acuiot"})],
        [rule("r1", "t", "sayhi", "t/hi")],
        files={"fn/sayhi.py": SAYHI},
        hub={"address": broker.address, "clientid": "oef-ctx", "username": "edge",
             "password": "s3cret-broker-pw"})
    before = int(time.time() * 1000)
    publish(broker, "t", json.dumps({"id": 1, "text": "héllo"}), qos=1)
    [out] = [m for m in collector.wait_for(2) if m.topic == "t/hi"]
    result = json.loads(out.payload)
    assert result["id"] == 1 and result["text"] == "héllo"
    assert result["functionName"] == "sayhi"
    assert result["functionInstanceID"] == "sayhi-1"
    assert result["messageQOS"] == 1
    assert result["messageTopic"] == "t"
    assert result["functionInvokeID"] == result["invokeid"] and len(result["functionInvokeID"]) == 36
    assert before - 1000 <= result["messageTimestamp"] <= int(time.time() * 1000)
    assert result["USER_ID"] == "acuiot"
    assert result["sayhi"] == "你好，世界！"
    assert out.qos == 1
    # Non-ASCII is kept as UTF-8, not escaped.
    assert "你好，世界！".encode("utf-8") in out.payload
    # The instance sees its env and a minimal base, never the daemon's environment or credentials.
    environ = result["environ"]
    assert "s3cret-broker-pw" not in json.dumps(environ)
    assert set(environ) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "USER_ID",
                            "OPENEDGE_FUNCTION_NAME", "OPENEDGE_FUNCTION_INSTANCE_ID", "LC_CTYPE"}
    assert result["pid"] in daemon.instance_pids()


def test_binary_in_binary_out(broker, daemon_factory, collector):
    daemon_factory([function("rev", "tools.reverse")], [rule("r1", "bin", "rev", "bin/out", qos=0, out_qos=0)],
                   files={"fn/tools.py": TOOLS})
    payload = bytes(range(256)) + b"\xff\xfe not json"
    publish(broker, "bin", payload, qos=0)
    out = wait_until(lambda: collector.on("bin/out"), message="the reversed payload")
    assert out[0].payload == payload[::-1]
    assert out[0].qos == 0


def test_none_publishes_nothing_and_acknowledges(broker, daemon_factory, collector, writable_tmp):
    functions = [function("nothing", "tools.nothing", env={"COUNT_DIR": str(writable_tmp)}),
                 function("echo", "tools.echo")]
    rules = [rule("r-none", "none", "nothing", "none/out"), rule("r-echo", "echo", "echo", "echo/out")]
    daemon = daemon_factory(functions, rules, files={"fn/tools.py": TOOLS})
    publish(broker, "none", b'{"n": 1}', qos=1)
    wait_until(lambda: (writable_tmp / "calls").exists(), message="the handler to run")
    publish(broker, "echo", b'{"after": true}', qos=1)
    wait_until(lambda: collector.on("echo/out"), message="the echo after the None")
    assert collector.on("none/out") == []
    # The QoS 1 input was acknowledged: a restarted daemon (same persistent session) is not
    # handed it again.
    assert daemon.stop() == 0
    daemon.start()
    publish(broker, "echo", b'{"again": true}', qos=1)
    wait_until(lambda: len(collector.on("echo/out")) == 2, message="the second echo")
    time.sleep(0.5)
    assert (writable_tmp / "calls").read_text().splitlines() == ["{'n': 1}"]


def test_handler_exception_publishes_the_envelope_and_keeps_the_instance(broker, daemon_factory, collector):
    daemon = daemon_factory([function("fail", "tools.fail")], [rule("r1", "in", "fail", "out")],
                   files={"fn/tools.py": TOOLS})
    payload = json.dumps({"device": "111", "value": "ü"}).encode()
    publish(broker, "in", payload, qos=1)
    out = wait_until(lambda: collector.on("out"), message="the envelope")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "ZeroDivisionError"
    assert envelope["errorMessage"] == "division by zero"
    assert envelope["functionName"] == "fail"
    assert len(envelope["requestId"]) == 36
    trace = envelope["stackTrace"]
    assert any('File "tools.py", line 15, in fail' in line for line in trace), trace
    assert any('File "tools.py", line 18, in divide' in line for line in trace), trace
    assert not any("runtime_python" in line for line in trace), trace
    # The log: one warning with the type, the message, the request id and the stack trace.
    line = next(line for line in daemon.log().splitlines() if envelope["requestId"] in line and "WARNING" in line)
    assert "ZeroDivisionError: division by zero" in line, line
    assert 'File "tools.py", line 18, in divide' in daemon.log().split(line, 1)[1][:2000]
    packet = envelope["packet"]
    assert base64.b64decode(packet["Message"]["Payload"]) == payload
    assert packet["Message"]["Topic"] == "in"
    assert packet["Message"]["QOS"] == 1
    assert packet["Message"]["Retain"] is False
    assert packet["Dup"] is False
    assert isinstance(packet["ID"], int) and packet["ID"] > 0
    # The instance that raised serves the next message: an exception is an answer, not a fault.
    publish(broker, "in", b'{"ok": true}', qos=1)
    wait_until(lambda: len(collector.on("out")) == 2, message="the next answer")
    second = json.loads(collector.on("out")[1].payload)
    assert "pid" in second


def test_error_topic_and_unencodable_result(broker, daemon_factory, collector):
    daemon_factory([function("bad", "tools.unencodable")],
                   [rule("r1", "in", "bad", "out", error={"topic": "errors", "qos": 1})],
                   files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}", qos=1)
    out = wait_until(lambda: collector.on("errors"), message="the envelope on the error topic")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "ResultEncodingError"
    assert "set" in envelope["errorMessage"]
    assert collector.on("out") == []


def test_unicode_and_output_qos_is_the_lower_of_input_and_rule(broker, daemon_factory, collector):
    daemon_factory([function("echo", "tools.echo")],
                   [rule("r-q1", "q1", "echo", "q1/out", qos=1, out_qos=1),
                    rule("r-q0", "q0", "echo", "q0/out", qos=0, out_qos=1),
                    rule("r-down", "down", "echo", "down/out", qos=1, out_qos=0)],
                   files={"fn/tools.py": TOOLS})
    text = {"城市": "北京", "emoji": "🌡", "t": 21.5}
    publish(broker, "q1", json.dumps(text, ensure_ascii=False).encode("utf-8"), qos=1)
    publish(broker, "q0", b'"zero"', qos=0)
    publish(broker, "down", b"[1, 2]", qos=1)
    wait_until(lambda: all(collector.on(t) for t in ("q1/out", "q0/out", "down/out")),
               message="three outputs")
    q1 = collector.on("q1/out")[0]
    assert json.loads(q1.payload.decode("utf-8")) == text and q1.qos == 1
    assert "北京".encode("utf-8") in q1.payload
    q0 = collector.on("q0/out")[0]
    assert q0.payload == b'"zero"' and q0.qos == 0
    down = collector.on("down/out")[0]
    assert json.loads(down.payload) == [1, 2] and down.qos == 0


def test_two_functions_several_rules_and_wildcards(broker, daemon_factory, collector):
    daemon_factory(
        [function("sayhi", "sayhi.handler", codedir="hi"), function("echo", "tools.echo")],
        [rule("r-hi", "sensors/+/temp", "sayhi", "hi/out"),
         rule("r-all", "all/#", "echo", "all/out", qos=0, out_qos=0),
         {"id": "r-baetyl", "subscribe": {"topic": "baetyl", "qos": 1},
          "function": {"name": "echo"}, "publish": {"topic": "baetyl/out", "qos": 1}}],
        files={"hi/sayhi.py": SAYHI, "fn/tools.py": TOOLS})
    publish(broker, "sensors/a/temp", b'{"v": 1}')
    publish(broker, "sensors/b/temp", b'{"v": 2}')
    publish(broker, "sensors/b/humidity", b'{"v": 3}')   # no rule matches
    publish(broker, "all/x/y/z", b'{"deep": true}', qos=0)
    publish(broker, "baetyl", b'{"spelling": "baetyl"}')
    wait_until(lambda: len(collector.on("hi/out")) == 2 and collector.on("all/out")
               and collector.on("baetyl/out"), message="every rule's output")
    topics = sorted(json.loads(m.payload)["messageTopic"] for m in collector.on("hi/out"))
    assert topics == ["sensors/a/temp", "sensors/b/temp"]
    assert json.loads(collector.on("all/out")[0].payload) == {"deep": True}
    assert json.loads(collector.on("baetyl/out")[0].payload) == {"spelling": "baetyl"}
    time.sleep(0.3)
    assert len(collector.on("hi/out")) == 2


def test_load_failure_becomes_an_envelope_for_every_message(broker, daemon_factory, collector):
    daemon = daemon_factory([function("broken", "broken.handler"), function("echo", "tools.echo")],
                            [rule("r1", "in", "broken", "out"), rule("r2", "echo", "echo", "echo/out")],
                            files={"fn/broken.py": "def handler(event, context)\n    return 1\n",
                                   "fn/tools.py": TOOLS})
    publish(broker, "in", b"{}", count=3)
    out = wait_until(lambda: len(collector.on("out")) >= 3 and collector.on("out"), message="three envelopes")
    for message in out:
        envelope = json.loads(message.payload)
        assert envelope["errorType"] == "FunctionLoadError"
        assert "syntax error in broken.py, line 1" in envelope["errorMessage"]
    # Other functions keep working.
    publish(broker, "echo", b'{"fine": 1}')
    wait_until(lambda: collector.on("echo/out"), message="the other function's answer")
    # ... and the operator is told once, not once per message.
    loud = [line for line in daemon.log().splitlines()
            if (" WARNING " in line or " ERROR " in line) and "broken.py, line 1" in line]
    assert len(loud) == 1, loud


def test_timeout_answers_with_an_envelope_and_kills_the_instance(broker, daemon_factory, collector):
    daemon = daemon_factory([function("sleep", "tools.sleep", instance={"timeout": "1s"})],
                            [rule("r1", "in", "sleep", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b'{"sleep": 60}')
    pid = wait_until(lambda: daemon.instance_pids(), message="an instance")[0]
    started = time.monotonic()
    out = wait_until(lambda: collector.on("out"), timeout=10, message="the timeout envelope")
    assert time.monotonic() - started < 4
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "FunctionTimeout"
    wait_until(lambda: not alive([pid]), message="the timed-out instance to be killed")
    publish(broker, "in", b'{"sleep": 0}')
    wait_until(lambda: len(collector.on("out")) == 2, message="an answer from a fresh instance")
    assert json.loads(collector.on("out")[1].payload) == {"slept": True}


def test_memory_limit_kills_the_instance(broker, daemon_factory, collector):
    daemon_factory([function("hog", "tools.hog", instance={"memory": "100m", "timeout": "20s"})],
                   [rule("r1", "in", "hog", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b'{"mb": 500}')
    out = wait_until(lambda: collector.on("out"), timeout=10, message="the memory envelope")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "MemoryLimitExceeded"
    assert "over its limit of 100 MB" in envelope["errorMessage"]
    publish(broker, "in", b'{"mb": 1, "hold": 0}')
    wait_until(lambda: len(collector.on("out")) == 2, message="a fresh instance to answer")
    assert json.loads(collector.on("out")[1].payload) == 1 << 20


def test_message_over_the_length_limit(broker, daemon_factory, collector):
    daemon_factory([function("echo", "tools.echo", instance={"message": {"length": {"max": "1k"}}})],
                   [rule("r1", "in", "echo", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"x" * 2048)
    out = wait_until(lambda: collector.on("out"), message="the envelope")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "MessageTooLarge"
    assert "2048 bytes" in envelope["errorMessage"]


def test_sigterm_finishes_in_flight_work_and_exits_0(broker, daemon_factory, collector):
    daemon = daemon_factory([function("sleep", "tools.sleep", instance={"max": 2})],
                            [rule("r1", "in", "sleep", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b'{"sleep": 1.5}')
    wait_until(lambda: daemon.instance_pids(), message="an instance")
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    # The in-flight invocation finished and its result was published before the exit.
    assert [json.loads(m.payload) for m in collector.on("out")] == [{"slept": True}]
    assert not alive(sorted(daemon.seen_pids))


def test_sigkill_of_the_daemon_leaves_no_instance(broker, daemon_factory, collector):
    daemon = daemon_factory([function("echo", "tools.echo", instance={"min": 3, "max": 3})],
                            [rule("r1", "in", "echo", "out")], files={"fn/tools.py": TOOLS})
    pids = wait_until(lambda: len(daemon.instance_pids()) == 3 and daemon.instance_pids(),
                      message="three warm instances")
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    wait_until(lambda: not alive(pids), timeout=10, message=f"instances {pids} to die with the daemon")


def test_reconnects_and_resubscribes_when_the_broker_comes_back(broker, daemon_factory):
    daemon = daemon_factory([function("echo", "tools.echo")], [rule("r1", "in", "echo", "out")],
                            files={"fn/tools.py": TOOLS})
    broker.stop()   # no persistence: the broker forgets the session, the daemon must resubscribe
    wait_until(lambda: "lost the broker" in daemon.log(), message="the daemon to notice")
    broker.start()
    wait_until(lambda: daemon.log().count(": subscribed to in") >= 2, timeout=20,
               message="the daemon to reconnect and subscribe again")
    collector = Collector(broker, ["out"])
    try:
        publish(broker, "in", b'{"back": true}')
        out = collector.wait_for(1)
        assert json.loads(out[0].payload) == {"back": True}
    finally:
        collector.close()


def test_retry_runs_a_crashed_message_again_on_a_fresh_instance(broker, daemon_factory, collector, writable_tmp):
    env = {"COUNT_DIR": str(writable_tmp)}
    daemon_factory([function("crashy", "tools.crash_once", env=env)],
                   [rule("r1", "in", "crashy", "out", retry={"max": 1})], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}")
    out = wait_until(lambda: collector.on("out"), message="the retried answer")
    assert json.loads(out[0].payload) == {"survived": True}
    assert (writable_tmp / "calls").read_text().count("call") == 2
    # A message that crashes every time gets the envelope after its retries.
    publish(broker, "in", b'{"always": true}')
    out = wait_until(lambda: len(collector.on("out")) == 2 and collector.on("out"), message="the envelope")
    envelope = json.loads(out[1].payload)
    assert envelope["errorType"] == "InstanceCrashed" and "exited with status 7" in envelope["errorMessage"]
    assert (writable_tmp / "calls").read_text().count("call") == 4


def test_retry_never_follows_an_exception(broker, daemon_factory, collector, writable_tmp):
    daemon_factory([function("raises", "tools.raise_counted", env={"COUNT_DIR": str(writable_tmp)})],
                   [rule("r1", "in", "raises", "out", retry={"max": 3})], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}")
    out = wait_until(lambda: collector.on("out"), message="the envelope")
    assert json.loads(out[0].payload)["errorType"] == "KeyError"
    time.sleep(0.5)
    assert (writable_tmp / "calls").read_text().count("call") == 1


def test_a_crash_without_retry_is_an_envelope(broker, daemon_factory, collector, writable_tmp):
    daemon_factory([function("crashy", "tools.crash_once", env={"COUNT_DIR": str(writable_tmp)})],
                   [rule("r1", "in", "crashy", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}")
    out = wait_until(lambda: collector.on("out"), message="the envelope")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "InstanceCrashed"
    assert base64.b64decode(envelope["packet"]["Message"]["Payload"]) == b"{}"


@pytest.mark.broker_config("max_inflight_messages 0\n")   # the broker would send everything at once
def test_a_full_queue_pauses_intake_at_qos1_and_loses_nothing(broker, daemon_factory, collector):
    daemon = daemon_factory([function("slow", "tools.slow_echo", instance={"max": 1})],
                            [rule("r1", "in", "slow", "out")], files={"fn/tools.py": TOOLS})
    count = 400
    client = Collector(broker, [], inflight=0)   # a publisher that does not wait for each ack
    try:
        infos = [client.client.publish("in", json.dumps({"seq": i}), 1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.close()
    wait_until(lambda: len(collector.on("out")) >= count, timeout=60, message=f"{count} outputs")
    seqs = sorted(json.loads(m.payload)["seq"] for m in collector.on("out"))
    assert set(seqs) == set(range(count))   # nothing lost
    assert "pausing intake" in daemon.log()
    assert daemon.stop() == 0
    [peak] = re.findall(r"function slow: peak queue (\d+)", daemon.log())
    assert int(peak) <= 64


def test_qos0_beyond_a_full_queue_pauses_intake_and_nothing_is_dropped(broker, daemon_factory, collector):
    daemon = daemon_factory([function("slow", "tools.sleep", instance={"max": 1})],
                            [rule("r1", "in", "slow", "out", qos=0, out_qos=0)], files={"fn/tools.py": TOOLS})
    count = 300   # past the queue's 64: intake pauses, and the broker holds the rest
    client = Collector(broker, [])
    try:
        for i in range(count):
            client.client.publish("in", json.dumps({"sleep": 0.005, "seq": i}), 0)
    finally:
        time.sleep(0.5)
        client.close()
    wait_until(lambda: len(collector.on("out")) >= count, timeout=60, message=f"{count} outputs")
    assert "pausing intake" in daemon.log()
    assert daemon.stop() == 0
    assert re.search(rf"rule r1: received {count}, published {count}, failed 0, dropped 0", daemon.log())
    [peak] = re.findall(r"function slow: peak queue (\d+)", daemon.log())
    assert int(peak) <= 64 + 2


def test_qos0_beyond_the_queue_is_dropped_and_counted_with_overflow_drop(broker, daemon_factory, collector):
    daemon = daemon_factory([function("slow", "tools.sleep", instance={"max": 1})],
                            [rule("r1", "in", "slow", "out", qos=0, out_qos=0, overflow="drop")],
                            files={"fn/tools.py": TOOLS})
    client = Collector(broker, [])
    try:
        for _ in range(150):
            client.client.publish("in", b'{"sleep": 0.05}', 0)
    finally:
        time.sleep(0.5)
        client.close()
    wait_until(lambda: "QoS 0 messages dropped" in daemon.log(), message="the drop to be logged")
    assert daemon.stop() == 0
    [dropped] = re.findall(r"function slow: peak queue \d+, dropped (\d+)", daemon.log())
    dropped = int(dropped)
    assert dropped > 0 and dropped + len(collector.on("out")) == 150
    assert re.search(rf"rule r1: received 150, published {len(collector.on('out'))}, failed 0, "
                     rf"dropped {dropped}", daemon.log())


def test_a_broken_function_is_retried_after_a_back_off_not_in_a_loop(broker, daemon_factory, collector):
    daemon = daemon_factory([function("broken", "missing_module.handler", instance={"min": 1})],
                            [rule("r1", "in", "broken", "out")], files={"fn/tools.py": TOOLS})
    for _ in range(12):
        publish(broker, "in", b"{}")
        time.sleep(0.25)
    out = wait_until(lambda: len(collector.on("out")) == 12 and collector.on("out"), message="12 envelopes")
    assert all(json.loads(m.payload)["errorType"] == "FunctionLoadError" for m in out)
    assert "no module named 'missing_module'" in json.loads(out[0].payload)["errorMessage"]
    # About three seconds of traffic: tries at 0 s, 1 s, 3 s (back-off 1 s, 2 s, 4 s ...).
    assert daemon.log().count("started pid") <= 4


def test_json_log_lines_carry_their_function_instance_and_request_and_a_zoned_time(
        broker, daemon_factory, collector):
    daemon = daemon_factory([function("fail", "tools.fail")], [rule("r1", "in", "fail", "out")],
                            files={"fn/tools.py": TOOLS},
                            logger={"level": "info", "console": True, "format": "json"})
    publish(broker, "in", b'{"say": "hello"}', qos=1)
    envelope = json.loads(wait_until(lambda: collector.on("out"), message="the envelope")[0].payload)
    request_id = envelope["requestId"]

    def entries() -> list:
        return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    wait_until(lambda: any(e.get("logger") == "openedge_function.summary" and e.get("request_id") == request_id
                           for e in entries()), message="the summary line")
    found = entries()
    assert found and all(re.search(r"T\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", e["time"]) for e in found), found[:3]
    summary = next(e for e in found if e["logger"] == "openedge_function.summary")
    assert summary["function"] == "fail" and summary["instance"] == "fail-1", summary
    failure = next(e for e in found if e["level"] == "warning" and e.get("request_id") == request_id)
    assert failure["rule"] == "r1" and failure["function"] == "fail", failure
    assert "ZeroDivisionError" in failure["message"]


def test_under_a_service_manager_stderr_is_the_log_and_a_file_only_when_configured(broker, daemon_factory):
    """A configured log file once took the log away from a service manager's journal (or doubled
    it, with console: true)."""
    logger = {"level": "info", "path": "var/oef.log"}
    for service, expected in ((False, False), (True, True)):
        env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
        if service:
            env["INVOCATION_ID"] = "0123456789abcdef0123456789abcdef"
        daemon = daemon_factory([function("echo", "tools.echo")], [rule("r1", "in", "echo", "out")],
                                files={"fn/tools.py": TOOLS}, logger=logger, wait=False)
        daemon.stop()
        daemon.start(wait=False, env=env)
        path = os.path.join(daemon.directory, "var", "oef.log")
        wait_until(lambda: os.path.exists(path) and ": subscribed to " in open(path).read(), 20,
                   message="the log file")
        assert (": subscribed to " in daemon.log()) is expected, (service, daemon.log()[-500:])
