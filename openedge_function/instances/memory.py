"""The memory limit, enforced by polling where the kernel does not (an instance without a memory
control group): resident memory of an instance and its subprocesses.

Runs on the daemon's own thread (psutil reads /proc, which the data plane's loop must not wait
for); it only flags and signals the instance. Its worker, on the loop, sees the stream break and
answers the invocation with MemoryLimitExceeded.
"""
from __future__ import annotations

import logging
from typing import Iterable

import psutil

from .instance import Instance
from .lifecycle import State

log = logging.getLogger("openedge_function.limits")


def enforce_memory(instances: Iterable[Instance], limit: int) -> None:
    """Kill the instances whose resident memory (with their subprocesses) is over `limit` bytes."""
    if not limit:
        return
    for instance in instances:
        if instance.state not in (State.IDLE, State.BUSY) or instance.pid is None:
            continue
        group = instance.cgroup
        if group is not None and group.memory:
            continue   # the kernel stops it at the limit
        rss = tree_rss(instance.pid)
        if rss > limit:
            log.warning("instance %s: %d MB resident, over its limit of %d MB: killing it",
                        instance.id, rss >> 20, limit >> 20)
            instance.memory_exceeded = rss
            instance.signal_kill()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants, in bytes (0 when it is gone)."""
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0
