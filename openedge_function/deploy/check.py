"""Checking what will run: a function's code loaded in a throwaway instance, as its own user, with
its packages and limits; its handler and initializer imported and checked against how they are
called, nothing of them run. `--check` checks every function this way (installing what
requirements.txt asks first, as the daemon would); the daemon checks at start those that start no
instance of their own (`min: 0`), so that a handler that cannot load is known before the first
message finds out.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Dict, List, Optional, Tuple

from ..config import AppConfig, Function
from ..errors import InvocationError
from ..instances.fdwatch import FdWatcher
from ..instances.spawner import Spawner
from ..isolation import RunAs, RunDir, plan
from .packages import PackageCache

log = logging.getLogger("openedge_function.check")

BOUND = 30.0   # seconds a check may take at most (the function's import, not its initializer)


def check_code(spawner: Spawner, function: Function, bound: float = BOUND) -> Optional[InvocationError]:
    """Load `function` in a throwaway instance of `spawner`; None when it would start, else why not.
    Blocks for up to `bound` seconds."""
    instance = spawner.instance(function, "check", lambda instance: None)
    instance.check = True
    try:
        instance.start(bound)
    except InvocationError as exc:
        return exc
    finally:
        instance.stop(2.0)
    return None


def check_all(config: AppConfig, bound: float = BOUND) -> List[Tuple[int, Function, InvocationError]]:
    """Check every function of `config` (its requirements installed first), a few at a time; the
    functions that would not start (their place in `functions:`, themselves, why)."""
    users = plan(config)
    cache = PackageCache(config.packages)
    fdwatch, rundir = FdWatcher(), RunDir()
    try:
        def one(function: Function) -> Optional[InvocationError]:
            who: RunAs = users[function.name]
            try:
                packages = cache.install(function, who)
            except InvocationError as exc:
                return exc
            spawner = Spawner(rundir.home(function, who), fdwatch)
            spawner.paths = (packages,) if packages else ()
            return check_code(spawner, function, bound)

        with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="check") as threads:
            outcomes: Dict[str, Optional[InvocationError]] = dict(
                zip((f.name for f in config.functions), threads.map(one, config.functions)))
    finally:
        fdwatch.close()
        rundir.close()
    failed = []
    for index, function in enumerate(config.functions):
        error = outcomes[function.name]
        if error is not None:
            failed.append((index, function, error))
    return failed


def describe(index: int, function: Function, error: InvocationError) -> str:
    """One failure as `--check` reports it: the function, where its code is, what is wrong and
    the lines of the traceback that are the function's own."""
    lines = [f"functions[{index}] ({function.name}, code in {function.codedir}): {error.error_type}: "
             f"{error.message}"]
    lines += [f"    {line.rstrip()}" for line in error.stack_trace if line.strip()][-8:]
    return "\n".join(lines)
