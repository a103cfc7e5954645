"""What an instance prints, into the daemon's log: one line per line, tagged with its invocation.

The runtime marks each line of the handler's with its request id (runtime_python/output.py) and
keeps it within the function's `log.max` per invocation. What a handler's subprocess writes to the
same pipes comes unmarked: it belongs to the invocation in progress, and is counted here against
the same budget, with the same truncation marker once it is spent.
"""
from __future__ import annotations

import logging
from typing import Optional

from runtime_python.output import Budget
from runtime_python.wire import MARK, SEPARATOR, truncation_marker

from .fdwatch import FdWatcher, LineSplitter

output_log = logging.getLogger("openedge_function.handler")   # what handlers print


class HandlerOutput:
    """An instance's stdout and stderr pipes, logged at info and warning."""

    def __init__(self, function: str, instance_id: str, log_max: int) -> None:
        self._function = function
        self._instance_id = instance_id
        self.request_id = ""   # the invocation in progress, for output the runtime did not mark
        self._unmarked = Budget(log_max)

    def attach(self, fdwatch: FdWatcher, stdout_fd: int, stderr_fd: int) -> None:
        """Read the pipes' ends `stdout_fd` and `stderr_fd` (the fd watcher's from now on)."""
        fdwatch.add(stdout_fd, LineSplitter(lambda line: self._line(line, logging.INFO)).feed)
        fdwatch.add(stderr_fd, LineSplitter(lambda line: self._line(line, logging.WARNING)).feed)

    def _line(self, line: str, level: int) -> None:
        if line.startswith(MARK):
            request_id, _, line = line[1:].partition(SEPARATOR)
        else:   # written by a subprocess: it belongs to the invocation in progress
            request_id = self.request_id
            fitting = self._within_budget(request_id, line)
            if fitting is None:
                return
            line = fitting
        output_log.log(level, "function=%s instance=%s request=%s: %s", self._function,
                       self._instance_id, request_id or "-", line,
                       extra={"function": self._function, "instance": self._instance_id,
                              "request_id": request_id})

    def _within_budget(self, request_id: str, line: str) -> Optional[str]:
        """What of an unmarked line fits in its invocation's output budget (log.max), the marker
        line once it is spent, then None."""
        budget = self._unmarked
        if budget.request_id != request_id:
            budget.start(request_id)
        if budget.truncated:
            return None
        size = len(line.encode("utf-8", "replace")) + 1
        if size <= budget.left:
            budget.left -= size
            return line
        budget.truncated = True
        return truncation_marker(budget.limit)
