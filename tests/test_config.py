"""application.yml: converters, defaults, OpenEdge's and Baetyl's spellings, and every kind of error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import yaml

from openedge_function.config import byte_size, duration, load_config, parse_config
from openedge_function.errors import ConfigError


@pytest.mark.parametrize("text, seconds", [
    ("300ms", 0.3), ("30s", 30), ("10m", 600), ("1h", 3600), ("1m30s", 90), ("1.5s", 1.5),
    ("0", 0), (45, 45), (2.5, 2.5), ("250us", 0.00025), ("1h2m3s", 3723),
])
def test_durations(text, seconds):
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ten seconds", "5d", "s", "1m 30s", "-1s", True, [1]])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        duration(text)


@pytest.mark.parametrize("text, size", [
    ("512k", 512 << 10), ("4m", 4 << 20), ("1g", 1 << 30), ("4MB", 4 << 20), ("4MiB", 4 << 20),
    ("128M", 128 << 20), (1024, 1024), ("100", 100), ("1.5k", 1536), ("0", 0),
])
def test_sizes(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["", "4 megabytes", "k", "-1", -5, "4x", False])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        byte_size(text)


def load(tmp_path, text, name="application.yml"):
    (tmp_path / "fn").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), str(tmp_path))


MINIMAL = """
    rules:
      - id: r1
        subscribe: {topic: t}
        compute: {function: f}
        publish: {topic: t/out}
    functions:
      - name: f
        handler: main.handler
        codedir: fn
"""


def test_defaults(tmp_path):
    config = load(tmp_path, MINIMAL)
    fn = config.functions[0]
    assert (fn.instance.min, fn.instance.max) == (0, 1)
    assert fn.instance.idletime == 600 and fn.instance.timeout == 30
    assert fn.instance.message_max == 4 << 20 and fn.instance.memory == 0
    assert fn.codedir == str(tmp_path / "fn")
    assert config.hub.host == "127.0.0.1" and config.hub.port == 1883 and not config.hub.tls
    rule = config.rules[0]
    assert rule.subscribe.qos == 0 and rule.publish.qos == 0 and rule.function == "f"
    assert config.logger.level == "info" and config.logger.console is None and config.logger.summary


def test_openedge_configuration_loads_unchanged(tmp_path):
    """OpenEdge 0.1.x's function module configuration, as its example shipped it."""
    (tmp_path / "app" / "func-nyeosbbch").mkdir(parents=True)
    config = load(tmp_path, """
        name: openedge_function
        mark: modu-e1iluuach
        hub:
          address: tcp://:1883
          username: test
          password: hahaha
        rules:
          - id: rule-e1iluuac1
            subscribe:
              topic: t
              qos: 1
            compute:
              function: sayhi
            publish:
              topic: t/hi
              qos: 1
        functions:
          - name: 'sayhi'
            runtime: 'python2.7'
            handler: 'sayhi.handler'
            codedir: 'app/func-nyeosbbch'
            entry: "bin/openedge-function-runtime-python27"
            env:
              USER_ID: acuiot
            instance:
              min: 0
              max: 100
              timeout: 30s
              idletime: 1m
              memory: {limit: 50m}
              cpu: {cpus: 0.5}
              pids: {limit: 10}
              message:
                length:
                  max: 4m
        logger:
          path: var/log/openedge_function.log
          console: true
          level: "debug"
          age: {max: 15}
          size: {max: 50}
          backup: {max: 15}
    """)
    assert config.hub.host == "127.0.0.1" and config.hub.port == 1883
    assert config.hub.username == "test" and config.hub.password == "hahaha"
    fn = config.functions[0]
    assert fn.instance.max == 100 and fn.instance.memory == 50 << 20 and fn.instance.idletime == 60
    assert fn.env == {"USER_ID": "acuiot"}
    assert config.rules[0].id == "rule-e1iluuac1" and config.rules[0].subscribe.qos == 1
    assert config.logger.level == "debug" and config.logger.path.endswith("var/log/openedge_function.log")


def test_baetyl_function_spelling_and_legacy_clientid(tmp_path):
    config = load(tmp_path, """
        hub: {address: "ssl://broker.local:8884"}
        rules:
          - clientid: func-sayhi-1
            subscribe: {topic: t}
            function: {name: f}
            publish: {topic: t/out}
        functions:
          - {name: f, handler: pkg.main.handler, codedir: fn, instance: {memory: 64m, cpu: {setcpus: "0-1,3"}}}
    """)
    assert config.rules[0].function == "f" and config.rules[0].clientid == "func-sayhi-1"
    assert config.hub.tls and config.hub.port == 8884 and config.hub.host == "broker.local"
    assert config.functions[0].instance.memory == 64 << 20
    assert config.functions[0].instance.cpus == (0, 1, 3)


def error_of(tmp_path, text) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def with_function(**changes):
    base = yaml.safe_load(textwrap.dedent(MINIMAL))
    base["functions"][0].update(changes)
    return yaml.safe_dump(base)


def with_rule(**changes):
    base = yaml.safe_load(textwrap.dedent(MINIMAL))
    base["rules"][0].update(changes)
    return yaml.safe_dump(base)


@pytest.mark.parametrize("text, field, words", [
    (with_function(instance={"max": 0}), "functions[0].instance.max", "0 is below the lower bound 1"),
    (with_function(instance={"max": 101}), "functions[0].instance.max", "above the upper bound 100"),
    (with_function(instance={"min": 3, "max": 2}), "functions[0].instance.min", "above instance.max 2"),
    (with_function(instance={"maxx": 2}), "functions[0].instance.maxx", "did you mean 'max'"),
    (with_function(instance={"timeout": "soon"}), "functions[0].instance.timeout", "'soon' is not a duration"),
    (with_function(instance={"timeout": "0s"}), "functions[0].instance.timeout", "must be above 0"),
    (with_function(instance={"memory": "lots"}), "functions[0].instance.memory", "'lots' is not a size"),
    (with_function(instance={"memory": "1m"}), "functions[0].instance.memory", "below the 8m"),
    (with_function(instance={"message": {"length": {"max": "big"}}}),
     "functions[0].instance.message.length.max", "'big' is not a size"),
    (with_function(handler="nodots"), "functions[0].handler", "not of the form module.function"),
    (with_function(handler=None), "functions[0].handler", "is required"),
    (with_function(name="bad name!"), "functions[0].name", "does not match"),
    (with_function(codedir="missing"), "functions[0].codedir", "'missing': no such directory"),
    (with_function(runtime="node8.5"), "functions[0].runtime", "not supported"),
    (with_function(env={"A": {"b": 1}}), "functions[0].env.A", "expected a string"),
    (with_function(handlr="x.y"), "functions[0].handlr", "did you mean 'handler'"),
    (with_rule(compute={"function": "nope"}), "rules[0].compute.function", "'nope' is not a function defined"),
    (with_rule(compute=None), "rules[0].compute", "is required"),
    (with_rule(subscribe={"topic": "a/#/b"}), "rules[0].subscribe.topic", "'#' must be"),
    (with_rule(subscribe={"topic": "t", "qos": 2}), "rules[0].subscribe.qos", "2 is above the upper bound 1"),
    (with_rule(publish={"topic": "out/+"}), "rules[0].publish.topic", "cannot hold wildcards"),
    (with_rule(publish={"topic": "t", "qos": "one"}), "rules[0].publish.qos", "'one' is not an integer"),
    (with_rule(function={"name": "f"}), "rules[0].function", "not both"),
    (with_rule(subscribe="t"), "rules[0].subscribe", "expected a mapping"),
    ("hub: {address: 'http://x:1'}\n" + textwrap.dedent(MINIMAL), "hub.address",
     "not tcp://host:port or ssl://host:port (mqtt:// is tcp://, mqtts:// and tls:// are ssl://)"),
    ("hub: {address: 'tcp://x:99999'}\n" + textwrap.dedent(MINIMAL), "hub.address", "out of range"),
    ("hub: {ca: nothere.pem}\n" + textwrap.dedent(MINIMAL), "hub.ca", "no such file"),
    ("logger: {level: loud}\n" + textwrap.dedent(MINIMAL), "logger.level", "'loud' is not one of"),
    ("rulez: []\n" + textwrap.dedent(MINIMAL), "rulez", "did you mean 'rules'"),
    ("functions: {a: 1}\n", "functions", "expected a list"),
    (with_function(user="no-such-user-here"), "functions[0].user",
     "no user named 'no-such-user-here' on this machine (make one with: useradd --system"),
    (with_function(group="no-such-group"), "functions[0].group", "no group named 'no-such-group'"),
    (with_function(user=True), "functions[0].user", "expected a user name or a numeric id"),
    (with_function(instance={"pids": 0}), "functions[0].instance.pids", "below the lower bound 1"),
    (with_function(instance={"files": 10}), "functions[0].instance.files", "below the lower bound 64"),
    ("defaults: {user: nobody, shell: x}\n" + textwrap.dedent(MINIMAL), "defaults.shell", "unknown key"),
])
def test_errors_name_the_file_the_field_and_the_value(tmp_path, text, field, words):
    error = error_of(tmp_path, text)
    assert error.field == field, str(error)
    assert words in error.message, str(error)
    assert str(error).startswith(str(tmp_path / "application.yml") + ": " + field + ": ")


def test_users_pids_files_and_the_openedge_pids_spelling(tmp_path):
    config = load(tmp_path, "defaults: {user: nobody, group: 65534}\n" + textwrap.dedent(MINIMAL))
    assert (config.defaults.user, config.defaults.group) == ("nobody", "65534")
    fn = config.functions[0]
    assert (fn.user, fn.group, fn.instance.pids, fn.instance.files) == (None, None, 64, 1024)
    fn = load(tmp_path, with_function(user=61001, instance={"pids": {"limit": 10}, "files": 4096})).functions[0]
    assert (fn.user, fn.instance.pids, fn.instance.files) == ("61001", 10, 4096)


def test_duplicates_are_errors(tmp_path):
    base = yaml.safe_load(textwrap.dedent(MINIMAL))
    base["functions"].append(dict(base["functions"][0]))
    error = error_of(tmp_path, yaml.safe_dump(base))
    assert error.field == "functions[1].name" and "defined twice" in error.message
    base = yaml.safe_load(textwrap.dedent(MINIMAL))
    base["rules"].append(dict(base["rules"][0]))
    error = error_of(tmp_path, yaml.safe_dump(base))
    assert error.field == "rules[1].id" and "used by another rule" in error.message


def test_yaml_syntax_error_says_where(tmp_path):
    error = error_of(tmp_path, "rules:\n  - id: [unclosed\n")
    assert "invalid YAML" in str(error) and "line" in str(error)


def test_a_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.yml"))
    assert "cannot read" in str(info.value) and "nope.yml" in str(info.value)


@pytest.mark.parametrize("data, says", [
    (None, "functions: the file is empty: no function is defined"),
    ({"hub": {"address": "tcp://127.0.0.1:1883"}}, "functions: missing: no function is defined"),
    ({"functions": None, "rules": []}, "functions: missing: no function is defined"),
])
def test_a_configuration_without_functions_is_an_error(tmp_path, data, says):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "empty.yml", str(tmp_path))
    assert says in str(info.value) and "write `functions: []`" in str(info.value)


def test_an_explicit_empty_list_of_functions_is_accepted(tmp_path):
    config = parse_config({"functions": []}, "empty.yml", str(tmp_path))
    assert config.rules == () and config.functions == ()


class TcpWitness:
    """A listening socket standing in for the broker, counting who connects to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("change, field", [
    ({"instance": {"max": 0}}, "functions[0].instance.max"),
    ({"handler": "x"}, "functions[0].handler"),
    ({"codedir": "nowhere"}, "functions[0].codedir"),
    ({"unknown": 1}, "functions[0].unknown"),
])
def test_the_daemon_exits_2_before_touching_the_broker(tmp_path, change, field):
    witness = TcpWitness()
    try:
        base = yaml.safe_load(textwrap.dedent(MINIMAL))
        base["hub"] = {"address": f"tcp://127.0.0.1:{witness.port}"}
        base["functions"][0].update(change)
        (tmp_path / "fn").mkdir()
        path = tmp_path / "application.yml"
        path.write_text(yaml.safe_dump(base))
        done = subprocess.run([sys.executable, "-m", "openedge_function", "-c", str(path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert f"{path}: {field}: " in done.stderr
        assert witness.connections == 0
    finally:
        witness.close()


def test_an_empty_file_stops_the_daemon_with_status_2(tmp_path):
    path = tmp_path / "application.yml"
    path.write_text("# nothing yet\n")
    done = subprocess.run([sys.executable, "-m", "openedge_function", "-c", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"{path}: functions: the file is empty: no function is defined" in done.stderr


def test_check_flag_validates_without_running(tmp_path):
    (tmp_path / "fn").mkdir()
    path = tmp_path / "application.yml"
    path.write_text(textwrap.dedent(MINIMAL))
    done = subprocess.run([sys.executable, "-m", "openedge_function", "--check", "-c", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "no module named 'main'" in done.stderr, done.stderr   # what would run
    (tmp_path / "fn" / "main.py").write_text("def handler(event, context):\n    return event\n")
    done = subprocess.run([sys.executable, "-m", "openedge_function", "--check", "-c", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    assert os.path.exists(path)


def test_delivery_settings(tmp_path):
    config = load(tmp_path, """
        hub: {protocol: 5, sessionexpiry: 2h, buffer: {max: 50}, maxsize: 100k}
        rules:
          - id: r1
            subscribe: {topic: "$share/g/t", qos: 1}
            compute: {function: f}
            publish: {topic: t/out, qos: 1}
            retry: {max: 2}
            ordered: true
            overflow: drop
            response: {topics: ["reply/#", "+/answers"]}
        functions:
          - {name: f, handler: main.handler, codedir: fn}
    """)
    assert config.hub.protocol == 5 and config.hub.session_expiry == 7200 and config.hub.buffer_max == 50
    assert config.hub.maxsize == 100 << 10
    rule = config.rules[0]
    assert rule.retry_max == 2 and rule.ordered and rule.subscribe.topic == "$share/g/t"
    assert rule.overflow == "drop" and rule.response_topics == ("reply/#", "+/answers")
    defaults = load(tmp_path, MINIMAL, "defaults.yml")
    assert defaults.hub.protocol == 0 and defaults.hub.session_expiry == 0xFFFFFFFF   # auto
    assert load(tmp_path, "hub: {protocol: auto}\n" + textwrap.dedent(MINIMAL), "auto.yml").hub.protocol == 0
    # A shared subscription's session: the hub's when it sets one, its own when it says.
    assert rule.expiry(config.hub) == 7200 and defaults.rules[0].expiry(defaults.hub) == 0xFFFFFFFF
    assert defaults.hub.maxsize == 268435460   # MQTT's own bound on a packet
    assert defaults.rules[0].retry_max == 0 and not defaults.rules[0].ordered
    assert defaults.rules[0].overflow == "pause"   # QoS 0 waits at the broker, as QoS 1 does
    assert defaults.rules[0].response_topics == ()   # any topic but the daemon's own input


@pytest.mark.parametrize("text, field, words", [
    ("hub: {protocol: 6}\n" + textwrap.dedent(MINIMAL), "hub.protocol", "not 3.1.1, 5 or auto"),
    ("hub: {sessionexpiry: soon}\n" + textwrap.dedent(MINIMAL), "hub.sessionexpiry", "not a duration"),
    ("hub: {buffer: {max: 0}}\n" + textwrap.dedent(MINIMAL), "hub.buffer.max", "below the lower bound 1"),
    ("hub: {maxsize: 512}\n" + textwrap.dedent(MINIMAL), "hub.maxsize", "not between 1k and 256m"),
    ("hub: {maxsize: 1g}\n" + textwrap.dedent(MINIMAL), "hub.maxsize", "not between 1k and 256m"),
    (with_rule(retry={"max": 11}), "rules[0].retry.max", "above the upper bound 10"),
    (with_rule(sessionexpiry="soon"), "rules[0].sessionexpiry", "not a duration"),
    (with_rule(ordered="yes"), "rules[0].ordered", "not true or false"),
    (with_rule(overflow="block"), "rules[0].overflow", "not one of pause, drop"),
    (with_rule(subscribe={"topic": "$share//t"}), "rules[0].subscribe.topic", "shared subscription"),
    (with_rule(response={"topics": ["reply/#/x"]}), "rules[0].response.topics", "'#' must be a whole level"),
    (with_rule(response={"topics": ["$share/g/r"]}), "rules[0].response.topics", "not a topic filter for answers"),
    (with_rule(response={"topics": []}), "rules[0].response.topics", "at least one topic filter"),
    (with_rule(response={"topic": ["r"]}), "rules[0].response.topic", "did you mean 'topics'"),
])
def test_delivery_setting_errors(tmp_path, text, field, words):
    error = error_of(tmp_path, text)
    assert error.field == field and words in error.message, str(error)


def test_a_shared_subscription_gets_a_finite_session_by_default(tmp_path):
    config = load(tmp_path, """
        hub: {protocol: 5}
        rules:
          - {id: a, subscribe: {topic: "$share/g/t", qos: 1}, compute: {function: f}}
          - {id: b, subscribe: {topic: "$share/g/u", qos: 1}, compute: {function: f}, sessionexpiry: 30s}
          - {id: c, subscribe: {topic: t, qos: 1}, compute: {function: f}}
          - {id: d, subscribe: {topic: v, qos: 1}, compute: {function: f}, sessionexpiry: never}
        functions:
          - {name: f, handler: main.handler, codedir: fn}
    """)
    assert [r.expiry(config.hub) for r in config.rules] == [300, 30, 0xFFFFFFFF, 0xFFFFFFFF]

def test_handler_convention_settings(tmp_path):
    config = load(tmp_path, """
        functions:
          - name: f
            handler: main.handler
            codedir: fn
            event: raw
            log: {max: 1k}
            initializer: {handler: main.init, timeout: 5s}
            version: v3
            credentials: {access_key_id: AK, access_key_secret: SK}
            service: {qualifier: prod}
            instance: {cpu: {cpus: 0.5}}
          - {name: g, handler: main.handler, codedir: fn, initializer: main.init}
    """)
    f, g = config.functions
    assert f.event == "raw" and f.log_max == 1024 and f.version == "v3"
    assert f.initializer == "main.init" and f.initializer_timeout == 5
    assert f.credentials.access_key_id == "AK" and f.credentials.security_token == ""
    assert f.service.qualifier == "prod" and f.service.name == "f"
    assert f.instance.cpu_share == 0.5
    assert g.initializer == "main.init" and g.initializer_timeout is None
    assert "SK" not in repr(f)   # secrets stay out of logs that print the configuration


@pytest.mark.parametrize("change, field, words", [
    ({"event": "json"}, "functions[0].event", "not one of openedge, raw"),
    ({"initializer": {"timeout": "1s"}}, "functions[0].initializer.handler", "is required"),
    ({"initializer": {"handler": "m.i", "timeout": "0s"}}, "functions[0].initializer.timeout", "above 0"),
    ({"credentials": {"secret": "x"}}, "functions[0].credentials.secret", "unknown key"),
    ({"log": {"max": "lots"}}, "functions[0].log.max", "not a size"),
])
def test_handler_convention_errors(tmp_path, change, field, words):
    error = error_of(tmp_path, with_function(**change))
    assert error.field == field and words in error.message, str(error)


STREAM_RULE = """
    nats: {servers: [nats://127.0.0.1:4222, "nats://127.0.0.1:4223"]}
    rules:
      - id: seq
        subscribe: {stream: SEQ, subject: seq.in, ackwait: 45s, maxdeliver: 3}
        compute: {function: f}
        publish: {subject: seq.out}
    functions:
      - {name: f, handler: main.handler, codedir: fn}
"""


def test_a_rule_may_read_a_jetstream_stream_and_publish_to_nats(tmp_path):
    config = load(tmp_path, STREAM_RULE)
    assert config.nats.servers == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223")
    rule = config.rules[0]
    assert rule.subscribe.stream == "SEQ" and rule.subscribe.subject == "seq.in" and rule.subscribe.topic == ""
    assert rule.subscribe.ack_wait == 45 and rule.subscribe.max_deliver == 3
    assert rule.to_nats and rule.publish.topic == rule.publish.subject == "seq.out" and not rule.shared


@pytest.mark.parametrize("change, field, words", [
    (lambda t: t.replace("nats: {servers: [nats://127.0.0.1:4222, \"nats://127.0.0.1:4223\"]}\n", ""),
     "rules[0].subscribe.stream", "needs a nats: section"),
    (lambda t: t.replace("subject: seq.in,", "subject: seq.in, topic: t,"), "rules[0].subscribe.topic",
     "either an MQTT topic or a stream"),
    (lambda t: t.replace("subject: seq.in, ", ""), "rules[0].subscribe.subject", "is required with stream"),
    (lambda t: t.replace("  - id: seq\n", "  -\n"), "rules[0].subscribe.consumer", "give the rule an id"),
    (lambda t: t.replace("{subject: seq.out}", "{subject: seq.out, topic: t}"), "rules[0].publish.subject",
     "not both"),
    (lambda t: t.replace("{subject: seq.out}", "{subject: seq.out}\n    error: {topic: t/err}"),
     "rules[0].error", "both to MQTT topics or both to NATS subjects"),
    (lambda t: t.replace("nats://127.0.0.1:4222,", "127.0.0.1:4222,"), "nats.servers", "not nats://host:port"),
])
def test_stream_rule_errors(tmp_path, change, field, words):
    error = error_of(tmp_path, change(textwrap.dedent(STREAM_RULE)))
    assert error.field == field and words in error.message, str(error)


def test_a_stream_rule_without_nats_py_installed_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nats" else real(name, *a))
    error = error_of(tmp_path, textwrap.dedent(STREAM_RULE))
    assert error.field == "nats" and "pip install 'openedge-function[nats]'" in error.message, str(error)
    load(tmp_path, MINIMAL, "plain.yml")   # a configuration without NATS does not need it
