"""Isolation against the handler, end to end: a handler tries each escape and each abuse through
a real daemon (as root, with real users, real cgroups and real signals), and each attempt fails
while the daemon keeps serving."""
from __future__ import annotations

import base64
import glob
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from openedge_function.isolation.cgroups import detect
from tests.helpers import DaemonProcess, function, publish, rule, wait_until, write_handler

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

# The handler the probe function runs (shared with the VM tests).
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_handler.py")) as _fh:
    PROBE = _fh.read()

ECHO = '''
import os
def handler(event, context):
    return {"echo": event, "pid": os.getpid(), "uid": os.getuid()}
'''


class Gateway:
    """A daemon with a probe function, a victim function and a broker rule for each."""

    def __init__(self, tmp_path, broker, collector, daemon_env=None, **probe_extra) -> None:
        self.broker, self.collector = broker, collector
        directory = tmp_path / "gateway"
        directory.mkdir()
        os.chmod(directory, 0o755)
        write_handler(str(directory / "probe"), "probe.py", PROBE)
        write_handler(str(directory / "victim"), "victim.py", ECHO)
        # The victim's code is its own: root's, readable only by the victim's group.
        os.chown(directory / "victim", 0, 61001)
        os.chmod(directory / "victim", 0o750)
        functions = [
            function("probe", "probe.handler", codedir="probe",
                     instance={"memory": "64m", "timeout": "20s", **probe_extra.pop("instance", {})},
                     **probe_extra),
            function("victim", "victim.handler", codedir="victim", user=61001, group=61001),
        ]
        config = {"hub": {"address": broker.address, "clientid": "isolation", "username": "u",
                          "password": "s3cret-broker-pw"},
                  "functions": functions,
                  "rules": [rule("probe", "probe/in", "probe", "probe/out"),
                            rule("victim", "victim/in", "victim", "victim/out")],
                  "logger": {"level": "debug", "path": "var/daemon.log", "console": True}}
        self.daemon = DaemonProcess(str(directory), config)
        os.chmod(self.daemon.config_path, 0o600)   # as an operator keeps a file with a password
        self.daemon.start(env=daemon_env)
        self.seen = 0

    def run(self, name: str, event: dict) -> dict:
        before = len(self.collector.on(f"{name}/out"))
        publish(self.broker, f"{name}/in", json.dumps(event).encode())
        out = wait_until(lambda: self.collector.on(f"{name}/out")[before:], 60,
                         message=f"the outcome of {name} {event}")
        return json.loads(out[0].payload)

    def probe(self, what: str, arg=None) -> dict:
        return self.run("probe", {"try": what, "arg": arg})

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def gateway(tmp_path, broker, collector):
    gw = Gateway(tmp_path, broker, collector)
    yield gw
    gw.stop()


def _denied(outcome: dict) -> bool:
    return outcome["done"] is False and outcome["error"] in ("PermissionError", "FileNotFoundError")


def test_a_handler_cannot_reach_the_daemon_its_config_or_another_function(gateway):
    daemon = gateway.daemon
    me = gateway.probe("whoami")
    # Never root: its own dynamic user and group, no supplementary groups.
    assert 61184 <= me["uid"] <= 65519 and me["gid"] == me["uid"] and me["groups"] == []
    supervisor = daemon.process.pid
    assert me["ppid"] == supervisor
    victim = gateway.run("victim", {"n": 1})
    assert victim["uid"] == 61001

    assert _denied(gateway.probe("read", daemon.config_path))
    assert _denied(gateway.probe("read", os.path.join(daemon.directory, "var", "daemon.log")))
    assert _denied(gateway.probe("read", f"/proc/{supervisor}/environ"))
    assert _denied(gateway.probe("read", daemon.log_path.replace("daemon.log", "victim/victim.py")))
    assert _denied(gateway.probe("list", os.path.join(daemon.directory, "victim")))
    assert _denied(gateway.probe("write", os.path.join(daemon.directory, "probe", "probe.py")))
    assert _denied(gateway.probe("write", os.path.join(daemon.directory, "probe", "new.py")))
    for pid in (supervisor, victim["pid"]):
        outcome = gateway.probe("kill", pid)
        assert outcome["done"] is False and outcome["error"] == "PermissionError", outcome
    # The victim's socket: in a directory of the victim's user that the probe cannot enter.
    [victim_socket] = [path for path in glob.glob("/tmp/openedge-function-*/victim-*/*.sock")
                       if os.stat(os.path.dirname(path)).st_uid == 61001]
    assert _denied(gateway.probe("connect", victim_socket))
    assert _denied(gateway.probe("list", os.path.dirname(os.path.dirname(victim_socket))))
    # Its own temporary directory is writable.
    assert gateway.probe("write_tmp")["done"] is True
    # Calls between functions need no server (none is configured) and no token.
    invoked = gateway.probe("invoke", "victim")
    assert invoked["done"] is True and invoked["result"]["echo"] == {"from": "probe"}, invoked

    # The daemon kept serving, both functions.
    assert daemon.process.poll() is None
    assert gateway.run("victim", {"n": 2})["echo"] == {"n": 2}
    assert gateway.probe("whoami")["uid"] == me["uid"]
    assert "holds a password or token and every user" not in daemon.log()


def test_processes_files_and_memory_are_bounded_by_the_kernel(gateway):
    if detect()[0] is None:
        pytest.skip(f"no cgroups here: {detect()[1]}")
    spawned = gateway.probe("spawn", 500)
    assert spawned["done"] is True
    assert spawned["result"]["started"] < 100 and spawned["result"]["error"] == "BlockingIOError", spawned
    opened = gateway.probe("open", 5000)["result"]
    assert opened["opened"] < 1024 and opened["error"] == "OSError", opened
    # 1 GB in one step under a 64 MB limit: the kernel stops it at the limit.
    envelope = gateway.probe("allocate", 1 << 30)
    assert envelope["errorType"] == "MemoryLimitExceeded", envelope
    used = int(envelope["errorMessage"].split(" used ")[1].split(" MB")[0])
    assert used <= 64, envelope
    # A new instance serves the next call.
    assert gateway.probe("whoami")["uid"] >= 61184
    assert gateway.daemon.process.poll() is None


def test_without_cgroups_rlimits_stand_in(tmp_path, broker, collector):
    # Without groups, memory is the RSS of the instance's processes as polled: the 80 children of
    # the spawn probe hold 1-2 MB each, so the limit leaves room for them.
    gw = Gateway(tmp_path, broker, collector, daemon_env={**os.environ, "OPENEDGE_FUNCTION_CGROUPS": "off"},
                 instance={"memory": "256m"})
    try:
        assert "instances get no control groups (OPENEDGE_FUNCTION_CGROUPS=off)" in gw.daemon.log()
        outcome = gw.probe("spawn", 500)
        assert "result" in outcome, outcome
        spawned = outcome["result"]
        # RLIMIT_NPROC: (64 + 16) tasks for each of its 1 instance, threads included.
        assert spawned["started"] < 100 and spawned["error"] == "BlockingIOError", spawned
        assert gw.probe("open", 5000)["result"]["opened"] < 1024
        # RLIMIT_AS: the allocation fails in the handler instead of taking 4 GB.
        envelope = gw.probe("allocate", 4 << 30)
        assert envelope["errorType"] in ("MemoryError", "MemoryLimitExceeded"), envelope
        assert gw.probe("whoami")["uid"] >= 61184
    finally:
        gw.stop()


def test_a_function_of_the_same_user_cannot_drive_another_instance(tmp_path, broker, collector):
    # A new interpreter (a variable read at start): its /tmp is the machine's, where the victim's
    # socket is; a fork of the template, with /tmp of its own, would not even find it.
    gw = Gateway(tmp_path, broker, collector, user=61001, group=61001, env={"PYTHONHASHSEED": "1"})
    try:
        gw.run("victim", {"n": 1})
        [victim_socket] = [path for path in glob.glob("/tmp/openedge-function-*/victim-*/*.sock")
                           if gw.daemon.directory and os.stat(os.path.dirname(path)).st_uid == 61001]
        # Same user: it may reach the socket, but the instance serves only the supervisor's key.
        outcome = gw.probe("ping", victim_socket)
        assert outcome["done"] is False and "closed the connection unanswered" in outcome["message"], outcome
        assert gw.run("victim", {"n": 2})["echo"] == {"n": 2}
        # A stranger claiming a 4 GB frame is closed at once, one who says nothing within 2 s;
        # neither holds the instance up.
        outcome = gw.probe("ping", [victim_socket, "huge"])
        assert outcome["done"] is False and "unanswered after 0." in outcome["message"], outcome
        outcome = gw.probe("ping", [victim_socket, "silent"])
        assert outcome["done"] is False and "closed the connection unanswered" in outcome["message"], outcome
        assert 1.5 <= float(outcome["message"].rsplit("after ", 1)[1].rstrip("s")) < 8, outcome
        assert gw.run("victim", {"n": 3})["echo"] == {"n": 3}
    finally:
        gw.stop()


def test_an_unreadable_code_directory_names_the_directory_that_stops_the_user(broker, daemon_factory, collector):
    daemon = daemon_factory([function("locked", "main.handler", codedir="locked"),
                             function("nested", "main.handler", codedir="home/fn")],
                            [rule("r", "in", "locked", "out"), rule("n", "nested/in", "nested", "nested/out")],
                            files={"locked/main.py": ECHO, "home/fn/main.py": ECHO})
    locked = os.path.join(daemon.directory, "locked")
    os.chmod(locked, 0o700)
    publish(broker, "in", b"{}")
    out = wait_until(lambda: collector.on("out"), 60, message="the envelope")
    envelope = json.loads(out[0].payload)
    assert envelope["errorType"] == "FunctionLoadError", envelope
    assert locked in envelope["errorMessage"] and "uid 6" in envelope["errorMessage"], envelope
    assert f"`chmod -R o+rX {locked}`" in envelope["errorMessage"], envelope
    # The code directory is open; the directory above it is not (code under /root): that one is named.
    home = os.path.join(daemon.directory, "home")
    os.chmod(os.path.join(home, "fn"), 0o755)
    os.chmod(home, 0o700)
    publish(broker, "nested/in", b"{}")
    envelope = json.loads(wait_until(lambda: collector.on("nested/out"), 60)[0].payload)
    assert f"{home} (mode 0700, uid 0, gid 0) is what it may not pass through; `chmod o+x {home}`" \
        in envelope["errorMessage"], envelope


def test_a_readable_configuration_with_a_password_is_warned_about(broker, daemon_factory):
    daemon = daemon_factory([function("f", "main.handler")], [rule("r", "in", "f", "out")],
                            files={"fn/main.py": ECHO},
                            hub={"address": broker.address, "clientid": "warned", "password": "pw",
                                 "username": "u"})
    assert os.stat(daemon.config_path).st_mode & stat.S_IROTH
    assert "holds a password or token and every user of this machine can read it" in daemon.log()


def test_a_killed_daemon_leaves_nothing_for_the_next_start(tmp_path, broker):
    rundirs = pathlib.Path(tempfile.mkdtemp(prefix="oef-run-"))   # short: socket paths are
    os.chmod(rundirs, 0o755)
    env = {**os.environ, "RUNTIME_DIRECTORY": str(rundirs)}
    directory = tmp_path / "d"
    directory.mkdir()
    write_handler(str(directory / "fn"), "main.py", ECHO)
    config = {"hub": {"address": broker.address, "clientid": "killed"},
              "functions": [function("f", "main.handler", instance={"min": 1})], "rules": []}
    first = DaemonProcess(str(directory), config)
    first.start(wait=False, env=env)
    try:
        wait_until(lambda: glob.glob(str(rundirs / "openedge-function-*" / "f-*" / "*.sock")), 30,
                   message="the first daemon's instance socket")
        [left] = glob.glob(str(rundirs / "openedge-function-*"))
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    assert os.path.isdir(left)
    second = DaemonProcess(str(directory), config)
    second.start(wait=False, env=env)
    try:
        wait_until(lambda: not os.path.exists(left), 30, message="the stale run directory to go")
        # Logged once it is gone (a moment after).
        wait_until(lambda: "left by a daemon that did not stop cleanly" in second.log(), 10,
                   message="the removal to be logged")
        wait_until(lambda: len(glob.glob(str(rundirs / "openedge-function-*"))) == 1, 30,
                   message="the second daemon's run directory")
    finally:
        second.stop()
    wait_until(lambda: not glob.glob(str(rundirs / "openedge-function-*")), 10,
               message="the run directory to go at a clean stop")
    os.rmdir(rundirs)


STUCK = '''
import os, time
def handler(event, context):
    with open(os.path.join(os.environ["OUT"], "runs"), "a") as fh:
        fh.write(context.request_id + "\\n")
    if event.get("stuck"):
        time.sleep(60)
    return {"ran": event}
'''


def test_a_message_in_flight_at_each_of_the_last_crashes_is_answered_not_run(
        tmp_path, writable_tmp, broker, collector):
    directory = tmp_path / "d"
    directory.mkdir()
    write_handler(str(directory / "fn"), "main.py", STUCK)
    config = {"hub": {"address": broker.address, "clientid": "poison"},
              "functions": [function("stuck", "main.handler", env={"OUT": str(writable_tmp)})],
              "rules": [rule("r", "in", "stuck", "out", error={"topic": "errors", "qos": 1})]}
    runs = writable_tmp / "runs"

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    for crash in range(3):
        daemon = DaemonProcess(str(directory), config).start()
        if crash == 0:
            publish(broker, "in", json.dumps({"stuck": True}).encode(), qos=1)
        wait_until(lambda: count() == crash + 1, 30, message=f"run {crash + 1} of the message")
        # Something brings the supervisor down while the message is in flight.
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        daemon._log.close()
    daemon = DaemonProcess(str(directory), config).start()
    try:
        out = wait_until(lambda: collector.on("errors"), 30, message="the PoisonMessage envelope")
        envelope = json.loads(out[0].payload)
        assert envelope["errorType"] == "PoisonMessage", envelope
        assert json.loads(base64.b64decode(envelope["packet"]["Message"]["Payload"])) == {"stuck": True}
        assert count() == 3   # not run a fourth time
        assert "was in flight at each of the last 3 crashes" in daemon.log()
        # The daemon serves on; the same payload later is run again.
        publish(broker, "in", json.dumps({"n": 1}).encode(), qos=1)
        result = wait_until(lambda: collector.on("out"), 30, message="a normal result")
        assert json.loads(result[0].payload) == {"ran": {"n": 1}}
    finally:
        daemon.stop()
    # A clean stop ends the row of crashes.
    daemon = DaemonProcess(str(directory), config).start()
    daemon.stop()
    assert json.loads((directory / ".openedge-function.inflight.crashes").read_text()) == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_the_unit_file_verifies(tmp_path):
    """The unit as `show unit` writes it for this installation (the package's has /usr/bin)."""
    shown = subprocess.run([sys.executable, "-m", "openedge_function", "show", "unit"], capture_output=True,
                           text=True, timeout=60)
    unit = shown.stdout
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "Delegate=yes", "ReadWritePaths="):
        assert setting in unit
    assert f"ExecStart={os.path.join(os.path.dirname(sys.executable), 'openedge-function')} -c " in unit
    path = tmp_path / "openedge-function.service"
    path.write_text(unit)
    run = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and str(path) not in run.stderr, run.stderr


def test_a_daemon_that_is_not_root_refuses_another_user(tmp_path):
    (tmp_path / "fn").mkdir()
    config = tmp_path / "application.yml"
    config.write_text("functions: [{name: f, handler: main.handler, codedir: fn, user: 61001}]\n")
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                          "-m", "openedge_function", "--check", "-c", str(config)],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert run.returncode == 2, run.stderr
    assert "functions[0].user: running instances as another user needs the daemon to run as root" \
        in run.stderr


def test_two_instances_with_one_id_get_groups_of_their_own(tmp_path):
    """A function replaced on reload numbers its instances from 1 again while the old ones run."""
    from openedge_function.config import Function
    from openedge_function.instances.instance import Instance
    from openedge_function.isolation import Sandbox, current
    from openedge_function.instances.fdwatch import FdWatcher as Watcher
    cgroups, why = detect()
    if cgroups is None:
        pytest.skip(f"no cgroups here: {why}")
    write_handler(str(tmp_path / "code"), "main.py", ECHO)
    function = Function(name="fn", handler="main.handler", codedir=str(tmp_path / "code"))
    watcher = Watcher()
    instances = []
    try:
        for _ in range(2):   # the old pool's fn-1, then the new pool's fn-1
            sandbox = Sandbox.make(str(tmp_path), function, current(), cgroups)
            instance = Instance(function, 1, sandbox, watcher, lambda inst: None)
            instance.start(ready_timeout=30)
            instances.append(instance)
        groups = [instance.cgroup for instance in instances]
        assert groups[0] is not None and groups[1] is not None
        assert groups[0].dirs != groups[1].dirs
        for instance, group in zip(instances, groups):
            procs = open(os.path.join(group.dirs["memory" if group.version == 1 else ""],
                                      "cgroup.procs")).read().split()
            assert str(instance.pid) in procs
            assert instance.process.poll() is None
    finally:
        for instance in instances:
            instance.stop()
        watcher.close()
        cgroups.close()
