"""The supervisor: one process that owns the broker connections, the pools and the instances.

Signal handlers only queue the signal; the main loop dispatches it and, between signals, enforces
memory limits and looks after the template. Messages never pass through this thread: they travel
on the data plane's loop (dataplane.py), which owns the broker connections, the pools and the
streams to the instances.

A function's code directory is watched: once an edit goes quiet, new code takes over
(deploy/handover.py); the daemon provides the pools and the switch. What /status and /healthz
report is read from outside (api/status.py).

SIGHUP re-reads the configuration. Unchanged rules and functions keep their connections and
instances; a changed function gets a new pool at once while its old instances finish what they
run; a removed or changed rule stops taking messages, settles what it has, unsubscribes (when
removed) and disconnects before its replacement connects with the same client id. Nothing is lost:
whatever a stopped connection did not acknowledge, the broker delivers again. A new configuration
with an error is refused with the error logged, and the running one stays.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gc
import logging
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from .api.calls import Calls
from .broker import Publisher
from .config import AppConfig, Function, Hub, Rule, Server, load_config
from .config.layout import control_socket
from .dataplane import DataPlane
from .deploy.check import check_code
from .deploy.codewatch import CodeWatch
from .deploy.handover import Handover
from .deploy.lastgood import LastGoodStore
from .deploy.packages import Installer, PackageCache
from .errors import ConfigError, InvocationError, ServerError
from .instances.fdwatch import FdWatcher
from .instances.instance import Instance
from .instances.spawner import Spawner
from .instances.template import Template, become_subreaper, reap_orphans
from .isolation import Cgroups, RunAs, RunDir, detect, group_id, plan, warn_readable_secrets
from .journal import Journal, journal_path
from .logs import setup_logging
from .pool import Pool
from .replies import ReplyPolicy
from .rules import RuleRunner

if TYPE_CHECKING:
    from .api.control import ControlSocket
    from .api.history import History
    from .api.metrics import Metrics
    from .api.server import HttpServer

log = logging.getLogger(__name__)

_TICK = 0.1            # seconds between maintenance passes: memory checks, the template
_REAP_EVERY = 1.0      # seconds between collecting what instances' subprocesses left orphaned
_SAMPLE_EVERY = 1.0    # seconds between the console's samples of each function's counts
_SHUTDOWN_EXTRA = 5.0  # on top of the longest function timeout, for a graceful stop
CHECK_WAIT = 10.0      # seconds the start waits for the checks of `min: 0` functions at most
LEAVE_QUIET = 0.5      # seconds a shared subscription must be quiet, after its unsubscribe, to be left


class Daemon:
    """Runs the configuration until SIGTERM or SIGINT; `run()` returns the exit status."""

    def __init__(self, config: AppConfig, workdir: Optional[str] = None) -> None:
        self.config = config
        self.workdir = workdir or os.getcwd()
        self.pools: Dict[str, Pool] = {}
        self.rules: List[RuleRunner] = []
        self.publisher: Optional[Publisher] = None
        self.nats_publisher: Optional[Any] = None   # jetstream.NatsPublisher, for rules that publish to NATS
        self._leaving: List[Pool] = []              # pools of changed or removed functions
        self._transitions: List[threading.Thread] = []
        self._signals: List[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._rundir: Optional[RunDir] = None
        self._cgroups: Optional[Cgroups] = None
        self._users: Dict[str, RunAs] = {}
        self._journal: Optional[Journal] = None
        self._fdwatch: Optional[FdWatcher] = None
        self._template: Optional[Template] = None
        self.handover: Optional[Handover] = None    # new code of functions whose code changed
        self._packages = PackageCache(config.packages)
        self.last_good = LastGoodStore(self.workdir)
        self._installer: Optional[Installer] = None
        self._posted: Deque[Tuple[Callable[..., None], Tuple[Any, ...]]] = collections.deque()
        self._reaped_at = 0.0
        self.metrics: Optional["Metrics"] = None
        self.history: Optional["History"] = None    # what the console shows of the past (with a server)
        self._sampled_at = 0.0
        self.limits = ""                            # the kernel limits instances get, in words
        self.http: Optional["HttpServer"] = None
        self.control: Optional["ControlSocket"] = None
        self.started_at = time.time()
        self.plane = DataPlane()
        self.calls = Calls(self.plane, lambda: self.pools)   # context.invoke, without the server

    # -- signals: the handlers only queue -----------------------------------------------------

    def _queue_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except BlockingIOError:
            pass

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the daemon's thread soon; from any thread."""
        self._posted.append((fn, args))
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
        warn_readable_secrets(self.config)
        try:
            self._journal = Journal(journal_path(self.workdir))
        except OSError as exc:
            log.warning("no in-flight journal (%s): a message that crashes the daemon is not "
                        "recognised at the next start", exc)
        self._users = plan(self.config)
        # Instances listen in private directories, one per pool, in the run directory.
        self._rundir = RunDir()
        # Before any child: under cgroup v2 the daemon moves itself into a group of its own.
        self._cgroups, why = detect()
        if self._cgroups is not None:
            self.limits = (f"control groups ({self._cgroups.describe()}): memory, pids"
                           + (", cpu" if self._cgroups.cpu else ""))
            log.info("instances get %s", self.limits)
        else:
            self.limits = (f"no control groups ({why}): memory limits are polled, and rlimits bound "
                           "processes and address space instead")
            log.warning("instances get %s", self.limits)
        for name, who in self._users.items():
            log.info("function %s runs as %s", name, who)
        self._fdwatch = FdWatcher()
        self.handover = Handover(self, CodeWatch(self._fdwatch))
        self.last_good.prune(self.config.functions)
        self._packages.prune({key for key in (self._packages.key(f, self._users[f.name])
                                              for f in self.config.functions) if key}
                             | {os.path.basename(path) for path in self.last_good.packages()})
        self._installer = Installer(self._packages, self._cgroups)
        self.plane.start()
        # Instances are forks of a template that has imported the runtime already; they come back
        # to us as children only if we are a subreaper.
        if become_subreaper():
            self._template = Template()
            self._template.start()
        else:
            log.info("instances start as new interpreters (cannot be a child subreaper here)")
        try:
            if self.config.server is not None:
                self._serve(self.config.server)
            self._listen()
            self._start()
            self._loop()
            return self._shutdown()
        finally:
            if self.control is not None:
                self.control.close()
            if self.http is not None:
                self.http.close()
            if self._template is not None:
                self._template.close()
                reap_orphans()
            if self._installer is not None:
                self._installer.close()
            self.plane.stop()
            if self.handover is not None:
                self.handover.close()
            if self._fdwatch is not None:
                self._fdwatch.close()
            if self._cgroups is not None:
                self._cgroups.close()
            if self._journal is not None:
                self._journal.close()
            self._rundir.close()

    def _start(self) -> None:
        config = self.config
        for function in config.functions:
            self.pools[function.name] = self.make_pool(function)
        for pool in self.pools.values():
            self.plane.call(pool.start)
        self._check(self.pools.values(), CHECK_WAIT, "at start")
        self.publisher = self._publisher(config.hub)
        self._nats_publisher(config)
        for rule in config.rules:
            self.rules.append(self._runner(rule, config, self.pools, self.publisher))
        log.info("openedge-function (pid %s): %d functions, %d rules, broker %s",
                 os.getpid(), len(self.pools), len(self.rules), config.hub.address)
        if not config.functions:
            log.warning("no functions (functions: []): nothing runs until a reload (SIGHUP) adds some")
        if self.http is not None:
            self.http.start()
        for runner in self.rules:
            runner.start()
        assert self.handover is not None
        self.handover.follow(config.functions)
        # What exists now (the imported modules, the configuration, the pools) lives as long as
        # the daemon: out of the collector's sight, a full collection no longer walks it (~30,000
        # objects, ~10 ms on a gateway's core, a pause every message in flight would wait out).
        gc.collect()
        gc.freeze()

    def _check(self, pools: Iterable[Pool], wait: float, when: str) -> None:
        """Load the code of functions that start no instance (`min: 0`) in throwaway instances
        (at start, before the broker): what does not load is known (logged, in /healthz) before a
        message finds out, and their last good version serves from the first message. Waits for
        the checks up to `wait` seconds; slower ones report when they end."""
        pools = [pool for pool in pools if pool.function.instance.min == 0 and not pool.held]
        if not pools:
            return
        threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="check")
        checks = {threads.submit(check_code, pool.spawner, pool.function): pool for pool in pools}
        done, late = concurrent.futures.wait(checks, wait)
        for future in done:
            self._checked(checks[future], future.result(), when)
        for future in late:
            future.add_done_callback(lambda f: self.post(self._checked, checks[f], f.result(), when))
        threads.shutdown(wait=False)

    def _checked(self, pool: Pool, error: Optional[InvocationError], when: str) -> None:
        name = pool.function.name
        if self.pools.get(name) is not pool:
            return   # replaced by a reload meanwhile
        if error is None:
            log.info("function %s: its code loads (checked %s)", name, when)
        elif not self.plane.run(pool.use_last_good, error):   # which says so when it has one
            log.error("function %s: its code does not load (%s: %s); it has no last good version, so its "
                      "messages get FunctionLoadError until %s changes", name, error.error_type,
                      error.message, pool.function.codedir)

    def _serve(self, server: Server) -> None:
        """Bind the HTTP server (it serves once the pools exist)."""
        # Imported only with a server: a daemon without one doesn't carry them.
        from .api import console, status
        from .api.history import History
        from .api.metrics import Metrics
        from .api.server import Api, HttpServer
        self.metrics = Metrics(lambda: self.pools, lambda: self.rules, lambda: self.publisher)
        history = self.history = History(self.metrics.functions)
        logging.getLogger().addHandler(history.logs)
        vitals = console.Vitals()
        page = console.Console(server, history,
                               lambda since: console.state(self, status.status(self), history, vitals, since))
        # Reload and restart over the network only behind the token (the control socket has them).
        api = Api(server, self.metrics, lambda: self.pools, lambda: status.health(self),
                  lambda: status.status(self), self._verbs() if server.token else None, page,
                  history.failures)
        try:
            self.http = HttpServer(api, server)
        except OSError as exc:
            raise ServerError(f"server.address: cannot listen on {server.address}: {exc.strerror or exc}") \
                from None
        log.info("HTTP server on http://%s:%d%s", server.host, self.http.port,
                 "" if server.token else " without a token: it only accepts loopback addresses "
                 "(set server.token to listen beyond)")

    def _listen(self) -> None:
        """The control socket (api/control.py): the command line's way in, with or without a
        server. A daemon that cannot make it runs on without, and says why."""
        from .api import status
        from .api.control import ControlSocket
        from .api.server import Api
        config = self.config
        path = config.control.socket or control_socket(config.file)
        api = Api(Server(host="local", port=0), self.metrics, lambda: self.pools,
                  lambda: status.health(self), lambda: status.status(self), self._verbs(),
                  failures=self.history.failures if self.history is not None else None)
        try:
            gid = group_id(config.control.group) if config.control.group else None
            self.control = ControlSocket(path, api, gid)
        except OSError as exc:
            log.warning("no control socket (%s): `openedge-function status` and the other commands "
                        "reach this daemon only through its HTTP server", exc.strerror or exc)
            return
        self.control.start()
        log.info("control socket on %s (openedge-function status|invoke|reload|restart -c %s)", path,
                 os.path.abspath(config.file))

    def _verbs(self) -> Tuple[Callable[[], Tuple[bool, str]], Callable[[str], Tuple[bool, str]]]:
        """Reload and restart, for the control socket and a server with a token."""
        return (lambda: self._on_daemon_thread(self._reload, "reload request"),
                lambda name: self._on_daemon_thread(self._restart, name))

    def _on_daemon_thread(self, fn: Callable[..., Tuple[bool, str]], *args: Any) -> Tuple[bool, str]:
        """Run `fn(*args)` on the daemon's thread and wait for what it says."""
        done = threading.Event()
        said: List[Tuple[bool, str]] = []

        def run() -> None:
            try:
                said.append(fn(*args))
            finally:
                done.set()

        self.post(run)
        if not done.wait(60.0) or not said:
            return False, "the daemon did not get to it within 60 s (it may be stopping)"
        return said[0]

    def _restart(self, name: str) -> Tuple[bool, str]:
        """New instances of function `name`'s current code take over; the old ones finish what
        they run. Its last good version is tried again only if the code still does not load."""
        old = self.pools.get(name)
        if old is None:
            return False, f"no function named {name!r}"
        assert self.handover is not None
        self._leaving.extend(self.handover.forget(lambda other: other == name))
        pool = self.make_pool(old.function)
        pool.follow(old)
        self.plane.call(pool.start)
        self.take_over(name, pool)
        self._check([pool], 0, "on restart")
        log.info("function %s: restarted on request: new instances of %s take over", name,
                 old.function.codedir)
        return True, f"function {name}: new instances of its code take over, the old ones finish what they run"

    def _publisher(self, hub: Hub) -> Publisher:
        """Connect the publisher first, so that the first outcomes find it connected."""
        publisher = Publisher(self.plane, hub, f"{hub.clientid}-publisher")
        publisher.start()
        if not publisher.connected.wait(min(hub.connect_timeout, 3.0)):
            log.warning("publisher: no connection to %s yet; starting anyway", hub.address)
        return publisher

    def make_pool(self, function: Function, candidate: bool = False) -> Pool:
        """A pool for `function`; held until its requirements are installed. A `candidate` (new
        code) starts one instance at once and leaves failures to the hand-over."""
        assert self._rundir is not None and self._fdwatch is not None
        who = self._users[function.name]
        spawner = Spawner(self._rundir.home(function, who, self._cgroups), self._fdwatch, self._template,
                          self.calls.handle)
        spawner.call_max = max([f.instance.message_max for f in self.config.functions]
                               + [function.instance.message_max])
        key = self._packages.key(function, who)   # None: no requirements.txt
        installed = self._packages.installed(key)
        install = key is not None and installed is None
        if installed is not None:
            spawner.paths = (installed,)
        pool = Pool(self.plane, function, spawner, warm=candidate, held=install)
        if self.metrics is not None:
            pool.observe = self.metrics.observer(function.name)
        if not candidate:   # new code that does not load leaves the serving pool as it is
            pool.last_good = self.last_good.latest(function)
        pool.on_loaded = lambda instance: self.post(self._keep_good, pool, instance)
        if install:
            assert self._installer is not None

            def installed_now(path: Optional[str], error: Optional[InvocationError]) -> None:
                if error is None:
                    self.plane.call(pool.release, (path,) if path else ())
                    return
                if not candidate and pool.last_good is None:
                    log.error("function %s: %s; its messages get FunctionLoadError until the file "
                              "changes (it has no last good version to start from)", function.name,
                              error.message)
                self.plane.call(pool.fail, error)

            self._installer.submit(function, who, installed_now)
        return pool

    def _nats_publisher(self, config: AppConfig) -> None:
        """The NATS publisher, once a rule publishes to a NATS subject."""
        if self.nats_publisher is None and config.nats is not None and any(r.to_nats for r in config.rules):
            from .jetstream import NatsPublisher
            self.nats_publisher = NatsPublisher(self.plane, config.nats)
            self.nats_publisher.start()

    def _runner(self, rule: Rule, config: AppConfig, pools: Dict[str, Pool], publisher: Publisher) -> RuleRunner:
        function = config.function(rule.function)
        if rule.to_nats:
            publisher = self.nats_publisher
        runner = RuleRunner(self.plane, rule, config.hub, function, pools[function.name], publisher,
                            _replies(rule, config), self._journal, config.nats)
        if self.history is not None:
            runner.on_failure = self.history.failures.on_rule_failure
        return runner

    def _loop(self) -> None:
        while True:
            signum = self._next_signal(_TICK)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(signum).name)
                return
            if signum == signal.SIGHUP:
                self._reload()
            while self._posted:
                fn, args = self._posted.popleft()
                fn(*args)
            if self.handover is not None:
                self.handover.check()
            self._maintain()

    # -- new code (the hand-over's side of it) -------------------------------------------------

    def take_over(self, name: str, pool: Pool) -> None:
        """`pool` (new code of function `name`) serves from now on; the old pool finishes what
        it runs and goes."""
        old = self.pools[name]
        self.pools = {**self.pools, name: pool}
        runners = [runner for runner in self.rules if runner.function.name == name]

        def switch() -> None:   # on the loop: between two messages, nothing queued runs old code
            for runner in runners:
                runner.use(runner.function, pool, runner.replies)
            old.hand_over(pool)

        self.plane.run(switch)
        self._leaving.append(old)

    def _keep_good(self, pool: Pool, instance: Instance) -> None:
        """An instance of `pool`'s code loaded: keep that code as the function's last good."""
        good = self.last_good.keep(pool.function, pool.spawner.sandbox.who, instance.paths,
                                   instance.started_at)
        if good is not None:
            pool.last_good = good

    def retire(self, pool: Pool) -> None:
        pool.close()
        self._leaving.append(pool)

    def _maintain(self) -> None:
        for pool in self.pools.values():
            pool.check_memory()
        for pool in list(self.handover.candidates.values() if self.handover else ()):
            pool.check_memory()
        for pool in list(self._leaving):
            pool.check_memory()
            if pool.join(0):
                self._leaving.remove(pool)
        self._transitions = [t for t in self._transitions if t.is_alive()]
        now = time.monotonic()
        if self.history is not None and now - self._sampled_at >= _SAMPLE_EVERY:
            self._sampled_at = now
            self.history.samples.sample(self.pools)
        if self._template is not None and now - self._reaped_at >= _REAP_EVERY:
            self._reaped_at = now
            self._template.check()
            reap_orphans()

    # -- reload -----------------------------------------------------------------------------------

    def _reload(self, by: str = "SIGHUP") -> Tuple[bool, str]:
        """Re-read the configuration (`by` a signal or a request); whether it was taken, and what
        changed or why not."""
        try:
            new = load_config(self.config.file, self.workdir)
            users = plan(new)
        except ConfigError as exc:
            log.error("%s: the new configuration is refused, the running one stays: %s", by, exc)
            return False, f"the new configuration is refused, the running one stays: {exc}"
        old = self.config
        if new.server != old.server:
            log.warning("%s: server settings change at the next restart; the HTTP server keeps %s",
                        by, old.server.address if old.server else "off")
            new = dataclasses.replace(new, server=old.server)
        if new.nats != old.nats and old.nats is not None:
            log.warning("%s: nats settings change at the next restart; the running ones stay", by)
            new = dataclasses.replace(new, nats=old.nats)
        self._nats_publisher(new)
        if new.control != old.control:
            log.warning("%s: control settings change at the next restart; the control socket stays", by)
            new = dataclasses.replace(new, control=old.control)
        if new.logger != old.logger:
            setup_logging(new.logger)
            if self.history is not None:
                logging.getLogger().addHandler(self.history.logs)
        publisher = self.publisher if new.hub == old.hub else self._publisher(new.hub)
        retired_publisher = None if publisher is self.publisher else self.publisher

        self._users = users
        pools: Dict[str, Pool] = {}
        fresh: List[Pool] = []
        added = [f.name for f in new.functions if f.name not in self.pools]
        for function in new.functions:
            pool = self.pools.get(function.name)
            if pool is not None and pool.function == function and pool.spawner.sandbox.who == users[function.name]:
                pools[function.name] = pool
            else:
                pools[function.name] = self.make_pool(function)
                self.plane.call(pools[function.name].start)
                fresh.append(pools[function.name])
        leaving = [pool for name, pool in self.pools.items() if pools.get(name) is not pool]
        assert self.handover is not None
        leaving += self.handover.forget(lambda name: pools.get(name) is not self.pools.get(name))

        kept: List[RuleRunner] = []
        stopping: List[Tuple[RuleRunner, bool]] = []   # (runner, removed for good)
        starting: List[RuleRunner] = []
        by_key = {_rule_key(r.rule): r for r in self.rules}
        for rule in new.rules:
            runner = by_key.pop(_rule_key(rule), None)
            if runner is not None and new.hub == old.hub and _same_rule(runner.rule, rule):
                runner.rule = rule
                # On the loop: the next message the intake reads goes to the new pool.
                self.plane.run(runner.use, new.function(rule.function), pools[rule.function],
                               _replies(rule, new))
                kept.append(runner)
                continue
            if runner is not None:
                # Same client id: unsubscribe only if the new rule no longer wants that topic.
                stopping.append((runner, runner.rule.subscribe.topic != rule.subscribe.topic))
            starting.append(self._runner(rule, new, pools, publisher))
        stopping.extend((runner, True) for runner in by_key.values())

        old_pools = self.pools
        self.config, self.pools, self.rules = new, pools, kept + starting
        self.publisher = publisher
        self._leaving.extend(leaving)
        replaced = sum(1 for name in old_pools if name in pools and pools[name] is not old_pools[name])
        summary = (f"configuration reloaded: {len(kept)} rules kept, {len(stopping)} stopped, "
                   f"{len(starting)} started; functions: {len(added)} added, {replaced} replaced, "
                   f"{sum(1 for name in old_pools if name not in pools)} removed")
        log.info("%s: %s", by, summary)
        self.handover.follow(new.functions)
        self._check(fresh, 0, "at the reload")
        transition = threading.Thread(target=self._transition,
                                      args=(stopping, starting, leaving, retired_publisher),
                                      name="reload", daemon=True)
        self._transitions.append(transition)
        transition.start()
        return True, summary

    @staticmethod
    def _transition(stopping: List[Tuple[RuleRunner, bool]], starting: List[RuleRunner],
                    leaving: List[Pool], retired_publisher: Optional[Publisher]) -> None:
        """Settle and disconnect the old rules, then connect the new ones; retire old pools."""
        # A shared subscription that goes leaves its group first, as at a stop.
        leave_groups([runner for runner, removed in stopping if removed and runner.rule.shared],
                     lambda: bool(time.sleep(0.05)))
        for runner, _ in stopping:
            runner.intake.stop_intake()
        for runner, removed in stopping:
            runner.wait_settled(runner.function.instance.timeout + _SHUTDOWN_EXTRA)
            if removed:
                runner.intake.unsubscribe()
            runner.stop()
        for runner in starting:
            runner.start()
        for pool in leaving:
            pool.close()
        if retired_publisher is not None:
            retired_publisher.drain(timeout=5.0)
            retired_publisher.stop()

    # -- stopping -------------------------------------------------------------------------------

    def _leave_groups(self) -> None:
        """Shared subscriptions first (see leave_groups); a second SIGTERM cuts it short."""
        leave_groups([runner for runner in self.rules if runner.rule.shared],
                     lambda: self._next_signal(0.05) in (signal.SIGTERM, signal.SIGINT))

    def _shutdown(self) -> int:
        """Stop intake, let in-flight work finish and publish, stop every instance."""
        for transition in self._transitions:
            transition.join()
        self._leave_groups()
        for runner in self.rules:
            runner.intake.stop_intake()
        pools = list(self.pools.values()) + self._leaving + (self.handover.drop_all() if self.handover else [])
        for pool in pools:
            pool.close()
        longest = max((p.function.instance.timeout for p in pools), default=0.0)
        deadline = time.monotonic() + longest + _SHUTDOWN_EXTRA
        while not all(pool.join(0) for pool in pools):
            if time.monotonic() > deadline or self._next_signal(0.05) in (signal.SIGTERM, signal.SIGINT):
                log.warning("stopping now: abandoning unfinished invocations to the broker")
                for pool in pools:
                    pool.abort()
                for pool in pools:
                    pool.join(5.0)
                break
            for pool in pools:
                pool.check_memory()
        for publisher in (self.publisher, self.nats_publisher):
            if publisher is not None:
                publisher.drain(timeout=5.0)
        for runner in self.rules:
            runner.stop()
        for publisher in (self.publisher, self.nats_publisher):
            if publisher is not None:
                publisher.stop()
        for runner in self.rules:
            stats = runner.stats()
            log.info("rule %s: received %d, published %d, failed %d, dropped %d",
                     runner.rule.name, stats["received"], stats["published"], stats["failed"],
                     stats["dropped"])
        for pool in pools:
            stats = pool.stats()
            log.info("function %s: peak queue %d, dropped %d QoS 0 messages", pool.function.name,
                     stats["queue_peak"], stats["dropped"])
        log.info("stopped")
        return 0


def leave_groups(shared: List[RuleRunner], hurry: Callable[[], bool]) -> None:
    """Unsubscribe the shared subscriptions of `shared`, so that the broker gives the group's other
    members what comes from now on, and serve what it sent before it took the unsubscribe (left
    unacknowledged, that would wait in this daemon's session, for ever or until the session
    expires). Done when those rules have been quiet and settled for LEAVE_QUIET seconds, or when
    `hurry()` (called between looks, it may wait a little) says so."""
    if not shared:
        return
    unsubscribing = [threading.Thread(target=runner.intake.unsubscribe, daemon=True) for runner in shared]
    for thread in unsubscribing:
        thread.start()
    for thread in unsubscribing:
        thread.join()
    longest = max(runner.function.instance.timeout for runner in shared) + _SHUTDOWN_EXTRA
    deadline = time.monotonic() + longest
    seen: List[int] = []
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        received = [runner.received for runner in shared]
        if received != seen:
            seen, quiet_since = received, time.monotonic()
        elif all(runner.pending <= 0 for runner in shared) and time.monotonic() - quiet_since >= LEAVE_QUIET:
            return
        if hurry():
            return
    log.warning("shared subscriptions still busy %.0fs after leaving their groups; what they hold "
                "goes back to the broker", longest)


def _replies(rule: Rule, config: AppConfig) -> ReplyPolicy:
    """Where `rule` answers MQTT 5 requests: its response.topics, never onto any rule's input."""
    return ReplyPolicy(rule.response_topics, (r.subscribe.topic for r in config.rules if r.subscribe.topic))


def _rule_key(rule: Rule) -> object:
    """What identifies a rule across reloads: its id (or legacy client id), else its content."""
    if rule.id or rule.clientid:
        return ("id", rule.id, rule.clientid)
    return ("anonymous", rule.subscribe, rule.function, rule.publish, rule.error)


def _same_rule(a: Rule, b: Rule) -> bool:
    """Equal but for the position in the file."""
    return a.__class__(**{**a.__dict__, "index": b.index}) == b
