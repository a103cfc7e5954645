"""The daemon's version (pyproject.toml's), for --version, /status and /metrics. Depends on nothing."""

__version__ = "0.1.0"
