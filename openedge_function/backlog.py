"""The invocations that wait for an instance of one function, and how many travel together.

Queued invocations go to an instance together, one stream message for several (the instance
still runs them one after the other), as long as recent handler durations keep a batch's
expected run time under a quarter of the timeout. At light load nothing waits, so batching never
adds latency: a message that finds an idle instance goes alone at once.
"""
from __future__ import annotations

import collections
from typing import Deque, List, Optional

from .invocation import Invocation

_BATCH_MAX, _BATCH_BYTES = 16, 1 << 20


class Backlog:
    """A FIFO of invocations with a soft bound: `full()` tells intake to pause."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.peak = 0
        self._queue: Deque[Invocation] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.limit

    def append(self, invocation: Invocation, first: bool = False) -> None:
        if first:
            self._queue.appendleft(invocation)
        else:
            self._queue.append(invocation)
        if len(self._queue) > self.peak:
            self.peak = len(self._queue)

    def remove(self, invocation: Invocation) -> bool:
        try:
            self._queue.remove(invocation)
        except ValueError:
            return False
        return True

    def take(self, limit: int) -> List[Invocation]:
        """The next invocation and, unless it must run alone, up to `limit - 1` more that may
        travel with it (never past _BATCH_BYTES of payload)."""
        queue = self._queue
        first = queue.popleft()
        batch = [first]
        if not first.solo:
            size = len(first.payload)
            while queue and len(batch) < limit and not queue[0].solo and size < _BATCH_BYTES:
                invocation = queue.popleft()
                batch.append(invocation)
                size += len(invocation.payload)
        return batch

    def clear(self) -> List[Invocation]:
        doomed, self._queue = list(self._queue), collections.deque()
        return doomed


class BatchSizer:
    """How many invocations may share a batch: a moving average of handler durations keeps a
    batch's expected run time under a quarter of the timeout."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self.average: Optional[float] = None   # seconds; None until handlers proved quick

    def observe(self, seconds: float) -> None:
        average = self.average
        self.average = seconds if average is None else 0.9 * average + 0.1 * seconds

    def reset(self) -> None:
        """A batch failed: run alone until handlers prove quick again."""
        self.average = None

    def limit(self) -> int:
        average = self.average
        if average is None:
            return 1
        return max(1, min(_BATCH_MAX, int(self._timeout / (4 * max(average, 1e-6)))))
