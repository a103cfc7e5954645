"""`openedge-function run DIR [EVENT|-]`: one event through a real instance, without broker or daemon.

The instance is the one the daemon would start: the same runtime, event decoding, context,
initializer, timeout, memory limit and user (as root), and the function's requirements.txt
installed the same way. What the handler prints and the execution summary go to stderr; the
result goes to stdout (JSON as the handler's value encodes, bytes as they are), or the error
envelope a rule would publish, with exit status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import threading
import time
from typing import List, Tuple

from ..config import Defaults, Function, Packages, byte_size, default_package_cache, duration, load_config
from ..config.layout import DEFAULT_HELP, default_config, default_workdir
from ..dataplane import DataPlane
from ..deploy.packages import PackageCache
from ..errors import ConfigError, InvocationError, Packet, build_envelope
from ..instances.fdwatch import FdWatcher
from ..instances.spawner import Spawner
from ..invocation import BYTES, NONE, Invocation, Outcome, failure, new_request_id
from ..isolation import RunAs, RunDir, plan, run_as
from ..pool import Pool

EXIT_USAGE = 2


class UsageError(Exception):
    pass


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openedge-function run",
        description="Run a function on one event in a real instance, with no broker and no daemon; "
                    "print its result, or its error envelope (exit status 1).")
    parser.add_argument("target", metavar="DIR|FUNCTION",
                        help="a code directory, or a function of the configuration (-c)")
    parser.add_argument("event", nargs="?", default=None,
                        help="the event, as a message's payload: JSON, else bytes; '-' reads standard "
                             "input (default: an empty payload, which handlers get as {})")
    parser.add_argument("-c", "--config",
                        help="take the function's settings from this configuration (default for a "
                             f"FUNCTION that is not a directory: {DEFAULT_HELP}; here: {default_config()})")
    parser.add_argument("-w", "--workdir", default=None,
                        help="where the configuration's relative paths start (default: the state "
                             "directory for the service's configuration, else the current directory)")
    parser.add_argument("--handler", help="module.function (default: the one handler the directory defines)")
    parser.add_argument("--initializer", help="module.function run once before the event")
    parser.add_argument("--timeout", default=None, help="e.g. 3s (default: the function's, else 30s)")
    parser.add_argument("--memory", default=None, help="e.g. 128m (default: the function's, else none)")
    parser.add_argument("--topic", default="local", help="the topic the context reports (default: %(default)s)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    args = parser.parse_intermixed_args(argv)
    try:
        function, who, packages = _function(args)
    except (ConfigError, UsageError) as exc:
        print(f"openedge-function run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    payload = sys.stdin.buffer.read() if args.event == "-" else (args.event or "").encode("utf-8")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for noisy in ("openedge_function.worker", "openedge_function.pool", "openedge_function.packages"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.umask(0o077)
    outcome, request_id = run_once(function, who, packages, payload, args.topic, args.qos)
    return _print(outcome, function, request_id, Packet(args.topic, payload, args.qos, False, False, 0))


def _function(args: argparse.Namespace) -> Tuple[Function, RunAs, Packages]:
    """The function to run: from the configuration, else made from the directory and options."""
    path = args.config
    if path is None and not os.path.isdir(args.target) and os.path.exists(default_config()):
        path = default_config()   # a function by name, of the configuration the daemon would run
    workdir = default_workdir(path, args.workdir) if path else os.path.abspath(args.workdir or os.getcwd())
    function = None
    packages = Packages(cache=default_package_cache(workdir))
    users = {}
    if path:
        config = load_config(path, workdir)
        users = plan(config)
        packages = config.packages
        targets = {os.path.abspath(args.target), os.path.normpath(os.path.join(workdir, args.target))}
        function = next((f for f in config.functions if f.name == args.target or f.codedir in targets), None)
        if function is None and not os.path.isdir(args.target):
            raise UsageError(f"{args.target!r} is neither a function of {path} nor a directory")
    if function is None:
        codedir = os.path.abspath(args.target)
        if not os.path.isdir(codedir):
            raise UsageError(f"{args.target!r}: no such directory (give -c CONFIG to run a function by name)")
        name = re.sub(r"[^a-zA-Z0-9_-]", "-", os.path.basename(codedir))[:140] or "function"
        function = Function(name=name, handler=args.handler or guess_handler(codedir), codedir=codedir)
    limits = function.instance
    try:
        timeout = duration(args.timeout) if args.timeout else limits.timeout
        memory = byte_size(args.memory) if args.memory else limits.memory
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    function = dataclasses.replace(
        function, handler=args.handler or function.handler,
        initializer=args.initializer or function.initializer,
        instance=dataclasses.replace(limits, min=0, max=1, timeout=timeout, memory=memory))
    who = users.get(function.name) or run_as(function, Defaults())
    return function, who, packages


def guess_handler(codedir: str) -> str:
    """module.handler for the one module of `codedir` that defines `handler` (index.py first)."""
    modules = sorted(name[:-3] for name in os.listdir(codedir)
                     if name.endswith(".py") and not name.startswith(("_", "test_", "setup")))
    modules.sort(key=lambda module: module != "index")
    found = []
    for module in modules:
        try:
            with open(os.path.join(codedir, module + ".py"), encoding="utf-8", errors="replace") as fh:
                if re.search(r"^def handler\s*\(", fh.read(), re.M):
                    found.append(module)
        except OSError:
            continue
    if len(found) == 1 or (found and found[0] == "index"):
        return f"{found[0]}.handler"
    raise UsageError(f"{codedir}: {'no module defines' if not found else 'several modules define'} "
                     "handler(event, context); say which with --handler module.function")


def run_once(function: Function, who: RunAs, packages: Packages, payload: bytes, topic: str,
             qos: int) -> Tuple[Outcome, str]:
    """(outcome, request id): an InvokeResponse or an InvocationError."""
    request_id = new_request_id()
    try:
        paths = PackageCache(packages).install(function, who)
    except InvocationError as exc:
        return exc, request_id
    plane, fdwatch, rundir = DataPlane(), FdWatcher(), RunDir()
    plane.start()
    spawner = Spawner(rundir.home(function, who), fdwatch)
    spawner.paths = (paths,) if paths else ()
    pool = Pool(plane, function, spawner)
    pool.retries = False   # one event, one try: nothing is tried again
    finished = threading.Event()
    result: List[object] = []

    def done(invocation: Invocation, outcome: object) -> None:
        result.append(outcome)
        finished.set()

    invocation = Invocation(request_id, topic, qos, payload, int(time.time() * 1000), 0, done,
                            lambda invocation: done(invocation, InvocationError("abandoned")))
    try:
        plane.call(pool.start)
        plane.call(pool.submit, invocation)
        while not finished.wait(0.05):
            pool.check_memory()
        pool.close()
        pool.join(10.0)
    finally:
        plane.stop()
        fdwatch.close()
        rundir.close()
    return result[0], request_id


def _print(outcome: Outcome, function: Function, request_id: str, packet: Packet) -> int:
    error = failure(outcome)
    if error is not None:
        envelope = build_envelope(error, request_id, function.name, packet)
        print(json.dumps(json.loads(envelope), indent=2, ensure_ascii=False))
        return 1
    if outcome.kind == BYTES:
        sys.stdout.buffer.write(outcome.payload)
        sys.stdout.flush()
    elif outcome.kind != NONE:
        print(outcome.payload.decode("utf-8"))
    return 0


__all__ = ["main", "guess_handler", "run_once"]

