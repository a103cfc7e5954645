"""openedge-function: an edge function-compute daemon.

MQTT rules feed Python handlers that run in pooled, isolated instance processes; results and
error envelopes are published back to the broker.
"""
from .config import AppConfig, load_config
from .daemon import Daemon
from .errors import ConfigError
from .sdk import Client, InvokeError
from .version import __version__

__all__ = ["AppConfig", "Client", "ConfigError", "Daemon", "InvokeError", "load_config", "__version__"]
