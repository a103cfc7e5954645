"""Kernel-enforced limits: one control group per instance.

cgroup v2 where the daemon owns its group (systemd's `Delegate=yes`), else the v1 `memory` and
`pids` hierarchies (and `cpu` for a quota) where the daemon may make groups in them. The kernel
then stops an allocation at `instance.memory` instead of a poll finding it late, bounds the
processes and threads of an instance at `instance.pids`, and an instance's leftovers (a subprocess
that left its process group) can be found and killed. `detect()` says why when there is none; the
daemon then falls back to polling and rlimits.

Everything here is small reads and writes of cgroupfs, done in the control threads (instance start
and stop) and the daemon's thread, never on the data plane's loop.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("openedge_function.cgroups")

OFF_ENV = "OPENEDGE_FUNCTION_CGROUPS"   # "off": use rlimits and polling even where groups work
_PERIOD_US = 100_000


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def _keyed(path: str, key: str) -> int:
    """`key N` from a flat-keyed file (memory.events, memory.oom_control); 0 when absent."""
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _mounts() -> List[Tuple[str, str, List[str]]]:
    """(mount point, fstype, super options) of the cgroup file systems."""
    found = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4].replace("\\040", " "), tail[0], tail[2].split(",")))
    return found


def _own_paths() -> Dict[str, str]:
    """Our group in each hierarchy: controller (or "" for v2) -> path."""
    paths: Dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _kill_all(procs_file: str) -> None:
    for pid in _read(procs_file).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass


def _remove(path: str) -> None:
    """rmdir a group, killing what is left in it; its processes take a moment to go."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove control group %s: %s", path, exc)
                return
        if os.path.exists(os.path.join(path, "cgroup.kill")):
            try:
                _write(os.path.join(path, "cgroup.kill"), "1")
            except OSError:
                pass
        _kill_all(os.path.join(path, "cgroup.procs"))
        time.sleep(0.01)


class Group:
    """One instance's group: a directory in each hierarchy (one with v2)."""

    def __init__(self, dirs: Dict[str, str], version: int, memory: int) -> None:
        self.dirs = dirs          # controller -> directory ("" for v2)
        self.version = version
        self.memory = memory

    def add(self, pid: int) -> None:
        for directory in self.dirs.values():
            _write(os.path.join(directory, "cgroup.procs"), str(pid))

    def _memory_dir(self) -> str:
        return self.dirs.get("" if self.version == 2 else "memory", "")

    def oom_kills(self) -> int:
        directory = self._memory_dir()
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(os.path.join(directory, name), "oom_kill") if directory else 0

    def peak(self) -> int:
        """The most memory the group held, in bytes (0 where the kernel does not say)."""
        directory = self._memory_dir()
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = _read(os.path.join(directory, name)).strip() if directory else ""
        return int(text) if text.isdigit() else 0

    def remove(self) -> None:
        """Kill what is left in the group (a subprocess that left the instance's process group,
        too) and remove it."""
        for directory in self.dirs.values():
            _remove(directory)


class Cgroups:
    """The daemon's own subtree, in which each instance gets a group."""

    def __init__(self, version: int, roots: Dict[str, str]) -> None:
        self.version = version
        self.roots = roots        # controller -> the directory instances' groups go in
        self.cpu = "cpu" in roots if version == 1 else "cpu" in _read(
            os.path.join(roots[""], "cgroup.subtree_control")).split()

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 at {self.roots['']}"
        return "cgroup v1 " + ", ".join(f"{c} at {d}" for c, d in sorted(self.roots.items()))

    def group(self, name: str, memory: int, pids: int, cpus: float) -> Group:
        """Make the group `name` with its limits (memory in bytes, 0 = none; cpus, 0 = no quota).
        Raises OSError."""
        dirs = {controller: os.path.join(root, name) for controller, root in self.roots.items()}
        if self.version == 1 and not cpus:
            dirs.pop("cpu", None)
        for directory in dirs.values():
            os.mkdir(directory)
        group = Group(dirs, self.version, memory)
        try:
            if self.version == 2:
                self._limit_v2(dirs[""], memory, pids, cpus)
            else:
                self._limit_v1(dirs, memory, pids, cpus)
        except OSError:
            group.remove()
            raise
        return group

    def _limit_v2(self, directory: str, memory: int, pids: int, cpus: float) -> None:
        if memory:
            _write(os.path.join(directory, "memory.max"), str(memory))
            if os.path.exists(os.path.join(directory, "memory.swap.max")):
                _write(os.path.join(directory, "memory.swap.max"), "0")
        _write(os.path.join(directory, "pids.max"), str(pids))
        if cpus and self.cpu:
            _write(os.path.join(directory, "cpu.max"), f"{int(cpus * _PERIOD_US)} {_PERIOD_US}")

    @staticmethod
    def _limit_v1(dirs: Dict[str, str], memory: int, pids: int, cpus: float) -> None:
        if memory:
            _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), str(memory))
            swap = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):
                try:
                    _write(swap, str(memory))   # no escape into swap
                except OSError:
                    pass
        _write(os.path.join(dirs["pids"], "pids.max"), str(pids))
        if cpus and "cpu" in dirs:
            _write(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(_PERIOD_US))
            _write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(int(cpus * _PERIOD_US)))

    def close(self) -> None:
        """Remove the daemon's subtree (instances' groups are gone by now)."""
        for root in self.roots.values():
            for entry in os.listdir(root) if os.path.isdir(root) else []:
                if os.path.isdir(os.path.join(root, entry)):
                    _remove(os.path.join(root, entry))
            if self.version == 1:
                _remove(root)


def detect() -> Tuple[Optional[Cgroups], str]:
    """The daemon's subtree where it may make one; else None and why not."""
    if os.environ.get(OFF_ENV, "").lower() in ("off", "0", "no", "false"):
        return None, f"{OFF_ENV}=off"
    if not os.path.exists("/proc/self/cgroup"):
        return None, "no cgroups on this system"
    mounts, own = _mounts(), _own_paths()
    reasons = []
    v2 = next((m for m in mounts if m[1] == "cgroup2"), None)
    if v2 is not None and "" in own:
        found, why = _setup_v2(os.path.normpath(v2[0] + own[""]))
        if found is not None:
            return found, ""
        reasons.append(why)
    found, why = _setup_v1(mounts, own)
    if found is not None:
        return found, ""
    reasons.append(why)
    return None, "; ".join(reason for reason in reasons if reason)


def _setup_v2(own: str) -> Tuple[Optional[Cgroups], str]:
    """Under systemd with Delegate=yes we own `own`: move ourselves into `own/supervisor` (a group
    with processes cannot hand controllers down) and put instances under `own/instances`."""
    available = _read(os.path.join(own, "cgroup.controllers")).split()
    missing = [c for c in ("memory", "pids") if c not in available]
    if missing:
        return None, f"cgroup v2 at {own} does not offer {', '.join(missing)}"
    wanted = ["memory", "pids"] + (["cpu"] if "cpu" in available else [])
    enable = " ".join("+" + c for c in wanted)
    instances = os.path.join(own, "instances")
    why = _not_ours(own)
    if why:
        return None, why
    try:
        if not os.access(os.path.join(own, "cgroup.procs"), os.W_OK):
            raise PermissionError(errno.EACCES, "not delegated to this user")
        supervisor = os.path.join(own, "supervisor")
        os.makedirs(supervisor, exist_ok=True)
        if os.path.normpath(own) != os.path.normpath(supervisor):
            for pid in _read(os.path.join(own, "cgroup.procs")).split():
                if int(pid) == os.getpid():
                    _write(os.path.join(supervisor, "cgroup.procs"), pid)
        _write(os.path.join(own, "cgroup.subtree_control"), enable)
        if os.path.isdir(instances):
            for entry in os.listdir(instances):   # an earlier run's, killed before it could clean
                if os.path.isdir(os.path.join(instances, entry)):
                    _remove(os.path.join(instances, entry))
        os.makedirs(instances, exist_ok=True)
        _write(os.path.join(instances, "cgroup.subtree_control"), enable)
    except OSError as exc:
        return None, f"cannot make groups under cgroup v2 {own}: {exc.strerror or exc}"
    return Cgroups(2, {"": instances}), ""


def _not_ours(own: str) -> str:
    """Why the cgroup v2 group `own` is not the daemon's to divide, or "". systemd marks the group
    of a unit with Delegate=yes (the `user.delegate` attribute since systemd 253, `trusted.delegate`
    since 251, which only a process with CAP_SYS_ADMIN can read: the unit does not give it that).
    Where the mark cannot be read, a group that holds other processes (a login shell's, another
    service's) is someone else's."""
    for name in ("user.delegate", "trusted.delegate"):
        try:
            if os.getxattr(own, name) == b"1":
                return ""
        except OSError:
            continue
    others = [pid for pid in _read(os.path.join(own, "cgroup.procs")).split() if int(pid) != os.getpid()]
    if others:
        return (f"cgroup v2 group {own} is not delegated to the daemon: it holds {len(others)} other "
                "processes (run it as the service, whose unit has Delegate=yes)")
    return ""


def _setup_v1(mounts: List[Tuple[str, str, List[str]]], own: Dict[str, str]) -> Tuple[Optional[Cgroups], str]:
    roots: Dict[str, str] = {}
    for controller in ("memory", "pids", "cpu"):
        mount = next((m for m in mounts if m[1] == "cgroup" and controller in m[2]), None)
        if mount is None or controller not in own:
            if controller == "cpu":
                continue
            return None, f"no cgroup v1 {controller} hierarchy"
        parent = os.path.normpath(mount[0] + own[controller])
        _clean_stale_v1(parent)
        root = os.path.join(parent, f"openedge-function-{os.getpid()}")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            for made in roots.values():
                _remove(made)
            if controller == "cpu":
                continue
            return None, f"cannot make groups in cgroup v1 {controller} at {parent}: {exc.strerror or exc}"
        roots[controller] = root
    return Cgroups(1, roots), ""


def _clean_stale_v1(parent: str) -> None:
    """Subtrees of daemons that are gone (SIGKILLed, so they could not remove their own)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith("openedge-function-"):
            continue
        pid = entry.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        stale = os.path.join(parent, entry)
        for group in os.listdir(stale):
            if os.path.isdir(os.path.join(stale, group)):
                _remove(os.path.join(stale, group))
        _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Cgroups", "Group", "detect", "OFF_ENV"]
