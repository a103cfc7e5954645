"""The soak's short version: the daemon under mixed load, a reload and a broker restart, loses no
QoS 1 message and does not grow (`make soak` runs the long one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_a_short_soak_loses_nothing_and_grows_nothing(tmp_path):
    out = tmp_path / "soak.csv"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--duration", "45", "--rate", "150",
         "--interval", "1", "--warmup", "10", "--every", "15", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["lost"] == 0 and summary["daemon_exit"] == 0
    assert summary["qos1"] > 3000 and summary["qos0"] > 1000
    assert [event.split(" at ")[0] for event in summary["events"]] == ["reload", "broker restart"]
    outcomes = summary["outcomes"]
    for kind in ("result", "ValueError", "ResultTooLarge", "FunctionTimeout", "InstanceCrashed"):
        assert outcomes.get(kind), (kind, outcomes)
    assert summary["instances_started"] > 10   # crashes, timeouts, idle eviction, the reload
    assert summary["growth"]["checked"] and not summary["growth"]["failures"]
    assert len(out.read_text().splitlines()) > 30   # a sample a second, and the header
