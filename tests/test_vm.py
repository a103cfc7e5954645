"""A gateway in a VM: the Debian package built from this checkout, installed into a Debian 12
guest with systemd as PID 1 and the unified cgroup v2 hierarchy, run as a service and checked
from inside (tests/vm/guest/checks.py) and from outside (a message through QEMU's forwarded port).

The guest boots under QEMU's software emulation (this machine's /dev/kvm cannot run a stock
kernel), from an image built once with mmdebstrap and cached outside the clone
($OPENEDGE_FUNCTION_VM_CACHE, default /var/cache/openedge-function-vm), opened with snapshot=on
so every boot starts clean. One boot runs every check; each is reported as a test of its own.
`make test-vm` runs these alone; `make test` runs them where the machine can (else they are
skipped with the reason). OPENEDGE_FUNCTION_VM=off skips them.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import types
from typing import Any, Dict, Optional

import pytest

from tests.helpers import ROOT, Collector, free_port

VM = os.path.join(ROOT, "tests", "vm")
CACHE = os.environ.get("OPENEDGE_FUNCTION_VM_CACHE", "/var/cache/openedge-function-vm")
BOOT_LIMIT = 25 * 60   # seconds for the whole guest session, checks included
CHECKS = [
    "install: the package installs, enabling and starting nothing",
    "layout: new puts the code where the service finds it",
    "service: a message in, a result out, through the guest's mosquitto",
    "service: a message from outside the machine, through QEMU's forwarded port",
    "cgroup v2: the daemon lives in a leaf of its own, instances in groups of their own",
    "cgroup v2: memory.max stops an allocation with MemoryLimitExceeded and its peak",
    "cgroup v2: pids.max stops a fork bomb",
    "cgroup v2: cpu.max caps a spinner at instance.cpu.cpus",
    "cgroup v2: a child that left its process group dies with its instance (cgroup.kill)",
    "temporary directories: shared under the unit, and what a function leaves there goes with it",
    "console: the package serves the page; it shows cgroup v2 and a failure",
    "systemctl reload is a SIGHUP reload",
    "systemctl stop drains and acknowledges: every message answered once across a restart",
    "journalctl -u has the daemon's log, with levels",
    "systemd-analyze security: the unit's exposure",
    "by hand from a root shell (no delegation): no groups, says why, rlimits instead",
    "upgrade keeps the configuration, the functions, the package cache and the journal",
    "remove keeps the configuration and the state; purge removes what the package made",
]

# What the session found, for the summary at the end of the run (conftest.py prints it).
SESSION: Dict[str, Any] = {}


def why_not() -> Optional[str]:
    """Why this machine cannot run the VM tests, or None."""
    if os.environ.get("OPENEDGE_FUNCTION_VM", "").lower() in ("off", "0", "no"):
        return "OPENEDGE_FUNCTION_VM=off"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the VM tests need an x86_64 Linux host, not {platform.system()} {platform.machine()}"
    if os.geteuid() != 0:
        return "building the image and the package needs root"
    missing = [tool for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "dpkg-buildpackage",
                                 "dh_virtualenv") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (tests/vm/ensure-tools.sh installs them)"
    os.makedirs(CACHE, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    if free < 6 << 30:
        return f"{CACHE} has {free >> 30} GB free; the image and a boot need 6"
    return None


def _previous(deb: str, directory: str) -> str:
    """The same build as an earlier version (…~prev), to upgrade from."""
    tree = os.path.join(directory, "prev")
    subprocess.run(["dpkg-deb", "-R", deb, tree], check=True)
    control = os.path.join(tree, "DEBIAN", "control")
    with open(control) as fh:
        text = fh.read()
    version = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("Version: "))
    with open(control, "w") as fh:
        fh.write(text.replace(f"Version: {version}", f"Version: {version}~prev1"))
    out = os.path.join(directory, f"openedge-function_{version}~prev1_amd64.deb")
    subprocess.run(["dpkg-deb", "-Zxz", "-b", tree, out], check=True, capture_output=True)
    shutil.rmtree(tree)
    return out


def _outside(share: str, port: int) -> None:
    """The check from outside: once the guest asks, a message through the forwarded port."""
    ready = os.path.join(share, "state", "outside.ready")
    if not os.path.exists(ready) or os.path.exists(os.path.join(share, "state", "outside.json")):
        return
    collector = Collector(types.SimpleNamespace(host="127.0.0.1", port=port), ["hello/out"])
    try:
        collector.client.publish("hello/in", json.dumps({"name": "outside"}), 1).wait_for_publish(30)
        deadline = time.monotonic() + 120
        while not collector.on("hello/out") and time.monotonic() < deadline:
            time.sleep(0.2)
        got = collector.on("hello/out")
        answer = json.loads(got[0].payload) if got else {"error": "no answer within 120s"}
    finally:
        collector.close()
    with open(os.path.join(share, "state", "outside.json.part"), "w") as fh:
        json.dump(answer, fh)
    os.rename(os.path.join(share, "state", "outside.json.part"), os.path.join(share, "state", "outside.json"))


@pytest.fixture(scope="module")
def guest() -> Dict[str, Dict[str, Any]]:
    reason = why_not()
    if reason:
        SESSION["skipped"] = reason
        pytest.skip(reason)
    started = time.monotonic()
    image = subprocess.run(["bash", os.path.join(VM, "build-image.sh"), CACHE], capture_output=True, text=True)
    if image.returncode != 0:
        pytest.fail(f"the guest image did not build:\n{image.stderr[-3000:]}")
    image_dir = image.stdout.strip().splitlines()[-1]
    SESSION["image"] = time.monotonic() - started
    built = subprocess.run(["bash", os.path.join(ROOT, "scripts", "build-deb.sh")], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"make deb failed:\n{built.stderr[-3000:]}")
    deb = built.stdout.strip().splitlines()[-1]
    SESSION["package"] = time.monotonic() - started - SESSION["image"]
    share = tempfile.mkdtemp(prefix="oef-vm-")
    try:
        os.makedirs(os.path.join(share, "pkg"))
        os.makedirs(os.path.join(share, "state"))
        shutil.copy(deb, os.path.join(share, "pkg"))
        _previous(deb, os.path.join(share, "pkg"))
        for name in ("guest.sh", "checks.py"):
            shutil.copy(os.path.join(VM, "guest", name), share)
        shutil.copy(os.path.join(ROOT, "tests", "probe_handler.py"), os.path.join(share, "probe.py"))
        port = free_port()
        command = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", "2", "-nographic", "-no-reboot",
            "-kernel", os.path.join(image_dir, "vmlinuz"), "-initrd", os.path.join(image_dir, "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 quiet panic=-1",
            "-drive", f"file={os.path.join(image_dir, 'disk.img')},format=raw,if=virtio,snapshot=on",
            "-virtfs", f"local,path={share},mount_tag=share,security_model=none,id=share",
            "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:1883",
        ]
        booted = time.monotonic()
        with open(os.path.join(share, "console.log"), "w") as console:
            qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
            try:
                while qemu.poll() is None and time.monotonic() - booted < BOOT_LIMIT:
                    _outside(share, port)
                    time.sleep(0.5)
            finally:
                if qemu.poll() is None:
                    qemu.kill()
                qemu.wait()
        SESSION["guest"] = time.monotonic() - booted
        results = os.path.join(share, "results.json")
        if not os.path.exists(results):
            log = ""
            for name in ("guest.log", "console.log"):
                path = os.path.join(share, name)
                if os.path.exists(path):
                    with open(path, errors="replace") as fh:
                        log += f"--- {name}\n{fh.read()[-3000:]}\n"
            pytest.fail(f"the guest reported nothing (qemu exit {qemu.returncode}):\n{log}")
        with open(results) as fh:
            found = {entry["name"]: entry for entry in json.load(fh)}
        SESSION["results"] = found
        return found
    finally:
        shutil.rmtree(share, ignore_errors=True)


@pytest.mark.parametrize("name", CHECKS)
def test_gateway(guest, name):
    """Each check of the guest session (tests/vm/guest/checks.py)."""
    result = guest.get(name)
    assert result is not None, f"the guest did not get to {name!r}"
    assert result["ok"], result["detail"]


def test_every_check_of_the_guest_is_reported_here():
    """A check the guest runs but this file does not list would pass or fail unseen."""
    with open(os.path.join(VM, "guest", "checks.py")) as fh:
        names = re.findall(r'^    @check\("([^"]+)"\)', fh.read(), re.M)
    assert names == CHECKS
