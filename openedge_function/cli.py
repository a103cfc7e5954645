"""`openedge-function -c application.yml`: the command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from . import __version__
from .config import load_config
from .daemon import Daemon
from .errors import ConfigError
from .logs import setup_logging

EXIT_CONFIG = 2


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
    return Daemon(config, args.workdir or os.getcwd()).run()
