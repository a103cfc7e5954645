"""`openedge-function -c application.yml` runs the daemon; `openedge-function invoke|status` talk to
one through its HTTP server."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import yaml

from .version import __version__
from .config import load_config
from .config.parser import parse_server
from .config.layout import DEFAULT_HELP, default_config, default_workdir
from .daemon import Daemon
from .errors import ConfigError, ServerError
from .isolation import plan
from .sdk import ADDRESS_ENV, DEFAULT_ADDRESS, TOKEN_ENV, Client, InvokeError
from .logs import setup_logging

EXIT_CONFIG = 2


def main(argv: Optional[List[str]] = None) -> int:
    """The command line. Pipe-safe: a reader that goes away (`status | head`) ends the command
    quietly, as it ends `cat`."""
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # What is still buffered for stdout would fail again at exit: send it nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141   # 128 + SIGPIPE, as a shell reports a command ended by its pipe


def _main(argv: List[str]) -> int:
    if argv and argv[0] in ("invoke", "status"):
        return client_main(argv)
    if argv and argv[0] == "run":
        from .commands.run import main as run_main
        return run_main(argv[1:])
    if argv and argv[0] == "new":
        from .commands.new import main as new_main
        return new_main(argv[1:])
    if argv and argv[0] == "show":
        from .commands.show import main as show_main
        return show_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="openedge-function",
        usage="%(prog)s [-c CONFIG] [-w DIR] [--check]\n       %(prog)s {run,new,invoke,status,show} ...",
        description="Edge function compute: MQTT rules feed Python handlers in pooled instances. "
                    "Without a command, runs the daemon on CONFIG.",
        epilog="commands (each has --help):\n"
               "  run DIR [EVENT|-]     run a function on one event in a real instance, no broker needed\n"
               "  new NAME              write a function folder and add it, with a rule, to the config\n"
               "  invoke NAME [EVENT]   run a function in the running daemon (its HTTP server)\n"
               "  status                the running daemon's functions, instances and counters\n"
               "  show unit|config      the systemd unit for this installation, an example configuration",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=None,
                        help=f"the configuration file (default: {DEFAULT_HELP}; here: {default_config()})")
    parser.add_argument("-w", "--workdir", default=None,
                        help="where relative paths in the configuration start (default: the state "
                             "directory for the service's configuration, else the current directory)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    args.config = args.config or default_config()
    args.workdir = default_workdir(args.config, args.workdir)
    try:
        config = load_config(args.config, args.workdir)
        plan(config)   # who each function runs as: a user this daemon cannot switch to is an error
    except ConfigError as exc:
        for error in getattr(exc, "errors", [exc]):
            print(f"openedge-function: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{args.config}: ok ({len(config.functions)} functions, {len(config.rules)} rules)")
        return 0
    # What the daemon writes (its log, its journal) is its own: functions run as other users.
    os.umask(0o077)
    setup_logging(config.logger)
    try:
        return Daemon(config, args.workdir).run()
    except ServerError as exc:
        print(f"openedge-function: {exc}", file=sys.stderr)
        return 1


def client_main(argv: List[str]) -> int:
    """`invoke` and `status`: talk to a running daemon's HTTP server."""
    parser = argparse.ArgumentParser(prog="openedge-function", description="Talk to a running daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    invoke = commands.add_parser("invoke", help="run a function and print its result")
    invoke.add_argument("function")
    invoke.add_argument("event", nargs="?", default=None,
                        help="the event: JSON, else sent as bytes; '-' reads standard input")
    status = commands.add_parser("status", help="print functions, instances and counters")
    for command in (invoke, status):
        command.add_argument("--address", default=None,
                             help=f"host:port of the daemon's server (default: ${ADDRESS_ENV}, else the "
                                  f"configuration's server.address, else {DEFAULT_ADDRESS})")
        command.add_argument("--token", default=None,
                             help=f"bearer token (default: ${TOKEN_ENV}, else the configuration's server.token)")
        command.add_argument("-c", "--config", default=None,
                             help=f"the daemon's configuration, for its server (default: {DEFAULT_HELP})")
    args = parser.parse_args(argv)
    address, token = args.address, args.token
    hint = ""   # what to say when no daemon answers
    if address is None and not os.environ.get(ADDRESS_ENV):
        path = args.config or default_config()
        address, configured_token = _server_of(path)
        token = token if token is not None or os.environ.get(TOKEN_ENV) else configured_token
        if address is None:
            hint = _no_server(path)
    client = Client(address=address, token=token)
    if args.command == "status":
        return _status(client, hint)
    raw = sys.stdin.buffer.read() if args.event == "-" else (
        None if args.event is None else args.event.encode("utf-8"))
    data: object = raw
    if raw is not None:
        try:
            data = json.loads(raw)
        except ValueError:
            pass
    try:
        result = client.invoke(args.function, data=data)
    except InvokeError as exc:
        envelope = exc.response if isinstance(exc.response, dict) else {
            "errorMessage": exc.message, "errorType": exc.code, "stackTrace": exc.stack_trace,
            "requestId": exc.request_id}
        print(json.dumps(envelope, indent=2, ensure_ascii=False))
        if exc.code == "ConnectionError" and hint:
            print(f"openedge-function: {hint}", file=sys.stderr)
        return 1
    if isinstance(result, bytes):
        sys.stdout.buffer.write(result)
        sys.stdout.flush()
    elif result is not None:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _server_of(path: str) -> "tuple[Optional[str], Optional[str]]":
    """The address and token of the server a configuration file sets up, as a client on this
    machine reaches it; (None, None) when it has none or it cannot be read."""
    try:
        with open(path, "rb") as fh:
            data = yaml.safe_load(fh)
        section = data.get("server") if isinstance(data, dict) else None
        if section is None:
            return None, None
        server = parse_server(section, path)
    except (OSError, yaml.YAMLError, ConfigError):
        return None, None
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host   # everywhere: loopback too
    address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    return address, server.token or None


def _no_server(path: str) -> str:
    """Why the configuration at `path` gave no server to ask, and what to do about it."""
    if not os.path.exists(path):
        return (f"there is no configuration at {path} to find the daemon's server in: name it with "
                f"-c CONFIG, or the server with --address HOST:PORT (or ${ADDRESS_ENV})")
    return (f"{path} sets up no HTTP server (no server: section, or one that cannot be read), so its "
            f"daemon has nothing to ask; add `server: {{address: 127.0.0.1:8080}}` and reload it "
            f"(SIGHUP), or name another daemon's server with --address HOST:PORT")


def _status(client: Client, hint: str = "") -> int:
    try:
        status = client.status()
    except InvokeError as exc:
        print(f"openedge-function: {exc}", file=sys.stderr)
        if exc.code == "ConnectionError" and hint:
            print(f"openedge-function: {hint}", file=sys.stderr)
        return 1
    print(f"daemon pid {status['pid']}, up {status['uptime_s']}s, broker {status['broker']['address']} "
          f"({'connected' if status['broker']['connected'] else 'NOT connected'}), "
          f"{'healthy' if status['healthy'] else 'UNHEALTHY: ' + '; '.join(status['reasons'])}")
    for warning in status.get("warnings", []):
        print(f"warning: {warning}")
    print("functions:")
    for name, fn in status["functions"].items():
        states = ", ".join(f"{count} {state}" for state, count in sorted(fn["states"].items())) or "none"
        print(f"  {name} ({fn['type']}): instances {fn['instances']} of max {fn['max']} ({states}), "
              f"queued {fn['queued']}, peak queue {fn['queue_peak']}, dropped {fn['dropped']}")
        for instance in fn["instance_list"]:
            print(f"    {instance['id']}  pid {instance['pid']}  {instance['state']}")
    print("rules:")
    for name, rule in status["rules"].items():
        print(f"  {name} -> {rule['function']}: received {rule['received']}, published {rule['published']}, "
              f"failed {rule['failed']}, dropped {rule['dropped']}"
              f"{'' if rule['connected'] else ', NOT connected'}")
    return 0
