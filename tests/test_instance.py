"""Instances and pools with real runtime processes (handler files written into tmp_path)."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import threading

import pytest

from openedge_function.config import Function, Limits
from openedge_function.errors import FunctionLoadError, InstanceCrashed, InvocationError
from openedge_function.instances.instance import Instance
from openedge_function.instances.spawner import Spawner
from openedge_function.isolation import Sandbox
from openedge_function.instances.lifecycle import State
from openedge_function.invocation import Invocation
from openedge_function.pool import Pool
from openedge_function.instances.fdwatch import FdWatcher as Watcher
from runtime_python._pb import function_pb2 as pb
from tests.helpers import alive, wait_until, write_handler


@pytest.fixture
def watcher():
    w = Watcher()
    yield w
    w.close()


@pytest.fixture
def rundir(tmp_path):
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return str(path)


def make_function(tmp_path, source, handler="main.handler", **limits) -> Function:
    codedir = tmp_path / "code"
    write_handler(str(codedir), "main.py", source)
    return Function(name="fn", handler=handler, codedir=str(codedir), instance=Limits(**limits))


def start(function, rundir, watcher, plane) -> Instance:
    """Start the process (blocking, as the control threads do) and open its stream on the loop."""
    instance = Instance(function, 1, Sandbox.make(rundir, function), watcher, lambda inst: None)
    try:
        instance.start(ready_timeout=30)
    finally:
        if instance.process is not None and instance.state is State.EXITED:
            assert instance.process.returncode is not None   # reaped
    on_loop(plane, instance.open(30))
    return instance


def on_loop(plane, coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, plane.loop).result(30)


def stop(plane, instance) -> None:
    on_loop(plane, instance.close_stream())
    instance.stop()


def test_an_instance_serves_on_a_private_unix_socket(tmp_path, rundir, watcher, plane):
    function = make_function(tmp_path, "def handler(event, context):\n    return {'got': event}\n")
    instance = start(function, rundir, watcher, plane)
    try:
        assert instance.state is State.IDLE
        mode = os.stat(instance.socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
        [response] = on_loop(plane, instance.invoke(
            pb.InvokeBatch(requests=[pb.InvokeRequest(request_id="r", payload=b'{"a": 1}')])))
        assert response.kind == pb.InvokeResponse.JSON
        assert json.loads(response.payload) == {"got": {"a": 1}}
    finally:
        stop(plane, instance)
    assert instance.state is State.EXITED
    assert not alive([instance.pid])


@pytest.mark.parametrize("files, handler, words", [
    ({}, "missing.handler", "no module named 'missing'"),
    ({"main.py": "import notinstalled_xyz\ndef handler(e, c): pass\n"}, "main.handler",
     "importing 'main' failed: No module named 'notinstalled_xyz'"),
    ({"main.py": "def handler(e, c)\n    pass\n"}, "main.handler", "syntax error in main.py, line 1"),
    ({"main.py": "def other(e, c): pass\n"}, "main.handler", "module 'main' has no attribute 'handler' (in main.py)"),
    ({"main.py": "def handlr(e, c): pass\n"}, "main.handler",
     "module 'main' has no attribute 'handler' (in main.py; did you mean 'handlr'?)"),
    ({"main.py": "raise RuntimeError('no config file')\n"}, "main.handler",
     "importing 'main' raised RuntimeError: no config file"),
    ({"main.py": "handler = 42\n"}, "main.handler", "'handler' is a int, not a function (in main.py)"),
])
def test_load_failures_say_what_failed_and_why(tmp_path, rundir, watcher, files, handler, words):
    codedir = tmp_path / "code"
    codedir.mkdir()
    for name, source in files.items():
        (codedir / name).write_text(source)
    function = Function(name="fn", handler=handler, codedir=str(codedir))
    instance = Instance(function, 1, Sandbox.make(rundir, function), watcher, lambda inst: None)
    with pytest.raises(FunctionLoadError) as info:
        instance.start(ready_timeout=30)
    assert words in info.value.message
    assert instance.state is State.EXITED
    assert instance.process.returncode == 4   # the runtime's own exit code for load failures


def test_packages_and_modules_beside_the_handler_import(tmp_path, rundir, watcher, plane):
    codedir = tmp_path / "code"
    write_handler(str(codedir / "pkg"), "__init__.py", "")
    write_handler(str(codedir / "pkg"), "entry.py", "from helper import double\n"
                  "def handler(event, context):\n    return double(event['n'])\n")
    write_handler(str(codedir), "helper.py", "def double(n):\n    return 2 * n\n")
    function = Function(name="fn", handler="pkg.entry.handler", codedir=str(codedir))
    instance = start(function, rundir, watcher, plane)
    try:
        [response] = on_loop(plane, instance.invoke(pb.InvokeBatch(requests=[pb.InvokeRequest(payload=b'{"n": 21}')])))
        assert response.payload == b"42"
    finally:
        stop(plane, instance)


def test_an_initializer_that_raises_is_a_load_failure(tmp_path, rundir, watcher):
    codedir = tmp_path / "code"
    write_handler(str(codedir), "main.py", "def init(context):\n    raise ValueError('no db')\n"
                  "def handler(e, c):\n    return 1\n")
    function = Function(name="fn", handler="main.handler", initializer="main.init", codedir=str(codedir))
    instance = Instance(function, 1, Sandbox.make(rundir, function), watcher, lambda inst: None)
    with pytest.raises(FunctionLoadError) as info:
        instance.start(ready_timeout=30)
    assert "initializer main.init raised ValueError: no db" in info.value.message
    assert any("main.py" in line for line in info.value.stack_trace)


class Outcomes:
    """Collects what a pool reports for each invocation."""

    def __init__(self) -> None:
        self.done = {}
        self.lock = threading.Lock()

    def invocation(self, request_id: str, payload: bytes) -> Invocation:
        return Invocation(request_id, "t", 1, payload, 0, 1, self._done, lambda inv: None)

    def _done(self, invocation, outcome) -> None:
        with self.lock:
            self.done[invocation.request_id] = outcome


def test_a_crash_answers_instance_crashed_and_the_next_message_gets_a_new_instance(tmp_path, rundir, watcher,
                                                                                   plane):
    function = make_function(tmp_path, "import os, signal\n"
                             "def handler(event, context):\n"
                             "    if event.get('how') == 'exit':\n        os._exit(3)\n"
                             "    if event.get('how') == 'segv':\n        os.kill(os.getpid(), signal.SIGSEGV)\n"
                             "    return os.getpid()\n", max=1)
    pool = Pool(plane, function, Spawner(Sandbox.make(rundir, function), watcher))
    outcomes = Outcomes()

    def submit(invocation) -> None:
        assert plane.run(pool.submit, invocation)

    try:
        submit(outcomes.invocation("a", b'{"how": "exit"}'))
        wait_until(lambda: "a" in outcomes.done, 30, message="the crash to be reported")
        error = outcomes.done["a"]
        assert isinstance(error, InstanceCrashed)
        assert "exited with status 3" in error.message
        submit(outcomes.invocation("b", b'{"how": "segv"}'))
        wait_until(lambda: "b" in outcomes.done, 30, message="the segfault to be reported")
        assert isinstance(outcomes.done["b"], InstanceCrashed)
        assert "killed by signal SIGSEGV" in outcomes.done["b"].message
        submit(outcomes.invocation("c", b"{}"))
        wait_until(lambda: "c" in outcomes.done, 30, message="a fresh instance to answer")
        assert not isinstance(outcomes.done["c"], InvocationError)
        assert outcomes.done["c"].kind == pb.InvokeResponse.JSON
    finally:
        pool.close()
        assert pool.join(15)
    assert not alive([i.pid for i in pool.instances()])
