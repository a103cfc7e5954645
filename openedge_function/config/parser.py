"""Reading application.yml into the model, every error named with its file, field path and value.

OpenEdge's function-module configuration loads unchanged (including the keys that only made sense
to OpenEdge's own module manager, which are accepted and ignored), and so does Baetyl's
`function: {name: ...}` spelling of a rule's function. Unknown keys are errors, with a
did-you-mean where one is close. One run reports every error of the file: a field's error is
noted in the parse's `Problems` and reading goes on with the field's default.

The keys, defaults and converters are the model's (`setting()` in model.py); `Reader.read(cls)`
reads a class's settings the same way for every section, and the code here handles only what a
section does beyond that.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import yaml

from ..errors import ConfigError, ConfigErrors
from .converters import above_zero, boolean, duration, entry_point, nonempty_string, show, string
from .model import (AppConfig, Control, Credentials, Defaults, Function, Hub, Limits, LoggerConfig, Nats, Packages,
                    Publication, Rule, Server, Service, Subscription, declaration,
                    default_package_cache, settings_of)

T = TypeVar("T")

log = logging.getLogger("openedge_function.config")

# Keys OpenEdge's module manager read from every module's configuration; they mean nothing here.
_MODULE_KEYS = ("name", "alias", "mark", "entry", "restart", "expose", "volumes", "params", "env",
                "resources", "api")
_SECTIONS = ("hub", "rules", "functions", "logger", "server", "defaults", "packages", "control", "nats")


class Problems:
    """The errors found so far while one file is parsed."""

    def __init__(self) -> None:
        self.found: List[ConfigError] = []

    def note(self, error: ConfigError) -> None:
        if all(str(error) != str(seen) for seen in self.found):
            self.found.append(error)

    def each(self, parse: Callable[..., T], *args: Any) -> Optional[T]:
        """`parse(*args)`, or None after noting the ConfigError that stopped it."""
        try:
            return parse(*args)
        except ConfigError as exc:
            for error in getattr(exc, "errors", [exc]):
                self.note(error)
            return None

    def raise_found(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigErrors(self.found)


def _heads(keys: Sequence[str]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(key.split(".", 1)[0] for key in keys))


def _under(keys: Sequence[str], head: str) -> Tuple[str, ...]:
    return tuple(key.split(".", 1)[1] for key in keys if key.startswith(head + "."))


class Reader:
    """One YAML mapping at a field path: checks its keys, converts its values. `keys` and
    `ignored` may be dotted (`size.max`): the reader of `size` then knows `max`."""

    def __init__(self, problems: Problems, file: str, path: str, value: Any, keys: Sequence[str],
                 ignored: Sequence[str] = ()) -> None:
        self.problems = problems
        self.file = file
        self.path = path
        self._keys, self._ignored = tuple(keys), tuple(ignored)
        self._sections: Dict[str, Reader] = {}
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.note(ConfigError(file, path or "(top level)", f"expected a mapping, got {show(value)}"))
            value = {}
        self.data = value
        known = _heads(self._keys)
        allowed = known + _heads(self._ignored)
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                more = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
                problems.note(ConfigError(file, self.at(str(key)), f"unknown key{more}"))

    @classmethod
    def of(cls, problems: Problems, file: str, path: str, value: Any, model: type) -> "Reader":
        """A reader of the settings `model` declares."""
        keys = [f.metadata["key"] for f in settings_of(model)] + list(getattr(model, "OTHER_KEYS", ()))
        return cls(problems, file, path, value, keys, getattr(model, "IGNORED", ()))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def note(self, key: str, message: str) -> None:
        self.problems.note(self.fail(key, message))

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.at(key) if key else self.path, message)

    def get(self, key: str, convert: Callable[[Any], Any], default: Any = None,
            required: bool = False) -> Any:
        """The converted value of `key` (dotted: in its section); `default` when it is absent or
        wrong (noted)."""
        head, _, rest = key.partition(".")
        if rest:
            return self.section(head).get(rest, convert, default, required)
        value = self.data.get(key)
        if value is None:
            if required:
                self.note(key, "is required")
            return default
        try:
            return convert(value)
        except ValueError as exc:
            self.note(key, str(exc))
            return default

    def section(self, key: str, model: Optional[type] = None, keys: Sequence[str] = (),
                ignored: Sequence[str] = ()) -> "Reader":
        """The reader of the mapping under `key`: of `model`'s settings, of `keys`, or (without
        either) of the keys this reader's dotted keys name under it."""
        reader = self._sections.get(key)
        if reader is None:
            value = self.data.get(key)
            if model is not None:
                reader = Reader.of(self.problems, self.file, self.at(key), value, model)
            elif keys or ignored:
                reader = Reader(self.problems, self.file, self.at(key), value, keys, ignored)
            else:
                reader = Reader(self.problems, self.file, self.at(key), value, _under(self._keys, key),
                                _under(self._ignored, key))
            self._sections[key] = reader
        return reader

    def value(self, model: type, name: str, default: Any = dataclasses.MISSING) -> Any:
        """The field `name` of `model`, read as the model declares it (`default` over its own)."""
        declared = declaration(model, name)
        convert = declared.metadata["convert"]
        required = declared.default is dataclasses.MISSING and declared.default_factory is dataclasses.MISSING
        if default is dataclasses.MISSING:
            default = None if declared.default is dataclasses.MISSING else declared.default
        return self.get(declared.metadata["key"], convert, default, required and default is None)

    def read(self, model: type, **given: Any) -> Any:
        """`model` with every setting it declares read from here, but those `given`."""
        values = dict(given)
        for declared in settings_of(model):
            if declared.name not in given and declared.metadata["convert"] is not None:
                values[declared.name] = self.value(model, declared.name)
        for key in self._ignored:   # a section only ignored (logger.age): its keys are checked
            if "." in key:
                self.section(key.split(".", 1)[0])
        return model(**values)


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
    problems = Problems()
    config = problems.each(_parse_top, problems, data, file, workdir)
    problems.raise_found()
    assert config is not None
    return config


def _parse_top(problems: Problems, data: Any, file: str, workdir: str) -> Optional[AppConfig]:
    top = Reader(problems, file, "", data, _SECTIONS, _MODULE_KEYS)
    defaults = top.section("defaults", Defaults).read(Defaults)
    hub = problems.each(_parse_hub, top.section("hub", Hub), workdir)

    functions: List[Function] = []
    raw_functions = top.data.get("functions")
    if raw_functions is None and (data is None or isinstance(data, dict)):
        # A daemon with nothing to run is a mistake more often than a plan: the plan says so.
        problems.note(ConfigError(file, "functions", (
            "the file is empty" if data is None else "missing") + ": no function is defined, so the "
            "daemon would have nothing to run (to start with none and add them by reload, write "
            "`functions: []`)"))
    if raw_functions is None:
        raw_functions = []
    if not isinstance(raw_functions, list):
        top.note("functions", f"expected a list, got {show(raw_functions)}")
        raw_functions = []
    for i, raw in enumerate(raw_functions):
        before = len(problems.found)
        fn = problems.each(_parse_function, Reader.of(problems, file, f"functions[{i}]", raw, Function),
                           workdir)
        if fn is None or len(problems.found) > before:
            continue   # reported; its rules still find it by name
        if any(f.name == fn.name for f in functions):
            problems.note(ConfigError(file, f"functions[{i}].name", f"{fn.name!r} is defined twice"))
        functions.append(fn)

    rules: List[Rule] = []
    raw_rules = top.data.get("rules") or []
    if not isinstance(raw_rules, list):
        top.note("rules", f"expected a list, got {show(raw_rules)}")
        raw_rules = []
    # Functions whose own entry has an error still count as defined: one error, not two.
    names = list(dict.fromkeys([f.name for f in functions] + [
        raw["name"] for raw in raw_functions if isinstance(raw, dict) and isinstance(raw.get("name"), str)
        and raw["name"]]))
    for i, raw in enumerate(raw_rules):
        before = len(problems.found)
        rule = problems.each(_parse_rule, Reader.of(problems, file, f"rules[{i}]", raw, Rule), i, names)
        if rule is None or len(problems.found) > before:
            continue
        target = next((f for f in functions if f.name == rule.function), None)
        if target is not None and target.type == "http":
            problems.note(ConfigError(file, f"rules[{i}].compute.function",
                                      f"{rule.function!r} is an HTTP function (type: http); a rule "
                                      "needs an event function"))
        if rule.id is not None and any(r.id == rule.id for r in rules):
            problems.note(ConfigError(file, f"rules[{i}].id", f"{rule.id!r} is used by another rule"))
        rules.append(rule)

    logger = problems.each(_parse_logger, top.section("logger", LoggerConfig), workdir)
    server = None
    if top.data.get("server") is not None:
        server = problems.each(_parse_server, top.section("server", Server))
    packages = problems.each(_parse_packages, top.section("packages", Packages), workdir)
    control = problems.each(_parse_control, top.section("control", Control))
    nats = None
    if top.data.get("nats") is not None:
        nats = problems.each(_parse_nats, top.section("nats", Nats))
    if any(rule.subscribe.stream or rule.to_nats for rule in rules) and importlib.util.find_spec("nats") is None:
        problems.note(ConfigError(file, "nats", "rules that read a stream or publish to NATS need nats-py: "
                                  "pip install 'openedge-function[nats]'"))
    for rule in rules:
        if rule.subscribe.stream and top.data.get("nats") is None:
            problems.note(ConfigError(file, f"rules[{rule.index}].subscribe.stream",
                                      "reading a JetStream stream needs a nats: section (its servers)"))
        if rule.to_nats and top.data.get("nats") is None:
            problems.note(ConfigError(file, f"rules[{rule.index}].publish.subject",
                                      "publishing to NATS needs a nats: section (its servers)"))
    if problems.found or hub is None or logger is None or packages is None or control is None:
        return None   # parse_config reports what was found
    return AppConfig(file=file, hub=hub, rules=tuple(rules), functions=tuple(functions), logger=logger,
                     server=server, defaults=defaults, packages=packages, control=control, nats=nats)


def parse_control(data: Any, file: str) -> Control:
    """The `control:` section alone (what the CLI needs to find the daemon). Raises ConfigError."""
    return _parse_alone(_parse_control, data or {}, file, "control", Control)


def _parse_control(r: Reader) -> Control:
    path = r.get("socket", nonempty_string) or ""
    if path and not os.path.isabs(path):
        raise r.fail("socket", f"{path!r}: give an absolute path (the command line finds it from anywhere)")
    if len(path.encode()) > 107:
        raise r.fail("socket", f"{path!r} is longer than a Unix socket's path may be (107 bytes)")
    return r.read(Control, socket=path)


def _parse_hub(r: Reader, workdir: str) -> Hub:
    address = r.value(Hub, "address")
    match = re.match(r"^(tcp|ssl|mqtt|mqtts|tls)://([^:/]*|\[[^\]]+\])(?::(\d+))?/?$", address)
    if not match:
        raise r.fail("address", f"{address!r} is not tcp://host:port or ssl://host:port (mqtt:// is "
                                "tcp://, mqtts:// and tls:// are ssl://)")
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
    return r.read(Hub, address=address, host=host, port=port_number, tls=tls, ca=ca, cert=cert, key=key)


def parse_server(data: Any, file: str) -> Server:
    """The `server:` section alone (what a client of the daemon needs of a configuration).
    Raises ConfigError naming the field."""
    return _parse_alone(_parse_server, data, file, "server", Server)


def _parse_alone(parse: Callable[[Reader], T], data: Any, file: str, key: str, model: type) -> T:
    """One section read on its own, with `parse`; raises ConfigError naming the field."""
    problems = Problems()
    section = problems.each(parse, Reader.of(problems, file, key, data, model))
    problems.raise_found()
    assert section is not None
    return section


def _parse_server(r: Reader) -> Server:
    address = r.value(Server, "host")
    match = re.match(r"^(?:http://)?([^:/\[\]]*|\[[^\]]+\]):(\d+)/?$", address)
    if not match:
        raise r.fail("address", f"{address!r} is not host:port (for example 127.0.0.1:8080)")
    host, port = match.group(1).strip("[]") or "0.0.0.0", int(match.group(2))
    if not 0 < port < 65536:
        raise r.fail("address", f"{address!r}: port {port} is out of range")
    token = r.value(Server, "token")
    if not token and not _loopback(host):
        raise r.fail("token", f"required when the server listens beyond loopback ({address!r}): "
                     "without one, anyone who reaches the port could run functions")
    return r.read(Server, host=host, port=port, token=token)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_nats(r: Reader) -> Nats:
    servers = r.data.get("servers", list(Nats.servers))
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not servers:
        raise r.fail("servers", f"expected a list of nats://host:port, got {show(servers)}")
    for server in servers:
        if not isinstance(server, str) or not re.match(r"^(nats|tls)://[^/\s]+:\d+/?$", server):
            raise r.fail("servers", f"{show(server)} is not nats://host:port (or tls://host:port)")
    return r.read(Nats, servers=tuple(servers))


def _parse_rule(r: Reader, index: int, functions: List[str]) -> Rule:
    section = r.section("subscribe", Subscription)
    subscribe = section.read(Subscription)
    if subscribe.stream:
        if subscribe.topic:
            raise section.fail("topic", "a rule reads either an MQTT topic or a stream, not both")
        if not subscribe.subject:
            raise section.fail("subject", "is required with stream (the subjects of it this rule takes)")
        if not subscribe.consumer and not r.data.get("id"):
            raise section.fail("consumer", "give the rule an id (or the consumer a name): every "
                               "gateway must share the same durable consumer")
    elif not subscribe.topic:
        raise section.fail("topic", "is required (or stream and subject, for a JetStream stream)")
    if r.has("compute") and r.has("function"):
        raise r.fail("function", "give either compute.function or function.name, not both")
    if r.has("function"):
        fn = r.section("function", keys=("name",)).get("name", nonempty_string, required=True)
        fn_path = r.at("function.name")
    else:
        if not r.has("compute"):
            raise r.fail("compute", "is required (compute: {function: <name>})")
        fn = r.section("compute", keys=("function",)).get("function", nonempty_string, required=True)
        fn_path = r.at("compute.function")
    if fn not in functions:
        known = ", ".join(functions) or "none"
        raise ConfigError(r.file, fn_path, f"{fn!r} is not a function defined under functions (known: {known})")

    def publication(key: str) -> Optional[Publication]:
        if not r.has(key):
            return None
        section = r.section(key, Publication)
        target = section.read(Publication)
        if target.subject and target.topic:
            raise section.fail("subject", "give either an MQTT topic or a NATS subject, not both")
        if not target.subject and not target.topic:
            raise section.fail("topic", "is required (or subject, for NATS)")
        return Publication(topic=target.subject, qos=target.qos, subject=target.subject) if target.subject \
            else target

    publish, error = publication("publish"), publication("error")
    if publish is not None and error is not None and bool(publish.subject) != bool(error.subject):
        raise r.fail("error", "publish and error go both to MQTT topics or both to NATS subjects")
    return r.read(Rule, index=index, subscribe=subscribe, function=fn, publish=publish, error=error)


def _parse_function(r: Reader, workdir: str) -> Function:
    name = r.value(Function, "name")
    codedir_text = r.get("codedir", string, Function.codedir)
    codedir = os.path.normpath(os.path.join(workdir, codedir_text))
    if not os.path.isdir(codedir):
        r.note("codedir", f"{codedir_text!r}: no such directory (relative paths start at {workdir})")
    runtime = r.get("runtime", string, Function.runtime)
    if not runtime.lower().startswith("python"):
        r.note("runtime", f"{runtime!r} is not supported: this daemon runs Python handlers")
    if runtime.lower() in ("python2", "python2.7", "python27"):
        log.warning("%s.runtime: %s handlers run under Python 3 here", r.path, runtime)
    env_section = r.data.get("env") or {}
    if not isinstance(env_section, dict):
        raise r.fail("env", f"expected a mapping, got {show(env_section)}")
    env: Dict[str, str] = {}
    for key, value in env_section.items():
        if value is None:
            value = ""
        if isinstance(value, (dict, list)):
            r.note(f"env.{key}", f"expected a string, got {show(value)}")
        env[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    # initializer: module.fn, or {handler: module.fn, timeout: 10s}
    initializer_timeout = None
    if isinstance(r.data.get("initializer"), dict):
        section = r.section("initializer", keys=("handler", "timeout"))
        initializer = section.get("handler", entry_point, required=True)
        initializer_timeout = section.get("timeout", above_zero(duration))
    else:
        initializer = r.get("initializer", entry_point)
    service = r.section("service", Service)
    return r.read(
        Function, name=name, codedir=codedir, runtime=runtime, env=env, initializer=initializer,
        initializer_timeout=initializer_timeout,
        instance=_parse_limits(r.section("instance", Limits)),
        credentials=r.section("credentials", Credentials).read(Credentials),
        service=service.read(Service, name=service.value(Service, "name", default=name)))


def _parse_limits(r: Reader) -> Limits:
    low, high = r.value(Limits, "min"), r.value(Limits, "max", default=None)
    if high is None:   # unset (1), or wrong and already reported
        high, low = Limits.max, low if not r.has("max") else 0
    if low > high:
        r.note("min", f"{low} is above instance.max {high}")

    def limit(name: str) -> int:
        """OpenEdge writes `name: {limit: ...}` (memory also with a swap, which means nothing here)."""
        if not isinstance(r.data.get(name), dict):
            return r.value(Limits, name)
        declared = declaration(Limits, name)
        return r.section(name, keys=("limit",), ignored=("swap",) if name == "memory" else ()).get(
            "limit", declared.metadata["convert"], declared.default)

    return r.read(Limits, min=low, max=high, memory=limit("memory"), pids=limit("pids"))


def _parse_logger(r: Reader, workdir: str) -> LoggerConfig:
    path = r.value(LoggerConfig, "path")
    return r.read(LoggerConfig, path=os.path.join(workdir, path) if path else None,
                  console=r.get("console", boolean, None))


def _parse_packages(r: Reader, workdir: str) -> Packages:
    cache = r.get("cache", nonempty_string)
    links = r.data.get("findlinks")
    if links is None:
        links = []
    elif not isinstance(links, list):
        links = [links]
    find_links = []
    for link in links:
        if not isinstance(link, str) or not link:
            raise r.fail("findlinks", f"expected a directory or URL, got {show(link)}")
        find_links.append(link if "://" in link else os.path.join(workdir, link))
    index = r.data.get("index")
    if index is False:
        index = ""
    elif index is not None and (not isinstance(index, str) or "://" not in index):
        raise r.fail("index", f"expected a package index URL, or false for none, got {show(index)}")
    return r.read(Packages, cache=os.path.join(workdir, cache) if cache else default_package_cache(workdir),
                  find_links=tuple(find_links), index=index)
