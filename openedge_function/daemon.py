"""The supervisor: one process that owns the broker connections, the pools and the instances.

Signal handlers only queue the signal; the main loop dispatches it and, between signals, keeps the
pools at their `min` and enforces memory limits.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import tempfile
import time
from typing import Dict, List, Optional

from .config import AppConfig
from .pool import Pool
from .rules import RuleRunner
from .watch import Watcher

log = logging.getLogger(__name__)

_TICK = 0.1           # seconds between maintenance passes: memory checks, min instances
_SHUTDOWN_EXTRA = 5.0  # on top of the longest function timeout, for a graceful stop


class Daemon:
    """Runs the configuration until SIGTERM or SIGINT; `run()` returns the exit status."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.pools: Dict[str, Pool] = {}
        self.rules: List[RuleRunner] = []
        self._signals: List[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._rundir: Optional[str] = None
        self._watcher: Optional[Watcher] = None

    # -- signals: the handlers only queue -----------------------------------------------------

    def _queue_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except BlockingIOError:
            pass

    def _next_signal(self, timeout: float) -> Optional[int]:
        if not self._signals:
            try:
                ready, _, _ = select.select([self._wake_r], [], [], timeout)
            except InterruptedError:
                ready = []
            if ready:
                os.read(self._wake_r, 4096)
        return self._signals.pop(0) if self._signals else None

    # -- running --------------------------------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._queue_signal)
        # Instances listen in a private directory (mkdtemp makes it 0700).
        self._rundir = tempfile.mkdtemp(prefix="openedge-function-")
        self._watcher = Watcher()
        try:
            self._start()
            self._loop()
            return self._shutdown()
        finally:
            if self._watcher is not None:
                self._watcher.close()
            shutil.rmtree(self._rundir, ignore_errors=True)

    def _start(self) -> None:
        config = self.config
        assert self._rundir is not None and self._watcher is not None
        for function in config.functions:
            self.pools[function.name] = Pool(function, self._rundir, self._watcher)
        for rule in config.rules:
            function = config.function(rule.function)
            self.rules.append(RuleRunner(rule, config.hub, function, self.pools[function.name]))
        log.info("openedge-function (pid %s): %d functions, %d rules, broker %s",
                 os.getpid(), len(self.pools), len(self.rules), config.hub.address)
        for pool in self.pools.values():
            pool.start()
        for runner in self.rules:
            runner.start()

    def _loop(self) -> None:
        while True:
            signum = self._next_signal(_TICK)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(signum).name)
                return
            if signum == signal.SIGHUP:
                log.warning("SIGHUP: reloading the configuration is not supported yet; restart instead")
            self._maintain()

    def _maintain(self) -> None:
        for pool in self.pools.values():
            pool.maintain()
            pool.check_memory()

    # -- stopping -------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        """Stop intake, let in-flight work finish and publish, stop every instance."""
        for runner in self.rules:
            runner.client.stop_intake()
        for pool in self.pools.values():
            pool.close()
        longest = max((p.function.instance.timeout for p in self.pools.values()), default=0.0)
        deadline = time.monotonic() + longest + _SHUTDOWN_EXTRA
        while not all(pool.join(0) for pool in self.pools.values()):
            if time.monotonic() > deadline or self._next_signal(0.05) in (signal.SIGTERM, signal.SIGINT):
                log.warning("stopping now: abandoning unfinished invocations to the broker")
                for pool in self.pools.values():
                    pool.abort()
                for pool in self.pools.values():
                    pool.join(5.0)
                break
            self._maintain()
        for runner in self.rules:
            runner.client.drain(timeout=5.0)
            runner.client.stop()
        for pool in self.pools.values():
            stats = pool.stats()
            log.info("function %s: peak queue %d, dropped %d QoS 0 messages", pool.function.name,
                     stats["queue_peak"], stats["dropped"])
        log.info("stopped")
        return 0

