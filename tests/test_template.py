"""Instances forked from the template: what they are, when a function gets a fresh interpreter
instead, what happens when the template dies, and who reaps what instances leave behind."""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Optional

import psutil

from runtime_python.template import NAME as TEMPLATE_NAME
from runtime_python.wire import SPARE_NAME

from .helpers import alive, function, publish, rule, wait_until

TOOLS = '''
import os, subprocess, sys, time

def about(event, context):
    return {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "path0": sys.path[0],
            "id": context["functionInstanceID"],
            "hash_randomization": sys.flags.hash_randomization,
            "env": sorted(k for k in os.environ if k.startswith("PYTHON"))}

def forks(event, context):
    # Plain fork() (subprocess on Python 3.9 uses it too), from the instance's own thread.
    codes = []
    for _ in range(event["n"]):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        codes.append(os.waitpid(pid, 0)[1])
    return codes

def orphan(event, context):
    # A shell that leaves a sleep behind and exits: the sleep is orphaned at once.
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    pid = int(out.stdout)
    time.sleep(event.get("hold", 0))
    return {"sleep": pid}
'''


def template_of(daemon) -> Optional[psutil.Process]:
    for child in psutil.Process(daemon.process.pid).children():
        if child.name() == TEMPLATE_NAME and child.status() != psutil.STATUS_ZOMBIE:
            return child
    return None


def test_instances_are_forks_of_the_template_and_children_of_the_daemon(broker, daemon_factory, collector):
    daemon = daemon_factory([function("about", "tools.about")], [rule("r1", "in", "about", "out")],
                            files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}")
    result = json.loads(wait_until(lambda: collector.on("out"), message="an answer")[0].payload)
    instance = psutil.Process(result["pid"])
    assert result["ppid"] == daemon.process.pid
    assert instance.name() == "about-1"
    assert "runtime_python.template" in instance.cmdline()
    # As `python -m runtime_python` started in codedir would see it.
    codedir = os.path.join(daemon.directory, "fn")
    assert result["cwd"] == codedir and result["path0"] == codedir
    assert result["hash_randomization"] == 1
    assert result["env"] == ["PYTHONDONTWRITEBYTECODE"]


def test_a_start_only_variable_gets_a_fresh_interpreter(broker, daemon_factory, collector):
    daemon = daemon_factory([function("about", "tools.about", env={"PYTHONHASHSEED": "0"})],
                            [rule("r1", "in", "about", "out")], files={"fn/tools.py": TOOLS})
    # A new interpreter would hold all its memory while it waited: its pool keeps no spare.
    time.sleep(1.5)
    assert daemon.instance_pids(spares=True) == []
    publish(broker, "in", b"{}")
    result = json.loads(wait_until(lambda: collector.on("out"), message="an answer")[0].payload)
    assert result["id"] == "about-1"   # the spare it did not make took no number
    assert result["hash_randomization"] == 0
    assert result["ppid"] == daemon.process.pid
    assert "runtime_python.template" not in psutil.Process(result["pid"]).cmdline()


def test_a_handler_that_forks_answers_from_the_child_and_the_instance(broker, daemon_factory, collector):
    daemon = daemon_factory([function("forks", "tools.forks"),
                             function("fresh", "tools.forks", env={"PYTHONHASHSEED": "1"})],
                            [rule("r1", "in", "forks", "out"), rule("r2", "in2", "fresh", "out2")],
                            files={"fn/tools.py": TOOLS})
    publish(broker, "in", b'{"n": 20}')
    publish(broker, "in2", b'{"n": 20}')
    wait_until(lambda: collector.on("out") and collector.on("out2"), message="both answers")
    for topic in ("out", "out2"):   # forked from the template, and a fresh interpreter
        assert json.loads(collector.on(topic)[0].payload) == [0] * 20
    assert "fork_posix" not in daemon.log() and "fork() handlers" not in daemon.log()


def test_a_dead_template_is_started_again(broker, daemon_factory, collector):
    daemon = daemon_factory([function("about", "tools.about", instance={"min": 1})],
                            [rule("r1", "in", "about", "out")], files={"fn/tools.py": TOOLS})
    first = wait_until(lambda: daemon.instance_pids(), message="the min instance")[0]
    template = wait_until(lambda: template_of(daemon), message="the template")
    template.kill()
    wait_until(lambda: (template_of(daemon) or template).pid != template.pid, message="a new template")
    wait_until(lambda: "the instance template was killed by signal SIGKILL; starting it again"
               in daemon.log(), message="the warning")
    assert not alive([template.pid])
    os.kill(first, signal.SIGKILL)   # its replacement is forked from the new template
    second = wait_until(lambda: [p for p in daemon.instance_pids() if p != first],
                        message="a replacement instance")[0]
    publish(broker, "in", b"{}")
    result = json.loads(wait_until(lambda: collector.on("out"), message="an answer")[0].payload)
    assert result["pid"] == second
    assert "runtime_python.template" in psutil.Process(second).cmdline()


def test_what_an_instance_leaves_orphaned_is_reaped(broker, daemon_factory, collector):
    daemon = daemon_factory([function("orphan", "tools.orphan", instance={"timeout": "1s"})],
                            [rule("r1", "in", "orphan", "out")], files={"fn/tools.py": TOOLS})
    publish(broker, "in", b"{}")
    sleep_pid = json.loads(wait_until(lambda: collector.on("out"), message="an answer")[0].payload)["sleep"]
    # The orphaned sleep is the daemon's now (a subreaper), and in the instance's process group.
    assert psutil.Process(sleep_pid).ppid() == daemon.process.pid
    publish(broker, "in", b'{"hold": 5}')   # times out: the instance's group is killed
    wait_until(lambda: len(collector.on("out")) == 2, message="the timeout envelope")
    assert json.loads(collector.on("out")[1].payload)["errorType"] == "FunctionTimeout"
    # Killed with the group, then reaped: not even a zombie is left.
    wait_until(lambda: not psutil.pid_exists(sleep_pid), message=f"orphan {sleep_pid} to be reaped")
    assert not any(c.status() == psutil.STATUS_ZOMBIE for c in psutil.Process(daemon.process.pid).children())


def test_the_template_dies_with_the_daemon(broker, daemon_factory):
    daemon = daemon_factory([function("about", "tools.about", instance={"min": 1})],
                            [rule("r1", "in", "about", "out")], files={"fn/tools.py": TOOLS})
    pids = wait_until(lambda: daemon.instance_pids(), message="the min instance")
    template = wait_until(lambda: template_of(daemon), message="the template")
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    wait_until(lambda: not alive(pids + [template.pid]), message="instance and template to go")


def test_a_spare_waits_forked_in_its_group_and_becomes_the_next_instance(broker, daemon_factory, collector):
    """Below max, a pool keeps one fork of the template ready (named oef-spare, in its control
    group, without the function's spec); the next instance to start is that process. A pool with
    `spare: false` keeps none."""
    daemon = daemon_factory([function("about", "tools.about", instance={"max": 2}),
                             function("plain", "tools.about", instance={"max": 2, "spare": False})],
                            [rule("r1", "in", "about", "out"), rule("r2", "in2", "plain", "out2")],
                            files={"fn/tools.py": TOOLS})
    [spare] = wait_until(lambda: daemon.instance_pids(spares=True), message="a spare")
    assert psutil.Process(spare).name() == SPARE_NAME and daemon.instance_pids() == []
    if os.path.isdir("/sys/fs/cgroup/memory") or os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        assert "/openedge-function" in open(f"/proc/{spare}/cgroup").read() or \
            "OPENEDGE_FUNCTION_CGROUPS=off" in daemon.log()
    publish(broker, "in", b"{}")
    answer = json.loads(wait_until(lambda: collector.on("out"), message="an answer")[0].payload)
    assert answer["pid"] == spare and answer["ppid"] == daemon.process.pid
    assert psutil.Process(spare).name() == "about-1"
    # One instance of two: the pool makes the next spare.
    [second] = wait_until(lambda: [p for p in daemon.instance_pids(spares=True) if p != spare],
                          message="the next spare")
    assert psutil.Process(second).name() == SPARE_NAME
    # The pool without spares starts its instance when the message comes.
    publish(broker, "in2", b"{}")
    plain = json.loads(wait_until(lambda: collector.on("out2"), message="an answer")[0].payload)
    assert plain["pid"] not in (spare, second)
    assert sorted(daemon.instance_pids(spares=True)) == sorted([spare, second, plain["pid"]])
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    wait_until(lambda: not alive([spare, second, plain["pid"]]), message="the spare to go with the daemon")
