"""The configuration as the rest of the daemon sees it: typed, frozen dataclasses.

Each setting is declared once, here: its key in application.yml (dotted for a nested one:
`buffer.max` is `buffer: {max: ...}`), its default and its converter, as the field's `setting()`.
The parser reads every class the same way from these declarations; what a section reads with
code of its own (an address split into host and port, a field with two spellings) is declared
with `setting(..., convert=None)`, so its key and default still live here alone.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Tuple

from .converters import (PACKET_MAX, PROTOCOL_AUTO, SESSION_NEVER_EXPIRES, above_zero, account, boolean,
                         bounded_int, byte_size, cpu_list, duration, entry_point, function_name, log_level,
                         memory_limit, nonempty_string, one_of, packet_size, positive_float, protocol, qos,
                         response_filters, session_expiry, string, topic_filter, topic_name)

__all__ = [
    "AppConfig", "Hub", "Rule", "Subscription", "Publication", "Function", "Limits", "Credentials",
    "Service", "Defaults", "Packages", "LoggerConfig", "Server", "setting", "settings_of", "declaration",
    "state_directory", "default_package_cache", "PACKET_MAX", "SESSION_NEVER_EXPIRES",
]

_NO_DEFAULT: Any = dataclasses.MISSING


def setting(key: str, default: Any = _NO_DEFAULT, convert: Optional[Callable[[Any], Any]] = None,
            repr: bool = True, factory: Any = _NO_DEFAULT) -> Any:
    """A field read from `key` with `convert` (None: its section's own code reads it), `default`
    (or a new `factory()`) when the key is absent; neither: the key is required."""
    return field(default=default, default_factory=factory, repr=repr,
                 metadata={"key": key, "convert": convert})


def settings_of(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of `cls` that are read from the file, in declaration order."""
    return (f for f in dataclasses.fields(cls) if "key" in f.metadata)


def declaration(cls: type, name: str) -> dataclasses.Field:
    """The setting `name` of `cls`: its key and converter in `metadata`, its default."""
    return next(f for f in settings_of(cls) if f.name == name)


@dataclass(frozen=True)
class Hub:
    """The MQTT broker the daemon connects to (`hub:`)."""
    # Keys of OpenEdge's MQTT client that this daemon has no use for.
    IGNORED: ClassVar[Tuple[str, ...]] = ("buffersize", "validatesubs", "subscriptions", "name")

    address: str = setting("address", "tcp://127.0.0.1:1883", nonempty_string)
    host: str = "127.0.0.1"         # from the address
    port: int = 1883
    tls: bool = False
    clientid: str = setting("clientid", "openedge-function", nonempty_string)
    username: Optional[str] = setting("username", None, string)
    password: Optional[str] = setting("password", None, string, repr=False)
    ca: Optional[str] = setting("ca", None)       # absolute paths of files that exist
    cert: Optional[str] = setting("cert", None)
    key: Optional[str] = setting("key", None)
    insecure_skip_verify: bool = setting("insecureSkipVerify", False, boolean)
    clean_session: bool = setting("cleansession", False, boolean)
    keepalive: float = setting("keepalive", 60.0, duration)
    connect_timeout: float = setting("timeout", 30.0, duration)
    reconnect_max: float = setting("interval", 60.0, duration)
    # 4: MQTT 3.1.1, 5: MQTT 5, PROTOCOL_AUTO (the default): 5, and 3.1.1 with a broker that
    # refuses it. MQTT 5 is where the broker's refusals, limits and session expiry are seen.
    protocol: int = setting("protocol", PROTOCOL_AUTO, protocol)
    session_expiry: int = setting("sessionexpiry", SESSION_NEVER_EXPIRES, session_expiry)  # s, MQTT 5
    buffer_max: int = setting("buffer.max", 1000, bounded_int(1, None))   # QoS 1 outcomes held while
    #   the broker is away
    maxsize: int = setting("maxsize", PACKET_MAX, packet_size)   # the largest PUBLISH the broker takes


# A shared subscription's session outlives its member by this much by default (seconds): a restart
# finds it again; a member lost for good leaves its share to the broker's policy after that.
SHARED_SESSION_EXPIRY = 300


@dataclass(frozen=True)
class Subscription:
    """An MQTT topic filter (`topic`), or a JetStream stream's subject (`stream`, `subject`)."""
    topic: str = setting("topic", "", topic_filter)
    qos: int = setting("qos", 0, qos)
    stream: Optional[str] = setting("stream", None, nonempty_string)   # a JetStream stream (nats:)
    subject: str = setting("subject", "", nonempty_string)   # its subjects this rule takes
    consumer: str = setting("consumer", "", nonempty_string)   # the durable consumer every
    #   daemon shares (default: openedge-function-<rule id>)
    ack_wait: float = setting("ackwait", 30.0, above_zero(duration))   # redelivered after this
    max_deliver: int = setting("maxdeliver", 5, bounded_int(1, 1000))   # then PoisonMessage


@dataclass(frozen=True)
class Nats:
    """A NATS cluster with JetStream (`nats:`), for rules that read a stream."""
    servers: Tuple[str, ...] = setting("servers", ("nats://127.0.0.1:4222",), None)
    user: Optional[str] = setting("username", None, string)
    password: Optional[str] = setting("password", None, string, repr=False)
    token: Optional[str] = setting("token", None, string, repr=False)
    name: str = setting("name", "openedge-function", nonempty_string)   # its connections' name


@dataclass(frozen=True)
class Publication:
    """An MQTT topic (`topic`), or a NATS subject (`subject`, with nats:; then `topic` holds it too)."""
    topic: str = setting("topic", "", topic_name)
    qos: int = setting("qos", 0, qos)
    subject: str = setting("subject", "", nonempty_string)


@dataclass(frozen=True)
class Rule:
    """Messages of `subscribe` go to `function`; outcomes go to `publish` (errors to `error`)."""
    # Baetyl's spelling of compute: {function: NAME}, read with it.
    OTHER_KEYS: ClassVar[Tuple[str, ...]] = ("function",)

    index: int                      # its place in `rules:`
    subscribe: Subscription = setting("subscribe")
    function: str = setting("compute")   # compute: {function: NAME}, or function: {name: NAME}
    id: Optional[str] = setting("id", None, nonempty_string)
    publish: Optional[Publication] = setting("publish", None)
    error: Optional[Publication] = setting("error", None)
    clientid: Optional[str] = setting("clientid", None, nonempty_string)
    # re-runs after InstanceCrashed (never after an exception or a timeout)
    retry_max: int = setting("retry.max", 0, bounded_int(0, 10))
    ordered: bool = setting("ordered", False, boolean)   # one topic's messages one after the other
    # What a full queue does to QoS 0 messages: pause intake as for QoS 1 (the broker buffers or
    # drops under its own limits), or drop them here (freshness over completeness).
    overflow: str = setting("overflow", "pause", one_of("pause", "drop"))
    # MQTT 5: the topics a request's response topic must match (empty: any topic but the daemon's
    # own subscriptions and $-topics; see replies.py)
    response_topics: Tuple[str, ...] = setting("response.topics", (), response_filters)
    # MQTT 5: how long the broker keeps the rule's session once it is gone (None: see expiry())
    session_expiry: Optional[int] = setting("sessionexpiry", None, session_expiry)

    @property
    def name(self) -> str:
        return self.id or f"rules[{self.index}]"

    @property
    def to_nats(self) -> bool:
        """Its outcomes go to NATS subjects."""
        return any(p is not None and p.subject for p in (self.publish, self.error))

    @property
    def shared(self) -> bool:
        return self.subscribe.topic.startswith("$share/")

    def expiry(self, hub: "Hub") -> int:
        """The session expiry the rule's connection asks for (MQTT 5): its own; else, on a shared
        subscription, SHARED_SESSION_EXPIRY unless the hub sets one (a member lost for good must
        not hold the group's messages for ever); else the hub's."""
        if self.session_expiry is not None:
            return self.session_expiry
        if self.shared and hub.session_expiry == SESSION_NEVER_EXPIRES:
            return SHARED_SESSION_EXPIRY
        return hub.session_expiry


@dataclass(frozen=True)
class Limits:
    """How a function's instances are pooled and limited (`instance:`). Times in seconds, sizes
    in bytes."""
    min: int = setting("min", 0, bounded_int(0, 100))
    max: int = setting("max", 1, bounded_int(1, 100))
    idletime: float = setting("idletime", 600.0, duration)
    # A process forked ahead of need, already in its control group, while the pool is below max.
    spare: bool = setting("spare", True, boolean)
    timeout: float = setting("timeout", 30.0, above_zero(duration))
    # RSS limit, 0 = unlimited; also OpenEdge's memory: {limit: 128m, swap: ...}
    memory: int = setting("memory", 0, memory_limit)
    message_max: int = setting("message.length.max", 4 << 20, above_zero(byte_size))
    cpus: Tuple[int, ...] = setting("cpu.setcpus", (), cpu_list)   # CPU affinity, empty = any
    cpu_share: float = setting("cpu.cpus", 0.0, positive_float)     # a CPU quota where cgroups allow
    # processes and threads a handler may add; also OpenEdge's pids: {limit: 10}
    pids: int = setting("pids", 64, bounded_int(1, 1 << 22))
    files: int = setting("files", 1024, bounded_int(64, 1 << 20))  # open files of one process


@dataclass(frozen=True)
class Credentials:
    """Handed to handlers as context.credentials (and FunctionGraph's getAccessKey() & co.)."""
    access_key_id: str = setting("access_key_id", "", string)
    access_key_secret: str = setting("access_key_secret", "", string, repr=False)
    security_token: str = setting("security_token", "", string, repr=False)
    token: str = setting("token", "", string, repr=False)


@dataclass(frozen=True)
class Service:
    """context.service, as Function Compute describes it."""
    name: str = setting("name", "", string)    # the function's name when not set
    log_project: str = setting("log_project", "", string)
    log_store: str = setting("log_store", "", string)
    qualifier: str = setting("qualifier", "LATEST", string)
    version_id: str = setting("version_id", "", string)


@dataclass(frozen=True)
class Function:
    IGNORED: ClassVar[Tuple[str, ...]] = ("id", "entry")

    name: str = setting("name", convert=function_name)
    handler: str = setting("handler", convert=entry_point)
    codedir: str = setting("codedir", ".")   # absolute once parsed
    # module.fn, or {handler: module.fn, timeout: 10s} (the timeout's default: instance.timeout)
    initializer: Optional[str] = setting("initializer", None)
    initializer_timeout: Optional[float] = None
    runtime: str = setting("runtime", "python3")
    python: Optional[str] = setting("python", None, nonempty_string)   # default: the daemon's
    env: Mapping[str, str] = setting("env", factory=dict)
    instance: Limits = setting("instance", Limits())
    event: str = setting("event", "openedge", one_of("openedge", "raw"))  # raw: always bytes
    type: str = setting("type", "event", one_of("event", "http"))   # http: a WSGI application
    log_max: int = setting("log.max", 4096, byte_size)   # handler output kept per invocation
    version: str = setting("version", "LATEST", string)
    alias: str = setting("alias", "", string)
    package: str = setting("package", "default", string)
    region: str = setting("region", "local", string)
    account_id: str = setting("account_id", "", string)
    credentials: Credentials = setting("credentials", Credentials())
    service: Service = setting("service", Service())
    user: Optional[str] = setting("user", None, account("user"))      # default: defaults.user
    group: Optional[str] = setting("group", None, account("group"))   # default: defaults.group,
    #   else the user's own group
    watch_code: bool = setting("watch", True, boolean)   # an edit of the code directory takes effect



@dataclass(frozen=True)
class Defaults:
    """What applies to every function that does not say otherwise (`defaults:`)."""
    user: Optional[str] = setting("user", None, account("user"))
    group: Optional[str] = setting("group", None, account("group"))


@dataclass(frozen=True)
class Packages:
    """How functions' requirements.txt are installed (`packages:`)."""
    # absolute; default: $STATE_DIRECTORY or the workdir, + .openedge-function/packages
    cache: str = setting("cache", "")
    find_links: Tuple[str, ...] = setting("findlinks", ())   # wheel directories or pages
    index: Optional[str] = setting("index", None)   # pip --index-url; "" for none (false)
    timeout: float = setting("timeout", 600.0, above_zero(duration))   # one install's longest run


@dataclass(frozen=True)
class LoggerConfig:
    """The daemon's log (`logger:`)."""
    IGNORED: ClassVar[Tuple[str, ...]] = ("age.max",)   # rotation is by size here

    path: Optional[str] = setting("path", None, nonempty_string)   # absolute once parsed
    level: str = setting("level", "info", log_level)
    format: str = setting("format", "text", one_of("text", "json"))
    # None: stderr when there is no path, or under a service manager (whose log stderr is)
    console: Optional[bool] = setting("console", None)
    size_max_mb: int = setting("size.max", 50, bounded_int(1, None))
    backup_max: int = setting("backup.max", 15, bounded_int(0, None))
    summary: bool = setting("summary", True, boolean)   # one execution-summary line per invocation


@dataclass(frozen=True)
class Server:
    """The HTTP server: invoke API, HTTP functions, /metrics, /healthz (`server:`)."""
    host: str = setting("address", convert=nonempty_string)   # address: host:port, required
    port: int
    token: str = setting("token", "", string)   # required as a bearer token on every request when set
    threads: int = setting("threads", 16, bounded_int(1, 256))   # requests served at once
    body_max: int = setting("body.max", 4 << 20, byte_size)   # largest request body read

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Control:
    """The local control socket (`control:`): where the CLI finds the daemon."""
    socket: str = setting("socket", "")   # absolute; default: config/layout.py's control_socket()
    group: Optional[str] = setting("group", None, account("group"))   # may use it too (0660)


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
    control: Control = field(default_factory=Control)
    nats: Optional[Nats] = None

    def function(self, name: str) -> Function:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(name)


def state_directory(workdir: str) -> str:
    """Where the daemon keeps what outlives it: $STATE_DIRECTORY (systemd's StateDirectory=), else
    the working directory."""
    return os.environ.get("STATE_DIRECTORY") or workdir


def default_package_cache(workdir: str) -> str:
    return os.path.join(state_directory(workdir), ".openedge-function", "packages")
