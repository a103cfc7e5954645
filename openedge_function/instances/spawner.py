"""What starting a function's instances takes, held in one place for its pool.

A pool asks its spawner for each new instance; the spawner knows the rest: the pool's private
directory and user (the sandbox), the fd watcher that follows the instances' sockets and pipes,
the template they fork from, the function's own packages, and who answers their calls to other
functions. The daemon and the `run` command each make one per pool.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

from ..config import Function
from ..isolation import Sandbox
from .fdwatch import FdWatcher
from .instance import Instance
from .status import OnCall
from .template import Template


class Spawner:
    """Makes the instances of one pool."""

    def __init__(self, sandbox: Sandbox, fdwatch: FdWatcher, template: Optional[Template] = None,
                 on_call: Optional[OnCall] = None) -> None:
        self.sandbox = sandbox
        self.fdwatch = fdwatch
        self.template = template
        self.on_call = on_call   # answers context.invoke: the daemon's Calls
        self.paths: Tuple[str, ...] = ()   # the function's own packages, on its instances' sys.path
        self.call_max = 4 << 20   # the largest body of a call its instances make: the daemon's
        #   largest instance.message.length.max

    def instance(self, function: Function, seq: int, on_lost: Callable[[Instance], None]) -> Instance:
        """A new instance (not yet started)."""
        return Instance(function, seq, self.sandbox, self.fdwatch, on_lost, self.template, self.paths,
                        self.on_call, self.call_max)
