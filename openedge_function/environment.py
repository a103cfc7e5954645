"""What every runtime process starts with: the instances, and the template they fork from."""
from __future__ import annotations

import os
from typing import Dict

from runtime_python._pb import function_pb2 as pb

# The runtime package sits beside this one; an interpreter other than ours finds it through this.
RUNTIME_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__))))
_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_environment() -> Dict[str, str]:
    """Nothing of the daemon's own environment, and so not the broker credentials."""
    return {
        "PATH": _BASE_PATH,
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": os.environ.get("HOME", "/"),
        "PYTHONDONTWRITEBYTECODE": "1",
        # gRPC's fork handlers would run in every subprocess a handler starts, with the server's
        # threads busy; they can abort the child (seen on Python 3.9, which forks without vfork).
        "GRPC_ENABLE_FORK_SUPPORT": "0",
    }
