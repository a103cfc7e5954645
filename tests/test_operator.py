"""The operator's day: the last good code after a bad edit, checks that load what will run, and the
local control socket."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any, Dict, List

import yaml

from tests.helpers import free_port, function, publish, rule, wait_until, write_handler

VERSIONED = """
def handler(event, context):
    return {{"v": {v}, "n": event["n"]}}
"""
BROKEN = "def handler(event, context)\n    return 1\n"


def _get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    return body.decode() if path == "/metrics" else json.loads(body)


def _answers(collector, topic: str) -> List[Dict[str, Any]]:
    return [json.loads(m.payload) for m in collector.on(topic)]


def _ask(broker, collector, n: int, count: int) -> Dict[str, Any]:
    publish(broker, "in", json.dumps({"n": n}))
    wait_until(lambda: len(collector.on("out")) >= count, 30, message=f"answer {count}")
    return _answers(collector, "out")[count - 1]


def test_the_last_good_code_serves_when_its_instance_idles_out_and_after_a_restart(broker, daemon_factory,
                                                                                  collector):
    port = free_port()
    daemon = daemon_factory([function("f", "h.handler", instance={"min": 0, "idletime": "1s"})],
                            [rule("r", "in", "f", "out")], files={"fn/h.py": VERSIONED.format(v=1)},
                            server={"address": f"127.0.0.1:{port}"})
    path = os.path.join(daemon.directory, "fn", "h.py")
    assert _ask(broker, collector, 0, 1) == {"v": 1, "n": 0}
    wait_until(lambda: "as its last good" in daemon.log(), 10, message="the code to be kept")
    kept = _get(port, "/status")["functions"]["f"]["code"]["last_good"]
    assert kept and kept["version"] and os.path.isfile(os.path.join(kept["path"], "h.py")), kept

    write_handler(os.path.dirname(path), "h.py", BROKEN)
    wait_until(lambda: "the new code does not load" in daemon.log(), 20)
    # min 0: the instance that served goes; the next message needs a new one.
    wait_until(lambda: _get(port, "/status")["functions"]["f"]["instances"] == 0, 20,
               message="the old instance to idle out")
    assert _ask(broker, collector, 1, 2) == {"v": 1, "n": 1}, "the last good version answers"
    code = _get(port, "/status")["functions"]["f"]["code"]
    assert code["serving"] == "last good" and "syntax error in h.py, line 1" in code["error"], code
    health = _get(port, "/healthz")
    assert health["status"] == "ok" and any(
        "last good" in w and kept["version"] in w and "syntax error" in w for w in health["warnings"]), health
    assert 'openedge_function_last_good_serving{function="f"} 1.0' in _get(port, "/metrics")

    # A reboot: the daemon starts again on the broken directory.
    daemon.stop()
    before = len(daemon.log())
    daemon.start()
    assert _ask(broker, collector, 2, 3) == {"v": 1, "n": 2}
    restarted = daemon.log()[before:]
    assert "its code does not load (FunctionLoadError: handler h.handler: syntax error in h.py, line 1" \
        in restarted and f"last good version {kept['version']}" in restarted, restarted[-3000:]
    assert _get(port, "/status")["functions"]["f"]["code"]["serving"] == "last good"

    write_handler(os.path.dirname(path), "h.py", VERSIONED.format(v=3))
    wait_until(lambda: "the new code serves" in daemon.log()[before:], 20)
    assert _ask(broker, collector, 3, 4) == {"v": 3, "n": 3}
    assert _get(port, "/healthz")["warnings"] == []
    code = _get(port, "/status")["functions"]["f"]["code"]
    assert code["serving"] == "current" and code["error"] is None
    wait_until(lambda: _get(port, "/status")["functions"]["f"]["code"]["last_good"]["version"]
               != kept["version"], 10, message="the new code to be kept")
    assert 'openedge_function_last_good_serving{function="f"} 0.0' in _get(port, "/metrics")


def test_a_function_that_never_loaded_is_found_at_start_and_says_it_has_no_last_good(broker, daemon_factory,
                                                                                      collector):
    port = free_port()
    daemon = daemon_factory([function("g", "h.handler", instance={"min": 0}),
                             function("ok", "h.handler", codedir="ok", instance={"min": 0})],
                            [rule("r", "in", "g", "out")],
                            files={"fn/h.py": BROKEN, "ok/h.py": VERSIONED.format(v=1)},
                            server={"address": f"127.0.0.1:{port}"})
    # Checked before the broker: known before any message comes.
    log = daemon.log()
    assert log.index("function g: its code does not load") < log.index(": subscribed to "), log
    assert "function ok: its code loads (checked at start)" in log
    assert _get(port, "/healthz")["status"] == "unavailable"
    assert _get(port, "/status")["functions"]["ok"]["instances"] == 0, "the check's instance is gone"
    envelope = _ask(broker, collector, 0, 1)
    assert envelope["errorType"] == "FunctionLoadError", envelope
    health = _get(port, "/healthz")
    assert health["status"] == "unavailable" and any(
        "no last good version" in r and "syntax error in h.py, line 1" in r for r in health["reasons"]), health
    code = _get(port, "/status")["functions"]["g"]["code"]
    assert code["last_good"] is None and code["serving"] == "current"


def test_check_loads_every_function_as_it_will_run_and_names_file_and_line(tmp_path):
    code = {
        "typo/w1.py": "def handler(event, context):\n    return 1\n",
        "syntax/h.py": "import json\nx = (\n",
        "arity/h.py": "\n\ndef handler(event):\n    return 1\n",
        "init/h.py": "import os\ndef init(context):\n    open(os.environ['MARK'], 'w').close()\n"
                     "    raise RuntimeError('never run by a check')\ndef handler(event, context):\n    return 1\n",
        "raises/h.py": "import json\n\nCONFIG = json.loads('{')\ndef handler(event, context):\n    return 1\n",
    }
    for path, source in code.items():
        write_handler(str(tmp_path / os.path.dirname(path)), os.path.basename(path), source)
    mark = tmp_path / "initializer-ran"
    functions = [function("w1", "w1.handlr", codedir="typo"), function("w2", "h.handler", codedir="syntax"),
                 function("w3", "h.handler", codedir="arity"),
                 function("w4", "h.handler", codedir="init", initializer="h.init", env={"MARK": str(mark)}),
                 function("w5", "nomodule.handler", codedir="typo"), function("w6", "h.handler", codedir="raises")]
    config = tmp_path / "application.yml"
    config.write_text(yaml.safe_dump({"hub": {"address": "tcp://127.0.0.1:1"}, "functions": functions,
                                      "rules": []}))
    for directory in [tmp_path] + [tmp_path / d for d in ("typo", "syntax", "arity", "init", "raises")]:
        os.chmod(directory, 0o755)
    checked = subprocess.run([sys.executable, "-m", "openedge_function", "--check", "-c", str(config)],
                             capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert checked.returncode == 2, checked.stdout + checked.stderr
    err = checked.stderr
    assert "functions[0] (w1, code in" in err and \
        "module 'w1' has no attribute 'handlr' (in w1.py; did you mean 'handler'?)" in err, err
    assert "functions[1] (w2" in err and "syntax error in h.py, line 2" in err, err
    assert "functions[2] (w3" in err and "handler h.handler (h.py, line 3): takes (event) but is called " \
        "with (event, context)" in err, err
    assert "functions[3]" not in err and not mark.exists(), "the initializer is not run by a check"
    assert "functions[4] (w5" in err and "no module named 'nomodule'" in err, err
    assert "functions[5] (w6" in err and "JSONDecodeError" in err and 'File "h.py", line 3' in err, err

    for path in ("typo/w1.py", "syntax/h.py", "arity/h.py", "raises/h.py"):
        write_handler(str(tmp_path / os.path.dirname(path)), os.path.basename(path),
                      "def handler(event, context):\n    return 1\n")
    functions[0]["handler"] = functions[4]["handler"] = "w1.handler"
    config.write_text(yaml.safe_dump({"hub": {"address": "tcp://127.0.0.1:1"}, "functions": functions,
                                      "rules": []}))
    checked = subprocess.run([sys.executable, "-m", "openedge_function", "--check", "-c", str(config)],
                             capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert checked.returncode == 0 and "6 functions, 0 rules; every handler loads" in checked.stdout, \
        checked.stderr


def _cli(*args: str, user: bool = False, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "openedge_function", *args]
    if user:   # someone else on the machine
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEDGE_FUNCTION_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, input=stdin,
                          cwd="/")


def test_the_control_socket_serves_status_invoke_reload_and_restart_without_a_server(broker, daemon_factory):
    daemon = daemon_factory([function("f", "h.handler", instance={"min": 1})], [],
                            files={"fn/h.py": VERSIONED.format(v=1)})
    config = daemon.config_path
    found = wait_until(lambda: re.search(r"control socket on (\S+) ", daemon.log()), 20,
                       message="the control socket")
    path = found.group(1)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()

    status = _cli("status", "-c", config)
    assert status.returncode == 0 and "f (event): instances 1" in status.stdout, status.stderr
    invoked = _cli("invoke", "f", "-", "-c", config, stdin='{"n": 5}')
    assert invoked.returncode == 0 and json.loads(invoked.stdout) == {"v": 1, "n": 5}, invoked.stderr
    failed = _cli("invoke", "f", "[]", "-c", config)
    assert failed.returncode == 1 and json.loads(failed.stdout)["errorType"] == "TypeError", failed.stdout

    restarted = _cli("restart", "f", "-c", config)
    assert restarted.returncode == 0 and "new instances" in restarted.stdout, restarted.stderr
    wait_until(lambda: "instance f-2: ready" in daemon.log(), 20, message="the new instance")
    assert _cli("restart", "nosuch", "-c", config).stdout.strip() == "no function named 'nosuch'"

    with open(config) as fh:
        data = yaml.safe_load(fh)
    data["functions"].append(function("g", "h.handler", codedir="fn"))
    with open(config, "w") as fh:
        yaml.safe_dump(data, fh)
    reloaded = _cli("reload", "-c", config)
    assert reloaded.returncode == 0 and "1 added" in reloaded.stdout, reloaded.stdout + reloaded.stderr
    assert json.loads(_cli("invoke", "g", '{"n": 1}', "-c", config).stdout) == {"v": 1, "n": 1}
    data["functions"][1]["instance"] = {"max": "many"}
    with open(config, "w") as fh:
        yaml.safe_dump(data, fh)
    refused = _cli("reload", "-c", config)
    assert refused.returncode == 1 and "functions[1].instance.max" in refused.stdout \
        and "the running one stays" in refused.stdout, refused.stdout + refused.stderr

    # Another user may not open it, and is told where the CLI looked.
    other = _cli("status", "-c", config, user=True)
    assert other.returncode == 1 and f"control socket {path}: [Errno 13] Permission denied" in other.stderr, \
        other.stderr
    assert "no daemon answers for the configuration" in other.stderr and "--socket PATH" in other.stderr

    daemon.stop()
    assert not os.path.exists(path), "the socket goes with the daemon"
    gone = _cli("status", "-c", config)
    assert gone.returncode == 1 and "its HTTP server is off" in gone.stderr and path in gone.stderr, gone.stderr


def test_control_socket_and_group_from_the_configuration(broker, daemon_factory, tmp_path):
    import grp
    path = f"/run/oef-test-{os.getpid()}-{tmp_path.name[-12:]}/control.sock"
    daemon = daemon_factory([function("f", "h.handler")], [], files={"fn/h.py": VERSIONED.format(v=1)},
                            control={"socket": path, "group": "nogroup"})
    wait_until(lambda: os.path.exists(path), 20, message="the configured socket")
    st = os.stat(path)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid, oct(st.st_mode)
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o711
    for how in (["-c", daemon.config_path], ["--socket", path]):
        status = _cli("status", *how)
        assert status.returncode == 0 and "f (event)" in status.stdout, status.stderr
    daemon.stop()
    os.rmdir(os.path.dirname(path))


def test_the_http_server_takes_reload_and_restart_only_behind_its_token(broker, daemon_factory):
    def post(port: int, path: str, token: str = "") -> "tuple[int, Any]":
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except urllib.error.URLError:
            return 0, None   # not listening yet

    guarded, open_port = free_port(), free_port()
    daemon_factory([function("f", "h.handler")], [], files={"fn/h.py": VERSIONED.format(v=1)},
                   server={"address": f"127.0.0.1:{guarded}", "token": "s3cret"})
    daemon_factory([function("f", "h.handler")], [], files={"fn/h.py": VERSIONED.format(v=1)},
                   server={"address": f"127.0.0.1:{open_port}"})
    wait_until(lambda: post(guarded, "/reload", "s3cret")[0] == 200, 20, message="the guarded server")
    code, answer = post(guarded, "/restart/f", "s3cret")
    assert code == 200 and answer["ok"] and "new instances" in answer["message"], answer
    assert post(guarded, "/reload")[0] == 401
    assert post(guarded, "/restart/nosuch", "s3cret") == (409, {"ok": False, "message": "no function named 'nosuch'"})
    wait_until(lambda: post(open_port, "/reload")[0] == 404, 20, message="the open server to refuse")
