"""openedge-function: an edge function-compute daemon.

MQTT rules feed Python handlers that run in pooled, isolated instance processes; results and
error envelopes are published back to the broker.
"""
import os

# Before gRPC loads: its fork handlers would run in every child the daemon starts (a new
# interpreter as another user, pip) while the data plane's threads are inside gRPC, and such a
# child dies before it can exec (SIGSEGV or an abort in the epoll poller, 1 start in 6 under load).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
# gRPC's C core logs to stderr on its own, past our logger and its level: a closed instance's
# connection ("chttp2_transport.cc ... Got goaway") is an INFO line of its. Only its errors
# (unless the operator sets GRPC_VERBOSITY).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .config import AppConfig, load_config  # noqa: E402
from .daemon import Daemon  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .sdk import Client, InvokeError  # noqa: E402

from .version import __version__  # noqa: E402
__all__ = ["AppConfig", "Client", "ConfigError", "Daemon", "InvokeError", "load_config", "__version__"]
