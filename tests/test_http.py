"""The HTTP server: invoke API, SDK, context.invoke, HTTP (WSGI) functions, /healthz, /metrics and
the CLI, against a real daemon over real sockets."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from openedge_function.api.server import HEADER_TIMEOUT
from openedge_function.sdk import Client, InvokeError

from .helpers import free_port, function, publish, request, rule, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE_WEBAPP = os.path.join(os.path.dirname(HERE), "example", "functions", "webapp", "index.py")

TOOLS = '''
import os, time

def echo(event, context):
    return event

def nothing(event, context):
    return None

def raw(event, context):
    return bytes(reversed(event)) if isinstance(event, bytes) else b"not bytes"

def about(event, context):
    return {"content_type": context.content_type, "contentType": context.get("contentType"),
            "event": event if not isinstance(event, bytes) else event.decode(),
            "token": os.environ.get("OPENEDGE_FUNCTION_TOKEN")}

def fail(event, context):
    return helper(event)

def helper(event):
    raise ValueError(f"cannot use {event!r}")

def sleep(event, context):
    time.sleep(event.get("sleep", 60))
    return {"slept": True}

def caller(event, context):
    return {"got": context.invoke(event["target"], event.get("event"))}

def loop(event, context):
    return context.invoke("loop", event)

def invoked(event, context):
    # SCF's "FuncInvoked"
    if "key1" in event.keys():
        print("value1 = " + event["key1"])
    return "Hello World from the function being invoked"

def crash(event, context):
    os._exit(3)
'''

WEB = '''
import time
from flask import Flask, request, make_response

app = Flask(__name__)

@app.route("/cookies")
def cookies():
    resp = make_response({"seen": request.cookies.get("session"), "agent": request.headers.get("X-Agent")})
    resp.set_cookie("first", "1")
    resp.set_cookie("second", "2")
    return resp

@app.route("/binary", methods=["POST"])
def binary():
    body = request.get_data()
    resp = make_response(bytes(reversed(body)), 200)
    resp.headers["Content-Type"] = "application/octet-stream"
    return resp

@app.route("/environ")
def environ():
    e = request.environ
    return {"uri": e["fc.request_uri"], "request_id": e["fc.context"].request_id,
            "script": e["SCRIPT_NAME"], "path": e["PATH_INFO"], "query": e["QUERY_STRING"],
            "protocol": e["SERVER_PROTOCOL"], "length": e["CONTENT_LENGTH"]}

@app.route("/crash")
def crash():
    import os
    os._exit(9)

@app.route("/hog")
def hog():
    block = bytearray(300 << 20)
    time.sleep(10)
    return str(len(block))

@app.route("/slow")
def slow():
    time.sleep(30)
    return "late"

def plain(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain ", environ["PATH_INFO"].encode()]
'''


def serving(daemon_factory, functions, files, token: str = "", **server):
    port = free_port()
    config = {"address": f"127.0.0.1:{port}", **server}
    if token:
        config["token"] = token
    daemon = daemon_factory(functions, [], files=files, server=config)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def up():
        try:
            return request(port, "GET", "/healthz", headers=headers, timeout=2)[0] in (200, 503)
        except OSError:
            return False
    wait_until(up, 20, message="the HTTP server")
    return daemon, port


@pytest.fixture
def api(daemon_factory):
    daemon, port = serving(daemon_factory, [
        function("echo", "tools.echo"), function("nothing", "tools.nothing"),
        function("raw", "tools.raw"), function("about", "tools.about"), function("fail", "tools.fail"),
        function("sleep", "tools.sleep", instance={"timeout": "1s"}),
        function("small", "tools.echo", instance={"message": {"length": {"max": "1k"}}}),
        function("caller", "tools.caller", instance={"timeout": "10s"}),
        function("loop", "tools.loop", instance={"timeout": "5s"}),
        function("FuncInvoked", "tools.invoked"), function("crash", "tools.crash"),
    ], {"fn/tools.py": TOOLS})
    return daemon, port


def test_invoke_answers_json_none_and_bytes_with_a_request_id(api):
    daemon, port = api
    status, headers, body = request(port, "POST", "/invoke/echo", b'{"a": [1, 2]}',
                                    {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"a": [1, 2]}
    assert len(headers["X-Request-Id"]) == 36
    status, headers, body = request(port, "POST", "/invoke/nothing", b"{}")
    assert (status, body) == (204, b"")
    status, headers, body = request(port, "POST", "/invoke/raw", b"\x00\x01\xff")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert body == b"\xff\x01\x00"
    # The Content-Type reaches the context; the body is decoded as an MQTT payload would be.
    status, _, body = request(port, "POST", "/invoke/about", b"a,b", {"Content-Type": "text/csv"})
    assert json.loads(body) == {"content_type": "text/csv", "contentType": "text/csv", "event": "a,b",
                                "token": None}


def test_invoke_failures_have_fitting_statuses_and_the_envelope(api):
    daemon, port = api
    status, headers, body = request(port, "POST", "/invoke/fail", b'"x"')
    envelope = json.loads(body)
    assert status == 500 and envelope["errorType"] == "ValueError"
    assert envelope["errorMessage"] == "cannot use 'x'"
    assert any("helper" in line for line in envelope["stackTrace"])
    assert envelope["requestId"] == headers["X-Request-Id"] and envelope["functionName"] == "fail"

    status, _, body = request(port, "POST", "/invoke/missing", b"{}")
    assert status == 404 and json.loads(body)["errorType"] == "UnknownFunction"

    status, _, body = request(port, "POST", "/invoke/small", b"x" * 2048)
    assert status == 413 and json.loads(body)["errorType"] == "MessageTooLarge"

    started = time.monotonic()
    status, _, body = request(port, "POST", "/invoke/sleep", b'{"sleep": 30}')
    assert status == 504 and json.loads(body)["errorType"] == "FunctionTimeout"
    assert time.monotonic() - started < 5

    status, _, body = request(port, "POST", "/invoke/crash", b"{}")
    assert status == 500 and json.loads(body)["errorType"] == "InstanceCrashed"

    status, _, _ = request(port, "GET", "/invoke/echo")
    assert status == 405


def test_requests_over_the_limits_get_their_status_and_the_server_goes_on(daemon_factory):
    daemon, port = serving(daemon_factory, [function("echo", "tools.echo")], {"fn/tools.py": TOOLS},
                           body={"max": "1m"})
    # A megabyte of headers: 431, read by the client after it sent them all (no reset).
    status, _, body = request(port, "GET", "/healthz", headers={"X-Big": "a" * (1 << 20)})
    assert status == 431 and json.loads(body)["errorType"] == "HeadersTooLarge"
    # A body over server.body.max, with its length given and chunked: 413.
    status, _, body = request(port, "POST", "/invoke/echo", b"x" * (8 << 20))
    assert status == 413 and json.loads(body)["errorType"] == "MessageTooLarge"
    assert "server.body.max" in json.loads(body)["errorMessage"]
    status, _, body = request(port, "POST", "/invoke/echo", iter([b"x" * (1 << 20)] * 4),
                              {"Transfer-Encoding": "chunked"})
    assert status == 413 and json.loads(body)["errorType"] == "MessageTooLarge"
    # A request that is not HTTP at all: 400.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 400 ") and b'"errorType": "BadRequest"' in answer
    # The server goes on serving.
    status, _, body = request(port, "POST", "/invoke/echo", b'{"after": true}')
    assert status == 200 and json.loads(body) == {"after": True}


def test_a_full_pool_and_queue_answers_429(daemon_factory):
    daemon, port = serving(daemon_factory, [function("sleep", "tools.sleep", instance={"timeout": "20s"})],
                           {"fn/tools.py": TOOLS}, threads=100)
    # max 1: one runs, 64 wait in the queue, the rest are refused at once.
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        calls = [pool.submit(request, port, "POST", "/invoke/sleep", b'{"sleep": 3}', None, 60)
                 for _ in range(75)]
        refused = []
        for call in concurrent.futures.as_completed(calls, timeout=40):
            status, _, body = call.result()
            if status == 429:
                refused.append(json.loads(body)["errorType"])
            if len(refused) >= 5:
                break
        assert refused[:5] == ["QueueFull"] * 5
        daemon.signal(15)   # don't wait for 65 sleeps: queued calls are answered 503 at shutdown
    assert daemon.wait(60) == 0


def test_the_token_is_required_and_checked_and_never_reaches_a_function(daemon_factory):
    daemon, port = serving(daemon_factory, [function("about", "tools.about"),
                                            function("caller", "tools.caller")],
                           {"fn/tools.py": TOOLS}, token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, _, body = request(port, "POST", "/invoke/about", b"{}", headers)
        assert status == 401 and json.loads(body)["errorType"] == "Unauthorized"
    assert request(port, "GET", "/metrics")[0] == 401
    status, _, body = request(port, "POST", "/invoke/about", b"{}", {"Authorization": "Bearer s3cret"})
    assert status == 200 and json.loads(body)["token"] is None
    # context.invoke inside a function needs no token: it asks over its instance's channel.
    client = Client(address=f"127.0.0.1:{port}", token="s3cret")
    assert client.invoke("caller", data={"target": "about", "event": {"n": 1}})["got"] == {
        "content_type": "application/json", "contentType": "application/json", "event": {"n": 1},
        "token": None}
    with pytest.raises(InvokeError) as caught:
        Client(address=f"127.0.0.1:{port}").invoke("about")
    assert caught.value.status == 401
    assert client.status()["functions"]["about"]["type"] == "event"
    with pytest.raises(InvokeError) as caught:
        Client(address=f"127.0.0.1:{port}").status()
    assert caught.value.code == "Unauthorized" and caught.value.status == 401


def test_a_server_beyond_loopback_needs_a_token(tmp_path):
    config = tmp_path / "application.yml"
    config.write_text("server: {address: '0.0.0.0:8080'}\n")
    run = subprocess.run([sys.executable, "-m", "openedge_function", "-c", str(config), "--check"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "server.token: required when the server listens beyond loopback" in run.stderr


def test_sdk_calls_in_both_styles_and_its_exception(api):
    daemon, port = api
    client = Client(address=f"127.0.0.1:{port}")
    # SCF's example, as its document shows it.
    assert client.invoke("FuncInvoked", data={"key1": "v"}) == "Hello World from the function being invoked"
    assert client.FuncInvoked(data={"a": "b"}) == "Hello World from the function being invoked"
    assert client.invoke("echo", data={"x": 1}, qualifier="$LATEST", namespace="default") == {"x": 1}
    assert client.invoke("raw", data=b"abc") == b"cba"
    assert client.nothing() is None
    with pytest.raises(InvokeError) as caught:
        client.fail(data="y")
    error = caught.value
    assert error.code == error.get_code() == "ValueError"
    assert error.message == error.get_message() == "cannot use 'y'"
    assert len(error.request_id) == 36 and error.get_request_id() == error.request_id
    assert error.get_response()["errorType"] == "ValueError" and error.status == 500
    assert any("helper" in line for line in error.get_stack_trace())
    with pytest.raises(InvokeError) as caught:
        client.invoke("echo", qualifier="v9")
    assert caught.value.code == "UnknownFunction"
    with pytest.raises(InvokeError) as caught:
        Client(address=f"127.0.0.1:{free_port()}").echo(data=1)
    assert caught.value.code == "ConnectionError"
    # One kept-alive connection carries many calls.
    connection = client._local.connection
    for i in range(20):
        assert client.echo(data=i) == i
    assert client._local.connection is connection


def test_context_invoke_and_the_self_invoke_deadlock_guard(api):
    daemon, port = api
    client = Client(address=f"127.0.0.1:{port}")
    assert client.caller(data={"target": "echo", "event": {"deep": True}}) == {"got": {"deep": True}}
    started = time.monotonic()
    with pytest.raises(InvokeError) as caught:
        client.loop(data={"n": 1})
    # Refused at once: its only instance is the caller waiting on it.
    assert time.monotonic() - started < 3
    assert caught.value.code == "InvokeError"
    assert "InvokeDeadlock" in caught.value.message and "could never run" in caught.value.message
    # The function still works afterwards.
    assert client.caller(data={"target": "FuncInvoked", "event": {}})["got"].startswith("Hello World")


def test_a_nested_call_gives_up_within_the_callers_timeout(daemon_factory):
    daemon, port = serving(daemon_factory, [
        function("caller", "tools.caller", instance={"timeout": "2s"}),
        function("sleep", "tools.sleep", instance={"timeout": "20s"})], {"fn/tools.py": TOOLS})
    client = Client(address=f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(InvokeError) as caught:
        client.caller(data={"target": "sleep", "event": {"sleep": 10}})
    assert time.monotonic() - started < 4
    # The caller's own handler saw the nested call time out, and said so in its error.
    assert caught.value.code == "InvokeError" and "InvokeTimeout" in caught.value.message


@pytest.fixture
def web(daemon_factory):
    with open(EXAMPLE_WEBAPP) as fh:
        example = fh.read()
    return serving(daemon_factory, [
        function("webapp", "index.handler", codedir="webapp", type="http"),
        function("web", "web.app", codedir="fn", type="http", instance={"timeout": "1s"}),
        function("plain", "web.plain", codedir="fn", type="http"),
        function("hungry", "web.app", codedir="fn", type="http", instance={"memory": "100m"}),
    ], {"webapp/index.py": example, "fn/web.py": WEB})


def test_the_flask_example_of_function_compute(web):
    daemon, port = web
    status, headers, body = request(port, "GET", "/http/webapp/")
    assert (status, body) == (200, b"<h1>Home</h1>")
    assert headers["Content-Type"].startswith("text/html")
    status, _, body = request(port, "GET", "/http/webapp/signin")
    assert status == 200 and b'action="/http/webapp/signin"' in body
    status, _, body = request(port, "GET", "/http/webapp/signin2?username=admin&password=password")
    assert (status, body) == (200, b"<h3>Hello2, admin!</h3>")
    status, _, body = request(port, "GET", "/http/webapp/signin2?username=admin&password=no")
    assert body == b"<h3>Bad username or password.</h3>"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = request(port, "POST", "/http/webapp/signin", b"username=admin&password=password", form)
    assert (status, body) == (200, b"<h3>Hello, admin!</h3>")
    status, _, body = request(port, "POST", "/http/webapp/signin", b"username=eve&password=x", form)
    assert body == b"<h3>Bad username or password.</h3>"
    status, _, body = request(port, "GET", "/http/webapp/no-such-page")
    assert status == 404 and b"Not Found" in body   # Flask's own 404


def test_wsgi_environ_cookies_binary_bodies_and_failures(web):
    daemon, port = web
    status, headers, body = request(port, "GET", "/http/web/cookies",
                                    headers={"Cookie": "session=abc", "X-Agent": "tests"})
    assert status == 200 and json.loads(body) == {"seen": "abc", "agent": "tests"}
    cookies = headers.get_all("Set-Cookie")
    assert [c.split(";")[0] for c in cookies] == ["first=1", "second=2"]
    blob = bytes(range(256)) * 4
    status, headers, body = request(port, "POST", "/http/web/binary", blob,
                                    {"Content-Type": "application/octet-stream"})
    assert status == 200 and body == blob[::-1]
    assert headers["Content-Type"] == "application/octet-stream"
    status, headers, body = request(port, "GET", "/http/web/environ?q=1&r=%20")
    environ = json.loads(body)
    assert environ == {"uri": "/http/web/environ?q=1&r=%20", "request_id": headers["X-Request-Id"],
                       "script": "/http/web", "path": "/environ", "query": "q=1&r=%20",
                       "protocol": "HTTP/1.1", "length": "0"}
    status, _, body = request(port, "GET", "/http/plain/some/where")
    assert (status, body) == (200, b"plain /some/where")
    # Timeouts behave as for MQTT functions.
    status, _, body = request(port, "GET", "/http/web/slow")
    assert status == 504 and json.loads(body)["errorType"] == "FunctionTimeout"
    status, _, body = request(port, "GET", "/http/web/crash")
    assert status == 500 and json.loads(body)["errorType"] == "InstanceCrashed"
    status, _, body = request(port, "GET", "/http/hungry/hog")
    assert status == 500 and json.loads(body)["errorType"] == "MemoryLimitExceeded"
    status, _, body = request(port, "GET", "/http/web/cookies")   # a fresh instance serves again
    assert status == 200
    status, _, body = request(port, "GET", "/http/nowhere/")
    assert status == 404
    status, _, body = request(port, "POST", "/invoke/web", b"{}")
    assert status == 400 and json.loads(body)["errorType"] == "NotAnEventFunction"


def test_healthz_turns_503_when_the_broker_goes(broker, daemon_factory):
    daemon, port = serving(daemon_factory, [function("echo", "tools.echo", instance={"min": 1})],
                           {"fn/tools.py": TOOLS})
    wait_until(lambda: request(port, "GET", "/healthz")[0] == 200, message="healthy")
    assert json.loads(request(port, "GET", "/healthz")[2]) == {"status": "ok", "reasons": [], "warnings": []}
    broker.stop()
    wait_until(lambda: request(port, "GET", "/healthz")[0] == 503, message="unhealthy")
    reasons = json.loads(request(port, "GET", "/healthz")[2])["reasons"]
    assert "the publisher is not connected to the broker" in reasons
    broker.start()
    wait_until(lambda: request(port, "GET", "/healthz")[0] == 200, 30, message="healthy again")


def test_metrics_move_with_traffic(broker, daemon_factory):
    port = free_port()
    daemon_factory([function("echo", "tools.echo"), function("fail", "tools.fail")],
                   [rule("r1", "in", "echo", "out")], files={"fn/tools.py": TOOLS},
                   server={"address": f"127.0.0.1:{port}"})
    client = Client(address=f"127.0.0.1:{port}")

    def metric(name: str) -> float:
        text = request(port, "GET", "/metrics")[2].decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    ok = 'openedge_function_invocations_total{function="echo",outcome="ok"}'
    assert metric(ok) == 0
    for i in range(5):
        client.echo(data=i)
    with pytest.raises(InvokeError):
        client.fail(data=1)
    assert metric(ok) == 5
    assert metric('openedge_function_invocations_total{function="fail",outcome="ValueError"}') == 1
    assert metric('openedge_function_duration_seconds_count{function="echo"}') == 5
    assert metric('openedge_function_instances{function="echo",state="idle"}') == 1
    assert metric('openedge_function_queue_depth{function="echo"}') == 0
    assert metric('openedge_function_broker_connected{connection="publisher"}') == 1
    assert metric('openedge_function_broker_connected{connection="rule r1"}') == 1
    publish(broker, "in", b'{"m": 1}', count=3)
    wait_until(lambda: metric('openedge_function_messages_out_total{rule="r1"}') == 3, message="3 out")
    assert metric('openedge_function_messages_in_total{rule="r1"}') == 3
    assert metric(ok) == 8
    assert metric('openedge_function_dropped_qos0_total{rule="r1"}') == 0
    for counter in ("refused", "poisoned", "expired", "undeliverable"):
        assert f'openedge_function_messages_{counter}_total{{rule="r1"}} 0.0' in \
            request(port, "GET", "/metrics")[2].decode()
    # The version, in /metrics and /status, is the package's.
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")) as fh:
        version = re.search(r'^version = "([^"]+)"', fh.read(), re.M).group(1)
    assert metric(f'openedge_function_build_info{{version="{version}"}}') == 1
    assert json.loads(request(port, "GET", "/status")[2])["version"] == version


def test_code_that_does_not_load_is_counted_and_flagged(broker, daemon_factory):
    port = free_port()
    daemon_factory([function("broken", "missing.handler")], [rule("r1", "in", "broken", "out")],
                   files={"fn/tools.py": TOOLS}, server={"address": f"127.0.0.1:{port}"})
    publish(broker, "in", b"{}", count=2)

    def text() -> str:
        return request(port, "GET", "/metrics")[2].decode()
    wait_until(lambda: 'openedge_function_invocations_total{function="broken",outcome="FunctionLoadError"} 2.0'
               in text(), 30, message="the FunctionLoadErrors counted")
    assert 'openedge_function_failing{function="broken"} 1.0' in text()
    assert re.search(r'openedge_function_load_failures_total\{function="broken"\} [1-9]', text())


def test_cli_invoke_and_status(api):
    daemon, port = api
    cli = [sys.executable, "-m", "openedge_function"]
    address = ["--address", f"127.0.0.1:{port}"]
    run = subprocess.run(cli + ["invoke", "echo", '{"k": "v"}'] + address, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0 and json.loads(run.stdout) == {"k": "v"}
    run = subprocess.run(cli + ["invoke", "fail", '"z"'] + address, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and json.loads(run.stdout)["errorType"] == "ValueError"
    run = subprocess.run(cli + ["status"] + address, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "healthy" in run.stdout and "echo (event): instances 1 of max 1" in run.stdout


def test_slow_clients_cannot_take_every_connection(daemon_factory):
    """100 sockets sending one header line every 3 s, without a token, once took every connection
    the server has, and /healthz timed out."""
    daemon, port = serving(daemon_factory, [function("echo", "tools.echo")], {"fn/tools.py": TOOLS},
                           token="t0ken")
    attackers = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /invoke/echo HTTP/1.1\r\nHost: x\r\n")
            attackers.append(sock)
        started = time.monotonic()
        answered = []
        while time.monotonic() - started < HEADER_TIMEOUT + 8:
            for sock in attackers:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            status, _, body = request(port, "GET", "/healthz", headers={"Authorization": "Bearer t0ken"},
                                      timeout=5)
            answered.append(status)
            time.sleep(1.5)
        assert answered and all(status == 200 for status in answered), answered
        closed = 0
        for sock in attackers:
            sock.settimeout(0.5)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(attackers), f"{len(attackers) - closed} slow connections still open"
    finally:
        for sock in attackers:
            sock.close()
    assert "HTTP client 127.0.0.1:" in daemon.log()
