"""Where the supervisor's and an instance's CPU goes under load: py-spy samples, summed by area.

Starts its own mosquitto and the daemon on the echo function (as `make bench` does), drives it at
a fixed rate, and records the supervisor and one instance with py-spy (`pip install py-spy`) for
the length of the run. Prints, for each process, the CPU milliseconds per message by thread and
by area of the code (paho, protobuf, asyncio, the pool, logging, ...), from samples of running threads.

    python bench/profile.py --rate 1000 --qos 0 --seconds 8
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench import DaemonUnderTest, Driver, say  # noqa: E402
from tests.helpers import Broker  # noqa: E402

# (area, what a frame's text contains), the first match from the innermost frame outwards wins.
AREAS: List[Tuple[str, str]] = [
    ("logging", "logging/"), ("psutil", "psutil/"),
    ("paho", "paho/mqtt/"), ("grpc", "grpc/"), ("protobuf", "protobuf/"),
    ("asyncio", "asyncio/"), ("selectors", "selectors.py"), ("threading", "threading.py"),
    ("queue", "queue.py"), ("runtime", "runtime_python/"), ("daemon", "openedge_function/"),
]


def area_of(frames: List[str]) -> str:
    for frame in reversed(frames):   # innermost last in py-spy's raw format
        for area, needle in AREAS:
            if needle in frame:
                return area
    return "other"


def summarize(path: str, rate_hz: int, messages: int) -> str:
    """py-spy's raw (collapsed) output: 'thread;frame;frame... count' per line."""
    by_thread: Dict[str, int] = collections.Counter()
    by_area: Dict[str, int] = collections.Counter()
    with open(path) as fh:
        for line in fh:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            count = int(count_text)
            by_thread[frames[0]] += count
            by_area[area_of(frames[1:])] += count
    ms = lambda samples: samples * 1000.0 / rate_hz / max(messages, 1)  # noqa: E731
    lines = ["  by thread, GIL-holding ms per message:"]
    lines += [f"    {ms(n):.3f}  {name}" for name, n in by_thread.most_common(12)]
    lines.append("  by area (innermost frame that names one), GIL-holding ms per message:")
    lines += [f"    {ms(n):.3f}  {name}" for name, n in by_area.most_common()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--qos", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--max", type=int, default=4)
    parser.add_argument("--sample-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include native frames (py-spy --native)")
    parser.add_argument("--keep", help="a directory to keep py-spy's raw samples in")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        say("needs py-spy: pip install py-spy")
        return 2
    workdir = tempfile.mkdtemp(prefix="oef-profile-")
    os.chmod(workdir, 0o755)   # as root, the function runs as a user of its own: it must reach its code
    broker = Broker(workdir).start()
    driver = Driver(broker.host, broker.port)
    daemon = DaemonUnderTest(workdir, broker.port, args.max, args.max, "profile")
    daemon.start(warm=args.max)
    recorders: Dict[str, Tuple[str, subprocess.Popen]] = {}
    try:
        driver.run(500, 1)   # warm up
        targets = {"supervisor": daemon.process.pid, "instance": daemon.instances()[0].pid}
        for name, pid in targets.items():
            out = os.path.join(workdir, f"{name}.txt")
            recorders[name] = (out, subprocess.Popen(
                [spy, "record", "-f", "raw", "--threads", "--gil", "--nonblocking", "-r", str(args.sample_rate),
                 "-d", str(int(args.seconds + 2)), "-p", str(pid), "-o", out]
                + (["--native"] if args.native else []),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        run = driver.run(int(args.rate * args.seconds), args.qos, rate=args.rate, cpu=daemon.cpu)
        for out, recorder in recorders.values():
            recorder.wait()
        delivered = run["sent"] - run["lost"]
        print(f"QoS {args.qos} at {args.rate:.0f}/s for {args.seconds:g}s: delivered {delivered} of "
              f"{run['sent']}, p50 {run['latency_ms'].get('p50')} ms, p99 {run['latency_ms'].get('p99')} ms, "
              f"CPU ms per message (from /proc) {run['cpu_ms_per_message']}")
        for name, (out, _) in recorders.items():
            # The recording spans the run and a second either side; the figures are per message sent.
            print(f"{name}:\n{summarize(out, args.sample_rate, run['sent'])}")
    finally:
        daemon.stop()
        driver.close()
        broker.stop()
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            for out, _ in recorders.values():
                shutil.copy(out, args.keep)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
