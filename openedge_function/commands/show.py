"""`openedge-function show unit|config`: the files an installation from the wheel needs.

The Debian package puts them in place itself. From a wheel, an operator writes them out:
    openedge-function show unit > /etc/systemd/system/openedge-function.service
    openedge-function show config > /etc/openedge-function/application.yml
The unit's ExecStart is this installation's own `openedge-function`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List

SHARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "share")
UNIT = "openedge-function.service"
CONFIG = "application.yml"
_PACKAGED_BINARY = "/usr/bin/openedge-function"


def this_binary() -> str:
    """How to start this installation's daemon: its `openedge-function` script, else its
    interpreter with -m."""
    script = os.path.join(os.path.dirname(sys.executable), "openedge-function")
    if os.access(script, os.X_OK):
        return script
    return f"{shlex.quote(sys.executable)} -m openedge_function"


def unit() -> str:
    with open(os.path.join(SHARE, UNIT)) as fh:
        return fh.read().replace(f"ExecStart={_PACKAGED_BINARY} ", f"ExecStart={this_binary()} ")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openedge-function show",
        description="Print a file an installation as a service needs (README, 'Running it as a service').")
    parser.add_argument("what", choices=("unit", "config"),
                        help="unit: the systemd unit, for this installation; config: an example "
                             "/etc/openedge-function/application.yml")
    args = parser.parse_args(argv)
    if args.what == "unit":
        sys.stdout.write(unit())
    else:
        with open(os.path.join(SHARE, CONFIG)) as fh:
            sys.stdout.write(fh.read())
    return 0
