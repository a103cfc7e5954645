"""Handlers from every seed document, run unchanged; the context, logs and execution summary."""
from __future__ import annotations

import json
import re
from pathlib import Path


from tests.helpers import alive, function, publish, rule, wait_until


# OpenEdge's documentation (000): the sayhi handler, as published, is the shipped example's.
EXAMPLE_SAYHI = Path(__file__).resolve().parent.parent / "example" / "functions" / "sayhi" / "sayhi.py"


def test_openedge_sayhi(broker, daemon_factory, collector):
    daemon_factory([function("sayhi", "sayhi.handler")], [rule("r1", "t", "sayhi", "t/hi")],
                   files={"fn/sayhi.py": EXAMPLE_SAYHI.read_text(encoding="utf-8")})
    publish(broker, "t", b'{"id": 1, "device": "111"}')
    out = json.loads(wait_until(lambda: collector.on("t/hi"), message="the answer")[0].payload)
    assert out["id"] == 1 and out["sayhi"] == "你好，世界！" and out["functionName"] == "sayhi"
    assert out["messageTopic"] == "t" and out["messageQOS"] == 1 and out["functionInstanceID"] == "sayhi-1"


# FunctionGraph (001): an initializer `file.initializer_name`, and a handler on the Context SDK.
FUNCTIONGRAPH = '''
def my_initializer(context):
    print('hello world!')


def handler(event, context):
    log = context.getLogger()
    log.info("test")
    return {
        "requestId": context.getRequestID(),
        "remaining": context.getRemainingTimeInMilliSeconds(),
        "accessKey": context.getAccessKey(),
        "secretKey": context.getSecretKey(),
        "securityAccessKey": context.getSecurityAccessKey(),
        "securitySecretKey": context.getSecuritySecretKey(),
        "securityToken": context.getSecurityToken(),
        "token": context.getToken(),
        "userData": context.getUserData("USER_ID"),
        "functionName": context.getFunctionName(),
        "runningTime": context.getRunningTimeInSeconds(),
        "version": context.getVersion(),
        "memory": context.getMemorySize(),
        "cpu": context.getCPUNumber(),
        "package": context.getPackage(),
        "alias": context.getAlias(),
        "awsRequestId": context.aws_request_id,
        "awsRemaining": context.get_remaining_time_in_millis(),
        "memoryLimitInMb": context.memory_limit_in_mb,
        "invokeid": context["invokeid"],
    }
'''


def test_functiongraph_initializer_context_and_logger(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("fg", "main.handler", initializer="main.my_initializer",
                  env={"USER_ID": "acuiot"}, version="v2", alias="prod", package="edge",
                  credentials={"access_key_id": "AK", "access_key_secret": "SK",
                               "security_token": "ST", "token": "TK"},
                  instance={"timeout": "20s", "memory": "256m", "cpu": {"cpus": 0.5}})],
        [rule("r1", "in", "fg", "out")], files={"fn/main.py": FUNCTIONGRAPH})
    publish(broker, "in", b"{}")
    out = json.loads(wait_until(lambda: collector.on("out"), message="the answer")[0].payload)
    request_id = out["requestId"]
    assert len(request_id) == 36
    assert out["awsRequestId"] == out["invokeid"] == request_id
    assert 15000 < out["remaining"] <= 20000 and 15000 < out["awsRemaining"] <= 20000
    assert (out["accessKey"], out["secretKey"], out["securityToken"], out["token"]) == ("AK", "SK", "ST", "TK")
    assert (out["securityAccessKey"], out["securitySecretKey"]) == ("AK", "SK")
    assert out["userData"] == "acuiot" and out["functionName"] == "fg"
    assert out["runningTime"] == 20 and out["memory"] == 256 and out["memoryLimitInMb"] == 256
    assert out["cpu"] == 500
    assert (out["version"], out["alias"], out["package"]) == ("v2", "prod", "edge")
    log = daemon.log()
    # The initializer's print, and the logger's `time - requestID - content` line, tagged.
    assert re.search(r"function=fg instance=fg-1 request=[0-9a-f-]{36}: hello world!", log)
    assert re.search(rf"function=fg instance=fg-1 request={request_id}: "
                     rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z - {request_id} - test", log), log


# Function Compute (002): the event is bytes; the handler parses its JSON itself.
FC_JSON = '''# -*- coding: utf-8 -*-
import json
def handler(event, context):
    evt = json.loads(event)
    return evt['key']
'''

# Function Compute (002): handlers that start subprocesses.
FC_SUBPROCESS = '''import os
import subprocess

def handler(event, context):
    ret = subprocess.check_output(['ls', "-l"])
    return ret
'''


def test_function_compute_raw_event_and_subprocess(broker, daemon_factory, collector):
    daemon_factory([function("fcjson", "index.handler", codedir="json", event="raw"),
                    function("fcls", "index.handler", codedir="ls")],
                   [rule("r1", "json", "fcjson", "json/out"), rule("r2", "ls", "fcls", "ls/out")],
                   files={"json/index.py": FC_JSON, "ls/index.py": FC_SUBPROCESS})
    publish(broker, "json", b'{"key": "value"}')
    publish(broker, "ls", b"{}")
    wait_until(lambda: collector.on("json/out") and collector.on("ls/out"), message="both answers")
    assert json.loads(collector.on("json/out")[0].payload) == "value"
    listing = collector.on("ls/out")[0].payload.decode()
    assert "index.py" in listing and listing.startswith("total")


# Function Compute (004): the FCContext attributes.
FC_CONTEXT = '''
def my_handler(event, context):
    creds = context.credentials
    return {
        "request_id": context.request_id,
        "credentials": [creds.access_key_id, creds.access_key_secret, creds.security_token],
        "function": [context.function.name, context.function.handler, context.function.memory,
                     context.function.timeout],
        "service": [context.service.name, context.service.log_project, context.service.log_store,
                    context.service.qualifier, context.service.version_id],
        "region": context.region,
        "account_id": context.account_id,
    }
'''


def test_function_compute_context_attributes(broker, daemon_factory, collector):
    daemon_factory(
        [function("fcctx", "main.my_handler", region="cn-shanghai", account_id="1234",
                  credentials={"access_key_id": "id", "access_key_secret": "secret", "security_token": "tok"},
                  service={"name": "svc", "log_project": "lp", "log_store": "ls", "qualifier": "prod",
                           "version_id": "3"},
                  instance={"timeout": "7s", "memory": "64m"})],
        [rule("r1", "in", "fcctx", "out")], files={"fn/main.py": FC_CONTEXT})
    publish(broker, "in", b"{}")
    out = json.loads(wait_until(lambda: collector.on("out"), message="the answer")[0].payload)
    assert len(out["request_id"]) == 36
    assert out["credentials"] == ["id", "secret", "tok"]
    assert out["function"] == ["fcctx", "main.my_handler", 64, 7]
    assert out["service"] == ["svc", "lp", "ls", "prod", "3"]
    assert out["region"] == "cn-shanghai" and out["account_id"] == "1234"


def test_context_defaults_without_configuration(broker, daemon_factory, collector):
    daemon_factory([function("plain", "main.my_handler")], [rule("r1", "in", "plain", "out")],
                   files={"fn/main.py": FC_CONTEXT})
    publish(broker, "in", b"{}")
    out = json.loads(wait_until(lambda: collector.on("out"), message="the answer")[0].payload)
    assert out["credentials"] == ["", "", ""]
    assert out["function"] == ["plain", "main.my_handler", 0, 30]   # memory 0: unlimited
    assert out["service"] == ["plain", "", "", "LATEST", ""]
    assert out["region"] == "local" and out["account_id"] == ""


LOGS = '''
import logging, subprocess, sys

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

def handler(event, context):
    print("from print")
    sys.stderr.write("from stderr\\n")
    logging.getLogger("user").warning("from logging")
    subprocess.run(["echo", "from a subprocess"])
    print("no newline at the end", end="")
    if event.get("chatty"):
        for i in range(200):
            print("x" * 99)
    return None
'''


def test_everything_a_handler_writes_is_logged_with_its_request(broker, daemon_factory, collector):
    daemon = daemon_factory([function("logs", "main.handler", log={"max": "2k"})],
                            [rule("r1", "in", "logs", "out")], files={"fn/main.py": LOGS})
    publish(broker, "in", b"{}")
    wait_until(lambda: "no newline at the end" in daemon.log(), message="the handler's output")
    wait_until(lambda: "from a subprocess" in daemon.log(), message="the subprocess's output")
    summary = wait_until(lambda: re.findall(r"request ([0-9a-f-]{36}): function logs, .*outcome none",
                                            daemon.log()), message="the summary line")
    request_id = summary[0]
    for text in ("from print", "from stderr", "WARNING from logging", "from a subprocess",
                 "no newline at the end"):
        assert f"function=logs instance=logs-1 request={request_id}: {text}" in daemon.log(), text
    # A chatty invocation: cut at 2 KB with one marker; the next invocation logs again.
    publish(broker, "in", b'{"chatty": true}')
    wait_until(lambda: "output truncated: over 2048 bytes" in daemon.log(), message="the marker")
    assert daemon.log().count("x" * 99) <= 2048 // 100
    assert daemon.log().count("output truncated") == 1
    publish(broker, "in", b"{}")
    wait_until(lambda: daemon.log().count("from print") == 3, message="the third invocation's output")


def test_one_summary_line_per_invocation(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("sleepy", "main.handler", instance={"memory": "128m"})],
        [rule("r1", "in", "sleepy", "out")],
        files={"fn/main.py": "import time\ndef handler(event, context):\n"
                             "    time.sleep(event['s'])\n    if event.get('fail'):\n        raise ValueError('no')\n"
                             "    return event\n"})
    publish(broker, "in", b'{"s": 0.15}')
    publish(broker, "in", b'{"s": 0, "fail": true}')
    wait_until(lambda: len(collector.on("out")) == 2, message="two answers")
    lines = wait_until(lambda: len(re.findall(r"request [0-9a-f-]{36}: function sleepy", daemon.log())) == 2
                       and re.findall(r"request ([0-9a-f-]{36}): function sleepy, memory 128 MB, "
                                      r"duration ([\d.]+) ms, used (\d+) MB, billed (\d+) ms, outcome (\w+)",
                                      daemon.log()), message="two summary lines")
    (_, duration, used, billed, outcome), (_, _, _, billed2, outcome2) = lines
    assert 150 <= float(duration) < 1000 and billed == "200" and outcome == "ok"
    assert 5 < int(used) < 128
    assert billed2 == "100" and outcome2 == "ValueError"


def test_an_initializer_that_raises_or_hangs_fails_the_function(broker, daemon_factory, collector):
    source = ("import time\ndef boom(context):\n    raise RuntimeError('no database')\n"
              "def hang(context):\n    time.sleep(60)\n"
              "def handler(event, context):\n    return 1\n")
    daemon_factory([function("boom", "main.handler", initializer="main.boom"),
                    function("hang", "main.handler",
                             initializer={"handler": "main.hang", "timeout": "1s"})],
                   [rule("r1", "boom", "boom", "boom/out"), rule("r2", "hang", "hang", "hang/out")],
                   files={"fn/main.py": source})
    publish(broker, "boom", b"{}")
    publish(broker, "hang", b"{}")
    wait_until(lambda: collector.on("boom/out") and collector.on("hang/out"), timeout=20,
               message="both envelopes")
    boom = json.loads(collector.on("boom/out")[0].payload)
    assert boom["errorType"] == "FunctionLoadError"
    assert "initializer main.boom raised RuntimeError: no database" in boom["errorMessage"]
    hang = json.loads(collector.on("hang/out")[0].payload)
    assert hang["errorType"] == "FunctionLoadError"
    assert "initializer main.hang did not finish within 1s" in hang["errorMessage"]


SPAWNER = '''
import os, subprocess, time

def handler(event, context):
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(os.environ["OUT"], "child"), "w") as fh:
        fh.write(str(child.pid))
    time.sleep(300)
'''


def test_a_handler_subprocess_dies_with_its_instance_on_timeout(broker, daemon_factory, collector, writable_tmp):
    daemon_factory([function("spawner", "main.handler", env={"OUT": str(writable_tmp)},
                             instance={"timeout": "1s"})],
                   [rule("r1", "in", "spawner", "out")], files={"fn/main.py": SPAWNER})
    publish(broker, "in", b"{}")
    out = wait_until(lambda: collector.on("out"), message="the timeout envelope")
    assert json.loads(out[0].payload)["errorType"] == "FunctionTimeout"
    child = int((writable_tmp / "child").read_text())
    wait_until(lambda: not alive([child]), timeout=5, message="the handler's subprocess to die")


def test_summary_lines_can_be_turned_off(broker, daemon_factory, collector):
    daemon = daemon_factory([function("quiet", "main.handler")], [rule("r1", "in", "quiet", "out")],
                            files={"fn/main.py": "def handler(event, context):\n    return event\n"},
                            logger={"level": "debug", "summary": False})
    publish(broker, "in", b"{}")
    wait_until(lambda: collector.on("out"), message="the answer")
    daemon.stop()
    assert "openedge_function.summary" not in daemon.log()


ASYNC_HANDLERS = '''
import asyncio


async def double(n):
    await asyncio.sleep(0.01)
    return n * 2


def run(event, context):
    # An asynchronous library's way: a loop of the handler's own for each call.
    try:
        asyncio.get_running_loop()
        running = True
    except RuntimeError:
        running = False
    return {"run": asyncio.run(double(event["n"])), "running_loop_seen": running}


def legacy(event, context):
    # The older way, still in the clouds' examples: the thread's loop, kept between calls.
    loop = asyncio.get_event_loop()
    return {"legacy": loop.run_until_complete(double(event["n"]))}


def gathered(event, context):
    async def main():
        return await asyncio.gather(*(double(i) for i in range(event["n"])))
    loop = asyncio.new_event_loop()
    try:
        return {"gathered": loop.run_until_complete(main())}
    finally:
        loop.close()
'''


def test_handlers_that_run_their_own_event_loop(broker, daemon_factory, collector):
    """The instance serves on an event loop; a handler that runs one of its own, in any of the
    usual ways, sees none running and runs as it would anywhere, call after call."""
    daemon_factory([function("run", "aio.run", instance={"max": 1}),
                    function("legacy", "aio.legacy", instance={"max": 1}),
                    function("gathered", "aio.gathered", instance={"max": 1})],
                   [rule("r1", "run/in", "run", "run/out"), rule("r2", "legacy/in", "legacy", "legacy/out"),
                    rule("r3", "gathered/in", "gathered", "gathered/out")],
                   files={"fn/aio.py": ASYNC_HANDLERS})
    for n in (1, 2, 3):
        for name in ("run", "legacy", "gathered"):
            publish(broker, f"{name}/in", json.dumps({"n": n}).encode(), qos=1)
    for name in ("run", "legacy", "gathered"):
        wait_until(lambda: len(collector.on(f"{name}/out")) == 3, message=f"three answers from {name}")
    answers = {name: [json.loads(m.payload) for m in collector.on(f"{name}/out")]
               for name in ("run", "legacy", "gathered")}
    assert sorted(a["run"] for a in answers["run"]) == [2, 4, 6], answers
    assert not any(a["running_loop_seen"] for a in answers["run"]), answers
    assert sorted(a["legacy"] for a in answers["legacy"]) == [2, 4, 6], answers
    assert sorted(len(a["gathered"]) for a in answers["gathered"]) == [1, 2, 3], answers
