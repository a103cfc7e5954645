"""The gateway's side of the VM tests: run inside a Debian 12 guest (systemd as PID 1, cgroup v2)
by the installed package's own interpreter, as root. The package was installed as an operator
would; each check below writes {"name", "ok", "detail"} to /share/results.json as it ends.

The host (tests/test_vm.py) reads the results; for the check from outside it is asked through
/share/state: `outside.ready` from here, `outside.json` back.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import zipfile
from typing import Any, Callable, Dict, List

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

SHARE = "/share"
CONFIG = "/etc/openedge-function/application.yml"
STATE = "/var/lib/openedge-function"
SERVICE = "openedge-function.service"
RESULTS: List[Dict[str, Any]] = []

SLOW = '''
import time
def handler(event, context):
    time.sleep(1)
    return {"n": event["n"]}
'''


PINNED = """
import tinypkg
def handler(event, context):
    return {"tinypkg": tinypkg.VALUE}
"""


def offline_wheel(directory: str) -> None:
    """tinypkg 1.0 as a wheel file (the guest has no index to reach), for requirements.txt."""
    os.makedirs(directory, exist_ok=True)
    dist = "tinypkg-1.0.dist-info"
    files = {"tinypkg.py": b"VALUE = 'from the wheel'\n",
             f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: vm\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{dist}/RECORD,,"]
    with zipfile.ZipFile(os.path.join(directory, "tinypkg-1.0-py3-none-any.whl"), "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], None]]:
    """Run the decorated function now as check `name`: its return value is the detail; an
    exception fails it."""
    def run(body: Callable[[], str]) -> Callable[[], None]:
        started = time.monotonic()
        try:
            detail, ok = body(), True
        except Exception as exc:
            journal = sh("journalctl", "-u", SERVICE, "-n", "25", "--no-pager", "-o", "cat", check=False)
            detail, ok = (f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}\n"
                          f"the service's last lines:\n{journal}"), False
        RESULTS.append({"name": name, "ok": ok, "detail": detail,
                        "seconds": round(time.monotonic() - started, 1)})
        with open(os.path.join(SHARE, "results.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1)
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return body
    return run


def sh(*command: str, check: bool = True, timeout: float = 300) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"waited {timeout:g}s for {what}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Mqtt:
    """A client of the guest's mosquitto: publishes, and keeps what arrives on its topics."""

    def __init__(self, topics: List[str]) -> None:
        self.got: List[Any] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"vm-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        expect(ready.wait(30), "no subscription")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.got.append((message.topic, json.loads(message.payload)))

    def on(self, topic: str) -> List[Any]:
        with self._lock:
            return [payload for t, payload in self.got if t == topic]

    def ask(self, topic: str, answer_topic: str, event: Any, timeout: float = 120) -> Any:
        before = len(self.on(answer_topic))
        self.client.publish(topic, json.dumps(event), 1).wait_for_publish(30)
        return wait_for(lambda: self.on(answer_topic)[before:], timeout, f"an answer on {answer_topic}")[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def logged(text: str, since: float, timeout: float = 240) -> str:
    """Wait until the service's journal has a line with `text`, written after `since` (epoch)."""
    def find() -> str:
        lines = sh("journalctl", "-u", SERVICE, "--since", f"@{int(since)}", "-o", "cat", "--no-pager",
                   check=False).splitlines()
        return next((line for line in lines if text in line), "")
    return wait_for(find, timeout, f"{text!r} in the journal")


def invoke(function: str) -> Any:
    """The result of `openedge-function invoke FUNCTION` once the service's server answers it."""
    def attempt() -> Any:
        done = subprocess.run(["openedge-function", "invoke", function], capture_output=True, text=True,
                              timeout=300)
        return json.loads(done.stdout) if done.returncode == 0 else None
    return wait_for(attempt, 240, f"openedge-function invoke {function}")


def main_pid() -> int:
    return int(sh("systemctl", "show", "-p", "MainPID", "--value", SERVICE).strip())


def service_group() -> str:
    return "/sys/fs/cgroup" + sh("systemctl", "show", "-p", "ControlGroup", "--value", SERVICE).strip()


def configure() -> None:
    """The probe, a slow function, their rules and the HTTP server, added to the configuration."""
    with open(os.path.join(SHARE, "probe.py")) as fh:   # tests/probe_handler.py, as the host runs it
        probe = fh.read()
    for name, source in (("probe", probe), ("slow", SLOW), ("pinned", PINNED)):
        os.makedirs(f"{STATE}/functions/{name}", exist_ok=True)
        with open(f"{STATE}/functions/{name}/{name}.py", "w") as fh:
            fh.write(source)
    offline_wheel(f"{STATE}/functions/pinned/wheels")
    with open(f"{STATE}/functions/pinned/requirements.txt", "w") as fh:
        fh.write("--no-index\n--find-links wheels\ntinypkg==1.0\n")
    with open(CONFIG) as fh:
        config = yaml.safe_load(fh)
    config["functions"] += [
        {"name": "probe", "handler": "probe.handler", "codedir": "functions/probe",
         "instance": {"max": 1, "timeout": "60s", "memory": "64m", "cpu": {"cpus": 0.2}}},
        {"name": "slow", "handler": "slow.handler", "codedir": "functions/slow", "instance": {"max": 1}},
        {"name": "pinned", "handler": "pinned.handler", "codedir": "functions/pinned"},
    ]
    config["rules"] += [
        {"id": "rule-probe", "subscribe": {"topic": "probe/in", "qos": 1}, "compute": {"function": "probe"},
         "publish": {"topic": "probe/out", "qos": 1}, "error": {"topic": "probe/out", "qos": 1}},
        {"id": "rule-slow", "subscribe": {"topic": "slow/in", "qos": 1}, "compute": {"function": "slow"},
         "publish": {"topic": "slow/out", "qos": 1}},
    ]
    config["server"] = {"address": "127.0.0.1:8080"}
    with open(CONFIG, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)


def main() -> int:
    packages = sorted(os.listdir(os.path.join(SHARE, "pkg")))
    previous = next(p for p in packages if "~" in p)
    current = next(p for p in packages if "~" not in p)

    @check("install: the package installs, enabling and starting nothing")
    def _() -> str:
        sh("dpkg", "-i", os.path.join(SHARE, "pkg", previous))
        enabled = sh("systemctl", "is-enabled", SERVICE, check=False).strip()
        active = sh("systemctl", "is-active", SERVICE, check=False).strip()
        expect(enabled == "disabled" and active == "inactive", f"{enabled}, {active}")
        mode = oct(os.stat(CONFIG).st_mode & 0o777)
        expect(mode == "0o600", f"the configuration is {mode}")
        expect(os.path.isdir(f"{STATE}/functions"), "no functions directory")
        expect(CONFIG in sh("dpkg-query", "--control-show", "openedge-function", "conffiles"), "not a conffile")
        return f"{previous}: {enabled}, {active}; {CONFIG} {mode}, a conffile"

    @check("layout: new puts the code where the service finds it")
    def _() -> str:
        out = sh("openedge-function", "new", "hello")
        expect(os.path.isfile(f"{STATE}/functions/hello/hello.py"), out)
        with open(CONFIG) as fh:
            text = fh.read()
        expect("codedir: functions/hello" in text, text)
        checked = sh("openedge-function", "--check")
        expect("1 functions, 1 rules" in checked, checked)
        ran = json.loads(sh("openedge-function", "run", "hello", '{"name": "vm"}'))
        expect(ran["hello"] == "vm", ran)
        return f"{STATE}/functions/hello, codedir functions/hello; --check: {checked.strip()}; run: {ran}"

    configure()
    client = Mqtt(["hello/out", "probe/out", "slow/out", "hello2/out"])
    started = time.time() - 1
    sh("systemctl", "enable", "--now", SERVICE)
    groups = logged("control groups", started)   # what the daemon says of its cgroups
    for rule in ("hello", "probe", "slow"):   # their first messages must find the subscription
        logged(f"rule rule-{rule}: subscribed to {rule}/in", started)

    @check("service: a message in, a result out, through the guest's mosquitto")
    def _() -> str:
        answer = client.ask("hello/in", "hello/out", {"name": "gateway"}, timeout=180)
        expect(answer["hello"] == "gateway", answer)
        status = sh("openedge-function", "status")
        expect("healthy" in status, status)
        control = "/run/openedge-function/control.sock"
        mode = os.stat(control).st_mode
        expect(stat.S_ISSOCK(mode) and mode & 0o777 == 0o600, f"{control}: {oct(mode)}")
        # The control socket answers without the HTTP server.
        direct = sh("openedge-function", "status", "--socket", control)
        expect("healthy" in direct, direct)
        return f"{answer}; status: {status.splitlines()[0]}; {control} 0600"

    @check("service: a message from outside the machine, through QEMU's forwarded port")
    def _() -> str:
        os.makedirs(f"{SHARE}/state", exist_ok=True)
        open(f"{SHARE}/state/outside.ready", "w").close()
        path = f"{SHARE}/state/outside.json"
        wait_for(lambda: os.path.exists(path), 180, "the host's check")
        with open(path) as fh:
            seen = json.load(fh)
        expect(seen.get("hello") == "outside", seen)
        return f"the host got {seen}"

    @check("cgroup v2: the daemon lives in a leaf of its own, instances in groups of their own")
    def _() -> str:
        group = service_group()
        expect(os.getxattr(group, "trusted.delegate") == b"1", "not delegated")
        with open(f"/proc/{main_pid()}/cgroup") as fh:
            own = fh.read().strip()
        expect(own.endswith("/openedge-function.service/supervisor"), f"{own}; the daemon said: {groups}")
        with open(os.path.join(group, "cgroup.procs")) as fh:
            internal = fh.read().split()
        expect(internal == [], f"processes in the service's own group: {internal}")
        probe = client.ask("probe/in", "probe/out", {"try": "cgroup"})["result"]
        expect(re.search(r"/openedge-function\.service/instances/probe-\d+\.\d+$", probe), probe)
        return f"daemon {own}; an instance in {probe}"

    @check("cgroup v2: memory.max stops an allocation with MemoryLimitExceeded and its peak")
    def _() -> str:
        envelope = client.ask("probe/in", "probe/out", {"try": "allocate", "arg": 1 << 30})
        expect(envelope.get("errorType") == "MemoryLimitExceeded", envelope)
        used = int(envelope["errorMessage"].split(" used ")[1].split(" MB")[0])
        expect(used <= 64, envelope["errorMessage"])
        return envelope["errorMessage"]

    @check("cgroup v2: pids.max stops a fork bomb")
    def _() -> str:
        spawned = client.ask("probe/in", "probe/out", {"try": "spawn", "arg": 500})["result"]
        expect(spawned.get("error") == "BlockingIOError" and spawned["started"] < 100, spawned)
        return f"{spawned}"

    @check("cgroup v2: cpu.max caps a spinner at instance.cpu.cpus")
    def _() -> str:
        spun = client.ask("probe/in", "probe/out", {"try": "spin", "arg": 4})["result"]
        share = spun["cpu"] / spun["wall"]
        expect(share < 0.35, f"{share:.2f} of a CPU under a quota of 0.2")
        return f"{spun['cpu']:.2f}s of CPU in {spun['wall']:.2f}s: {share:.2f} of a CPU (quota 0.2)"

    @check("cgroup v2: a child that left its process group dies with its instance (cgroup.kill)")
    def _() -> str:
        child = client.ask("probe/in", "probe/out", {"try": "runaway"})["result"]
        expect(child["pgid"] != child["mine"] and os.path.exists(f"/proc/{child['pid']}"), child)
        expect("/openedge-function.service/instances/" in child["cgroup"], f"not in an instance's group: {child}")
        crashed = client.ask("probe/in", "probe/out", {"try": "crash"})
        expect(crashed.get("errorType") == "InstanceCrashed", crashed)
        wait_for(lambda: not os.path.exists(f"/proc/{child['pid']}"), 60, f"pid {child['pid']} to go")
        return f"pid {child['pid']} (its own process group) was gone once {crashed['errorType']}"

    @check("temporary directories: shared under the unit, and what a function leaves there goes with it")
    def _() -> str:
        line = logged("function probe: its instances", 0)
        # The unit keeps CAP_SYS_ADMIN out: no mount namespace per instance. /tmp is the service's
        # (PrivateTmp); /dev/shm is the machine's, so the daemon removes what the probe left.
        expect("share /tmp" in line and "removed when its last instance stops" in line, line)
        written = client.ask("probe/in", "probe/out", {"try": "write", "arg": "/dev/shm/litter"})
        expect(written["done"] and os.path.exists("/dev/shm/litter"), f"{written}: not in /dev/shm")
        since = time.time() - 1
        sh("systemctl", "restart", SERVICE)
        removed = logged("function probe: removed", since)
        expect(not os.path.exists("/dev/shm/litter"), "/dev/shm/litter outlived the service")
        logged("rule rule-probe: subscribed", since)
        return f"{line}; at the restart: {removed}"

    @check("console: the package serves the page; it shows cgroup v2 and a failure")
    def _() -> str:
        def get(path: str) -> bytes:
            with urllib.request.urlopen(f"http://127.0.0.1:8080{path}", timeout=30) as response:
                return response.read()
        page = get("/console")
        expect(b"/console/console.js" in page, page[:200])
        expect(b"function drawFunctions" in get("/console/console.js"), "no script")
        state = json.loads(get("/console/api/state"))
        names = [f["name"] for f in state["functions"]]
        expect("probe" in names and "hello" in names, names)
        expect("cgroup v2" in state["health"]["limits"], state["health"]["limits"])
        # The service restarted above (what it keeps of the past is in memory): a failure now.
        crashed = client.ask("probe/in", "probe/out", {"try": "crash"})
        expect(crashed.get("errorType") == "InstanceCrashed", crashed)
        failures = json.loads(get("/console/api/failures"))["failures"]
        seen = [f for f in failures if f["requestId"] == crashed["requestId"]]
        expect(seen and seen[0]["errorType"] == "InstanceCrashed" and seen[0]["topic"] == "probe/in", failures)
        return (f"functions {names}; limits: {state['health']['limits']}; the crash: "
                f"{seen[0]['errorMessage']}")

    @check("systemctl reload is a SIGHUP reload")
    def _() -> str:
        before = main_pid()
        with open(CONFIG) as fh:
            config = yaml.safe_load(fh)
        config["rules"].append({"id": "rule-hello2", "subscribe": {"topic": "hello2/in", "qos": 1},
                                "compute": {"function": "hello"}, "publish": {"topic": "hello2/out", "qos": 1}})
        with open(CONFIG, "w") as fh:
            yaml.safe_dump(config, fh, sort_keys=False)
        since = time.time() - 1
        sh("systemctl", "reload", SERVICE)
        logged("rule rule-hello2: subscribed to hello2/in", since)
        answer = client.ask("hello2/in", "hello2/out", {"name": "reloaded"}, timeout=180)
        expect(answer["hello"] == "reloaded" and main_pid() == before, f"{answer}, pid {before} -> {main_pid()}")
        reloaded = logged("SIGHUP: configuration reloaded", since)
        expect("1 started" in reloaded, reloaded)
        asked = sh("openedge-function", "reload")   # the same through the control socket
        expect(re.search(r"configuration reloaded: \d+ rules kept, 0 stopped, 0 started", asked), asked)
        return f"pid {before} kept; {reloaded}; openedge-function reload: {asked.strip()}"

    @check("systemctl stop drains and acknowledges: every message answered once across a restart")
    def _() -> str:
        for n in range(4):
            client.client.publish("slow/in", json.dumps({"n": n}), 1).wait_for_publish(30)
        wait_for(lambda: client.on("slow/out"), 120, "the first slow answer")
        sh("systemctl", "stop", SERVICE)
        before_restart = sorted(a["n"] for a in client.on("slow/out"))
        status = sh("systemctl", "show", "-p", "ExecMainStatus", "--value", SERVICE).strip()
        sh("systemctl", "start", SERVICE)
        wait_for(lambda: len(client.on("slow/out")) >= 4, 180, "all 4 slow answers")
        time.sleep(3)
        answers = sorted(a["n"] for a in client.on("slow/out"))
        expect(answers == [0, 1, 2, 3] and status == "0", f"answers {answers}, exit status {status}")
        return f"answered before the stop: {before_restart}, after the restart: the rest; exit status {status}"

    @check("journalctl -u has the daemon's log, with levels")
    def _() -> str:
        entries = [json.loads(line) for line in sh("journalctl", "-u", SERVICE, "-o", "json", "--no-pager").splitlines()]
        ours = [e for e in entries if "openedge_function." in str(e.get("MESSAGE", ""))]
        levels = {e.get("PRIORITY") for e in ours}
        expect({"6", "4"} <= levels, f"priorities {levels}")
        warning = next(e["MESSAGE"] for e in ours if e.get("PRIORITY") == "4")
        return f"{len(ours)} entries, priorities {sorted(levels)}; a warning: {warning[:120]}"

    @check("systemd-analyze security: the unit's exposure")
    def _() -> str:
        report = sh("systemd-analyze", "security", SERVICE, "--no-pager", check=False)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", report)
        expect(match is not None, report[-300:])
        level = float(match.group(1))
        expect(level <= 5.0, match.group(0))
        return match.group(0)

    sh("systemctl", "stop", SERVICE)

    @check("by hand from a root shell (no delegation): no groups, says why, rlimits instead")
    def _() -> str:
        log = open("/tmp/by-hand.log", "w")
        process = subprocess.Popen(["openedge-function", "-c", CONFIG], cwd=STATE, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            answer = client.ask("hello/in", "hello/out", {"name": "by hand"}, timeout=180)
            expect(answer["hello"] == "by hand", answer)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(120)
        with open("/tmp/by-hand.log") as fh:
            text = fh.read()
        line = next((l for l in text.splitlines() if "instances get no control groups" in l), "")
        expect("is not delegated to the daemon" in line, text[-1500:])
        expect(code == 0, f"exit status {code}")
        return line.split("WARNING ", 1)[-1]

    sh("systemctl", "start", SERVICE)

    @check("upgrade keeps the configuration, the functions, the package cache and the journal")
    def _() -> str:
        with open(CONFIG, "rb") as fh:
            config_hash = hashlib.sha256(fh.read()).hexdigest()
        code = sorted(os.listdir(f"{STATE}/functions"))
        journal = os.path.exists(f"{STATE}/.openedge-function.inflight")
        cache = f"{STATE}/.openedge-function/packages"
        pinned = invoke("pinned")
        expect(pinned == {"tinypkg": "from the wheel"}, pinned)
        installed = sorted(os.listdir(cache))
        expect(any(entry.startswith("pinned-") for entry in installed), f"the cache holds {installed}")
        before = main_pid()
        since = time.time() - 1
        sh("dpkg", "-i", os.path.join(SHARE, "pkg", current))
        version = sh("dpkg-query", "-W", "-f", "${Version}", "openedge-function")
        with open(CONFIG, "rb") as fh:
            same = hashlib.sha256(fh.read()).hexdigest() == config_hash
        expect(same and sorted(os.listdir(f"{STATE}/functions")) == code, "configuration or code changed")
        expect(journal and os.path.exists(f"{STATE}/.openedge-function.inflight"), "the journal is gone")
        wait_for(lambda: sh("systemctl", "is-active", SERVICE, check=False).strip() == "active", 120, "the service")
        after = main_pid()
        answer = client.ask("hello/in", "hello/out", {"name": "upgraded"}, timeout=180)
        expect(answer["hello"] == "upgraded", answer)
        again = invoke("pinned")
        expect(again == pinned and sorted(os.listdir(cache)) == installed, f"{again}, {os.listdir(cache)}")
        reinstalled = sh("journalctl", "-q", "-u", SERVICE, "--since", f"@{int(since)}", "-o", "cat", "-g",
                         "installing", "--no-pager", check=False).strip()
        expect(not reinstalled, f"installed again: {reinstalled}")
        return (f"{previous} -> {version}: configuration, {code}, the journal and the package cache "
                f"{installed} kept (nothing installed again); restarted (pid {before} -> {after})")

    client.close()

    @check("remove keeps the configuration and the state; purge removes what the package made")
    def _() -> str:
        sh("dpkg", "--remove", "openedge-function")
        kept = [p for p in (CONFIG, f"{STATE}/functions/hello/hello.py") if os.path.exists(p)]
        expect(len(kept) == 2 and not os.path.lexists("/usr/bin/openedge-function"), f"after remove: {kept}")
        sh("dpkg", "--purge", "openedge-function")
        left = [p for p in ("/etc/openedge-function", STATE, "/var/log/openedge-function", "/opt/venvs/openedge-function",
                            "/usr/bin/openedge-function") if os.path.lexists(p)]
        expect(not left, f"left: {left}")
        return f"remove kept {kept}; purge left nothing"

    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
