"""`openedge-function -c application.yml`: the command line."""
from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
from typing import List, Optional

from . import __version__
from .config import LoggerConfig, load_config
from .daemon import Daemon
from .errors import ConfigError

EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(config: LoggerConfig) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(getattr(logging, config.level.upper()))
    if config.format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: List[logging.Handler] = []
    if config.path:
        os.makedirs(os.path.dirname(config.path) or ".", exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            config.path, maxBytes=config.size_max_mb << 20, backupCount=config.backup_max,
            encoding="utf-8"))
    if config.console or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="openedge-function",
        description="Edge function compute: MQTT rules feed Python handlers in pooled instances.")
    parser.add_argument("-c", "--config", default="etc/openedge/application.yml",
                        help="the configuration file (default: %(default)s)")
    parser.add_argument("-w", "--workdir", default=None,
                        help="where relative paths in the configuration start (default: the current directory)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.workdir)
    except ConfigError as exc:
        print(f"openedge-function: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{args.config}: ok ({len(config.functions)} functions, {len(config.rules)} rules)")
        return 0
    setup_logging(config.logger)
    return Daemon(config).run()
