"""application.yml: typed, frozen, validated.

converters.py   YAML values to typed ones (depends on nothing)
model.py        the dataclasses, each setting declared once: key, default, converter
parser.py       reads a file into the model, reporting every error with its field path
"""
from .converters import byte_size, duration, function_name
from .model import (PACKET_MAX, SESSION_NEVER_EXPIRES, AppConfig, Control, Credentials, Defaults, Function, Hub,
                    Limits, LoggerConfig, Nats, Packages, Publication, Rule, Server, Service, Subscription,
                    default_package_cache, state_directory)
from .parser import load_config, parse_config

__all__ = [
    "AppConfig", "Control", "Hub", "Rule", "Subscription", "Publication", "Function", "Limits", "Credentials",
    "Service", "Nats", "Defaults", "Packages", "LoggerConfig", "Server", "load_config", "parse_config",
    "duration", "byte_size", "function_name", "state_directory", "default_package_cache",
    "PACKET_MAX", "SESSION_NEVER_EXPIRES",
]
