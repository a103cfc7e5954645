"""Prometheus metrics of the daemon, in a registry of its own.

Per invocation the pool calls one observer, which counts in plain integers (`Counts`: it runs on
the data plane's thread alone, so it needs no lock); the rest (instances by state, queue depth,
rule counters, connections, drops) is read from the pools, rules and publisher the daemon hands
over. Both are turned into metrics when /metrics is scraped, so the message path pays for a
counter and a bucket, nothing more. The console (api/console.py) samples the same counts.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from prometheus_client import CollectorRegistry, Info, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from ..version import __version__

if TYPE_CHECKING:
    from ..broker import Publisher
    from ..pool import Pool
    from ..rules import RuleRunner

Pools = Callable[[], Mapping[str, "Pool"]]
Rules = Callable[[], Iterable["RuleRunner"]]

disable_created_metrics()   # no *_created series: scrapers only need the counts

# Upper bounds of the run-time buckets, in seconds (the last bucket, +Inf, is implied).
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
          5.0, 10.0, 30.0, 60.0)
_STATES = ("starting", "idle", "busy", "stopping")
_UNREMARKABLE = ("ok", "none")   # outcomes that are not errors


class Counts:
    """One function's invocations since the daemon started: by outcome (ok, none, or the error
    type), and their run times in BOUNDS' buckets. Its pools count on the data plane's thread."""

    __slots__ = ("outcomes", "buckets", "seconds")

    def __init__(self) -> None:
        self.outcomes: Dict[str, int] = {}
        self.buckets: List[int] = [0] * (len(BOUNDS) + 1)   # not cumulative; the last is +Inf
        self.seconds = 0.0

    def observe(self, outcome: str, seconds: Optional[float]) -> None:
        """An invocation's outcome, and how long it ran (None: it did not run)."""
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if seconds is not None:
            self.buckets[bisect_left(BOUNDS, seconds)] += 1
            self.seconds += seconds

    def errors(self) -> int:
        return sum(n for outcome, n in list(self.outcomes.items()) if outcome not in _UNREMARKABLE)


def quantile(q: float, buckets: Iterable[int]) -> Optional[float]:
    """The `q` quantile (seconds) of run times counted in BOUNDS' buckets, interpolated within its
    bucket as Prometheus's histogram_quantile does; None without any."""
    counts = list(buckets)
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(BOUNDS):
                return BOUNDS[-1]   # over the last bound: that bound is all that is known
            low = BOUNDS[index - 1] if index else 0.0
            return low + (BOUNDS[index] - low) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


class Metrics:
    def __init__(self, pools: Pools, rules: Rules,
                 publisher: Callable[[], Optional["Publisher"]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.functions: Dict[str, Counts] = {}   # by function name, across reloads and new code
        self.registry.register(_DaemonCollector(pools, rules, publisher, self.functions))
        Info("openedge_function_build", "The daemon's version", registry=self.registry).info(
            {"version": __version__})

    def observer(self, function: str) -> Callable[[str, Optional[float]], None]:
        """What a pool calls after each invocation: (outcome, seconds; None when it did not run,
        as a FunctionLoadError)."""
        counts = self.functions.get(function)
        if counts is None:
            counts = self.functions[function] = Counts()
        return counts.observe

    def render(self) -> Tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DaemonCollector:
    """Reads the running configuration's pools, rules and publisher at each scrape."""

    def __init__(self, pools: Pools, rules: Rules, publisher: Callable[[], Any],
                 functions: Mapping[str, Counts]) -> None:
        self._pools, self._rules, self._publisher = pools, rules, publisher
        self._functions = functions

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        yield from self._invocations()
        yield from self._daemon()

    def _invocations(self) -> Iterator:
        invocations = CounterMetricFamily("openedge_function_invocations", "Invocations that ran, by "
                                          "outcome (ok, none, or the error type)", labels=["function", "outcome"])
        duration = HistogramMetricFamily("openedge_function_duration_seconds", "Handler run time",
                                         labels=["function"])
        bounds = [floatToGoString(bound) for bound in BOUNDS] + ["+Inf"]
        for name, counts in list(self._functions.items()):
            for outcome, n in list(counts.outcomes.items()):
                invocations.add_metric([name, outcome], n)
            cumulative, total = [], 0
            for bound, n in zip(bounds, list(counts.buckets)):
                total += n
                cumulative.append((bound, total))
            duration.add_metric([name], cumulative, counts.seconds)
        yield from (invocations, duration)

    def _daemon(self) -> Iterator:
        instances = GaugeMetricFamily("openedge_function_instances", "Instances by state",
                                      labels=["function", "state"])
        queued = GaugeMetricFamily("openedge_function_queue_depth", "Invocations waiting for an instance",
                                   labels=["function"])
        pool_dropped = CounterMetricFamily("openedge_function_pool_dropped_qos0",
                                           "QoS 0 messages dropped at a full queue", labels=["function"])
        load_failures = CounterMetricFamily("openedge_function_load_failures", "Instances that did not "
                                            "start (the code does not load, or it crashed at start)",
                                            labels=["function"])
        failing = GaugeMetricFamily("openedge_function_failing", "1 while the function's instances "
                                    "cannot start", labels=["function"])
        last_good = GaugeMetricFamily("openedge_function_last_good_serving", "1 while the function's "
                                      "code does not load and new instances start from its last good "
                                      "version", labels=["function"])
        for name, pool in list(self._pools().items()):
            stats = pool.stats()
            last_good.add_metric([name], 1 if pool.on_last_good else 0)
            for state in _STATES:
                instances.add_metric([name, state], stats["states"].get(state, 0))
            queued.add_metric([name], stats["queued"])
            pool_dropped.add_metric([name], stats["dropped"])
            load_failures.add_metric([name], stats["load_failures"])
            failing.add_metric([name], 1 if stats["failing"] else 0)
        received = CounterMetricFamily("openedge_function_messages_in", "Messages received by rule",
                                       labels=["rule"])
        published = CounterMetricFamily("openedge_function_messages_out", "Outcomes published by rule "
                                        "(results and error envelopes)", labels=["rule"])
        failed = CounterMetricFamily("openedge_function_messages_failed", "Messages answered with an "
                                     "error envelope, by rule", labels=["rule"])
        dropped = CounterMetricFamily("openedge_function_dropped_qos0", "QoS 0 messages dropped, by rule",
                                      labels=["rule"])
        connected = GaugeMetricFamily("openedge_function_broker_connected", "1 when the connection to "
                                      "the broker is up", labels=["connection"])
        refusals = {key: CounterMetricFamily(f"openedge_function_messages_{key}", text, labels=["rule"])
                    for key, text in (
                        ("refused", "MQTT 5 requests not run: their response topic is refused"),
                        ("poisoned", "Messages answered with PoisonMessage instead of run"),
                        ("expired", "MQTT 5 messages that expired before an instance was free"),
                        ("undeliverable", "Messages acknowledged with no outcome the broker would take"))}
        for runner in list(self._rules()):
            stats = runner.stats()
            rule = runner.rule.name
            received.add_metric([rule], stats["received"])
            published.add_metric([rule], stats["published"])
            failed.add_metric([rule], stats["failed"])
            dropped.add_metric([rule], stats["dropped"])
            for key, family in refusals.items():
                family.add_metric([rule], stats[key])
            connected.add_metric([f"rule {rule}"], 1 if runner.intake.connected.is_set() else 0)
        publisher = self._publisher()
        if publisher is not None:
            connected.add_metric(["publisher"], 1 if publisher.connected.is_set() else 0)
        yield from (instances, queued, pool_dropped, load_failures, failing, last_good, received, published, failed,
                    dropped, *refusals.values(), connected)
