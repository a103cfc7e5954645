"""make soak: the daemon under steady mixed load for a bounded time; fails on any QoS 1 loss or on
growth of the supervisor's resources after warm-up.

It starts its own mosquitto (persistent, with message_size_limit 256k, hub.maxsize 200k) and the
daemon with two functions, then drives three rules at once:
  - soak/mixed/1 (QoS 1) and soak/mixed/0 (QoS 0) into `mixed`, whose messages ask for a result
    (80 %), None (8 %), an exception (7 %), a result over hub.maxsize (3 %), a timeout (1 %) or a
    crash (1 %): every outcome and every envelope the daemon has;
  - soak/echo (QoS 1) into `echo`, in 5 s bursts and 5 s pauses, so that its instances are evicted
    when idle (idletime 2s) and started again: instance churn.
Every `--every` seconds (default a third of the run) comes an event, alternately a reload
(SIGHUP after a change of the functions' environment, which replaces both functions) and a restart
of the broker.

Every `--interval` seconds it samples the supervisor's resident memory, open files, threads and
children (CSV in --out, a summary in the same name with .json, a plot with --plot). The bounds:
  - resident memory: the median of the last quarter of the samples after `--warmup` may exceed
    that of the first quarter by at most 10 MB + 10 %;
  - threads: never more than at rest before the load plus the control pool's 32 (its threads
    are made on demand and kept, so the count climbs with the busiest moment so far) plus 3;
  - open files and children: at rest (before the load, and after it once idle instances are
    stopped), by at most 5 open files and no child. Under load they follow the instances (about
    five descriptors each), so the samples show the load, not a leak.
A QoS 1 message is lost when neither its result, nor its envelope, nor (for None) the mark its
handler leaves, arrived by the end. QoS 0 messages may be lost by design; they are counted.
Exit status 0 when nothing was lost and nothing grew past its bound, 1 otherwise.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Set

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from openedge_function.dataplane import _BLOCKING_THREADS as CONTROL_THREADS  # noqa: E402
from tests.helpers import Broker, DaemonProcess, wait_until  # noqa: E402  (the tests' fixtures)

HANDLERS = '''
import os, time

def mixed(event, context):
    kind = event["kind"]
    if kind == "value":
        return {"id": event["id"], "version": os.environ.get("VERSION")}
    if kind == "none":   # nothing is published: a mark in a file tells it ran
        fd = os.open(os.environ["SOAK_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"%d\\n" % event["id"])
        finally:
            os.close(fd)
        return None
    if kind == "raise":
        raise ValueError("soak %d" % event["id"])
    if kind == "big":
        return {"id": event["id"], "pad": "x" * 300000}
    if kind == "timeout":
        time.sleep(5)
    if kind == "crash":
        os._exit(3)
    return {"id": event["id"]}

def echo(event, context):
    return event
'''

KINDS = [("value", 80), ("none", 8), ("raise", 7), ("big", 3), ("timeout", 1), ("crash", 1)]
BOUNDS = {"rss_mb": (10.0, 0.10), "fds": 5, "threads": CONTROL_THREADS + 3, "children": 0}
AT_REST = ("fds", "children")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Load:
    """The publisher of the soak and the subscriber to every outcome."""

    def __init__(self, broker: Broker, rate: float, qos0_share: float) -> None:
        self.rate = rate
        self.qos0_share = qos0_share
        self.sent: Dict[int, int] = {}            # id -> QoS, of the mixed rules
        self.kinds: Dict[int, str] = {}
        self.echo_sent: Set[int] = set()
        self.answered: Set[int] = set()           # ids with a result or an envelope
        self.echoed: Set[int] = set()
        self.outcomes: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._random = random.Random(7)
        subscribed = threading.Event()
        # Persistent sessions on both sides: a broker restart loses nothing of theirs.
        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-sub-{os.getpid()}",
                               clean_session=False)
        self.sub.on_connect = lambda c, *a: c.subscribe("soak/out/#", 1)
        self.sub.on_subscribe = lambda *a: subscribed.set()
        self.sub.on_message = self._on_outcome
        self.sub.connect(broker.host, broker.port)
        self.sub.loop_start()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-pub-{os.getpid()}",
                               clean_session=False)
        self.pub.max_inflight_messages_set(1000)
        self.pub.max_queued_messages_set(0)
        self.pub.connect(broker.host, broker.port)
        self.pub.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the soak's subscriber could not subscribe")
        self._thread = threading.Thread(target=self._drive, name="load", daemon=True)

    def _on_outcome(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            outcome = json.loads(message.payload)
        except ValueError:
            return
        if "errorType" in outcome:
            kind = outcome["errorType"]
            payload = base64.b64decode(outcome.get("packet", {}).get("Message", {}).get("Payload", ""))
            try:
                ident = json.loads(payload)["id"] if payload else None
            except (ValueError, KeyError, TypeError):
                ident = None
        else:
            kind, ident = "result", outcome.get("id")
        with self._lock:
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
            if ident is None:
                return
            if message.topic == "soak/out/echo":
                self.echoed.add(ident)
            else:
                self.answered.add(ident)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _drive(self) -> None:
        kinds = [kind for kind, _ in KINDS]
        weights = [weight for _, weight in KINDS]
        started = time.monotonic()
        ident = 0
        while not self._stop.is_set():
            ident += 1
            due = started + ident / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind = self._random.choices(kinds, weights)[0]
            qos = 0 if self._random.random() < self.qos0_share else 1
            with self._lock:
                self.sent[ident] = qos
                self.kinds[ident] = kind
            self.pub.publish(f"soak/mixed/{qos}", json.dumps({"id": ident, "kind": kind}), qos)
            # echo: bursts of 5 s at a quarter of the rate, then 5 s of nothing.
            if int(time.monotonic() - started) % 10 < 5 and ident % 4 == 0:
                with self._lock:
                    self.echo_sent.add(ident)
                self.pub.publish("soak/echo", json.dumps({"id": ident}), 1)

    def missing(self, marks: Set[int]) -> Dict[str, List[int]]:
        """QoS 1 messages with no trace of an outcome yet, by rule."""
        with self._lock:
            mixed = [i for i, qos in self.sent.items() if qos == 1 and i not in self.answered
                     and not (self.kinds[i] == "none" and i in marks)]
            echo = [i for i in self.echo_sent if i not in self.echoed]
        return {"mixed": sorted(mixed), "echo": sorted(echo)}

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def read_marks(path: str) -> Set[int]:
    try:
        with open(path) as fh:
            return {int(line) for line in fh if line.strip()}
    except FileNotFoundError:
        return set()


class Sampler:
    """The supervisor's resources every `interval` seconds, as CSV rows."""

    FIELDS = ["t", "rss_mb", "fds", "threads", "children", "sent", "answered"]

    def __init__(self, pid: int, interval: float, load: Load, path: str) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.load = load
        self.rows: List[Dict[str, float]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._file = open(path, "w", newline="")
        self._csv = csv.DictWriter(self._file, self.FIELDS)
        self._csv.writeheader()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._file.close()

    def snapshot(self) -> Dict[str, float]:
        with self.process.oneshot():
            return {"t": round(time.monotonic() - self._started, 1),
                    "rss_mb": round(self.process.memory_info().rss / (1 << 20), 2),
                    "fds": self.process.num_fds(), "threads": self.process.num_threads(),
                    "children": len(self.process.children())}

    def at_rest(self, like: Optional[Dict[str, float]] = None, timeout: float = 30.0) -> Dict[str, float]:
        """A snapshot once the children stopped changing (and, given `like`, are no more than
        its): idle instances take idletime and a stop to go."""
        deadline = time.monotonic() + timeout
        previous = self.snapshot()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            current = self.snapshot()
            if current["children"] == previous["children"] and (
                    like is None or current["children"] <= like["children"]):
                return current
            previous = current
        return previous

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                row = self.snapshot()
            except psutil.Error:
                continue
            row["sent"] = len(self.load.sent)
            row["answered"] = len(self.load.answered)
            self.rows.append(row)
            self._csv.writerow(row)
            self._file.flush()


def growth(rows: List[Dict[str, float]], warmup: float, before: Dict[str, float],
           after: Dict[str, float]) -> Dict[str, Any]:
    """Resident memory in the first against the last quarter of the samples after warm-up, the
    rest at rest before against after the load; and which bounds were crossed."""
    warm = [row for row in rows if row["t"] >= warmup]
    if len(warm) < 4:
        return {"checked": False, "failures": [], "samples_after_warmup": len(warm)}
    quarter = max(2, len(warm) // 4)
    first, last = warm[:quarter], warm[-quarter:]
    result: Dict[str, Any] = {"checked": True, "samples_after_warmup": len(warm), "failures": []}
    before_rss = statistics.median(r["rss_mb"] for r in first)
    after_rss = statistics.median(r["rss_mb"] for r in last)
    absolute, relative = BOUNDS["rss_mb"]
    result["rss_mb"] = [before_rss, after_rss]
    if after_rss - before_rss > absolute + relative * before_rss:
        result["failures"].append(f"resident memory grew from {before_rss:.1f} to {after_rss:.1f} MB "
                                  f"(bound: {absolute:g} MB + {relative:.0%})")
    most = max([r["threads"] for r in rows] + [after["threads"]])
    result["threads"] = [before["threads"], most]
    if most - before["threads"] > BOUNDS["threads"]:
        result["failures"].append(f"threads grew from {before['threads']} at rest to {most} "
                                  f"(bound: {BOUNDS['threads']}, the control pool and 3)")
    for key in AT_REST:
        result[key] = [before[key], after[key]]
        if after[key] - before[key] > BOUNDS[key]:
            result["failures"].append(f"{key} at rest grew from {before[key]} to {after[key]} "
                                      f"(bound: {BOUNDS[key]})")
    return result


def config_of(broker: Broker, marks: str, version: int) -> Dict[str, Any]:
    env = {"VERSION": str(version), "SOAK_MARKS": marks}
    return {
        "hub": {"address": broker.address, "clientid": "soak", "maxsize": "200k", "interval": "2s"},
        "functions": [
            {"name": "mixed", "handler": "handlers.mixed", "codedir": "fn", "env": env,
             "instance": {"min": 1, "max": 4, "timeout": "500ms", "idletime": "3s"}},
            {"name": "echo", "handler": "handlers.echo", "codedir": "fn", "env": env,
             "instance": {"min": 0, "max": 3, "idletime": "2s"}},
        ],
        "rules": [
            {"id": "mixed-1", "subscribe": {"topic": "soak/mixed/1", "qos": 1},
             "compute": {"function": "mixed"}, "publish": {"topic": "soak/out/mixed", "qos": 1}},
            {"id": "mixed-0", "subscribe": {"topic": "soak/mixed/0", "qos": 0},
             "compute": {"function": "mixed"}, "publish": {"topic": "soak/out/mixed", "qos": 0}},
            {"id": "echo", "subscribe": {"topic": "soak/echo", "qos": 1},
             "compute": {"function": "echo"}, "publish": {"topic": "soak/out/echo", "qos": 1}},
        ],
        "logger": {"level": "info", "path": "daemon.log", "console": False, "summary": False},
    }


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m` or `2h`."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def plot(path: str, rows: List[Dict[str, float]], warmup: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 9))
    times = [r["t"] for r in rows]
    for axis, key, label in zip(axes, ("rss_mb", "fds", "threads", "children"),
                                ("resident memory (MB)", "open files", "threads", "children")):
        axis.plot(times, [r[key] for r in rows])
        axis.axvline(warmup, color="grey", linestyle=":")
        axis.set_ylabel(label)
    axes[-1].set_xlabel("seconds")
    figure.suptitle("openedge-function soak: the supervisor's resources")
    figure.tight_layout()
    figure.savefig(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=duration, default=300.0, help="how long the load runs (90s, 5m, 2h)")
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second into the mixed rules")
    parser.add_argument("--qos0", type=float, default=0.3, help="the share of them sent at QoS 0")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=duration, default=None, help="samples before this are not compared "
                        "(default: a tenth of the run, at least 10 s, at most 2 m)")
    parser.add_argument("--every", type=duration, default=None,
                        help="seconds between events, a reload and a broker restart in turn (default: a third of the run)")
    parser.add_argument("--out", default=os.path.join("var", "soak.csv"), help="the samples (CSV); "
                        "the summary goes to the same name with .json")
    parser.add_argument("--plot", nargs="?", const=os.path.join("var", "soak.png"), default=None,
                        help="draw the samples (needs matplotlib: the bench extra)")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(120.0, max(10.0, args.duration / 10))
    every = args.every or args.duration / 3
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    workdir = tempfile.mkdtemp(prefix="oef-soak-")
    os.chmod(workdir, 0o755)   # as root, functions run as users of their own: they must reach fn/
    os.makedirs(os.path.join(workdir, "fn"))
    with open(os.path.join(workdir, "fn", "handlers.py"), "w") as fh:
        fh.write(HANDLERS)
    shared = os.path.join(workdir, "marks")
    os.makedirs(shared)
    os.chmod(shared, 0o1777)
    marks = os.path.join(shared, "none.txt")
    os.makedirs(os.path.join(workdir, "broker"))
    broker = Broker(os.path.join(workdir, "broker"), persistence=True,
                    extra="message_size_limit 262144\n").start()
    daemon = DaemonProcess(workdir, config_of(broker, marks, 1))
    daemon.rules = 3
    load: Optional[Load] = None
    sampler: Optional[Sampler] = None
    events: List[str] = []
    exit_code: Optional[int] = None
    started = time.monotonic()
    try:
        daemon.start()
        say(f"soak: {args.duration:g} s at {args.rate:g} msg/s, events every {every:g} s, "
            f"warm-up {warmup:g} s; work directory {workdir}")
        load = Load(broker, args.rate, args.qos0)
        assert daemon.process is not None
        sampler = Sampler(daemon.process.pid, args.interval, load, args.out)
        rest_before = sampler.at_rest()
        started = time.monotonic()
        load.start()
        sampler.start()
        next_event, version = started + every, 1
        while time.monotonic() - started < args.duration:
            time.sleep(0.2)
            if time.monotonic() >= next_event and time.monotonic() - started < args.duration - 5:
                next_event += every
                if len([e for e in events if e.startswith("reload")]) <= len([e for e in events if e.startswith("broker")]):
                    version += 1
                    with open(daemon.config_path, "w") as fh:
                        yaml.safe_dump(config_of(broker, marks, version), fh)
                    daemon.signal(signal.SIGHUP)
                    events.append(f"reload at {time.monotonic() - started:.0f} s")
                else:
                    broker.stop()
                    time.sleep(2)
                    broker.start()
                    events.append(f"broker restart at {time.monotonic() - started:.0f} s")
                say(f"soak: {events[-1]}")
        load.stop()
        seconds = time.monotonic() - started
        # Everything sent is answered within a few seconds; give the stragglers time.
        try:
            wait_until(lambda: not any(load.missing(read_marks(marks)).values()), 60, interval=0.5,
                       message="every QoS 1 message's outcome")
        except AssertionError:
            pass
        sampler.stop()
        missing = load.missing(read_marks(marks))
        rest_after = sampler.at_rest(like=rest_before)
        exit_code = daemon.stop()
    finally:
        if load is not None:
            load.close()
        if sampler is not None and not sampler._stop.is_set():
            sampler.stop()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop()
        broker.stop()

    rows = sampler.rows
    checked = growth(rows, warmup, rest_before, rest_after)
    log = daemon.log()
    qos1 = sum(1 for qos in load.sent.values() if qos == 1)
    summary = {
        "duration_s": round(seconds, 1), "rate": args.rate, "sent": len(load.sent) + len(load.echo_sent),
        "qos1": qos1 + len(load.echo_sent), "qos0": len(load.sent) - qos1,
        "lost": len(missing["mixed"]) + len(missing["echo"]), "lost_ids": {k: v[:20] for k, v in missing.items()},
        "qos0_answered": sum(1 for i, qos in load.sent.items() if qos == 0 and i in load.answered),
        "outcomes": load.outcomes, "events": events,
        "instances_started": log.count(": ready (pid"), "daemon_exit": exit_code,
        "first": rows[0] if rows else None, "last": rows[-1] if rows else None,
        "at_rest": {"before": rest_before, "after": rest_after},
        "growth": checked, "bounds": BOUNDS, "samples": args.out, "workdir": workdir,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(summary, fh, indent=2)
    if args.plot and rows:
        try:
            plot(args.plot, rows, warmup)
        except ImportError:
            say("soak: --plot needs matplotlib (make soak installs it: pip install -e '.[bench]')")

    first, last = summary["first"] or {}, summary["last"] or {}
    print(f"soak: {summary['duration_s']:g} s, {summary['sent']} messages ({summary['qos1']} QoS 1, "
          f"{summary['qos0']} QoS 0), {summary['instances_started']} instances started; "
          f"events: {', '.join(events) or 'none'}")
    print(f"outcomes: {json.dumps(load.outcomes, sort_keys=True)}")
    if checked.get("rss_mb"):
        print(f"  rss_mb    first sample {first.get('rss_mb')} MB, last {last.get('rss_mb')} MB; median "
              f"after warm-up {checked['rss_mb'][0]} -> {checked['rss_mb'][1]} MB")
        print(f"  threads   at rest {rest_before['threads']} -> {rest_after['threads']}; the most seen "
              f"{checked['threads'][1]}")
    for key in AT_REST:
        print(f"  {key:9} at rest {rest_before[key]} -> {rest_after[key]}" + (
            f"; under load {min(r[key] for r in rows)}-{max(r[key] for r in rows)}" if rows else ""))
    print(f"QoS 1 lost: {summary['lost']}; QoS 0 answered {summary['qos0_answered']} of {summary['qos0']}; "
          f"daemon exit {exit_code}; samples in {args.out}")
    failures = list(checked["failures"])
    if summary["lost"]:
        failures.append(f"{summary['lost']} QoS 1 messages lost: {summary['lost_ids']}")
    if exit_code != 0:
        failures.append(f"the daemon exited with {exit_code}")
    if not checked["checked"]:
        failures.append("too few samples after warm-up to compare (a longer --duration, or a shorter --interval)")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
