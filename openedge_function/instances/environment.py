"""What a runtime process starts with: its environment, and the spec it reads first.

The spec travels over the instance's status socket, never argv (which anyone on the machine can
read): what the runtime runs, as whom, within which limits, and what its context reports.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Sequence

from runtime_python._pb import function_pb2 as pb
from runtime_python.wire import SPEC

from ..config import Function
from ..isolation import RunAs

# The runtime package sits beside this one; an interpreter other than ours finds it through this.
RUNTIME_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__))))
_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Threads of the runtime itself (main, lifeline, door) and room to spare, on top of what
# instance.pids allows a handler.
RUNTIME_TASKS = 16
# The size of an instance's private /tmp (and /var/tmp, /dev/shm, /run/lock) without instance.memory.
TMP_SIZE = 128 << 20


def base_environment() -> Dict[str, str]:
    """Nothing of the daemon's own environment, and so not the broker credentials."""
    return {
        "PATH": _BASE_PATH,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": os.environ.get("HOME", "/"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def instance_environment(function: Function, instance_id: str) -> Dict[str, str]:
    """The function's env over the base; the daemon's own environment never reaches an instance."""
    env = base_environment()
    if function.python:
        env["PYTHONPATH"] = RUNTIME_ROOT
    env.update(function.env)
    env["OPENEDGE_FUNCTION_NAME"] = function.name
    env["OPENEDGE_FUNCTION_INSTANCE_ID"] = instance_id
    return env


def function_spec(function: Function) -> Dict[str, Any]:
    """What the runtime's context reports of the function."""
    limits = function.instance
    cpus = limits.cpu_share or (len(limits.cpus) if limits.cpus else os.cpu_count() or 1)
    return {
        "name": function.name, "handler": function.handler, "initializer": function.initializer,
        "event": function.event, "log_max": function.log_max,
        "timeout_ms": int(limits.timeout * 1000), "memory_mb": limits.memory >> 20,
        "cpu_millicores": int(cpus * 1000),
        "version": function.version, "alias": function.alias, "package": function.package,
        "region": function.region, "account_id": function.account_id,
        "credentials": dataclasses.asdict(function.credentials),
        "service": dataclasses.asdict(function.service),
    }


def start_spec(function: Function, instance_id: str, who: RunAs, env: Dict[str, str], key: str,
               paths: Sequence[str], socket_path: str, grouped: bool, call_max: int,
               check: bool = False) -> Dict[str, Any]:
    """The first message of the status socket. `grouped`: the instance has a control group, so
    rlimits need not stand in for it; `call_max`: the largest body of a call it makes; `check`:
    load the handler and initializer and run nothing (deploy/check.py)."""
    limits = function.instance
    return {SPEC: {
        **function_spec(function), "key": key, "paths": list(paths), "call_max": call_max,
        "start": {"function": function.name, "handler": function.handler,
                  "initializer": function.initializer, "codedir": function.codedir,
                  "socket": socket_path, "instance_id": instance_id,
                  "timeout_ms": int(limits.timeout * 1000), "check": check, "kind": function.type},
        "process": {
            "uid": who.uid, "gid": who.gid, "user": who.name, "env": env,
            "files": limits.files,
            # Without a group, rlimits stand in: processes of the user (all its instances)...
            "nproc": (limits.pids + RUNTIME_TASKS) * limits.max if not grouped and who.switches else 0,
            # ... and address space, a coarse stand-in for memory (polling still applies).
            "address_space": limits.memory if not grouped else 0,
            # As root: /tmp, /var/tmp, /dev/shm and /run/lock of its own, of this size each.
            "private_tmp": (limits.memory or TMP_SIZE) if os.geteuid() == 0 else 0,
        },
    }}
