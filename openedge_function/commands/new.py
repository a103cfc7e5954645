"""`openedge-function new NAME`: a working function folder, and its function and rule in the config.

The handler goes to `functions/NAME/NAME.py` in the working directory the daemon will use for the
configuration (config/layout.py: the state directory for the service's, else the current
directory), and the configuration gets a `codedir` that resolves there. The function and a rule
(`NAME/in` → `NAME/out`, QoS 1) are added as text, so the file's comments and layout stay; a file
that does not exist yet is written whole.
The result must load (`load_config`), else nothing is changed and the entries are printed instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

import yaml

from ..config import function_name, parse_config
from ..config.layout import DEFAULT_HELP, FUNCTIONS, default_config, default_workdir, is_system
from ..errors import ConfigError

EXIT_USAGE = 2

HANDLER = '''"""{name}: a function of openedge-function.

Try it without a broker:  openedge-function run {codedir} '{{"name": "edge"}}'
Packages it imports go in requirements.txt beside this file (installed for this function alone).
"""


def handler(event, context):
    """`event` is the message: JSON-decoded when it is JSON, else bytes. What this returns is
    published (a value as JSON, bytes as they are, None: nothing); an exception becomes an error
    envelope on the rule's error topic."""
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {{"hello": name, "function": context["functionName"], "topic": context["messageTopic"]}}
'''


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="openedge-function new",
        description="Write a working function folder and add the function and a rule for it to the "
                    "configuration.")
    parser.add_argument("name", help="the function's name ([a-zA-Z0-9_-])")
    parser.add_argument("-c", "--config", default=None,
                        help=f"the configuration to add it to, made when missing (default: {DEFAULT_HELP}; "
                             f"here: {default_config()})")
    parser.add_argument("-w", "--workdir", default=None,
                        help="where the configuration's relative paths start (default: the state "
                             "directory for the service's configuration, else the current directory)")
    parser.add_argument("--dir", default=None,
                        help=f"the code directory (default: {FUNCTIONS}/NAME in the working directory)")
    args = parser.parse_args(argv)
    try:
        name = function_name(args.name)
    except ValueError as exc:
        print(f"openedge-function new: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = args.config or default_config()
    workdir = default_workdir(config, args.workdir)
    where = os.path.abspath(args.dir) if args.dir else os.path.join(workdir, FUNCTIONS, name)
    # As the daemon will read it: relative to its working directory when the code is under it.
    codedir = os.path.relpath(where, workdir) if _under(where, workdir) else where
    shown = os.path.relpath(where) if _under(where, os.getcwd()) else where   # as the user types it
    source = os.path.join(where, f"{name}.py")
    if os.path.exists(source):
        print(f"openedge-function new: {source} exists already", file=sys.stderr)
        return EXIT_USAGE
    text = _read(config)
    if text is not None and name in _functions(text):
        print(f"openedge-function new: {config} has a function {name!r} already", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(where, exist_ok=True)
    with open(source, "w") as fh:
        fh.write(HANDLER.format(name=name, codedir=shown))
    function = (f"- name: {name}\n  handler: {name}.handler\n  codedir: {codedir}\n"
                f"  instance:\n    max: 2\n")
    rule = (f"- id: rule-{name}\n  subscribe:\n    topic: {name}/in\n    qos: 1\n"
            f"  compute:\n    function: {name}\n  publish:\n    topic: {name}/out\n    qos: 1\n")
    if text is None:
        text = ("hub:\n  address: tcp://127.0.0.1:1883\nrules:\n" + _indent(rule, "  ")
                + "functions:\n" + _indent(function, "  "))
    else:
        text = add_entry(add_entry(text, "functions", function), "rules", rule)
    problem = _check(text, config, workdir)
    if problem is not None:
        print(f"wrote {source}; add these to {config} yourself ({problem}):\n"
              f"functions:\n{_indent(function, '  ')}rules:\n{_indent(rule, '  ')}", file=sys.stderr)
        return 1
    with open(config, "w") as fh:
        fh.write(text)
    serve = ("systemctl reload openedge-function   (the service reads it again)" if is_system(config)
             else f"openedge-function -c {config}   (a running daemon: kill -HUP its pid)")
    print(f"wrote {source}, and function {name} with rule rule-{name} ({name}/in -> {name}/out) "
          f"in {config}\n"
          f"  try it:      openedge-function run {shown} '{{\"name\": \"edge\"}}'\n"
          f"  serve it:    {serve}\n"
          f"  send to it:  mosquitto_pub -t {name}/in -q 1 -m '{{\"name\": \"edge\"}}'")
    return 0


def _under(path: str, directory: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(directory)]) == os.path.abspath(directory)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _functions(text: str) -> List[str]:
    """The names of the functions a configuration's text defines (none if it does not parse)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    functions = data.get("functions") if isinstance(data, dict) else None
    if not isinstance(functions, list):
        return []
    return [f.get("name") for f in functions if isinstance(f, dict)]


def _indent(block: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in block.splitlines(True))


def add_entry(text: str, key: str, entry: str) -> str:
    """`text` with `entry` (a YAML list item) appended to the top-level list `key`, as text."""
    lines = text.splitlines(True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{key}\s*:", line)), None)
    if start is None:
        return "".join(lines) + f"{key}:\n" + _indent(entry, "  ")
    if re.match(rf"^{key}\s*:\s*\[\s*\]\s*(#.*)?$", lines[start]):   # key: []
        lines[start] = f"{key}:\n"
    end = start + 1
    while end < len(lines) and not re.match(r"^[^\s#]", lines[end]):
        end += 1
    items = [line for line in lines[start + 1:end] if re.match(r"^\s*- ", line)]
    prefix = re.match(r"^(\s*)", items[0]).group(1) if items else "  "
    while end > start + 1 and not lines[end - 1].strip():   # before the block's trailing blank lines
        end -= 1
    return "".join(lines[:end]) + _indent(entry, prefix) + "".join(lines[end:])


def _check(text: str, config: str, workdir: str) -> Optional[str]:
    """None when `text` is a valid configuration (relative paths from `workdir`), else why not."""
    try:
        parse_config(yaml.safe_load(text), config, workdir)
    except (ConfigError, yaml.YAMLError) as exc:
        return str(exc)
    return None
