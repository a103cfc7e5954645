"""make bench: how fast the daemon moves messages on this machine, and how that compares.

It starts its own mosquitto on a free port (or uses --broker), then drives, over MQTT, with
numbered and timestamped messages:
  1. the ceiling: an in-process relay (bench/relay.py: subscribe, call the handler, publish);
  2. the daemon with a trivial echo function (instance.max from --max), warm:
     flat out at QoS 0 and QoS 1, then at fixed rates for latency;
  3. cold start: the first reply from a daemon whose pool starts empty; code reload: from an
     edit of the handler to the first reply of the new code;
  4. resident memory of the supervisor and of each idle instance.
Ratios within one run are the figures that count; absolute numbers on a shared machine drift.
Results: a table on stdout, JSON in --out, a latency histogram PNG with --plot.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from runtime_python.template import NAME as TEMPLATE_NAME  # noqa: E402
from tests.helpers import Broker, free_port, is_instance, wait_until  # noqa: E402  (the tests' fixtures)

ECHO = "def handler(event, context):\n    return event\n"
PROTOCOL = ""   # hub.protocol of the daemons measured ("": the daemon's default); --protocol
CONSOLE = "off"  # the HTTP server and its console: off, closed or open; --console
CONSOLE_TOKEN = "bench-console-token"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _no_delay(client, userdata, sock) -> None:
    import socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cpu_seconds(pid: int) -> Dict[str, float]:
    """CPU seconds (user + system, from /proc) of the daemon `pid` and of its instances together."""
    supervisor = psutil.Process(pid)
    own = supervisor.cpu_times()
    instances = 0.0
    for process in supervisor.children():
        try:
            if is_instance(process.cmdline(), process.name()):
                times = process.cpu_times()
                instances += times.user + times.system
        except psutil.Error:
            pass
    return {"supervisor": own.user + own.system, "instances": instances}


class Driver:
    """A publisher and a subscriber: numbered messages out, replies counted and timed."""

    def __init__(self, host: str, port: int) -> None:
        self.run_id = 0
        self.received: Dict[int, int] = {}
        self.latencies: List[float] = []
        self.first_sent = 0.0
        self.last_reply = 0.0
        self.last_gen: Optional[int] = None   # the code generation the last reply came from
        self._lock = threading.Lock()
        ready = threading.Event()
        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.sub.on_socket_open = _no_delay
        self.sub.on_connect = lambda c, *a: c.subscribe("bench/out", 1)
        self.sub.on_subscribe = lambda *a: ready.set()
        self.sub.on_message = self._on_reply
        self.sub.connect(host, port)
        self.sub.loop_start()
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
        self.pub.on_socket_open = _no_delay
        self.pub.max_inflight_messages_set(1000)
        self.pub.connect(host, port)
        self.pub.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the driver could not subscribe")

    def _on_reply(self, client, userdata, message) -> None:
        now = time.time()
        try:
            reply = json.loads(message.payload)
        except ValueError:
            return
        if reply.get("run") != self.run_id:
            return
        self.last_gen = reply.get("gen")
        with self._lock:
            seq = reply["seq"]
            self.received[seq] = self.received.get(seq, 0) + 1
            self.latencies.append(now - reply["ts"])
            self.last_reply = now

    def run(self, count: int, qos: int, rate: Optional[float] = None, settle: float = 5.0,
            cpu: Optional[Callable[[], Dict[str, float]]] = None) -> dict:
        """Send `count` messages (flat out, or at `rate` per second); wait for the replies. With
        `cpu` (seconds of CPU by process role), also the CPU milliseconds per message of each."""
        cpu_before = cpu() if cpu else {}
        with self._lock:
            self.run_id += 1
            self.received = {}
            self.latencies = []
        run_id = self.run_id
        start = time.time()
        self.first_sent = start
        for seq in range(count):
            if rate:
                delay = start + seq / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            self.pub.publish("bench/in", json.dumps({"run": run_id, "seq": seq, "ts": time.time()}), qos)
        sent_in = time.time() - start
        last, seen = time.monotonic(), -1
        while len(self.received) < count:   # wait while replies keep coming
            time.sleep(0.05)
            if len(self.received) != seen:
                seen, last = len(self.received), time.monotonic()
            elif time.monotonic() - last > settle:
                break
        with self._lock:
            unique = len(self.received)
            total = sum(self.received.values())
            latencies = sorted(self.latencies)
            elapsed = max(self.last_reply - start, 1e-9)
        cpu_ms = {}
        if cpu is not None:
            cpu_after = cpu()
            cpu_ms = {role: round((cpu_after[role] - cpu_before.get(role, 0.0)) * 1000 / max(unique, 1), 3)
                      for role in cpu_after}
        return {
            "qos": qos, "sent": count, "received": total, "lost": count - unique,
            "duplicated": total - unique, "rate": rate, "send_seconds": round(sent_in, 3),
            "throughput": round(unique / elapsed, 1),
            "latency_ms": percentiles(latencies), "_latencies": latencies,
            "cpu_ms_per_message": cpu_ms,
        }

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def percentiles(values: List[float]) -> dict:
    if not values:
        return {}
    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)
    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(values[-1] * 1000, 3)}


class DaemonUnderTest:
    """The daemon as a user runs it, on the echo function."""

    def __init__(self, workdir: str, port: int, max_instances: int, min_instances: int, tag: str) -> None:
        self.workdir = os.path.join(workdir, tag)
        self.console: Optional[ConsoleReader] = None
        os.makedirs(os.path.join(self.workdir, "fn"), exist_ok=True)
        with open(os.path.join(self.workdir, "fn", "echo.py"), "w") as fh:
            fh.write(ECHO)
        config = {
            "hub": {"address": f"tcp://127.0.0.1:{port}", "clientid": f"bench-{tag}",
                    **({"protocol": PROTOCOL} if PROTOCOL else {})},
            "rules": [{"id": "echo", "subscribe": {"topic": "bench/in", "qos": 1},
                       "compute": {"function": "echo"}, "publish": {"topic": "bench/out", "qos": 1}}],
            "functions": [{"name": "echo", "handler": "echo.handler", "codedir": "fn",
                           "instance": {"min": min_instances, "max": max_instances}}],
            # Production logging at these rates: warnings only (no per-invocation summary lines).
            "logger": {"level": "warning", "path": "daemon.log", "console": False},
        }
        if CONSOLE != "off":   # the HTTP server, with its console closed or open
            self.http_port = free_port()
            config["server"] = {"address": f"127.0.0.1:{self.http_port}", "token": CONSOLE_TOKEN}
        self.config = os.path.join(self.workdir, "application.yml")
        with open(self.config, "w") as fh:
            yaml.safe_dump(config, fh)
        self.process: Optional[subprocess.Popen] = None

    def start(self, warm: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "openedge_function", "-c", self.config],
                                        cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: len(self.instances()) >= warm, 30, message=f"{warm} warm instances")
        except AssertionError:
            self.stop()   # its log (daemon.log in the work directory) says why
            raise
        time.sleep(0.5)   # let the rule subscribe (no log at level warning to wait on)
        if CONSOLE == "open":
            self.console = ConsoleReader(self.http_port)

    def instances(self) -> List[psutil.Process]:
        if self.process is None:
            return []
        try:
            return [p for p in psutil.Process(self.process.pid).children() if is_instance(p.cmdline(), p.name())]
        except psutil.Error:
            return []

    def cpu(self) -> Dict[str, float]:
        return cpu_seconds(self.process.pid)

    def memory(self) -> dict:
        """Resident memory (RSS) of each process; for instances also PSS, their share of the
        pages they hold with the template and each other, and USS, the pages only they hold."""
        mb = lambda value: round(value / 2**20, 1)  # noqa: E731
        supervisor = psutil.Process(self.process.pid)
        instances = [p.memory_full_info() for p in self.instances()]
        templates = [p.memory_full_info() for p in supervisor.children() if p.name() == TEMPLATE_NAME]
        return {"supervisor_mb": mb(supervisor.memory_info().rss),
                "instances_mb": [mb(m.rss) for m in instances],
                "instances_pss_mb": [mb(m.pss) for m in instances],
                "instances_uss_mb": [mb(m.uss) for m in instances],
                "template_mb": mb(templates[0].rss) if templates else None,
                "template_pss_mb": mb(templates[0].pss) if templates else None}

    def stop(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ConsoleReader:
    """What an open console page asks of the daemon, as often as it asks (api/page/console.js):
    the state and the failures every 2 s, the followed function's log lines every second."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._stop = threading.Event()
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def _get(self, path: str) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        try:
            connection.request("GET", path, headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
            self.requests += 1
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def _run(self) -> None:
        since, failure, line, tick = 0.0, 0, 0, 0
        while not self._stop.wait(1.0):
            try:
                if tick % 2 == 0:
                    state = self._get(f"/console/api/state?since={since}")
                    since = max([since] + [p["t"] for f in state["functions"] for p in f["series"]])
                    failures = self._get(f"/console/api/failures?after={failure}")["failures"]
                    failure = max([failure] + [f["seq"] for f in failures])
                lines = self._get(f"/console/api/logs?function=echo&after={line}")["lines"]
                line = max([line] + [entry["seq"] for entry in lines])
            except (OSError, ValueError) as exc:
                say(f"  console: {exc}")
            tick += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def cold_start(workdir: str, port: int, driver: Driver, tries: int) -> dict:
    """Time to the first reply from a daemon whose pool is empty (min 0)."""
    times = []
    for attempt in range(tries):
        daemon = DaemonUnderTest(workdir, port, 1, 0, f"cold{attempt}")
        daemon.start(warm=0)
        try:
            time.sleep(0.5)
            result = driver.run(1, 1, settle=10)
            if result["latency_ms"]:
                times.append(result["latency_ms"]["max"])
        finally:
            daemon.stop()
    return {"first_reply_ms": times, "median_ms": round(statistics.median(times), 1) if times else None}


def code_reload(workdir: str, port: int, driver: Driver, tries: int) -> dict:
    """Time from an edit of the handler to the first reply of the new code (messages keep coming)."""
    daemon = DaemonUnderTest(workdir, port, 1, 1, "reload")
    daemon.start(warm=1)
    path = os.path.join(daemon.workdir, "fn", "echo.py")
    times = []
    try:
        for gen in range(1, tries + 1):
            time.sleep(1.0)
            with open(path, "w") as fh:
                fh.write(f"def handler(event, context):\n    event['gen'] = {gen}\n    return event\n")
            start = time.monotonic()
            while driver.last_gen != gen and time.monotonic() - start < 15:
                driver.run(1, 1, settle=1.0)
            if driver.last_gen == gen:
                times.append(round((time.monotonic() - start) * 1000, 1))
    finally:
        daemon.stop()
    return {"edit_to_new_code_ms": times, "median_ms": round(statistics.median(times), 1) if times else None}


def relay_ceiling(port: int, driver: Driver, count: int, codedir: str, rates: List[float],
                  duration: float) -> dict:
    """Flat out, and latency at the fixed rates the daemon gets (up to 1000/s): the floor that
    the MQTT hops alone set."""
    results: dict = {}
    for qos in (0, 1):
        relay = subprocess.Popen([sys.executable, os.path.join(HERE, "relay.py"), "--port", str(port),
                                  "--qos", str(qos), "--codedir", codedir],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": ROOT})
        process = psutil.Process(relay.pid)

        def cpu() -> Dict[str, float]:
            times = process.cpu_times()
            return {"relay": times.user + times.system}

        try:
            relay.stdout.readline()
            driver.run(200, qos)   # warm up
            results[f"qos{qos}"] = driver.run(count, qos, cpu=cpu)
            say(f"  relay qos{qos}: {results[f'qos{qos}']['throughput']:.0f} msg/s")
            for rate in (r for r in rates if r <= 1000):
                run = driver.run(int(rate * duration), qos, rate=rate, cpu=cpu)
                run.pop("_latencies", None)
                results[f"latency qos{qos}@{int(rate)}"] = run
                say(f"  relay qos{qos} at {rate:.0f}/s: p50 {run['latency_ms'].get('p50')} ms, "
                    f"p99 {run['latency_ms'].get('p99')} ms")
        finally:
            relay.stdin.close()
            relay.wait(10)
    return results


def measure(workdir: str, port: int, driver: Driver, codedir: str, args: argparse.Namespace,
            rates: List[float], tag: str) -> dict:
    """One run: the relay's ceiling, then the warm daemon flat out and at the fixed rates."""
    results: dict = {}
    say("ceiling: in-process relay")
    results["relay"] = relay_ceiling(port, driver, args.count, codedir, rates, args.duration)

    say(f"daemon: echo function, instance.max {args.max}, warm")
    daemon = DaemonUnderTest(workdir, port, args.max, args.max, f"warm{tag}")
    daemon.start(warm=args.max)
    try:
        driver.run(500, 1)   # warm up
        results["daemon"] = {}
        for qos in (0, 1):
            run = driver.run(args.count, qos, cpu=daemon.cpu)
            run["fraction_of_relay"] = round(run["throughput"] / results["relay"][f"qos{qos}"]["throughput"], 3)
            results["daemon"][f"qos{qos}"] = run
            say(f"  flat out qos{qos}: {run['throughput']:.0f} msg/s ({run['fraction_of_relay']:.2f} of the "
                f"relay), delivered {run['sent'] - run['lost']} of {run['sent']}, duplicated "
                f"{run['duplicated']}, CPU ms/message {run['cpu_ms_per_message']}")
        results["latency"] = {}
        for qos in (0, 1):
            for rate in rates:
                run = driver.run(int(rate * args.duration), qos, rate=rate, cpu=daemon.cpu)
                results["latency"][f"qos{qos}@{int(rate)}"] = run
                say(f"  qos{qos} at {rate:.0f}/s: p50 {run['latency_ms'].get('p50')} ms, "
                    f"p99 {run['latency_ms'].get('p99')} ms, lost {run['lost']}, "
                    f"CPU ms/message {run['cpu_ms_per_message']}")
        time.sleep(1.0)
        results["memory"] = daemon.memory()
        memory = results["memory"]
        say(f"  memory: supervisor {memory['supervisor_mb']} MB, instances {memory['instances_mb']} MB "
            f"(PSS {memory['instances_pss_mb']}, USS {memory['instances_uss_mb']}), template "
            f"{memory['template_mb']} MB (PSS {memory['template_pss_mb']})")
    finally:
        daemon.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="messages per flat-out run")
    parser.add_argument("--max", type=int, default=4, help="instance.max of the echo function")
    parser.add_argument("--rates", default="200,1000,3000", help="fixed rates for latency, per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per fixed-rate run")
    parser.add_argument("--runs", type=int, default=1,
                        help="measure this many times (relay and daemon each time); the table shows "
                             "the median and the range")
    parser.add_argument("--cold", type=int, default=3, help="cold starts to time")
    parser.add_argument("--reloads", type=int, default=5, help="code edits to time")
    parser.add_argument("--broker", help="host:port of a broker to use instead of starting one")
    parser.add_argument("--protocol", default="", help="hub.protocol of the daemon: 3.1.1, 5 or auto "
                        "(default: the daemon's own default)")
    parser.add_argument("--console", choices=("off", "closed", "open"), default="off",
                        help="the daemon's HTTP server and its console: off (no server), closed (a "
                             "server no one looks at) or open (one page polling it, as a browser does)")
    parser.add_argument("--out", default=os.path.join(ROOT, "var", "bench.json"))
    parser.add_argument("--plot", nargs="?", const=os.path.join(ROOT, "var", "bench-latency.png"),
                        help="draw a latency histogram PNG (needs matplotlib)")
    args = parser.parse_args()
    global PROTOCOL, CONSOLE
    PROTOCOL = args.protocol
    CONSOLE = args.console
    rates = [float(r) for r in args.rates.split(",") if r]

    workdir = tempfile.mkdtemp(prefix="oef-bench-")
    os.chmod(workdir, 0o755)   # as root, the function runs as a user of its own: it must reach its code
    broker = None
    if args.broker:
        host, _, port_text = args.broker.rpartition(":")
        port = int(port_text)
    else:
        broker = Broker(workdir).start()
        host, port = broker.host, broker.port
    codedir = os.path.join(workdir, "relay")
    os.makedirs(codedir)
    with open(os.path.join(codedir, "echo.py"), "w") as fh:
        fh.write(ECHO)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                     "count": args.count, "max": args.max, "runs": []}
    driver = Driver(host, port)
    try:
        for index in range(args.runs):
            if args.runs > 1:
                say(f"run {index + 1} of {args.runs}")
            results["runs"].append(measure(workdir, port, driver, codedir, args, rates, str(index)))
        say("cold start: first reply from an empty pool")
        results["cold_start"] = cold_start(workdir, port, driver, args.cold)
        say(f"  {results['cold_start']['first_reply_ms']} ms")
        say("code reload: from an edit of the handler to the first reply of the new code")
        results["code_reload"] = code_reload(workdir, port, driver, args.reloads)
        say(f"  {results['code_reload']['edit_to_new_code_ms']} ms")
    finally:
        driver.close()
        if broker is not None:
            broker.stop()

    histograms: Dict[str, List[float]] = {}
    for run in results["runs"]:
        for key, fixed in run["latency"].items():
            histograms.setdefault(key, []).extend(fixed.pop("_latencies"))
        for section in ("relay", "daemon"):
            for measured in run[section].values():
                measured.pop("_latencies", None)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(table(results))
    print(f"\nresults: {args.out}")
    if args.plot:
        plot(histograms, args.plot)
    return 0


def _median(runs: List[dict], path: List[str]) -> str:
    """The median over the runs of the figure at `path`, with the range when there are several."""
    values = []
    for run in runs:
        value: object = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    if not values:
        return ""
    middle = statistics.median(values)
    text = f"{middle:.3g}" if middle < 10 else f"{middle:.0f}"
    if len(values) > 1:
        low, high = min(values), max(values)
        text += f" ({low:.3g}-{high:.3g})" if high < 10 else f" ({low:.0f}-{high:.0f})"
    return text


def table(results: dict) -> str:
    runs = results["runs"]
    lines = ["", f"Medians of {len(runs)} run(s), the range in parentheses; CPU is milliseconds per "
             "message delivered.", "",
             "| measure | relay (ceiling) | daemon | daemon / relay | CPU: relay | CPU: supervisor | "
             "CPU: instances |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for qos in (0, 1):
        key = f"qos{qos}"
        delivered = f", delivered {_median([{'d': r['daemon'][key]['sent'] - r['daemon'][key]['lost']} for r in runs], ['d'])}" \
            f" of {runs[0]['daemon'][key]['sent']}"
        lines.append(
            f"| flat out, QoS {qos}, msg/s | {_median(runs, ['relay', key, 'throughput'])} | "
            f"{_median(runs, ['daemon', key, 'throughput'])}{delivered} | "
            f"{_median(runs, ['daemon', key, 'fraction_of_relay'])} | "
            f"{_median(runs, ['relay', key, 'cpu_ms_per_message', 'relay'])} | "
            f"{_median(runs, ['daemon', key, 'cpu_ms_per_message', 'supervisor'])} | "
            f"{_median(runs, ['daemon', key, 'cpu_ms_per_message', 'instances'])} |")
    for key in runs[0]["latency"]:
        relay_key = f"latency {key}"
        relay = " / ".join(_median(runs, ["relay", relay_key, "latency_ms", q]) for q in ("p50", "p99")) \
            if relay_key in runs[0]["relay"] else ""
        ours = " / ".join(_median(runs, ["latency", key, "latency_ms", q]) for q in ("p50", "p99", "max"))
        lost = _median(runs, ["latency", key, "lost"])
        lines.append(f"| latency {key}/s, ms p50 / p99 (/ max) | {relay} | {ours} (lost {lost}) | | "
                     f"{_median(runs, ['relay', relay_key, 'cpu_ms_per_message', 'relay'])} | "
                     f"{_median(runs, ['latency', key, 'cpu_ms_per_message', 'supervisor'])} | "
                     f"{_median(runs, ['latency', key, 'cpu_ms_per_message', 'instances'])} |")
    cold = results["cold_start"]
    lines.append(f"| cold start, first reply, ms (median of {len(cold['first_reply_ms'])}) | | {cold['median_ms']} | | | | |")
    reload = results.get("code_reload")
    if reload:
        lines.append(f"| code reload, edit to the new code's first reply, ms (median of "
                     f"{len(reload['edit_to_new_code_ms'])}) | | {reload['median_ms']} | | | | |")
    memory = runs[-1]["memory"]
    lines.append(f"| resident memory, supervisor with {len(memory['instances_mb'])} instances, MB | | "
                 f"{_median(runs, ['memory', 'supervisor_mb'])} | | | | |")
    lines.append(f"| resident memory per idle instance, MB: RSS / PSS / USS (last run) | | "
                 f"{', '.join(map(str, memory['instances_mb']))} / {', '.join(map(str, memory['instances_pss_mb']))}"
                 f" / {', '.join(map(str, memory['instances_uss_mb']))} | | | | |")
    if memory.get("template_mb") is not None:
        lines.append(f"| resident memory of the instance template, MB: RSS / PSS | | {memory['template_mb']} / "
                     f"{memory['template_pss_mb']} | | | | |")
    return "\n".join(lines)


def plot(histograms: Dict[str, List[float]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("--plot needs matplotlib: pip install 'openedge-function[bench]'")
        return
    figure, axes = plt.subplots(figsize=(9, 5))
    all_ms = [v * 1000 for values in histograms.values() for v in values]
    if not all_ms:
        return
    # Log-spaced bins: the light-load runs (around a millisecond) and the overloaded ones
    # (hundreds) show on one axis.
    low, high = max(min(all_ms), 0.05), max(all_ms)
    bins = [low * (high / low) ** (i / 80) for i in range(81)]
    for key, values in histograms.items():
        if values:
            axes.hist([v * 1000 for v in values], bins=bins, histtype="step", label=key)
    axes.set_xscale("log")
    axes.set_xlabel("latency, ms")
    axes.set_ylabel("messages")
    axes.set_title("openedge-function: end-to-end latency at fixed rates")
    axes.legend()
    figure.savefig(path, dpi=100)
    say(f"histogram: {path}")


if __name__ == "__main__":
    sys.exit(main())
