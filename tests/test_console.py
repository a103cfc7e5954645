"""The console (/console): its data endpoints (shapes, bounds, the token), and the page itself in
a real browser, headless Debian chromium driven by Playwright, on the example's functions."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

import pytest

from openedge_function.api.history import FAILURES, LOG_FUNCTIONS, LOG_LINES, SAMPLES, Failures, LogTail, Samples
from openedge_function.api.metrics import BOUNDS, Counts, quantile
from openedge_function.errors import HandlerError, PoisonMessage
from tests.helpers import ROOT, Collector, free_port, function, publish, request, rule, wait_until

TOKEN = "console-test-token-5e2b"
BEARER = {"Authorization": f"Bearer {TOKEN}"}

FAILING = """
def handler(event, context):
    print("about to fail on", event)
    raise ValueError("no good: " + str(event))
"""

PRINTING = """
def handler(event, context):
    for i in range(int(event.get("lines", 1))):
        print("line", i, "of", context["functionInvokeID"])
    return {"printed": event.get("lines", 1)}
"""


def get(port: int, path: str, headers: Optional[Dict[str, str]] = None) -> Any:
    status, _, body = request(port, "GET", path, headers=BEARER if headers is None else headers)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def serving(daemon_factory, functions, rules, files, token: str = TOKEN):
    port = free_port()
    server = {"address": f"127.0.0.1:{port}"}
    if token:
        server["token"] = token
    daemon = daemon_factory(functions, rules, files=files, server=server)
    wait_until(lambda: _up(port), 20, message="the HTTP server")
    return daemon, port


def _up(port: int) -> bool:
    try:
        return request(port, "GET", "/healthz", headers=BEARER)[0] in (200, 503)
    except OSError:
        return False


def example_files() -> Dict[str, str]:
    files = {}
    for name in ("sayhi", "echo"):
        with open(os.path.join(ROOT, "example", "functions", name, f"{name}.py")) as fh:
            files[f"example/functions/{name}/{name}.py"] = fh.read()
    return files


EXAMPLE_FUNCTIONS = [function("sayhi", "sayhi.handler", "example/functions/sayhi", instance={"min": 1, "max": 4}),
                     function("echo", "echo.handler", "example/functions/echo", instance={"max": 2})]
EXAMPLE_RULES = [rule("rule-sayhi", "t", "sayhi", "t/hi"),
                 rule("rule-echo", "bin", "echo", "bin/echo", qos=0, out_qos=0)]


# -- the rings -------------------------------------------------------------------------------------

def test_quantiles_come_from_the_buckets_as_histogram_quantile_reads_them():
    counts = Counts()
    assert quantile(0.5, counts.buckets) is None
    for _ in range(98):
        counts.observe("ok", 0.0002)      # in the (0.1 ms, 0.25 ms] bucket
    counts.observe("ValueError", 0.004)   # (2.5 ms, 5 ms]
    counts.observe("FunctionLoadError", None)
    counts.observe("ok", 120.0)           # over the last bound
    assert counts.outcomes == {"ok": 99, "ValueError": 1, "FunctionLoadError": 1} and counts.errors() == 2
    assert sum(counts.buckets) == 100 and counts.buckets[-1] == 1
    assert 0.0001 < quantile(0.5, counts.buckets) <= 0.00025
    assert 0.0025 < quantile(0.99, counts.buckets) <= 0.005
    assert quantile(1.0, counts.buckets) == BOUNDS[-1]


def test_samples_are_bounded_and_read_as_rates():
    counts = Counts()
    samples = Samples({"f": counts, "gone": Counts()})
    for second in range(SAMPLES + 20):
        for _ in range(second % 5):
            counts.observe("ok", 0.001)
        samples.sample(["f", "gone"], now=1000.0 + second)
    points = samples.series("f")
    assert len(points) == SAMPLES - 1 and points[-1]["t"] == 1000.0 + SAMPLES + 19
    assert [p["rate"] for p in points[-5:]] == [float((SAMPLES + 15 + i) % 5) for i in range(5)]
    assert samples.series("f", since=points[-3]["t"]) == points[-2:]
    last = samples.last("f")   # the last minute: 60 seconds of 0+1+2+3+4 every 5 seconds
    assert last["messages"] == 120 and last["errors"] == 0 and 0.5 < last["p50_ms"] <= 1.0
    samples.sample(["f"], now=2000.0)   # a function no longer configured loses its ring
    assert samples.series("gone") == [] and samples.last("gone")["messages"] == 0


def test_failures_and_log_lines_are_bounded():
    failures = Failures()
    for i in range(FAILURES + 3):
        failures.record(HandlerError("ValueError", f"bad {i}", ["  File x\n", "    raise\n"] * 100), "f",
                        f"r{i}", "rule r1", "in", b"\xff" * 10000, 1)
    failures.record(PoisonMessage("delivered 5 times"), "f", "p", "rule r1", "in", b"{}", 1)
    kept = failures.after(0)
    assert len(kept) == FAILURES and kept[-1]["poison"] and not kept[0]["poison"]
    assert kept[0]["packet"]["truncated"] and len(kept[0]["packet"]["base64"]) < 6000
    assert len(kept[0]["stackTrace"]) == 60 and kept[0]["packet"]["size"] == 10000
    assert failures.after(kept[-2]["seq"]) == kept[-1:]

    tail = LogTail()
    logger = logging.getLogger("tests.console.tail")
    logger.propagate = False
    logger.addHandler(tail)
    logger.setLevel(logging.INFO)
    try:
        for i in range(LOG_LINES + 10):
            logger.info("line %d", i, extra={"function": "f", "request_id": f"r{i}"})
        logger.info("untagged: not kept")
        for i in range(LOG_FUNCTIONS + 5):
            logger.info("one", extra={"function": f"g{i}"})
    finally:
        logger.removeHandler(tail)
    lines = tail.after("f", 0, LOG_LINES * 2)
    assert len(lines) == LOG_LINES and lines[-1]["line"] == f"line {LOG_LINES + 9}"
    assert lines[-1]["requestId"] == f"r{LOG_LINES + 9}"
    assert tail.after(f"g{LOG_FUNCTIONS - 2}", 0, 10) and not tail.after(f"g{LOG_FUNCTIONS + 2}", 0, 10)


# -- the data endpoints ------------------------------------------------------------------------------

def test_without_the_token_the_page_and_its_data_are_refused(broker, daemon_factory):
    _, port = serving(daemon_factory, EXAMPLE_FUNCTIONS, EXAMPLE_RULES, example_files())
    status, headers, body = request(port, "GET", "/console")
    assert status == 401 and headers["Content-Type"].startswith("text/html")
    assert b'name="token"' in body and b"console.js" not in body and b"sayhi" not in body
    for path in ("/console/console.js", "/console/api/state", "/console/api/failures",
                 "/console/api/logs?function=sayhi"):
        status, _, body = request(port, "GET", path)
        assert status == 401, path
        assert json.loads(body)["errorType"] == "Unauthorized"
        assert request(port, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
    # A wrong token at the form: refused, no cookie.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, body = request(port, "POST", "/console/login", b"token=guess", form)
    assert status == 401 and "Set-Cookie" not in headers and b"not the server&#x27;s token" in body
    # The right one: a cookie that opens the page and its data, and holds no token.
    status, headers, _ = request(port, "POST", "/console/login", f"token={TOKEN}".encode(), form)
    assert status == 303 and headers["Location"] == "/console"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    jar = {"Cookie": cookie.split(";")[0]}
    status, headers, body = request(port, "GET", "/console", headers=jar)
    assert status == 200 and b"console.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(port, "/console/api/state", jar)["functions"]
    # The invoke API takes the cookie only with the page's own header, which other sites cannot send.
    assert request(port, "POST", "/invoke/sayhi", b'{"a": 1}', jar)[0] == 401
    status, _, body = request(port, "POST", "/invoke/sayhi", b'{"a": 1}', {**jar, "X-Console": "1"})
    assert status == 200 and json.loads(body)["a"] == 1
    # Nor does the cookie stand for the token elsewhere.
    assert request(port, "GET", "/status", headers=jar)[0] == 401
    status, headers, _ = request(port, "GET", "/console/logout", headers=jar)
    assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]


def test_without_a_token_the_console_answers_loopback_names_only(broker, daemon_factory):
    _, port = serving(daemon_factory, EXAMPLE_FUNCTIONS, EXAMPLE_RULES, example_files(), token="")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert request(port, "GET", "/console/api/state", headers={"Host": host})[0] == 200, host
    # A name that resolves to this machine from someone else's page (DNS rebinding): refused.
    assert request(port, "GET", "/console", headers={"Host": f"gateway.example.com:{port}"})[0] == 401
    assert request(port, "GET", "/console/api/state", headers={"Host": "127.0.0.1.nip.io"})[0] == 401


def test_the_state_shows_functions_rules_and_health_with_history(broker, daemon_factory):
    daemon, port = serving(daemon_factory, EXAMPLE_FUNCTIONS, EXAMPLE_RULES, example_files())
    state = get(port, "/console/api/state")
    assert {"time", "version", "pid", "uptime_s", "healthy", "reasons", "warnings", "functions", "rules",
            "health"} <= set(state)
    functions = {f["name"]: f for f in state["functions"]}
    assert set(functions) == {"sayhi", "echo"}
    sayhi = functions["sayhi"]
    for key in ("state", "instances", "min", "max", "user", "code", "packages", "outcomes", "last_minute",
                "series", "limits", "instance_list", "queued"):
        assert key in sayhi, key
    assert sayhi["min"] == 1 and sayhi["max"] == 4 and sayhi["state"] == "idle" and sayhi["packages"] is None
    assert sayhi["code"]["serving"] == "current"
    rules = {r["name"]: r for r in state["rules"]}
    assert rules["rule-sayhi"]["in"] == "t (QoS 1)" and rules["rule-sayhi"]["out"] == "t/hi (QoS 1)"
    assert rules["rule-echo"]["in"] == "bin (QoS 0)" and rules["rule-sayhi"]["function"] == "sayhi"
    assert rules["rule-sayhi"]["paused"] == [] and rules["rule-sayhi"]["connected"] is True
    health = state["health"]
    assert [c["name"] for c in health["connections"]] == ["publisher", "rule rule-sayhi", "rule rule-echo"]
    assert all(c["connected"] for c in health["connections"])
    assert health["daemon"]["rss_mb"] > 5 and health["daemon"]["threads"] >= 2
    assert "control groups" in health["limits"]

    collector = Collector(broker, ["t/hi"])
    try:
        publish(broker, "t", b'{"n": 1}', count=40)
        wait_until(lambda: len(collector.messages) == 40, 20, message="40 answers")
    finally:
        collector.close()

    def minute() -> Dict[str, Any]:
        return {f["name"]: f for f in get(port, "/console/api/state")["functions"]}["sayhi"]["last_minute"]
    wait_until(lambda: minute()["messages"] == 40, 10, message="the last minute to count 40")
    last = minute()
    assert last["errors"] == 0 and 0 < last["p50_ms"] <= last["p99_ms"] < 1000
    state = get(port, "/console/api/state")
    sayhi = {f["name"]: f for f in state["functions"]}["sayhi"]
    assert sayhi["outcomes"] == {"ok": 40}
    series = sayhi["series"]
    assert 1 <= len(series) <= SAMPLES
    assert sum(round(p["rate"] * 1.0) for p in series) >= 30   # about a second per sample
    assert any(p["rate"] > 0 and p["p99_ms"] for p in series)
    # `since` gives the samples after it, so a page fetches each once.
    newest = series[-1]["t"]
    time.sleep(2.5)
    later = {f["name"]: f for f in get(port, f"/console/api/state?since={newest}")["functions"]}["sayhi"]["series"]
    assert 1 <= len(later) <= 4 and all(p["t"] > newest for p in later)
    assert get(port, "/console/api/state?since=nonsense")["functions"]   # a bad value: all of it


def test_failures_are_kept_with_their_trace_and_packet_and_bounded(broker, daemon_factory):
    _, port = serving(daemon_factory, [function("bad", "bad.handler", instance={"max": 1})],
                      [rule("r1", "in", "bad", "out")], {"fn/bad.py": FAILING})
    publish(broker, "in", '{"x": "ünïcode"}'.encode())
    failures = wait_until(lambda: get(port, "/console/api/failures")["failures"], 20, message="a failure")
    [failure] = failures
    assert failure["errorType"] == "ValueError" and failure["function"] == "bad"
    assert "no good" in failure["errorMessage"] and failure["source"] == "rule r1" and failure["topic"] == "in"
    assert not failure["poison"] and failure["requestId"]
    assert any("raise ValueError" in line for line in failure["stackTrace"])
    assert failure["packet"] == {"topic": "in", "qos": 1, "size": len('{"x": "ünïcode"}'.encode()),
                                 "text": '{"x": "ünïcode"}', "truncated": False}
    # A call of the invoke API that fails is there too, binary payload as base64.
    status, _, _ = request(port, "POST", "/invoke/bad", b"\xff\xfe", {**BEARER, "Content-Type": "application/json"})
    assert status >= 400
    newer = wait_until(lambda: get(port, f"/console/api/failures?after={failure['seq']}")["failures"], 10,
                       message="the invoke API's failure")
    assert newer[0]["source"] == "invoke API" and newer[0]["packet"]["base64"] == "//4="
    # Bounded: the last FAILURES.
    publish(broker, "in", b'{"more": 1}', count=FAILURES + 5)
    wait_until(lambda: get(port, "/console/api/failures")["failures"][-1]["seq"] >= FAILURES + 7, 60,
               message="every failure recorded")
    kept = get(port, "/console/api/failures")["failures"]
    assert len(kept) == FAILURES and kept[-1]["seq"] == FAILURES + 7
    assert [f["seq"] for f in kept] == list(range(8, FAILURES + 8))


def test_logs_tail_a_functions_lines_with_request_ids(broker, daemon_factory):
    _, port = serving(daemon_factory, [function("talk", "talk.handler")], [], {"fn/talk.py": PRINTING})
    status, headers, _ = request(port, "POST", "/invoke/talk", b'{"lines": 3}', BEARER)
    assert status == 200
    request_id = headers["X-Request-Id"]

    def lines(query: str = "") -> list:
        return get(port, f"/console/api/logs?function=talk{query}")["lines"]
    wait_until(lambda: len([line for line in lines() if line["line"].startswith("line ")]) == 3, 10,
               message="the three lines")
    printed = [line for line in lines() if line["line"].startswith("line ")]
    assert [line["line"] for line in printed] == [f"line {i} of {request_id}" for i in range(3)]
    assert all(line["requestId"] == request_id and line["level"] == "info" and line["instance"] for line in printed)
    # `after` and `limit`: the newer lines only, the last `limit` of them; the limit is bounded.
    last = lines()[-1]["seq"]
    assert lines(f"&after={last}") == []
    request(port, "POST", "/invoke/talk", b'{"lines": 8}', BEARER)
    wait_until(lambda: len(lines(f"&after={last}")) >= 8, 10, message="eight more lines")
    assert len(lines(f"&after={last}&limit=2")) == 2
    assert len(lines(f"&limit={LOG_LINES * 10}")) <= LOG_LINES
    assert len(lines("&limit=-5")) == 1
    assert get(port, "/console/api/logs?function=nosuch")["lines"] == []


# -- in a real browser -------------------------------------------------------------------------------

def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else "")
    if not found:
        pytest.fail("chromium is not installed (make test installs it: scripts/ensure-chromium.sh)")
    return found


def test_the_console_in_a_browser(broker, daemon_factory, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright comes with the test extra")
    daemon, port = serving(daemon_factory, EXAMPLE_FUNCTIONS, EXAMPLE_RULES, example_files())
    artefacts = os.path.join(ROOT, "var")
    os.makedirs(artefacts, exist_ok=True)
    problems = []   # uncaught errors and console errors of the page's own script
    base = f"http://127.0.0.1:{port}"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
            page.on("console", lambda message: problems.append(f"console: {message.text}")
                    if message.type == "error" and "Failed to load resource" not in message.text else None)
            # Without the token: the login form, nothing of the gateway.
            response = page.goto(f"{base}/console")
            assert response.status == 401
            assert page.locator("#function-list").count() == 0
            assert page.goto(f"{base}/console/api/state").status == 401
            page.goto(f"{base}/console")
            page.fill("#token", "wrong")
            page.click("button[type=submit]")
            assert "not the server" in page.inner_text("#problem")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")

            # The example's functions, rules and health.
            page.wait_for_selector("#function-sayhi[data-state=idle]", timeout=15000)
            assert page.locator("#function-echo").count() == 1
            assert page.inner_text("#rule-table tbody").count("flowing") == 2
            assert page.inner_text("#health-pill") == "healthy"
            assert "publisher: connected" in page.inner_text("#health-body")

            # Invoke from the form: the result, and the time it took.
            page.select_option("#invoke-function", "sayhi")
            page.fill("#invoke-body", '{"name": "browser"}')
            page.click("#invoke-send")
            page.wait_for_selector("#invoke-status.ok", timeout=15000)
            result = json.loads(page.inner_text("#invoke-output"))
            assert result["name"] == "browser" and result["functionName"] == "sayhi"
            assert page.inner_text("#invoke-time").endswith(" ms")

            # Under load, the throughput chart moves.
            publish(broker, "t", b'{"name": "load"}', count=150)
            page.wait_for_function(
                "() => Number(document.querySelector('svg.chart[data-function=sayhi]')"
                ".getAttribute('data-peak-rate')) > 0", timeout=20000)
            wait_until(lambda: "150 messages" in page.inner_text("#function-sayhi")
                       or "151 messages" in page.inner_text("#function-sayhi"), 15,
                       message="the last minute's count on the page")

            # Break the handler (edit and go): its failure appears, with its trace and packet.
            with open(os.path.join(daemon.directory, "example/functions/sayhi/sayhi.py"), "w") as fh:
                fh.write("def handler(event, context):\n    raise ValueError('broken on purpose')\n")

            def failure_shown() -> bool:
                publish(broker, "t", b'{"name": "after the edit"}')
                return page.locator("details.failure[data-type=ValueError]").count() > 0
            wait_until(failure_shown, 30, interval=1.0, message="the failure on the page")
            entry = page.locator("details.failure[data-type=ValueError]").first
            assert "broken on purpose" in entry.inner_text()
            entry.locator("summary").click()
            assert "raise ValueError" in entry.locator("pre.trace").inner_text()
            assert "after the edit" in entry.locator("pre.payload").inner_text()

            # The logs follow: the failure's line is tagged with its request.
            page.select_option("#log-function", "sayhi")
            page.wait_for_function("() => document.querySelector('#log-lines').textContent"
                                   ".includes('broken on purpose')", timeout=15000)
            page.screenshot(path=os.path.join(artefacts, "console.png"), full_page=True)
            # A phone-sized screen: one column, nothing wider than the screen.
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(500)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=os.path.join(artefacts, "console-phone.png"))
        finally:
            browser.close()
    assert problems == []
