"""`openedge-function -c application.yml` runs the daemon; `openedge-function invoke|status` talk to
one through its HTTP server."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import yaml

from .version import __version__
from .config import AppConfig, load_config
from .config.parser import parse_control, parse_server
from .config.layout import DEFAULT_HELP, control_sockets, default_config, default_workdir
from .daemon import Daemon
from .errors import ConfigError, ServerError
from .isolation import plan
from .sdk import ADDRESS_ENV, TOKEN_ENV, Client, InvokeError
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
    if argv and argv[0] in ("invoke", "status", "reload", "restart"):
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
        return _check(args.config, config)
    # What the daemon writes (its log, its journal) is its own: functions run as other users.
    os.umask(0o077)
    setup_logging(config.logger)
    try:
        return Daemon(config, args.workdir).run()
    except ServerError as exc:
        print(f"openedge-function: {exc}", file=sys.stderr)
        return 1


def _check(path: str, config: AppConfig) -> int:
    """`--check`: the configuration is valid; now load every function as it will run."""
    from .deploy.check import check_all, describe
    os.umask(0o077)
    failed = check_all(config)
    for index, function, error in failed:
        print(f"openedge-function: {path}: {describe(index, function, error)}", file=sys.stderr)
    if failed:
        return EXIT_CONFIG
    print(f"{path}: ok ({len(config.functions)} functions, {len(config.rules)} rules; every handler "
          "loads as its user)")
    return 0


def client_main(argv: List[str]) -> int:
    """`invoke`, `status`, `reload` and `restart`: talk to a running daemon, over its control socket
    (api/control.py) or its HTTP server."""
    parser = argparse.ArgumentParser(prog="openedge-function", description="Talk to a running daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    invoke = commands.add_parser("invoke", help="run a function and print its result")
    invoke.add_argument("function")
    invoke.add_argument("event", nargs="?", default=None,
                        help="the event: JSON, else sent as bytes; '-' reads standard input")
    status = commands.add_parser("status", help="print functions, instances and counters")
    reload = commands.add_parser("reload", help="re-read the configuration (as SIGHUP does) and say how it went")
    restart = commands.add_parser("restart", help="start new instances of a function's code; the old "
                                  "ones finish what they run")
    restart.add_argument("function")
    for command in (invoke, status, reload, restart):
        command.add_argument("-c", "--config", default=None,
                             help=f"the daemon's configuration, to find it by (default: {DEFAULT_HELP})")
        command.add_argument("--socket", default=None,
                             help="the daemon's control socket (default: the configuration's control.socket, "
                                  "else where the daemon of that configuration puts it)")
        command.add_argument("--address", default=None,
                             help=f"host:port of the daemon's HTTP server instead (default: ${ADDRESS_ENV})")
        command.add_argument("--token", default=None,
                             help=f"bearer token for the HTTP server, which is then asked instead of the "
                                  f"control socket (default: ${TOKEN_ENV}, else the configuration's server.token)")
    args = parser.parse_args(argv)
    args.data = _event(args.event) if args.command == "invoke" else None   # read once, whichever way
    ways, looked = _ways(args)
    tried: List[str] = []
    for where, client in ways:
        try:
            return _command(args, client)
        except _Unreachable as exc:
            tried.append(f"  {where}: {exc}")
    print(f"openedge-function: no daemon answers for {looked}", file=sys.stderr)
    for line in tried:
        print(line, file=sys.stderr)
    if not ways:
        print("  (nowhere to look)", file=sys.stderr)
    print("Is the daemon running (systemctl status openedge-function)? Name another one with -c CONFIG, "
          "--socket PATH or --address HOST:PORT.", file=sys.stderr)
    return 1


class _Unreachable(Exception):
    """No daemon at this address: try the next."""


_NOBODY_THERE = ("No such file", "Connection refused", "Permission denied", "Name or service not known")


def _ways(args: argparse.Namespace) -> "tuple[List[tuple[str, Client]], str]":
    """Where to reach the daemon, in order (a description, a client), and what it was looked for by."""
    if args.address or os.environ.get(ADDRESS_ENV):
        address = args.address or os.environ[ADDRESS_ENV]
        return [(f"HTTP server {address}", Client(address=address, token=args.token))], f"--address {address}"
    path = args.config or default_config()
    data = _sections_of(path)
    ways = []
    # A token is the HTTP server's: given one, the command asks the server.
    for socket_path in [args.socket] if args.socket else [] if args.token is not None else _sockets_in(data, path):
        ways.append((f"control socket {socket_path}", Client(address="unix:" + socket_path, token="")))
    address, configured_token = _server_in(data, path)
    if address is not None:
        token = args.token if args.token is not None or os.environ.get(TOKEN_ENV) else configured_token
        ways.append((f"HTTP server {address}", Client(address=address, token=token)))
    looked = f"--socket {args.socket}" if args.socket else f"the configuration {os.path.abspath(path)}"
    if not os.path.exists(path) and not args.socket:
        looked += " (which does not exist)"
    elif address is None and not args.socket:
        looked += " (its HTTP server is off: no server: section)"
    return ways, looked


def _sections_of(path: str) -> Dict[str, Any]:
    """The top-level sections of the configuration file at `path` ({} when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _sockets_in(data: Dict[str, Any], path: str) -> List[str]:
    """The control sockets the daemon of the configuration `data` (read from `path`) may listen on."""
    if data.get("control"):
        try:
            configured = parse_control(data["control"], path).socket
        except ConfigError:
            configured = ""
        if configured:
            return [configured]
    return control_sockets(path)


def _command(args: argparse.Namespace, client: Client) -> int:
    """Run the command through `client`; _Unreachable when nothing answers there."""
    try:
        if args.command == "status":
            return _status(client.status())
        if args.command in ("reload", "restart"):
            return _verb(client, "/reload" if args.command == "reload" else f"/restart/{args.function}")
        return _invoke(args, client)
    except InvokeError as exc:
        if exc.code == "ConnectionError" and any(text in exc.message for text in _NOBODY_THERE):
            raise _Unreachable(exc.message.rpartition(": ")[2]) from None
        if exc.code in ("ConnectionError", "InvokeTimeout") or args.command != "invoke":
            print(f"openedge-function: {exc}", file=sys.stderr)
            return 1
        envelope = exc.response if isinstance(exc.response, dict) else {
            "errorMessage": exc.message, "errorType": exc.code, "stackTrace": exc.stack_trace,
            "requestId": exc.request_id}
        print(json.dumps(envelope, indent=2, ensure_ascii=False))
        return 1


def _verb(client: Client, path: str) -> int:
    status, _, payload = client._request("POST", path, b"", {}, 90.0)
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = {}
    if status == 404 and "ok" not in answer:
        print("openedge-function: the HTTP server takes reload and restart only with a server.token; "
              "without one, use the control socket (as root, or with --socket)", file=sys.stderr)
        return 1
    if status == 401:
        print(f"openedge-function: {answer.get('errorMessage', 'unauthorized')}", file=sys.stderr)
        return 1
    print(answer.get("message", payload.decode("utf-8", "replace")))
    return 0 if answer.get("ok") else 1


def _event(event: Optional[str]) -> object:
    """The event to send: JSON decoded, else bytes; '-' reads standard input."""
    raw = sys.stdin.buffer.read() if event == "-" else None if event is None else event.encode("utf-8")
    if raw is not None:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw


def _invoke(args: argparse.Namespace, client: Client) -> int:
    result = client.invoke(args.function, data=args.data)
    if isinstance(result, bytes):
        sys.stdout.buffer.write(result)
        sys.stdout.flush()
    elif result is not None:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _server_of(path: str) -> "tuple[Optional[str], Optional[str]]":
    """The address and token of the server a configuration file sets up, as a client on this
    machine reaches it; (None, None) when it has none or it cannot be read."""
    return _server_in(_sections_of(path), path)


def _server_in(data: Dict[str, Any], path: str) -> "tuple[Optional[str], Optional[str]]":
    """_server_of, of the sections already read."""
    if data.get("server") is None:
        return None, None
    try:
        server = parse_server(data["server"], path)
    except ConfigError:
        return None, None
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host   # everywhere: loopback too
    address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    return address, server.token or None


def _status(status: dict) -> int:
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
        code = fn.get("code") or {}
        if code.get("serving") == "last good":
            good = code.get("last_good") or {}
            print(f"    code: does not load ({code.get('error')}); its last good version "
                  f"{good.get('version')} of {good.get('saved')} serves")
        elif code.get("error"):
            print(f"    code: does not load: {code['error']}"
                  + ("" if code.get("last_good") else " (no last good version: it never loaded here)"))
        for instance in fn["instance_list"]:
            print(f"    {instance['id']}  pid {instance['pid']}  {instance['state']}")
    print("rules:")
    for name, rule in status["rules"].items():
        print(f"  {name} -> {rule['function']}: received {rule['received']}, published {rule['published']}, "
              f"failed {rule['failed']}, dropped {rule['dropped']}"
              f"{'' if rule['connected'] else ', NOT connected'}")
    return 0
