from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List

import pytest

from openedge_function.isolation.cgroups import detect
from openedge_function.dataplane import DataPlane
from openedge_function.isolation import remove_stale
from tests.helpers import Broker, Collector, DaemonProcess, alive, wait_until, write_handler


def pytest_configure(config):
    config.addinivalue_line("markers", "broker_config(text): extra lines for the test's mosquitto.conf")


@pytest.fixture(autouse=True, scope="session")
def _reachable_checkout() -> None:
    """As root, the daemons under test run functions as unprivileged users, who must reach this
    checkout (the runtime and the venv's interpreter live in it): a clone in a private directory
    gets its ancestors opened for passing through (o+x, not listing). The checkout itself is
    listed too: it is the PYTHONPATH entry through which a `python:` interpreter finds the
    runtime, and Python's import system lists a path entry before it finds anything in it."""
    if os.geteuid() != 0:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.stat(root).st_mode & 0o004:
        warnings.warn(f"{root} was not readable by other users; made it o+r")
        os.chmod(root, os.stat(root).st_mode | 0o004)
    for start in (root, sys.prefix):
        directory = os.path.abspath(start)
        while directory != "/":
            mode = os.stat(directory).st_mode
            if not mode & 0o001:
                warnings.warn(f"{directory} was not reachable by other users; made it o+x")
                os.chmod(directory, mode | 0o001)
            directory = os.path.dirname(directory)


@pytest.fixture(autouse=True)
def _reachable_tmp(request) -> None:
    """As root, daemons run functions as unprivileged users, who must reach the code directories
    the tests write under tmp_path: pytest makes its directories 0700, so open them for passing
    through (not for listing)."""
    if os.geteuid() != 0 or "tmp_path" not in request.fixturenames:
        return
    path = request.getfixturevalue("tmp_path")
    for directory in [path] + list(path.parents)[:3]:
        if str(directory) in ("/", "/tmp"):
            break
        os.chmod(directory, os.stat(directory).st_mode | 0o111)


@pytest.fixture
def writable_tmp(tmp_path) -> Iterator[pathlib.Path]:
    """A directory that functions' users may write in and the test reads (for handlers that leave
    files there). As root it is outside /tmp: instances forked from the template have /tmp of
    their own."""
    if os.geteuid() != 0:
        os.chmod(tmp_path, 0o1777)
        yield tmp_path
        return
    os.makedirs(_SHARED, 0o755, exist_ok=True)
    path = pathlib.Path(tempfile.mkdtemp(dir=_SHARED))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


_SHARED = "/var/lib/openedge-function-tests"


@pytest.fixture
def broker(tmp_path, request) -> Iterator[Broker]:
    directory = tmp_path / "broker"
    directory.mkdir()
    marker = request.node.get_closest_marker("broker_config")
    mosquitto = Broker(str(directory), extra=marker.args[0] if marker else "").start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def daemon_factory(tmp_path, broker) -> Iterator[Callable[..., DaemonProcess]]:
    """Starts daemons on `broker`; stops each one and checks that no instance outlived it."""
    started: List[DaemonProcess] = []

    def start(functions: List[Dict[str, Any]], rules: List[Dict[str, Any]],
              files: Dict[str, str] = None, wait: bool = True, **extra: Any) -> DaemonProcess:
        """`files` maps paths under the daemon's directory (codedirs are relative to it) to source."""
        config = {"hub": {"address": broker.address, "clientid": f"oef-test-{len(started)}"},
                  "functions": functions, "rules": rules,
                  "logger": {"level": "debug", "console": True}}
        config.update(extra)
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        for path, source in (files or {}).items():
            write_handler(str(directory / os.path.dirname(path)), os.path.basename(path), source)
        daemon = DaemonProcess(str(directory), config)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for daemon in started:
        daemon.stop()
        wait_until(lambda: not alive(sorted(daemon.seen_pids)), 10,
                   message=f"instances {sorted(daemon.seen_pids)} to exit with the daemon")
    if any(daemon.process is not None and (daemon.process.returncode or 0) < 0 for daemon in started):
        # A killed daemon leaves its run directory and control groups to the next start: be it.
        remove_stale(tempfile.gettempdir())
        cgroups, _ = detect()
        if cgroups is not None:
            cgroups.close()


@pytest.fixture
def collector(broker) -> Iterator[Collector]:
    """A client recording everything published on `broker`."""
    client = Collector(broker, ["#"])
    yield client
    client.close()


@pytest.fixture
def plane() -> Iterator[DataPlane]:
    """The data plane's loop, in its thread, for tests of pools and instances without a daemon."""
    loop = DataPlane()
    loop.start()
    yield loop
    loop.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    """What the gateway in the VM showed (tests/test_vm.py), or why it did not run."""
    import sys
    vm = sys.modules.get("tests.test_vm")
    session = getattr(vm, "SESSION", None)
    if not session:
        return
    write = terminalreporter.write_line
    terminalreporter.section("gateway in a VM")
    if "skipped" in session:
        write(f"skipped: {session['skipped']}")
        return
    write(f"Debian 12 guest, systemd as PID 1, cgroup v2 (unified), the package built from this checkout; "
          f"image {session.get('image', 0):.0f}s, package {session.get('package', 0):.0f}s, "
          f"guest {session.get('guest', 0):.0f}s")
    for name, result in session.get("results", {}).items():
        detail = " ".join(str(result["detail"]).split())[:160]
        write(f"{'PASS' if result['ok'] else 'FAIL'} {name} ({result['seconds']}s): {detail}")
