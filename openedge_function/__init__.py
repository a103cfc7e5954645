"""openedge-function: an edge function-compute daemon.

MQTT rules feed Python handlers that run in pooled, isolated instance processes; results and
error envelopes are published back to the broker.
"""
from .config import AppConfig, load_config
from .daemon import Daemon
from .errors import ConfigError

__version__ = "0.1.0"
__all__ = ["AppConfig", "ConfigError", "Daemon", "load_config", "__version__"]
