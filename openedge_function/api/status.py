"""What /healthz, /status and `openedge-function status` tell of a running daemon, read from
outside it: the daemon runs, this module only looks (at what `Running` names)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple

from ..version import __version__
from ..config import AppConfig


class CodeState(Protocol):
    """What the hand-over to new code (deploy/handover.py) tells."""
    how: str                       # how code directories are watched
    errors: Mapping[str, str]      # function -> why its new code does not load
    candidates: Mapping[str, Any]  # function -> the pool of its new code, while it proves itself


class Running(Protocol):
    """What a report reads of the daemon."""
    config: AppConfig
    pools: Mapping[str, Any]       # function name -> Pool
    rules: Iterable[Any]           # RuleRunner
    publisher: Optional[Any]       # Publisher
    started_at: float
    handover: CodeState


def health(daemon: Running) -> Tuple[bool, List[str], List[str]]:
    """Whether the daemon serves (connected to the broker and every `min` instance up), why
    not, and what else needs a look: new code that does not load while the old one serves."""
    reasons = []
    publisher = daemon.publisher
    if publisher is not None and not publisher.connected.is_set():
        reasons.append("the publisher is not connected to the broker")
    for runner in list(daemon.rules):
        if not runner.intake.connected.is_set():
            reasons.append(f"rule {runner.rule.name} is not connected to the broker")
    warnings = []
    for name, pool in list(daemon.pools.items()):
        stats = pool.stats()
        ready = stats["instances"] - stats["starting"] - stats["states"].get("stopping", 0)
        good, error = pool.last_good, pool.code_error
        if stats["failing"]:
            reasons.append(f"function {name} fails to load: {stats['failing']}"
                           + (" (its last good version does not load either)" if pool.on_last_good
                              else "" if good else " (it has no last good version: it never loaded here)"))
        elif error is not None and not pool.on_last_good:
            reasons.append(f"function {name}: its code does not load: {error.error_type}: {error.message} "
                           "(it has no last good version: it never loaded here)")
        elif ready < pool.function.instance.min:
            reasons.append(f"function {name} has {ready} of its {pool.function.instance.min} "
                           "minimum instances up")
        if pool.on_last_good and error is not None:
            warnings.append(f"function {name}: its code does not load ({error.error_type}: {error.message}); "
                            f"its last good {good.describe()} serves")
        elif name in daemon.handover.errors:
            warnings.append(f"function {name}: the new code does not load, the previous code serves: "
                            f"{daemon.handover.errors[name]}")
    return not reasons, reasons, warnings


def status(daemon: Running) -> Dict[str, Any]:
    """What `openedge-function status` prints."""
    ok, reasons, warnings = health(daemon)
    code = daemon.handover
    functions = {}
    for name, pool in list(daemon.pools.items()):
        function, spawner = pool.function, pool.spawner
        functions[name] = {
            "type": function.type, "user": str(spawner.sandbox.who),
            "code": {"watch": code.how if function.watch_code else "off",
                     "error": code.errors.get(name) or _text(pool.code_error),
                     "replacing": name in code.candidates,
                     "serving": "last good" if pool.on_last_good else "current",
                     "last_good": _good(pool.last_good)},
            "packages": "installing" if pool.held else spawner.paths[0] if spawner.paths else None,
            "min": function.instance.min,
            "max": function.instance.max, **pool.stats(),
            "instance_list": [{"id": i.id, "pid": i.pid, "state": i.state.value} for i in pool.instances()],
        }
    rules = {runner.rule.name: {"function": runner.function.name,
                                "connected": runner.intake.connected.is_set(), **runner.stats()}
             for runner in list(daemon.rules)}
    publisher = daemon.publisher
    return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - daemon.started_at, 1),
            "healthy": ok, "reasons": reasons, "warnings": warnings,
            "broker": {"address": daemon.config.hub.address,
                       "connected": bool(publisher and publisher.connected.is_set())},
            "functions": functions, "rules": rules}


def _text(error: Any) -> Optional[str]:
    return f"{error.error_type}: {error.message}" if error is not None else None


def _good(good: Any) -> Optional[Dict[str, Any]]:
    """What status says of a last good version (deploy/lastgood.py)."""
    if good is None:
        return None
    return {"version": good.version, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(good.saved)),
            "path": good.path}
