"""application.yml: typed, frozen, validated.

OpenEdge's function-module configuration loads unchanged (including the keys that only made sense
to OpenEdge's own module manager, which are accepted and ignored), and so does Baetyl's
`function: {name: ...}` spelling of a rule's function. Every error names the file, the field path
and the value; unknown keys are errors, with a did-you-mean where one is close.
"""
from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

import yaml

from .errors import ConfigError, ConfigErrors

T = TypeVar("T")

__all__ = [
    "AppConfig", "Hub", "Rule", "Subscription", "Publication", "Function", "Instance",
    "Credentials", "Service", "Defaults",
    "LoggerConfig", "load_config", "parse_config", "duration", "byte_size",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Converters: each takes the YAML value and returns the typed one, or raises ValueError saying why.

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def duration(value: Any) -> float:
    """`300ms`, `30s`, `10m`, `1h`, `1m30s` (Go's notation) or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (use 300ms, 30s, 10m, 1h)")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"{value!r} is not a duration (use 300ms, 30s, 10m, 1h)")
    return total


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def byte_size(value: Any) -> int:
    """`512k`, `4m`, `1g` (also `4MB`, `4MiB`; binary multiples) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size (use 512k, 4m, 1g or bytes)")
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (use 512k, 4m, 1g or bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def bounded_int(low: Optional[int], high: Optional[int]) -> Callable[[Any], int]:
    """An integer within [low, high]."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if low is not None and value < low:
            raise ValueError(f"{value} is below the lower bound {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above the upper bound {high}")
        return value
    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def nonempty_string(value: Any) -> str:
    text = string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def one_of(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = string(value).lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    return convert


_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,140}$")
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def function_name(value: Any) -> str:
    text = string(value)
    if not _NAME.match(text):
        raise ValueError(f"{text!r} does not match ^[a-zA-Z0-9_-]{{1,140}}$")
    return text


def entry_point(value: Any) -> str:
    """`module.function` (the module may be dotted: `pkg.mod.function`)."""
    text = string(value)
    if not _HANDLER.match(text):
        raise ValueError(f"{text!r} is not of the form module.function")
    return text


def topic_filter(value: Any) -> str:
    """A subscription: wildcards allowed where MQTT allows them, `$share/group/...` too."""
    text = nonempty_string(value)
    levels = text.split("/")
    if text.startswith("$share/"):
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            raise ValueError(f"{text!r} is not a valid shared subscription ($share/group/topic)")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{text!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{text!r}: '+' must be a whole level")
    return text


def topic_name(value: Any) -> str:
    """A publish topic: no wildcards."""
    text = nonempty_string(value)
    if "+" in text or "#" in text:
        raise ValueError(f"{text!r}: a publish topic cannot hold wildcards")
    return text


# ----------------------------------------------------------------------------------------------
# The configuration, as the rest of the daemon sees it.

SESSION_NEVER_EXPIRES = 0xFFFFFFFF


# MQTT's own bound on a packet: a fixed header of 5 bytes and 268,435,455 more.
PACKET_MAX = 268435455 + 5
# The smallest hub.maxsize: below it, an error envelope (without the input) may not fit either.
_MAXSIZE_MIN = 1024


@dataclass(frozen=True)
class Hub:
    """The MQTT broker the daemon connects to."""
    address: str = "tcp://127.0.0.1:1883"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    clientid: str = "openedge-function"
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    insecure_skip_verify: bool = False
    clean_session: bool = False
    keepalive: float = 60.0
    connect_timeout: float = 30.0
    reconnect_max: float = 60.0
    protocol: int = 4               # 4: MQTT 3.1.1, 5: MQTT 5
    session_expiry: int = SESSION_NEVER_EXPIRES   # seconds, MQTT 5 only
    buffer_max: int = 1000          # QoS 1 outcomes held while the broker is away
    maxsize: int = PACKET_MAX       # the largest PUBLISH packet the broker takes (hub.maxsize)


@dataclass(frozen=True)
class Subscription:
    topic: str
    qos: int = 0


@dataclass(frozen=True)
class Publication:
    topic: str
    qos: int = 0


@dataclass(frozen=True)
class Rule:
    """Messages of `subscribe` go to `function`; outcomes go to `publish` (errors to `error`)."""
    index: int
    id: Optional[str]
    subscribe: Subscription
    function: str
    publish: Optional[Publication]
    error: Optional[Publication] = None
    clientid: Optional[str] = None
    retry_max: int = 0          # re-runs after InstanceCrashed (never after an exception or a timeout)
    ordered: bool = False       # messages of one topic run one after the other
    # What a full queue does to QoS 0 messages: pause intake as for QoS 1 (the broker buffers or
    # drops under its own limits), or drop them here (freshness over completeness).
    overflow: str = "pause"

    @property
    def name(self) -> str:
        return self.id or f"rules[{self.index}]"


@dataclass(frozen=True)
class Instance:
    """How a function's instances are pooled and limited. Times in seconds, sizes in bytes."""
    min: int = 0
    max: int = 1
    idletime: float = 600.0
    timeout: float = 30.0
    memory: int = 0                 # RSS limit, 0 = unlimited
    message_max: int = 4 << 20
    cpus: Tuple[int, ...] = ()      # CPU affinity (instance.cpu.setcpus), empty = any
    cpu_share: float = 0.0          # instance.cpu.cpus: a CPU quota where cgroups allow, 0 = none
    pids: int = 64                  # processes and threads a handler may add (instance.pids)
    files: int = 1024               # open files of one process (instance.files, RLIMIT_NOFILE)


@dataclass(frozen=True)
class Credentials:
    """Handed to handlers as context.credentials (and FunctionGraph's getAccessKey() & co.)."""
    access_key_id: str = ""
    access_key_secret: str = field(default="", repr=False)
    security_token: str = field(default="", repr=False)
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class Service:
    """context.service, as Function Compute describes it."""
    name: str = ""
    log_project: str = ""
    log_store: str = ""
    qualifier: str = "LATEST"
    version_id: str = ""


@dataclass(frozen=True)
class Function:
    name: str
    handler: str
    codedir: str                    # absolute
    initializer: Optional[str] = None
    initializer_timeout: Optional[float] = None   # default: instance.timeout
    runtime: str = "python3"
    python: Optional[str] = None    # interpreter for the instances; default: the daemon's
    env: Mapping[str, str] = field(default_factory=dict)
    instance: Instance = field(default_factory=Instance)
    event: str = "openedge"         # openedge: JSON-decoded else bytes; raw: always bytes
    type: str = "event"             # event: handler(event, context); http: a WSGI application
    log_max: int = 4096             # handler output kept per invocation
    version: str = "LATEST"
    alias: str = ""
    package: str = "default"
    region: str = "local"
    account_id: str = ""
    credentials: Credentials = field(default_factory=Credentials)
    service: Service = field(default_factory=Service)
    user: Optional[str] = None      # run as (a name or a numeric id); default: defaults.user
    group: Optional[str] = None     # default: defaults.group, else the user's own group
    watch: bool = True              # an edit of the code directory takes effect by itself


@dataclass(frozen=True)
class Defaults:
    """What applies to every function that does not say otherwise (`defaults:`)."""
    user: Optional[str] = None
    group: Optional[str] = None


@dataclass(frozen=True)
class Packages:
    """How functions' requirements.txt are installed (`packages:`)."""
    cache: str = ""                 # absolute; default: $STATE_DIRECTORY or the workdir, + .openedge-function/packages
    find_links: Tuple[str, ...] = ()    # wheel directories or pages (pip --find-links)
    index: Optional[str] = None     # pip --index-url; "" for none at all (--no-index)
    timeout: float = 600.0          # one install's longest run


@dataclass(frozen=True)
class LoggerConfig:
    path: Optional[str] = None
    level: str = "info"
    format: str = "text"
    console: bool = True
    size_max_mb: int = 50
    backup_max: int = 15
    summary: bool = True            # one execution-summary line per invocation (at info)


@dataclass(frozen=True)
class Server:
    """The HTTP server: invoke API, HTTP functions, /metrics, /healthz."""
    host: str
    port: int
    token: str = ""                 # required as a bearer token on every request when set
    threads: int = 16               # requests served at once (calls wait in these threads)
    body_max: int = 4 << 20         # largest request body read (functions' own limits apply too)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class AppConfig:
    file: str
    hub: Hub
    rules: Tuple[Rule, ...]
    functions: Tuple[Function, ...]
    logger: LoggerConfig
    server: Optional[Server] = None
    defaults: Defaults = field(default_factory=Defaults)
    packages: Packages = field(default_factory=Packages)

    def function(self, name: str) -> Function:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# Parsing

class _Reader:
    """Reads one YAML mapping at a field path, checking keys and converting values."""

    def __init__(self, file: str, path: str, value: Any, known: Tuple[str, ...],
                 ignored: Tuple[str, ...] = ()) -> None:
        self.file = file
        self.path = path
        if value is None:
            value = {}
        if not isinstance(value, dict):
            _problem(ConfigError(file, path or "(top level)", f"expected a mapping, got {_show(value)}"))
            value = {}
        self.data = value
        allowed = known + ignored
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                more = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
                _problem(ConfigError(file, self.at(str(key)), f"unknown key{more}"))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, convert: Callable[[Any], Any], default: Any = None,
            required: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                _problem(ConfigError(self.file, self.at(key), "is required"))
            return default
        try:
            return convert(value)
        except ValueError as exc:
            _problem(ConfigError(self.file, self.at(key), str(exc)))
            return default

    def section(self, key: str, known: Tuple[str, ...], ignored: Tuple[str, ...] = ()) -> "_Reader":
        return _Reader(self.file, self.at(key), self.data.get(key), known, ignored)

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.at(key) if key else self.path, message)


# The errors found so far while a file is parsed: a field's error is noted and parsing goes on
# (with the field's default), so that one run reports every error of the file.
_found: Optional[List[ConfigError]] = None


def _problem(error: ConfigError) -> None:
    """Note `error` (raise it when no parse is collecting)."""
    if _found is None:
        raise error
    if all(str(error) != str(seen) for seen in _found):
        _found.append(error)


def _each(parse: Callable[..., T], *args: Any) -> Optional[T]:
    """`parse(*args)`, or None after noting the ConfigError that stopped it."""
    try:
        return parse(*args)
    except ConfigError as exc:
        for error in getattr(exc, "errors", [exc]):
            _problem(error)
        return None


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


# Keys OpenEdge's module manager read from every module's configuration; they mean nothing here.
_MODULE_KEYS = ("name", "alias", "mark", "entry", "restart", "expose", "volumes", "params", "env",
                "resources", "api")
# Keys of OpenEdge's MQTT client that this daemon has no use for.
_HUB_LEGACY = ("buffersize", "validatesubs", "subscriptions", "name")


def load_config(path: str, workdir: Optional[str] = None) -> AppConfig:
    """Read and validate `path`; relative paths inside resolve against `workdir` (default: cwd)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, "", f"invalid YAML: {where}{problem}") from None
    return parse_config(data, path, workdir or os.getcwd())


def parse_config(data: Any, file: str, workdir: str) -> AppConfig:
    """Validate `data`; raises ConfigErrors listing every error found (ConfigError when one)."""
    global _found
    outer, _found = _found, []
    try:
        config = _each(_parse_top, data, file, workdir)
        found = _found
    finally:
        _found = outer
    if len(found) == 1:
        raise found[0]
    if found:
        raise ConfigErrors(found)
    assert config is not None
    return config


def _parse_top(data: Any, file: str, workdir: str) -> Optional[AppConfig]:
    top = _Reader(file, "", data, ("hub", "rules", "functions", "logger", "server", "defaults",
                                   "packages"), _MODULE_KEYS)
    defaults_section = top.section("defaults", ("user", "group"))
    defaults = Defaults(user=defaults_section.get("user", account("user")),
                        group=defaults_section.get("group", account("group")))
    hub = _each(_parse_hub, top.section("hub", (
        "address", "clientid", "username", "password", "ca", "cert", "key", "insecureSkipVerify",
        "cleansession", "timeout", "interval", "keepalive", "protocol", "sessionexpiry", "buffer",
        "maxsize"),
        _HUB_LEGACY), workdir)

    functions: List[Function] = []
    raw_functions = top.data.get("functions")
    if raw_functions is None and (data is None or isinstance(data, dict)):
        # A daemon with nothing to run is a mistake more often than a plan: the plan says so.
        _problem(ConfigError(file, "functions", (
            "the file is empty" if data is None else "missing") + ": no function is defined, so the "
            "daemon would have nothing to run (to start with none and add them by reload, write "
            "`functions: []`)"))
    if raw_functions is None:
        raw_functions = []
    if not isinstance(raw_functions, list):
        _problem(top.fail("functions", f"expected a list, got {_show(raw_functions)}"))
        raw_functions = []
    for i, raw in enumerate(raw_functions):
        before = len(_found or ())
        fn = _each(_parse_function, file, f"functions[{i}]", raw, workdir)
        if fn is None or len(_found or ()) > before:
            continue   # reported; its rules still find it by name
        if any(f.name == fn.name for f in functions):
            _problem(ConfigError(file, f"functions[{i}].name", f"{fn.name!r} is defined twice"))
        functions.append(fn)

    rules: List[Rule] = []
    raw_rules = top.data.get("rules") or []
    if not isinstance(raw_rules, list):
        _problem(top.fail("rules", f"expected a list, got {_show(raw_rules)}"))
        raw_rules = []
    # Functions whose own entry has an error still count as defined: one error, not two.
    names = list(dict.fromkeys([f.name for f in functions] + [
        raw["name"] for raw in raw_functions if isinstance(raw, dict) and isinstance(raw.get("name"), str)
        and raw["name"]]))
    for i, raw in enumerate(raw_rules):
        before = len(_found or ())
        rule = _each(_parse_rule, file, i, raw, names)
        if rule is None or len(_found or ()) > before:
            continue
        target = next((f for f in functions if f.name == rule.function), None)
        if target is not None and target.type == "http":
            _problem(ConfigError(file, f"rules[{i}].compute.function",
                                 f"{rule.function!r} is an HTTP function (type: http); a rule needs "
                                 "an event function"))
        if rule.id is not None and any(r.id == rule.id for r in rules):
            _problem(ConfigError(file, f"rules[{i}].id", f"{rule.id!r} is used by another rule"))
        rules.append(rule)

    logger = _each(_parse_logger, top.section("logger", (
        "path", "level", "format", "console", "size", "backup", "summary"), ("age",)), workdir)
    server = None
    if top.data.get("server") is not None:
        server = _each(_parse_server, top.section("server", ("address", "token", "threads", "body")))
    packages = _each(_parse_packages, top.section("packages", ("cache", "findlinks", "index", "timeout")),
                     workdir)
    if _found or hub is None or logger is None or packages is None:
        return None   # parse_config reports what was found
    return AppConfig(file=file, hub=hub, rules=tuple(rules), functions=tuple(functions), logger=logger,
                     server=server, defaults=defaults, packages=packages)


def state_directory(workdir: str) -> str:
    """Where the daemon keeps what outlives it: $STATE_DIRECTORY (systemd's StateDirectory=), else
    the working directory."""
    return os.environ.get("STATE_DIRECTORY") or workdir


def default_package_cache(workdir: str) -> str:
    return os.path.join(state_directory(workdir), ".openedge-function", "packages")


def _parse_packages(r: _Reader, workdir: str) -> Packages:
    cache = r.get("cache", nonempty_string)
    links = r.data.get("findlinks")
    if links is None:
        links = []
    elif not isinstance(links, list):
        links = [links]
    find_links = []
    for i, link in enumerate(links):
        if not isinstance(link, str) or not link:
            raise r.fail("findlinks", f"expected a directory or URL, got {_show(link)}")
        find_links.append(link if "://" in link else os.path.join(workdir, link))
    index = r.data.get("index")
    if index is False:
        index = ""
    elif index is not None and (not isinstance(index, str) or "://" not in index):
        raise r.fail("index", f"expected a package index URL, or false for none, got {_show(index)}")
    timeout = r.get("timeout", duration, 600.0)
    if timeout <= 0:
        _problem(r.fail("timeout", "must be above 0"))
    return Packages(cache=os.path.join(workdir, cache) if cache else default_package_cache(workdir),
                    find_links=tuple(find_links), index=index, timeout=timeout)


def _parse_server(r: _Reader) -> Server:
    address = r.get("address", nonempty_string, required=True)
    match = re.match(r"^(?:http://)?([^:/\[\]]*|\[[^\]]+\]):(\d+)/?$", address)
    if not match:
        raise r.fail("address", f"{address!r} is not host:port (for example 127.0.0.1:8080)")
    host, port = match.group(1).strip("[]") or "0.0.0.0", int(match.group(2))
    if not 0 < port < 65536:
        raise r.fail("address", f"{address!r}: port {port} is out of range")
    token = r.get("token", string, "")
    if not token and not _loopback(host):
        raise r.fail("token", f"required when the server listens beyond loopback ({address!r}): "
                     "without one, anyone who reaches the port could run functions")
    return Server(host=host, port=port, token=token, threads=r.get("threads", bounded_int(1, 256), 16),
                  body_max=r.section("body", ("max",)).get("max", byte_size, 4 << 20))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_hub(r: _Reader, workdir: str) -> Hub:
    address = r.get("address", nonempty_string, "tcp://127.0.0.1:1883")
    match = re.match(r"^(tcp|ssl|mqtt|mqtts|tls)://([^:/]*|\[[^\]]+\])(?::(\d+))?/?$", address)
    if not match:
        raise r.fail("address", f"{address!r} is not tcp://host:port or ssl://host:port")
    scheme, host, port = match.groups()
    tls = scheme in ("ssl", "mqtts", "tls")
    host = host.strip("[]") or "127.0.0.1"
    port_number = int(port) if port else (8883 if tls else 1883)
    if not 0 < port_number < 65536:
        raise r.fail("address", f"{address!r}: port {port_number} is out of range")

    def path_of(key: str) -> Optional[str]:
        value = r.get(key, nonempty_string)
        if value is None:
            return None
        full = os.path.join(workdir, value)
        if not os.path.isfile(full):
            raise r.fail(key, f"{value!r}: no such file")
        return full

    ca, cert, key = path_of("ca"), path_of("cert"), path_of("key")
    if (cert is None) != (key is None):
        raise r.fail("cert" if key else "key", "cert and key go together")
    return Hub(
        address=address, host=host, port=port_number, tls=tls,
        clientid=r.get("clientid", nonempty_string, "openedge-function"),
        username=r.get("username", string), password=r.get("password", string),
        ca=ca, cert=cert, key=key,
        insecure_skip_verify=r.get("insecureSkipVerify", boolean, False),
        clean_session=r.get("cleansession", boolean, False),
        keepalive=r.get("keepalive", duration, 60.0),
        connect_timeout=r.get("timeout", duration, 30.0),
        reconnect_max=r.get("interval", duration, 60.0),
        protocol=r.get("protocol", _protocol, 4),
        session_expiry=r.get("sessionexpiry", _session_expiry, SESSION_NEVER_EXPIRES),
        buffer_max=r.section("buffer", ("max",)).get("max", bounded_int(1, None), 1000),
        maxsize=r.get("maxsize", _maxsize, PACKET_MAX),
    )


def _maxsize(value: Any) -> int:
    size = byte_size(value)
    if not _MAXSIZE_MIN <= size <= PACKET_MAX:
        raise ValueError(f"{value!r} is not between 1k and 256m (MQTT's own limit)")
    return size


def _protocol(value: Any) -> int:
    text = string(value).strip().lower().lstrip("v")
    if text in ("3.1.1", "311", "4"):
        return 4
    if text in ("5", "5.0"):
        return 5
    raise ValueError(f"{value!r} is not 3.1.1 or 5")


def _session_expiry(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() in ("never", "forever"):
        return SESSION_NEVER_EXPIRES
    return min(int(duration(value)), SESSION_NEVER_EXPIRES)


_QOS = bounded_int(0, 1)


def _parse_rule(file: str, index: int, raw: Any, functions: List[str]) -> Rule:
    path = f"rules[{index}]"
    r = _Reader(file, path, raw, ("id", "clientid", "subscribe", "compute", "function", "publish",
                                  "error", "retry", "ordered", "overflow"))
    sub = r.section("subscribe", ("topic", "qos"))
    subscribe = Subscription(sub.get("topic", topic_filter, required=True), sub.get("qos", _QOS, 0))
    if r.has("compute") and r.has("function"):
        raise r.fail("function", "give either compute.function or function.name, not both")
    if r.has("function"):
        fn = r.section("function", ("name",)).get("name", nonempty_string, required=True)
        fn_path = f"{path}.function.name"
    else:
        if not r.has("compute"):
            raise r.fail("compute", "is required (compute: {function: <name>})")
        fn = r.section("compute", ("function",)).get("function", nonempty_string, required=True)
        fn_path = f"{path}.compute.function"
    if fn not in functions:
        known = ", ".join(functions) or "none"
        raise ConfigError(file, fn_path, f"{fn!r} is not a function defined under functions (known: {known})")

    def publication(key: str) -> Optional[Publication]:
        if not r.has(key):
            return None
        section = r.section(key, ("topic", "qos"))
        return Publication(section.get("topic", topic_name, required=True), section.get("qos", _QOS, 0))

    return Rule(
        index=index, id=r.get("id", nonempty_string), subscribe=subscribe, function=fn,
        publish=publication("publish"), error=publication("error"),
        clientid=r.get("clientid", nonempty_string),
        retry_max=r.section("retry", ("max",)).get("max", bounded_int(0, 10), 0),
        ordered=r.get("ordered", boolean, False),
        overflow=r.get("overflow", one_of("pause", "drop"), "pause"),
    )


_MIN = bounded_int(0, 100)
_MAX = bounded_int(1, 100)


def _parse_function(file: str, path: str, raw: Any, workdir: str) -> Function:
    r = _Reader(file, path, raw, ("name", "handler", "codedir", "initializer", "runtime", "python",
                                  "env", "instance", "event", "type", "log", "version", "alias", "package",
                                  "region", "account_id", "credentials", "service", "user", "group",
                                  "watch"),
                ("id", "entry"))
    name = r.get("name", function_name, required=True)
    handler = r.get("handler", entry_point, required=True)
    codedir_text = r.get("codedir", string, ".")
    codedir = os.path.normpath(os.path.join(workdir, codedir_text))
    if not os.path.isdir(codedir):
        _problem(r.fail("codedir", f"{codedir_text!r}: no such directory (relative paths start at {workdir})"))
    runtime = r.get("runtime", string, "python3")
    if not runtime.lower().startswith("python"):
        _problem(r.fail("runtime", f"{runtime!r} is not supported: this daemon runs Python handlers"))
    if runtime.lower() in ("python2", "python2.7", "python27"):
        log.warning("%s.runtime: %s handlers run under Python 3 here", path, runtime)
    python = r.get("python", nonempty_string)
    env_section = r.data.get("env") or {}
    if not isinstance(env_section, dict):
        raise r.fail("env", f"expected a mapping, got {_show(env_section)}")
    env: Dict[str, str] = {}
    for key, value in env_section.items():
        if value is None:
            value = ""
        if isinstance(value, (dict, list)):
            _problem(ConfigError(file, f"{path}.env.{key}", f"expected a string, got {_show(value)}"))
        env[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    # initializer: module.fn, or {handler: module.fn, timeout: 10s}
    initializer, initializer_timeout = None, None
    if isinstance(r.data.get("initializer"), dict):
        section = r.section("initializer", ("handler", "timeout"))
        initializer = section.get("handler", entry_point, required=True)
        initializer_timeout = section.get("timeout", duration)
        if initializer_timeout is not None and initializer_timeout <= 0:
            _problem(section.fail("timeout", "must be above 0"))
    else:
        initializer = r.get("initializer", entry_point)
    creds = r.section("credentials", ("access_key_id", "access_key_secret", "security_token", "token"))
    service = r.section("service", ("name", "log_project", "log_store", "qualifier", "version_id"))
    return Function(
        name=name, handler=handler, codedir=codedir,
        initializer=initializer, initializer_timeout=initializer_timeout,
        runtime=runtime, python=python, env=env,
        instance=_parse_instance(r.section("instance", (
            "min", "max", "idletime", "timeout", "memory", "cpu", "pids", "files", "message"))),
        event=r.get("event", one_of("openedge", "raw"), "openedge"),
        type=r.get("type", one_of("event", "http"), "event"),
        log_max=r.section("log", ("max",)).get("max", byte_size, 4096),
        version=r.get("version", string, "LATEST"),
        alias=r.get("alias", string, ""),
        package=r.get("package", string, "default"),
        region=r.get("region", string, "local"),
        account_id=r.get("account_id", string, ""),
        credentials=Credentials(**{key: creds.get(key, string, "") for key in (
            "access_key_id", "access_key_secret", "security_token", "token")}),
        service=Service(
            name=service.get("name", string, name),
            log_project=service.get("log_project", string, ""),
            log_store=service.get("log_store", string, ""),
            qualifier=service.get("qualifier", string, "LATEST"),
            version_id=service.get("version_id", string, ""),
        ),
        user=r.get("user", account("user")),
        group=r.get("group", account("group")),
        watch=r.get("watch", boolean, True),
    )


def _parse_instance(r: _Reader) -> Instance:
    low, high = r.get("min", _MIN, 0), r.get("max", _MAX)
    if high is None:   # unset (1), or wrong and already reported
        high, low = 1, low if not r.has("max") else 0
    if low > high:
        _problem(r.fail("min", f"{low} is above instance.max {high}"))
    timeout = r.get("timeout", duration, 30.0)
    if timeout <= 0:
        _problem(r.fail("timeout", "must be above 0"))
    memory_value = r.data.get("memory")
    if isinstance(memory_value, dict):   # OpenEdge: memory: {limit: 128m, swap: ...}
        memory = r.section("memory", ("limit",), ("swap",)).get("limit", byte_size, 0)
    else:
        memory = r.get("memory", byte_size, 0)
    if 0 < memory < (8 << 20):
        _problem(r.fail("memory", f"{memory_value!r} is below the 8m a Python instance needs"))
    cpu = r.section("cpu", ("setcpus", "cpus"))
    cpus = cpu.get("setcpus", _cpu_list, ())
    cpu_share = cpu.get("cpus", _positive_float, 0.0)
    pids_value = r.data.get("pids")
    if isinstance(pids_value, dict):   # OpenEdge: pids: {limit: 10}
        pids = r.section("pids", ("limit",)).get("limit", _PIDS, 64)
    else:
        pids = r.get("pids", _PIDS, 64)
    files = r.get("files", _FILES, 1024)
    message = r.section("message", ("length",)).section("length", ("max",))
    message_max = message.get("max", byte_size, 4 << 20)
    if message_max < 1:
        _problem(message.fail("max", "must be above 0"))
    return Instance(min=low, max=high, idletime=r.get("idletime", duration, 600.0), timeout=timeout,
                    memory=memory, message_max=message_max, cpus=cpus, cpu_share=cpu_share,
                    pids=pids, files=files)


# Below this a Python instance with its gRPC server cannot start.
_PIDS = bounded_int(1, 1 << 22)
_FILES = bounded_int(64, 1 << 20)


def account(kind: str) -> Callable[[Any], str]:
    """A user or group: a name that exists on this machine, or a numeric id."""
    def convert(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise ValueError(f"expected a {kind} name or a numeric id, got {_show(value)}")
        text = str(value)
        if text.isdigit():
            return text
        import grp
        import pwd
        try:
            (pwd.getpwnam if kind == "user" else grp.getgrnam)(text)
        except KeyError:
            raise ValueError(f"no {kind} named {text!r} on this machine"
                             + (" (make one with: useradd --system --no-create-home "
                                f"--shell /usr/sbin/nologin {text})" if kind == "user" else "")) from None
        return text
    return convert


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} is not a number above 0")
    return float(value)


def _cpu_list(value: Any) -> Tuple[int, ...]:
    """`0-1,3` → (0, 1, 3)."""
    cpus: List[int] = []
    for part in string(value).split(","):
        part = part.strip()
        bounds = part.split("-")
        if not part or len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise ValueError(f"{value!r} is not a CPU list such as 0-1,3")
        cpus.extend(range(int(bounds[0]), int(bounds[-1]) + 1))
    return tuple(sorted(set(cpus)))


def _parse_logger(r: _Reader, workdir: str) -> LoggerConfig:
    path = r.get("path", nonempty_string)
    level = r.get("level", one_of("debug", "info", "warn", "warning", "error"), "info")
    r.section("age", (), ("max",))   # rotation is by size here; age is accepted for compatibility
    return LoggerConfig(
        path=os.path.join(workdir, path) if path else None,
        level="warning" if level == "warn" else level,
        format=r.get("format", one_of("text", "json"), "text"),
        console=r.get("console", boolean, path is None),
        size_max_mb=r.section("size", ("max",)).get("max", bounded_int(1, None), 50),
        backup_max=r.section("backup", ("max",)).get("max", bounded_int(0, None), 15),
        summary=r.get("summary", boolean, True),
    )
