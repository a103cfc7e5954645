"""Prometheus metrics of the daemon, in a registry of its own.

Per invocation the pool calls one observer (a counter and a histogram, both thread-safe); the
rest (instances by state, queue depth, rule counters, connections, drops) is read from the pools,
rules and publisher the daemon hands over, when /metrics is scraped, so it costs the message
path nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

from prometheus_client import (CollectorRegistry, Counter, Histogram, Info, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..version import __version__

if TYPE_CHECKING:
    from ..broker import Publisher
    from ..pool import Pool
    from ..rules import RuleRunner

Pools = Callable[[], Mapping[str, "Pool"]]
Rules = Callable[[], Iterable["RuleRunner"]]

disable_created_metrics()   # no *_created series: scrapers only need the counts

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STATES = ("starting", "idle", "busy", "stopping")


class Metrics:
    def __init__(self, pools: Pools, rules: Rules,
                 publisher: Callable[[], Optional["Publisher"]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter("openedge_function_invocations", "Invocations that ran, by outcome "
                                   "(ok, none, or the error type)", ["function", "outcome"],
                                   registry=self.registry)
        self.duration = Histogram("openedge_function_duration_seconds", "Handler run time",
                                  ["function"], buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_DaemonCollector(pools, rules, publisher))
        Info("openedge_function_build", "The daemon's version", registry=self.registry).info(
            {"version": __version__})

    def observer(self, function: str) -> Callable[[str, Optional[float]], None]:
        """What a pool calls after each invocation: (outcome, seconds; None when it did not run,
        as a FunctionLoadError)."""
        histogram = self.duration.labels(function)
        counters: Dict[str, Counter] = {}

        def observe(outcome: str, seconds: Optional[float]) -> None:
            counter = counters.get(outcome)
            if counter is None:
                counter = counters[outcome] = self.invocations.labels(function, outcome)
            counter.inc()
            if seconds is not None:
                histogram.observe(seconds)
        return observe

    def render(self) -> Tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DaemonCollector:
    """Reads the running configuration's pools, rules and publisher at each scrape."""

    def __init__(self, pools: Pools, rules: Rules, publisher: Callable[[], Any]) -> None:
        self._pools, self._rules, self._publisher = pools, rules, publisher

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
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
