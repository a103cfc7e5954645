"""What a hostile publisher, package or handler tried, each case through a real daemon (as root,
with its users and groups) and a real mosquitto: each attempt is answered, bounded or refused, and
the daemon keeps serving."""
from __future__ import annotations

import json
import os
import signal
import time

from tests.helpers import Collector, V5Client, alive, function, make_wheel, publish, rule, wait_until

ECHO = '''
def handler(event, context):
    return {"echo": event, "function": context["functionName"]}
'''

V5 = {"protocol": 5}


def test_a_response_topic_no_one_can_publish_to_is_refused_acknowledged_and_costs_nothing(
        broker, daemon_factory):
    """A wildcard response topic (mosquitto takes it) once left each request unsettled: 100 of
    them filled the broker's in-flight window and the rule answered nothing more."""
    daemon = daemon_factory(
        [function("f", "h.handler", instance={"max": 1})],
        [rule("r", "req", "f", "out", error={"topic": "err", "qos": 1})],
        files={"fn/h.py": ECHO}, hub={"address": broker.address, "clientid": "oef-h1", **V5})
    client = V5Client(broker, ["reply/#", "err", "out"])
    try:
        hostile = ["x/#", "a/+/b", "+", "$SYS/broker/x", "req"]
        for i in range(150):
            client.request("req", json.dumps({"n": i}).encode(), ResponseTopic=hostile[i % len(hostile)],
                           CorrelationData=b"h%d" % i)
        client.request("req", b'{"n": "good"}', ResponseTopic="reply/me", CorrelationData=b"good")
        wait_until(lambda: client.on("reply/me") and len(client.on("err")) == 150, 60,
                   message="the good request's answer and an envelope for each hostile one")
        assert json.loads(client.on("reply/me")[0].payload)["echo"] == {"n": "good"}
        envelopes = [json.loads(m.payload) for m in client.on("err")]
        assert {e["errorType"] for e in envelopes} == {"ResponseRefused"}
        assert any("wildcard" in e["errorMessage"] for e in envelopes)
        assert any("$-topic" in e["errorMessage"] for e in envelopes)
        assert any("subscribes to it" in e["errorMessage"] for e in envelopes)
        log = daemon.log()
        assert "Task exception was never retrieved" not in log and "Traceback" not in log
        assert log.count("ResponseRefused") == 1, "a flood of refusals is one log line, not one per request"
        assert not client.on("out"), "a refused request was run"
    finally:
        client.close()
    # Every one of them was acknowledged: a restart gets nothing back from the broker.
    daemon.stop()
    again = daemon_factory(
        [function("f", "h.handler", instance={"max": 1})],
        [rule("r", "req", "f", "out", error={"topic": "err", "qos": 1})],
        files={"fn/h.py": ECHO}, hub={"address": broker.address, "clientid": "oef-h1", **V5})
    wait_until(lambda: "subscribed" in again.log(), 20)
    watcher = Collector(broker, ["err", "out"])
    try:
        time.sleep(2)
        assert not watcher.messages, "the broker delivered refused requests again"
    finally:
        watcher.close()


def test_a_response_topic_is_bounded_to_what_the_rule_allows(broker, daemon_factory):
    """A requester could once have the daemon answer onto a topic only the daemon may write
    (`ctl/door/1/set`), or onto another rule's input, which ran another function on its payload."""
    daemon = daemon_factory(
        [function("f", "h.handler"), function("g", "h.handler")],
        [rule("open", "adv/echo", "f", "adv/out", error={"topic": "adv/err", "qos": 1}),
         rule("bounded", "api/echo", "f", "api/out", error={"topic": "api/err", "qos": 1},
              response={"topics": ["reply/#"]}),
         rule("other", "ctl/+/+/set", "g", "ctl/out")],
        files={"fn/h.py": ECHO}, hub={"address": broker.address, "clientid": "oef-h2", **V5})
    client = V5Client(broker, ["#"])
    try:
        # Without response.topics: anything but the daemon's own input.
        client.request("adv/echo", b'{"to": "ctl"}', ResponseTopic="ctl/door/1/set", CorrelationData=b"1")
        client.request("adv/echo", b'{"to": "self"}', ResponseTopic="adv/echo", CorrelationData=b"2")
        client.request("adv/echo", b'{"to": "mine"}', ResponseTopic="my/inbox", CorrelationData=b"3")
        # With them: only there.
        client.request("api/echo", b'{"to": "elsewhere"}', ResponseTopic="my/inbox", CorrelationData=b"4")
        client.request("api/echo", b'{"to": "reply"}', ResponseTopic="reply/7", CorrelationData=b"5")
        wait_until(lambda: len(client.on("adv/err")) == 2 and client.on("my/inbox") and client.on("api/err")
                   and client.on("reply/7"), 30, message="two refusals and one answer per rule")
        refused = [json.loads(m.payload) for m in client.on("adv/err") + client.on("api/err")]
        assert {e["errorType"] for e in refused} == {"ResponseRefused"}
        assert sorted(e["packet"]["Message"]["Topic"] for e in refused) == ["adv/echo", "adv/echo", "api/echo"]
        assert any("subscribes to it (ctl/+/+/set)" in e["errorMessage"] for e in refused)
        assert any("none of the rule's response.topics (reply/#)" in e["errorMessage"] for e in refused)
        assert json.loads(client.on("my/inbox")[0].payload)["echo"] == {"to": "mine"}
        assert json.loads(client.on("reply/7")[0].payload)["echo"] == {"to": "reply"}
        assert not client.on("ctl/door/1/set") and not client.on("ctl/out"), \
            "the daemon answered onto a topic the requester named, and another function ran"
        assert len(client.on("adv/echo")) == 3, "the daemon answered into its own input (3 requests)"
    finally:
        client.close()
    assert "ResponseRefused" in daemon.log()


def test_whatever_the_journal_history_holds_the_daemon_starts_and_moves_it_aside(broker, daemon_factory):
    """Valid JSON of the wrong shape in the journal's history once made every start exit with
    a TypeError."""
    daemon = daemon_factory([function("f", "h.handler")], [rule("r", "in", "f", "out")],
                            files={"fn/h.py": ECHO})
    history = os.path.join(daemon.directory, ".openedge-function.inflight.crashes")
    for moved, bad in enumerate(('[1, 2, 3]', '[["not a digest"], [], []]', '{"rows": 1}', None), 1):
        daemon.signal(signal.SIGKILL)   # a crash: the next start reads the history
        daemon.wait()
        if bad is None:
            os.remove(history)
            os.mkdir(history)   # not even a file
        else:
            with open(history, "w") as fh:
                fh.write(bad)
        daemon.start()
        wait_until(lambda: daemon.log().count("moved aside to") >= moved, 20)
        with open(history) as fh:
            assert isinstance(json.load(fh), list)
        assert "no in-flight journal" not in daemon.log()
    kept = [name for name in os.listdir(daemon.directory) if ".crashes.bad-" in name]
    assert kept, "the unusable history was not kept for the operator"
    assert "Traceback" not in daemon.log()


def _inotify_watches(pid: int) -> int:
    """The inotify watches process `pid` holds, in all its inotify instances."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                count += sum(1 for line in fh if line.startswith("inotify wd:"))
        except OSError:
            pass
    return count


def test_links_in_a_code_directory_are_not_followed_by_the_watcher(tmp_path, broker, daemon_factory, collector):
    """Two links to `.` kept the daemon's main thread busy (SIGTERM unanswered for 12 s, another
    function's edit taking 33 s); a link out to a 3,000-directory tree added 3,000 watches."""
    outside = tmp_path / "outside"
    for i in range(3000):
        (outside / f"d{i // 60}" / f"e{i}").mkdir(parents=True)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "h.py").write_text(ECHO)
    os.chmod(hostile, 0o755)
    os.symlink(".", hostile / "loop1")
    os.symlink(".", hostile / "loop2")
    os.symlink(str(outside), hostile / "out")
    os.symlink("/", hostile / "root")
    daemon = daemon_factory([function("hostile", "h.handler", codedir=str(hostile)),
                             function("plain", "h.handler", codedir="plain")],
                            [rule("h", "h/in", "hostile", "h/out"), rule("p", "p/in", "plain", "p/out")],
                            files={"plain/h.py": VERSIONED.format(v=1)})
    assert _inotify_watches(daemon.process.pid) < 50, "links out of the code directory were followed"
    # Another function's edit takes effect at once.
    edited = time.monotonic()
    with open(os.path.join(daemon.directory, "plain", "h.py"), "w") as fh:
        fh.write(VERSIONED.format(v=2))
    publish(broker, "p/in", b"{}")

    def new_code() -> bool:
        answers = [json.loads(m.payload) for m in collector.on("p/out")]
        if answers and answers[-1]["v"] == 1:
            publish(broker, "p/in", b"{}")
        return any(a["v"] == 2 for a in answers)
    wait_until(new_code, 20, interval=0.5, message="the other function's new code")
    assert time.monotonic() - edited < 10
    publish(broker, "h/in", b'{"x": 1}')
    wait_until(lambda: collector.on("h/out"), 20)
    # SIGTERM is answered at once.
    stopped = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert time.monotonic() - stopped < 5


VERSIONED = '''
VERSION = {v}
def handler(event, context):
    return {{"v": VERSION}}
'''


CALLS = '''
import json, os, time
from runtime_python import channel
from runtime_python.sdk import InvokeError

def size(event, context):
    return len(event)

def blob(event, context):
    return "y" * event

def caller(event, context):
    what = event["what"]
    try:
        if what == "big-in":
            return {"got": context.invoke("size", "x" * 100_000)}
        if what == "big-out":
            return {"got": len(context.invoke("blob", 600_000))}
        if what == "over":
            return {"got": context.invoke("size", "x" * (5 << 20))}
        if what == "child":
            started = time.monotonic()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    result = {"got": context.invoke("size", "abc")}
                except InvokeError as exc:
                    result = {"code": exc.code, "message": exc.message}
                os.write(w, json.dumps(result).encode())
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            result = json.loads(os.read(r, 65536))
            result["seconds"] = time.monotonic() - started
            return result
    except InvokeError as exc:
        return {"code": exc.code, "message": exc.message}

def rec(event, context):
    # Calls itself over the raw channel, without the chain and deadline headers the SDK sends.
    with open(os.path.join(event["dir"], "gen-%d" % event["gen"]), "w"):
        pass
    status, headers, body = channel.current().call(
        "rec", json.dumps({"dir": event["dir"], "gen": event["gen"] + 1}).encode(), {}, {}, None)
    return {"gen": event["gen"], "status": status, "below": json.loads(body)}

def parent(event, context):
    return context.invoke("slow", event)

def slow(event, context):
    open(os.path.join(event["dir"], "slow-started"), "w").close()
    time.sleep(15)
    open(os.path.join(event["dir"], "slow-finished"), "w").close()
'''


def test_calls_between_functions_carry_any_size_and_a_forked_child_fails_at_once(
        broker, daemon_factory, collector):
    """A 100 KB event once timed out (the channel cut lines at 16 KB and logged 1.4 MB per call);
    a 600 KB result timed out and broke the channel for the next call; a handler's child waited
    its whole timeout for a reply its parent read."""
    daemon = daemon_factory(
        [function("caller", "calls.caller", instance={"timeout": "20s", "max": 1}),
         function("size", "calls.size"), function("blob", "calls.blob")],
        [rule("c", "c/in", "caller", "c/out")], files={"fn/calls.py": CALLS})

    def call(what: str) -> dict:
        before = len(collector.on("c/out"))
        publish(broker, "c/in", json.dumps({"what": what}).encode())
        return json.loads(wait_until(lambda: collector.on("c/out")[before:], 30,
                                     message=f"the caller's answer to {what}")[0].payload)

    assert call("big-in") == {"got": 100_000}
    assert call("big-out") == {"got": 600_000}
    assert call("big-out") == {"got": 600_000}, "the call after a large result failed"
    assert call("big-in") == {"got": 100_000}
    over = call("over")
    assert over["code"] == "MessageTooLarge" and "bytes" in over["message"], over
    child = call("child")
    assert child["code"] == "NotTheInstance" and child["seconds"] < 5, child
    log = daemon.log()
    assert "unreadable" not in log and len(log) < 1 << 20, "the channel wrote its traffic to the log"
    assert "caller-1: stopped" not in log, "the caller's instance was lost on the way"


def test_the_supervisor_sets_the_call_chain_and_a_calls_children_end_with_it(
        broker, daemon_factory, collector, writable_tmp):
    """A handler that called the channel without the chain and deadline headers recursed past the
    deadlock guard, and generations kept running after its caller gave up."""
    daemon = daemon_factory(
        [function("rec", "calls.rec", instance={"timeout": "8s", "max": 3}),
         function("parent", "calls.parent", instance={"timeout": "2s"}),
         function("slow", "calls.slow", instance={"timeout": "30s"})],
        [rule("r", "r/in", "rec", "r/out", error={"topic": "r/err", "qos": 1}),
         rule("p", "p/in", "parent", "p/out", error={"topic": "p/err", "qos": 1})],
        files={"fn/calls.py": CALLS})
    started = time.monotonic()
    publish(broker, "r/in", json.dumps({"dir": str(writable_tmp), "gen": 1}).encode())
    answer = json.loads(wait_until(lambda: collector.on("r/out") or collector.on("r/err"), 30)[0].payload)
    assert time.monotonic() - started < 6, "the recursion ran into its timeout"
    generations = sorted(name for name in os.listdir(writable_tmp) if name.startswith("gen-"))
    assert generations == ["gen-1", "gen-2", "gen-3"], generations
    # The third generation's call would need a fourth instance its callers hold: refused at once.
    assert answer["below"]["below"]["status"] == 508, answer

    publish(broker, "p/in", json.dumps({"dir": str(writable_tmp)}).encode())
    wait_until(lambda: os.path.exists(writable_tmp / "slow-started"), 20)
    wait_until(lambda: collector.on("p/out") or collector.on("p/err"), 20)
    # The caller has given up: its call is stopped, well before slow's own 30 s.
    wait_until(lambda: "called by parent" in daemon.log() and "outcome FunctionTimeout" in daemon.log(), 10)
    time.sleep(1)
    assert not os.path.exists(writable_tmp / "slow-finished")


BACKEND = '''
import os, signal, time
MARKS = {marks!r}
HOG = {hog!r}

# Runs when pip imports the build backend, as a hostile package's build would.
pid = os.fork()
if pid == 0:   # a double fork: a grandchild in a session of its own, holding pip's output
    os.setsid()
    if os.fork() == 0:
        with open(os.path.join(MARKS, "{name}-orphan.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(300)
    os._exit(0)
os.waitpid(pid, 0)
if HOG:
    open(os.path.join(MARKS, "hog-start"), "w").close()
    block = bytearray(400 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    open(os.path.join(MARKS, "hog-done"), "w").close()
else:
    time.sleep(300)   # a build that never ends

def build_wheel(*args, **kwargs):
    raise RuntimeError("never built")
'''

PYPROJECT = '''
[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
'''


def _orphan(marks, name: str) -> int:
    path = os.path.join(marks, f"{name}-orphan.pid")
    wait_until(lambda: os.path.exists(path) and open(path).read(), 60, message=f"{name}'s grandchild")
    with open(path) as fh:
        return int(fh.read())


def test_what_a_package_runs_at_install_time_is_bounded_and_killed(
        tmp_path, broker, daemon_factory, collector, writable_tmp):
    """A build backend allocated 400 MB under memory: 128m and double-forked a child that outlived
    the daemon; a pip that kept its output open held the one installer thread, and another
    function's install waited behind it."""
    wheels = str(tmp_path / "wheels")
    make_wheel(wheels, "goodpkg", "1.0", "__version__ = '1.0'\n")
    os.chmod(tmp_path / "wheels", 0o755)
    files = {"good/h.py": "import goodpkg\ndef handler(event, context):\n    return goodpkg.__version__\n"}
    for name, hog in (("stuck", False), ("hog", True)):
        files[f"{name}/h.py"] = ECHO
        files[f"{name}/requirements.txt"] = f"./{name}pkg\n"
        files[f"{name}/{name}pkg/pyproject.toml"] = PYPROJECT
        files[f"{name}/{name}pkg/backend.py"] = BACKEND.format(marks=str(writable_tmp), hog=hog, name=name)
    files["good/requirements.txt"] = "goodpkg==1.0\n"
    started = time.monotonic()
    daemon = daemon_factory(
        [function("stuck", "h.handler", codedir="stuck"),
         function("hog", "h.handler", codedir="hog", instance={"memory": "128m"}),
         function("good", "h.handler", codedir="good")],
        [rule(name, f"{name}/in", name, f"{name}/out", error={"topic": f"{name}/err", "qos": 1})
         for name in ("stuck", "hog", "good")],
        files=files, packages={"findlinks": [wheels], "index": False, "timeout": "12s"})
    publish(broker, "good/in", b"{}")
    wait_until(lambda: collector.on("good/out"), 60, message="the good function's answer")
    assert time.monotonic() - started < 11, "an install waited behind another"
    assert json.loads(collector.on("good/out")[0].payload) == "1.0"

    stuck, hog = _orphan(writable_tmp, "stuck"), _orphan(writable_tmp, "hog")
    publish(broker, "hog/in", b"{}")
    envelope = json.loads(wait_until(lambda: collector.on("hog/err"), 60)[0].payload)
    assert envelope["errorType"] == "FunctionLoadError", envelope
    assert os.path.exists(writable_tmp / "hog-start") and not os.path.exists(writable_tmp / "hog-done"), \
        "the build backend used 400 MB under a limit of 128 MB"
    wait_until(lambda: not alive([hog]), 10, message="the hog's grandchild to be killed with its install")

    publish(broker, "stuck/in", b"{}")
    envelope = json.loads(wait_until(lambda: collector.on("stuck/err"), 60)[0].payload)
    assert "did not finish within 12s" in envelope["errorMessage"], envelope
    wait_until(lambda: not alive([stuck]), 10, message="the stuck build's grandchild to be killed")

    # An install that still runs when the daemon stops is killed with everything it started.
    os.remove(writable_tmp / "stuck-orphan.pid")
    with open(os.path.join(daemon.directory, "stuck", "requirements.txt"), "a") as fh:
        fh.write("# again\n")
    again = _orphan(writable_tmp, "stuck")
    daemon.stop()
    wait_until(lambda: not alive([again]), 10, message="the install's grandchild to go with the daemon")


LITTER = '''
import errno, os

def handler(event, context):
    written = {}
    for path in ("/dev/shm", "/tmp", "/var/tmp", "/run/lock"):
        name = os.path.join(path, "litter-%d" % os.getuid())
        try:
            with open(name, "wb") as fh:
                for _ in range(event.get("mb", 1)):
                    fh.write(b"x" * (1 << 20))
            written[path] = os.path.getsize(name)
        except OSError as exc:
            written[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    return {"uid": os.getuid(), "written": written, "tmpdir": os.environ.get("TMPDIR")}
'''


def test_files_outside_the_private_temporary_directory_do_not_outlive_the_function(
        broker, daemon_factory, collector):
    """A handler wrote 60 MB to /dev/shm and exited: the file stayed, owned by its user, unbounded
    by memory: and after the daemon was gone; /tmp, /var/tmp and /run/lock were writable too."""
    daemon = daemon_factory(
        [function("forked", "litter.handler", instance={"memory": "64m", "idletime": "1s"}),
         # A variable the interpreter reads at start: a new interpreter, not a fork of the template.
         function("fresh", "litter.handler", env={"PYTHONHASHSEED": "7"})],
        [rule("f", "forked/in", "forked", "forked/out"), rule("n", "fresh/in", "fresh", "fresh/out")],
        files={"fn/litter.py": LITTER})
    publish(broker, "forked/in", json.dumps({"mb": 1}).encode())
    publish(broker, "fresh/in", json.dumps({"mb": 1}).encode())
    wait_until(lambda: collector.on("forked/out") and collector.on("fresh/out"), 30)
    forked = json.loads(collector.on("forked/out")[0].payload)
    fresh = json.loads(collector.on("fresh/out")[0].payload)
    # The fork's own: never on the machine's /dev/shm or /tmp ...
    assert forked["written"] == {path: 1 << 20 for path in ("/dev/shm", "/tmp", "/var/tmp", "/run/lock")}
    for path in ("/dev/shm", "/tmp", "/var/tmp", "/run/lock"):
        assert not os.path.exists(os.path.join(path, f"litter-{forked['uid']}")), path
    # ... and bounded: 100 MB under 64 MB fills the tmpfs or the memory group, whichever comes first.
    publish(broker, "forked/in", json.dumps({"mb": 100}).encode())
    bounded = json.loads(wait_until(lambda: collector.on("forked/out")[1:], 30)[0].payload)
    assert bounded.get("errorType") == "MemoryLimitExceeded" or bounded["written"]["/dev/shm"] == "ENOSPC", bounded
    log = daemon.log()
    assert "function forked: its instances get /tmp, /var/tmp, /dev/shm and /run/lock of their own" in log
    assert "function fresh: its instances share /tmp, /var/tmp, /dev/shm and /run/lock" in log
    # The new interpreter's litter is on the machine until its last instance stops: here, with
    # the daemon.
    assert fresh["written"]["/dev/shm"] == 1 << 20, fresh
    litter = [os.path.join(path, f"litter-{fresh['uid']}") for path in ("/dev/shm", "/tmp", "/var/tmp")]
    assert all(os.path.exists(path) for path in litter)
    assert daemon.stop() == 0
    assert not any(os.path.exists(path) for path in litter), "what the function's user left is still there"
    assert "removed" in daemon.log() and f"(uid {fresh['uid']})" in daemon.log()
