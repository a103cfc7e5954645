"""New code takes over from old: a function's code directory changed, so a pool of the new code
starts one instance; once it is ready, it takes over what is queued and every new message while
the old instances finish what they run. New code that does not load is logged once, shown in
/status and /healthz, and the old code keeps serving. A requirements.txt is installed first
(packages.py).

The daemon owns the running pools and rules; this module owns the candidates (pools of new code
that have not proved themselves yet) and what their failures said. It runs on the daemon's thread.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, Protocol

from ..config import Function
from ..errors import InvocationError
from ..pool import Pool
from .codewatch import CodeWatch

log = logging.getLogger("openedge_function.daemon")


class Running(Protocol):
    """What the hand-over needs of the daemon."""
    pools: Dict[str, Pool]

    def make_pool(self, function: Function, candidate: bool = False) -> Pool:
        """A pool for `function`; a candidate starts one instance at once, whatever `min`."""

    def post(self, fn: Callable[..., None], *args: object) -> None:
        """Run `fn(*args)` on the daemon's thread soon; from any thread."""

    def take_over(self, name: str, pool: Pool) -> None:
        """`pool` serves function `name` from now on; its predecessor finishes and goes."""

    def retire(self, pool: Pool) -> None:
        """Close `pool` and let it finish what it runs."""


class Handover:
    """The candidates of new code, and why the new code of a function does not load."""

    def __init__(self, daemon: Running, code: CodeWatch) -> None:
        self._daemon = daemon
        self._code = code
        self.how = code.how
        self.candidates: Dict[str, Pool] = {}   # function -> the pool of its new code
        self.errors: Dict[str, str] = {}        # function -> why its new code does not load

    def follow(self, functions: Iterable[Function]) -> None:
        """Watch the code directories of `functions` that want it (and only those)."""
        wanted = {f.name: f.codedir for f in functions if f.watch_code}
        followed = {name: codedir for codedir, names in self._code.followed().items() for name in names}
        for name, codedir in followed.items():
            if wanted.get(name) != codedir:
                self._code.unfollow(name)
        for name, codedir in wanted.items():
            if followed.get(name) != codedir:
                self._code.follow(name, codedir)

    def check(self) -> None:
        """Renew the functions whose code changed and went quiet since the last check."""
        for name, since in self._code.due():
            self._renew(name, since)

    def _renew(self, name: str, since: float) -> None:
        """`name`'s code changed: start a pool of the new code (replacing one still starting)."""
        pool = self._daemon.pools.get(name)
        if pool is None:
            return
        stale = self.candidates.pop(name, None)
        if stale is not None:
            self._daemon.retire(stale)
        candidate = self._daemon.make_pool(pool.function, candidate=True)
        candidate.follow(stale or pool)
        candidate.on_first = lambda error: self._daemon.post(self._ready, name, candidate, error, since)
        self.candidates[name] = candidate
        log.info("function %s: %s changed; starting an instance of the new code", name,
                 pool.function.codedir)
        candidate.plane.call(candidate.start)

    def _ready(self, name: str, candidate: Pool, error: Optional[InvocationError], since: float) -> None:
        """The new code's first instance is ready (it takes over) or failed (the old code stays)."""
        if self.candidates.get(name) is not candidate:
            return   # a later change, a reload or the stop replaced it meanwhile
        del self.candidates[name]
        if error is not None:
            self._daemon.retire(candidate)
            text = f"{error.error_type}: {error.message}"
            if self.errors.get(name) != text:
                log.error("function %s: the new code does not load, the previous code keeps serving "
                          "(and new instances start from its last good version, if it has one): %s",
                          name, text)
            self.errors[name] = text
            serving = self._daemon.pools.get(name)
            if serving is not None:
                serving.plane.call(serving.use_last_good, error, True)
            return
        self._daemon.take_over(name, candidate)
        self.errors.pop(name, None)
        log.info("function %s: the new code serves, %.0f ms after the change", name,
                 (time.monotonic() - since) * 1000)

    def forget(self, replaced: Callable[[str], bool]) -> List[Pool]:
        """A reload replaced or removed some functions: their candidates are moot (closed, and
        returned to be waited for) and their errors are gone."""
        moot = []
        for name, candidate in list(self.candidates.items()):
            if replaced(name):
                del self.candidates[name]
                candidate.close()
                moot.append(candidate)
        for name in list(self.errors):
            if replaced(name):
                del self.errors[name]
        return moot

    def drop_all(self) -> List[Pool]:
        """Stopping: every candidate, to be closed with the rest."""
        candidates = list(self.candidates.values())
        self.candidates.clear()
        return candidates

    def close(self) -> None:
        self._code.close()
