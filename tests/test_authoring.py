"""The author's loop: edits that take effect by themselves, per-function packages, another venv's
interpreter, local runs, new functions and --check."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from typing import Any, Dict, List, Optional

import yaml

from tests.helpers import (Collector, free_port, function, make_wheel, publish, rule, wait_until,
                           write_handler)

VERSIONED = """
import time
VERSION = {v}

def handler(event, context):
    time.sleep(0.003)
    return {{"v": VERSION, "n": event["n"]}}
"""

CLI = [sys.executable, "-m", "openedge_function"]


def _edit(path: str, source: str) -> None:
    """Save a file as an editor does: truncate and write in place."""
    write_handler(os.path.dirname(path), os.path.basename(path), source)


def _answers(collector: Collector, topic: str) -> List[Dict[str, Any]]:
    return [json.loads(m.payload) for m in collector.on(topic)]


def _get(port: int, path: str) -> Any:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


# -- code that takes effect by itself ---------------------------------------------------------------

def test_an_edit_under_load_takes_over_with_nothing_lost_or_answered_twice(broker, daemon_factory, collector):
    daemon = daemon_factory([function("f", "h.handler", instance={"max": 3})],
                            [rule("r", "in", "f", "out")], files={"fn/h.py": VERSIONED.format(v=1)})
    sender = Collector(broker, [])
    total, rate = 600, 150.0
    sent_at: List[float] = []
    edited_at: List[float] = []

    def send() -> None:
        start = time.monotonic()
        for n in range(total):
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            sent_at.append(time.monotonic())
            sender.client.publish("in", json.dumps({"n": n}), 1)
            if n == total // 3:
                edited_at.append(time.monotonic())
                _edit(os.path.join(daemon.directory, "fn", "h.py"), VERSIONED.format(v=2))

    thread = threading.Thread(target=send)
    thread.start()
    thread.join(60)
    sender.close()
    wait_until(lambda: len(collector.on("out")) >= total, 60, message=f"{total} answers")
    time.sleep(0.5)   # anything answered twice would arrive now
    answers = _answers(collector, "out")
    assert sorted(a["n"] for a in answers) == list(range(total)), "lost or answered twice"
    versions = {a["n"]: a["v"] for a in answers}
    assert set(versions.values()) == {1, 2}
    # Every message sent two and a half seconds after the edit ran the new code.
    late = [n for n in range(total) if sent_at[n] > edited_at[0] + 2.5]
    assert late and all(versions[n] == 2 for n in late), [n for n in late if versions[n] != 2][:5]
    # Before the edit: the old code only.
    assert all(versions[n] == 1 for n in range(total // 3))
    assert daemon.log().count("starting an instance of the new code") == 1
    took = re.search(r"function f: the new code serves, (\d+) ms after the change", daemon.log())
    assert took and int(took.group(1)) < 2500, daemon.log()[-2000:]


def test_new_code_that_does_not_load_leaves_the_old_code_serving(broker, daemon_factory, collector):
    port = free_port()
    daemon = daemon_factory([function("f", "h.handler")], [rule("r", "in", "f", "out")],
                            files={"fn/h.py": VERSIONED.format(v=1)},
                            server={"address": f"127.0.0.1:{port}"})
    path = os.path.join(daemon.directory, "fn", "h.py")
    publish(broker, "in", json.dumps({"n": 0}))
    wait_until(lambda: len(collector.on("out")) == 1, 20)

    for attempt in (1, 2):   # saved broken twice: logged once
        _edit(path, "def handler(event, context)\n    return 1\n")
        wait_until(lambda: daemon.log().count("does not load") >= 1
                   and daemon.log().count("starting an instance of the new code") >= attempt, 20,
                   message="the broken code to be tried")
        wait_until(lambda: _get(port, "/status")["functions"]["f"]["code"]["replacing"] is False, 20)
    assert daemon.log().count("the new code does not load") == 1
    assert "syntax error in h.py, line 1" in daemon.log()
    health = _get(port, "/healthz")
    assert health["status"] == "ok" and "syntax error" in health["warnings"][0], health
    assert "syntax error" in _get(port, "/status")["functions"]["f"]["code"]["error"]

    publish(broker, "in", json.dumps({"n": 1}))
    wait_until(lambda: len(collector.on("out")) == 2, 20)
    assert _answers(collector, "out")[1] == {"v": 1, "n": 1}, "the old code serves"

    _edit(path, VERSIONED.format(v=2))
    wait_until(lambda: "the new code serves" in daemon.log(), 20)
    publish(broker, "in", json.dumps({"n": 2}))
    wait_until(lambda: len(collector.on("out")) == 3, 20)
    assert _answers(collector, "out")[2] == {"v": 2, "n": 2}
    assert _get(port, "/healthz")["warnings"] == []
    assert _get(port, "/status")["functions"]["f"]["code"]["error"] is None


def test_a_burst_of_writes_is_one_replacement_and_watch_false_turns_it_off(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("f", "h.handler", codedir="f"), function("g", "h.handler", codedir="g", watch=False, instance={"min": 1})],
        [rule("rf", "in/f", "f", "out/f"), rule("rg", "in/g", "g", "out/g")],
        files={"f/h.py": VERSIONED.format(v=1), "g/h.py": VERSIONED.format(v=1)})
    f, g = os.path.join(daemon.directory, "f"), os.path.join(daemon.directory, "g")
    wait_until(lambda: "instance g-1: ready" in daemon.log(), 20)   # g's code is loaded
    # A git pull: many files at once, a new package directory among them.
    os.mkdir(os.path.join(f, "lib"))
    for i in range(30):
        write_handler(os.path.join(f, "lib"), f"m{i}.py", f"X = {i}\n")
    _edit(os.path.join(f, "h.py"), VERSIONED.format(v=2))
    _edit(os.path.join(g, "h.py"), VERSIONED.format(v=2))
    wait_until(lambda: "function f: the new code serves" in daemon.log(), 20)
    time.sleep(1.5)   # a second replacement, if there were one, would have started by now
    assert daemon.log().count("f changed; starting an instance of the new code") == 1, daemon.log()[-3000:]
    assert "g changed" not in daemon.log()
    publish(broker, "in/f", json.dumps({"n": 1}))
    publish(broker, "in/g", json.dumps({"n": 1}))
    wait_until(lambda: collector.on("out/f") and collector.on("out/g"), 20)
    assert _answers(collector, "out/f") == [{"v": 2, "n": 1}]
    assert _answers(collector, "out/g") == [{"v": 1, "n": 1}], "watch: false keeps the running code"


# -- per-function packages --------------------------------------------------------------------------

PACKAGE_REPORT = """
import sys

def handler(event, context):
    import {module}
    return {{"version": getattr({module}, "__version__", None), "file": {module}.__file__}}
"""


def test_requirements_are_installed_for_the_function_alone_once_and_cached(broker, daemon_factory, collector):
    """From the package index: a small pure-Python package, and a pin of the daemon's own PyYAML
    that the function's import must honour."""
    files = {"fn/h.py": """
        import tabulate
        import yaml

        def handler(event, context):
            return {"tabulate": tabulate.__version__, "file": tabulate.__file__, "yaml": yaml.__version__}
        """,
             "fn/requirements.txt": "tabulate==0.9.0\nPyYAML==6.0.1\n",
             "other/h.py": PACKAGE_REPORT.format(module="tabulate")}
    functions = [function("f", "h.handler"), function("other", "h.handler", codedir="other")]
    rules = [rule("r", "in", "f", "out"), rule("ro", "in/other", "other", "out/other", error={"topic": "err/other"})]
    started = time.monotonic()
    daemon = daemon_factory(functions, rules, files=files)
    publish(broker, "in", "{}")
    publish(broker, "in/other", "{}")
    wait_until(lambda: collector.on("out") and collector.on("err/other"), 300, message="answers")
    first = time.monotonic() - started
    answer = _answers(collector, "out")[0]
    cache = os.path.join(daemon.directory, ".openedge-function", "packages")
    assert answer["tabulate"] == "0.9.0" and answer["file"].startswith(cache), answer
    assert answer["yaml"] == "6.0.1", "the function's pin loses to the daemon's PyYAML"
    other = _answers(collector, "err/other")[0]
    assert other["errorType"] == "ModuleNotFoundError", "another function sees the packages"
    assert daemon.log().count("installing") == 1

    daemon.stop()
    log_before = len(daemon.log())
    started = time.monotonic()
    daemon.start()
    publish(broker, "in", "{}")
    wait_until(lambda: len(collector.on("out")) == 2, 60)
    again = time.monotonic() - started
    assert "installing" not in daemon.log()[log_before:], "a restart installs again"
    assert _answers(collector, "out")[1]["tabulate"] == "0.9.0"
    print(f"first start with install: {first:.1f}s; restart from the cache: {again:.1f}s")


def test_an_offline_wheel_directory_and_a_failed_install(tmp_path, broker, daemon_factory, collector):
    wheels = str(tmp_path / "wheels")
    make_wheel(wheels, "offlinepkg", "1.0", "__version__ = '1.0'\n")
    os.chmod(tmp_path / "wheels", 0o755)
    files = {"a/h.py": PACKAGE_REPORT.format(module="offlinepkg"), "a/requirements.txt": "offlinepkg==1.0\n",
             "b/h.py": PACKAGE_REPORT.format(module="offlinepkg"), "b/requirements.txt": "offlinepkg==2.0\n"}
    daemon = daemon_factory(
        [function("a", "h.handler", codedir="a"), function("b", "h.handler", codedir="b")],
        [rule("ra", "in/a", "a", "out/a"), rule("rb", "in/b", "b", "out/b", error={"topic": "err/b"})],
        files=files, packages={"findlinks": [wheels], "index": False})
    publish(broker, "in/b", "{}")
    publish(broker, "in/a", "{}")
    wait_until(lambda: collector.on("out/a") and collector.on("err/b"), 120, message="answers")
    assert _answers(collector, "out/a")[0]["version"] == "1.0"
    envelope = _answers(collector, "err/b")[0]
    assert envelope["errorType"] == "FunctionLoadError"
    assert "requirements.txt of function b does not install: ERROR:" in envelope["errorMessage"], envelope
    assert "offlinepkg==2.0" in envelope["errorMessage"]
    # The file fixed: the function works, with nothing restarted.
    write_handler(os.path.join(daemon.directory, "b"), "requirements.txt", "offlinepkg==1.0\n")
    wait_until(lambda: "function b: the new code serves" in daemon.log(), 120)
    publish(broker, "in/b", "{}")
    wait_until(lambda: collector.on("out/b"), 30)
    assert _answers(collector, "out/b")[0]["version"] == "1.0"


# -- another venv's interpreter ----------------------------------------------------------------------

def _venv(path: str, site: Optional[str] = None) -> str:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    python = os.path.join(path, "bin", "python")
    packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    if site is not None:   # the runtime's packages, from the daemon's venv
        with open(os.path.join(packages, "runtime.pth"), "w") as fh:
            fh.write(site + "\n")
    with open(os.path.join(packages, "onlyhere.py"), "w") as fh:
        fh.write(f"MARK = {os.path.basename(path)!r}\n")
    return python


def test_python_of_another_venv_is_honoured_and_what_it_lacks_is_named(tmp_path, broker, daemon_factory, collector):
    good = _venv(str(tmp_path / "good"), sysconfig.get_paths()["purelib"])
    bare = _venv(str(tmp_path / "bare"))
    files = {"fn/h.py": """
        import sys
        import onlyhere

        def handler(event, context):
            return {"mark": onlyhere.MARK, "prefix": sys.prefix}
        """}
    daemon_factory(
        [function("good", "h.handler", python=good), function("bare", "h.handler", python=bare)],
        [rule("rg", "in/good", "good", "out/good"), rule("rb", "in/bare", "bare", "out/bare", error={"topic": "err/bare"})],
        files=files)
    publish(broker, "in/good", "{}")
    publish(broker, "in/bare", "{}")
    wait_until(lambda: collector.on("out/good") and collector.on("err/bare"), 60, message="answers")
    assert _answers(collector, "out/good")[0] == {"mark": "good", "prefix": str(tmp_path / "good")}
    envelope = _answers(collector, "err/bare")[0]
    assert envelope["errorType"] == "FunctionLoadError"
    assert "lacks protobuf, which the runtime needs" in envelope["errorMessage"], envelope


# -- local runs and new functions ---------------------------------------------------------------------

def test_new_writes_a_function_that_runs_locally_and_loads(tmp_path):
    os.chmod(tmp_path, 0o755)
    made = subprocess.run(CLI + ["new", "hello", "-c", "application.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "functions" / "hello" / "hello.py").exists()
    os.chmod(tmp_path / "functions", 0o755)
    os.chmod(tmp_path / "functions" / "hello", 0o755)
    check = subprocess.run(CLI + ["--check", "-c", "application.yml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "1 functions, 1 rules" in check.stdout, check.stderr
    ran = subprocess.run(CLI + ["run", "functions/hello", '{"name": "edge"}'], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {"hello": "edge", "function": "hello", "topic": "local"}
    assert "outcome ok" in ran.stderr   # the execution summary

    # A second one goes into the existing file, whose comments stay.
    config = tmp_path / "application.yml"
    config.write_text("# my gateway\n" + config.read_text().replace("functions:", "functions:  # mine"))
    made = subprocess.run(CLI + ["new", "second", "-c", "application.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    text = config.read_text()
    assert text.startswith("# my gateway\n") and "functions:  # mine" in text
    check = subprocess.run(CLI + ["--check", "-c", "application.yml"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert "2 functions, 2 rules" in check.stdout, check.stderr
    again = subprocess.run(CLI + ["new", "second", "-c", "application.yml"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists already" in again.stderr


def test_run_takes_the_configured_settings_and_prints_envelopes(tmp_path):
    os.chmod(tmp_path, 0o755)
    write_handler(str(tmp_path / "fn"), "h.py", """
        import time
        STATE = {}

        def init(context):
            STATE["greeting"] = "set up"

        def handler(event, context):
            if isinstance(event, bytes):
                return event[::-1]
            if event.get("sleep"):
                time.sleep(event["sleep"])
            if event.get("fail"):
                raise KeyError("missing")
            return {"greeting": STATE.get("greeting"), "timeout": context.getRunningTimeInSeconds()}
        """)
    os.chmod(tmp_path / "fn", 0o755)
    (tmp_path / "app.yml").write_text(json.dumps({
        "hub": {"address": "tcp://127.0.0.1:1"},
        "functions": [{"name": "f", "handler": "h.handler", "codedir": "fn", "initializer": "h.init",
                       "instance": {"timeout": "1s"}}]}))

    def run(*args: str, stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + ["run", *args], cwd=tmp_path, capture_output=True, timeout=60, input=stdin)

    ok = run("f", "-c", "app.yml", "{}")
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"greeting": "set up", "timeout": 1}, ok.stderr
    slow = run("f", "-c", "app.yml", '{"sleep": 3}')
    assert slow.returncode == 1 and json.loads(slow.stdout)["errorType"] == "FunctionTimeout"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "h.py").write_text("def handler(event, context)\n")
    os.chmod(tmp_path / "broken", 0o755)
    broken = run("broken", "{}")   # one event, one try: nothing speaks of a next one
    assert broken.returncode == 1 and json.loads(broken.stdout)["errorType"] == "FunctionLoadError"
    assert b"next try" not in broken.stdout + broken.stderr, broken.stderr
    failed = run("fn", "{\"fail\": true}")   # by directory: the handler found, no initializer
    envelope = json.loads(failed.stdout)
    assert failed.returncode == 1 and envelope["errorType"] == "KeyError"
    assert base64.b64decode(envelope["packet"]["Message"]["Payload"]) == b'{"fail": true}'
    raw = run("fn", "-", stdin=b"\x00\x01binary")
    assert raw.returncode == 0 and raw.stdout == b"yranib\x01\x00"


def test_help_lists_the_commands_and_check_reports_every_error(tmp_path):
    helped = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=60)
    for command in ("run DIR", "new NAME", "invoke NAME", "status"):
        assert command in helped.stdout
    (tmp_path / "bad.yml").write_text(
        "hub: {keepalive: banana}\n"
        "functions:\n  - {name: f, handler: h.handler, codedir: nowhere, instance: {max: 0, colour: red}}\n"
        "rules:\n  - {id: r, subscribe: {topic: t, qos: 7}, compute: {function: f}}\n"
        "  - {id: s, subscribe: {topic: t}, compute: {function: ghost}}\n")
    checked = subprocess.run(CLI + ["--check", "-c", str(tmp_path / "bad.yml")], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 2
    lines = checked.stderr.strip().splitlines()
    for field in ("hub.keepalive", "functions[0].codedir", "functions[0].instance.max",
                  "functions[0].instance.colour", "rules[0].subscribe.qos", "rules[1].compute.function"):
        assert sum(field + ":" in line for line in lines) == 1, (field, lines)
    assert len(lines) == 6, lines


def test_reload_counts_added_functions(broker, daemon_factory):
    daemon = daemon_factory([function("f", "h.handler")], [rule("r", "in", "f", "out")],
                            files={"fn/h.py": VERSIONED.format(v=1)})
    with open(daemon.config_path) as fh:
        config = yaml.safe_load(fh)
    config["functions"].append(function("g", "h.handler"))
    with open(daemon.config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), 20)
    assert "functions: 1 added, 0 replaced, 0 removed" in daemon.log()



# -- one layout -----------------------------------------------------------------------------------

def test_every_command_takes_the_same_default_configuration(tmp_path):
    """$OPENEDGE_FUNCTION_CONFIG (else /etc/openedge-function/application.yml, else application.yml
    here) is what the daemon, new, run, status and invoke read; --help says so."""
    os.chmod(tmp_path, 0o755)
    config = tmp_path / "gateway" / "application.yml"
    config.parent.mkdir()
    env = {**os.environ, "OPENEDGE_FUNCTION_CONFIG": str(config)}
    for command in ([], ["new"], ["run"]):
        helped = subprocess.run(CLI + command + ["--help"], capture_output=True, text=True, env=env, timeout=60)
        text = "".join(helped.stdout.split())   # argparse wraps lines, at hyphens too
        assert "/etc/openedge-function/application.yml" in text, helped.stdout
        assert f"here:{config}" in text, helped.stdout
    work = tmp_path / "state"
    work.mkdir()
    made = subprocess.run(CLI + ["new", "hello", "-w", str(work)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (work / "functions" / "hello" / "hello.py").exists()
    assert "codedir: functions/hello\n" in config.read_text()   # resolves against the workdir
    for path in (work, work / "functions", work / "functions" / "hello"):
        os.chmod(path, 0o755)
    check = subprocess.run(CLI + ["--check", "-w", str(work)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "1 functions, 1 rules" in check.stdout, check.stderr
    ran = subprocess.run(CLI + ["run", "hello", '{"name": "edge"}', "-w", str(work)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["hello"] == "edge"


def test_status_and_invoke_find_the_server_in_the_configuration(tmp_path, broker, daemon_factory):
    port = free_port()
    write_handler(str(tmp_path / "fn"), "h.py", "def handler(event, context):\n    return {'got': event}\n")
    daemon = daemon_factory(rules=[], functions=[function("f", "h.handler", str(tmp_path / "fn"))],
                            server={"address": f"127.0.0.1:{port}", "token": "s3cret"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEDGE_FUNCTION_")}
    env["OPENEDGE_FUNCTION_CONFIG"] = daemon.config_path
    wait_until(lambda: subprocess.run(CLI + ["status"], env=env, capture_output=True, timeout=60).returncode == 0,
               timeout=30)
    status = subprocess.run(CLI + ["status"], env=env, capture_output=True, text=True, timeout=60)
    assert "healthy" in status.stdout and "f (event)" in status.stdout, status.stdout + status.stderr
    invoked = subprocess.run(CLI + ["invoke", "f", '{"a": 1}'], env=env, capture_output=True, text=True,
                             timeout=60)
    assert invoked.returncode == 0 and json.loads(invoked.stdout) == {"got": {"a": 1}}, invoked.stderr
    wrong = subprocess.run(CLI + ["status", "--token", "nope"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 1 and "Unauthorized" in wrong.stderr + wrong.stdout
    # Pipe-safe: a reader that is gone (`status | head`) ends the command quietly.
    piped = subprocess.Popen(CLI + ["status"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piped.stdout.close()
    errors = piped.stderr.read().decode()
    assert piped.wait(60) in (0, 141) and "Traceback" not in errors and "BrokenPipe" not in errors, errors


def test_a_server_listening_everywhere_is_reached_on_loopback(tmp_path):
    from openedge_function.cli import _server_of
    config = tmp_path / "application.yml"
    config.write_text("server: {address: '0.0.0.0:8123', token: t}\n")
    assert _server_of(str(config)) == ("127.0.0.1:8123", "t")
    config.write_text("server: {address: 'http://[::]:8124/', token: t2}\n")
    assert _server_of(str(config)) == ("127.0.0.1:8124", "t2")
    config.write_text("server: {address: '127.0.0.1:8125'}\n")
    assert _server_of(str(config)) == ("127.0.0.1:8125", None)
    config.write_text("server: {address: '0.0.0.0:8126'}\n")   # the daemon refuses it: no token
    assert _server_of(str(config)) == (None, None)
    assert _server_of(str(tmp_path / "missing.yml")) == (None, None)


def test_status_with_no_daemon_says_where_it_looked_and_what_to_do(tmp_path):
    """`status` and `invoke` once said only "Connection refused", nothing of the server being off."""
    config = tmp_path / "application.yml"
    config.write_text("functions: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEDGE_FUNCTION_")}
    for path, words in ((config, "(its HTTP server is off: no server: section)"),
                        (tmp_path / "none.yml", "(which does not exist)")):
        for command in (["status"], ["invoke", "f", "{}"], ["reload"], ["restart", "f"]):
            done = subprocess.run(CLI + command + ["-c", str(path)], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 1, done.stdout + done.stderr
            assert f"no daemon answers for the configuration {path} {words}" in done.stderr, done.stderr
            assert "control socket /run/openedge-function-control/" in done.stderr and \
                "No such file or directory" in done.stderr, done.stderr
            assert "-c CONFIG, --socket PATH or --address HOST:PORT" in done.stderr, done.stderr
