"""Delivery: persistent sessions (MQTT 3.1.1 and 5), reload, shared subscriptions, TLS, ordering."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import yaml

from tests.helpers import Broker, Collector, DaemonProcess, function, publish, rule, wait_until

TOOLS = '''
import os, random, time

def echo(event, context):
    return event

def version(event, context):
    return {"v": os.environ.get("VERSION"), "pid": os.getpid(), "event": event}

def jitter(event, context):
    time.sleep(random.random() * 0.02)
    return {"topic": context["messageTopic"], "seq": event["seq"]}
'''


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_what_arrives_while_the_daemon_is_down_is_delivered_when_it_returns(broker, daemon_factory,
                                                                           collector, protocol):
    daemon = daemon_factory([function("echo", "tools.echo")], [rule("r1", "in", "echo", "out")],
                            files={"fn/tools.py": TOOLS},
                            hub={"address": broker.address, "clientid": "oef-persist", "protocol": protocol})
    publish(broker, "in", b'{"n": 1}')
    wait_until(lambda: collector.on("out"), message="the first answer")
    assert daemon.stop() == 0
    publish(broker, "in", b'{"n": 2}')
    publish(broker, "in", b'{"n": 3}')
    daemon.start()
    wait_until(lambda: len(collector.on("out")) == 3, message="the messages sent while it was down")
    assert sorted(json.loads(m.payload)["n"] for m in collector.on("out")) == [1, 2, 3]


def write_config(daemon: DaemonProcess, change) -> None:
    with open(daemon.config_path) as fh:
        config = yaml.safe_load(fh)
    change(config)
    with open(daemon.config_path, "w") as fh:
        yaml.safe_dump(config, fh)


def test_sighup_adds_removes_and_changes_without_touching_the_rest(broker, daemon_factory, collector):
    daemon = daemon_factory(
        [function("keep", "tools.version", env={"VERSION": "1"}),
         function("change", "tools.version", env={"VERSION": "1"})],
        [rule("r-keep", "keep", "keep", "keep/out"), rule("r-change", "change", "change", "change/out"),
         rule("r-remove", "remove", "keep", "remove/out")],
        files={"fn/tools.py": TOOLS})
    for topic in ("keep", "change", "remove"):
        publish(broker, topic, b"{}")
    wait_until(lambda: all(collector.on(f"{t}/out") for t in ("keep", "change", "remove")),
               message="answers before the reload")
    keep_pid = json.loads(collector.on("keep/out")[0].payload)["pid"]

    def change(config):
        config["functions"][1]["env"]["VERSION"] = "2"
        config["rules"] = [r for r in config["rules"] if r["id"] != "r-remove"]
        config["rules"].append(rule("r-new", "new", "keep", "new/out"))

    write_config(daemon, change)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), message="the reload")
    wait_until(lambda: ": subscribed to new" in daemon.log(), message="the new rule to subscribe")
    for topic in ("keep", "change", "remove", "new"):
        publish(broker, topic, b"{}")
    wait_until(lambda: len(collector.on("keep/out")) == 2 and len(collector.on("change/out")) == 2
               and collector.on("new/out"), message="answers after the reload")
    kept = json.loads(collector.on("keep/out")[1].payload)
    assert kept["pid"] == keep_pid   # an unchanged function keeps its instance
    changed = json.loads(collector.on("change/out")[1].payload)
    assert changed["v"] == "2"
    time.sleep(0.5)
    assert len(collector.on("remove/out")) == 1   # the removed rule took nothing more
    # It also left the persistent session: a restart does not bring its messages back.
    assert daemon.stop() == 0
    daemon.start()
    time.sleep(0.5)
    assert len(collector.on("remove/out")) == 1


def test_sighup_with_a_broken_configuration_keeps_the_running_one(broker, daemon_factory, collector):
    daemon = daemon_factory([function("echo", "tools.echo")], [rule("r1", "in", "echo", "out")],
                            files={"fn/tools.py": TOOLS})
    write_config(daemon, lambda config: config["functions"][0]["instance"].update({"max": 0})
                 if "instance" in config["functions"][0] else config["functions"][0].update(
                     {"instance": {"max": 0}}))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "refused" in daemon.log(), message="the refusal to be logged")
    assert "functions[0].instance.max: 0 is below the lower bound 1" in daemon.log()
    publish(broker, "in", b'{"still": "working"}')
    out = wait_until(lambda: collector.on("out"), message="the old configuration to answer")
    assert json.loads(out[0].payload) == {"still": "working"}


def test_two_daemons_split_a_shared_subscription(broker, daemon_factory, collector):
    functions = [function("who", "tools.version")]
    first = daemon_factory(functions, [rule("r1", "$share/workers/in", "who", "out")],
                           files={"fn/tools.py": TOOLS},
                           hub={"address": broker.address, "clientid": "oef-a"})
    second = daemon_factory(functions, [rule("r1", "$share/workers/in", "who", "out")],
                            files={"fn/tools.py": TOOLS},
                            hub={"address": broker.address, "clientid": "oef-b"})
    for i in range(40):
        publish(broker, "in", json.dumps({"i": i}).encode())
    wait_until(lambda: len(collector.on("out")) == 40, message="every message answered once")
    answers = [json.loads(m.payload) for m in collector.on("out")]
    assert sorted(a["event"]["i"] for a in answers) == list(range(40))
    pids = {a["pid"] for a in answers}
    assert set(first.instance_pids()) & pids and set(second.instance_pids()) & pids


def test_a_shared_subscription_session_expires_as_the_rule_says(broker, daemon_factory):
    """MQTT 5: a member's session outlives it by its rule's sessionexpiry (default for $share:
    five minutes, not never), so a member lost for good does not hold the group's share for ever."""
    hub = {"address": broker.address, "clientid": "oef-expiry", "protocol": 5}
    rules = [rule("shared", "$share/g/in", "who", "out", sessionexpiry="2s"), rule("plain", "plain/in", "who", "out")]
    daemon = daemon_factory([function("who", "tools.version")], rules, files={"fn/tools.py": TOOLS}, hub=hub)
    assert "a shared subscription under MQTT 3.1.1" not in daemon.log()
    daemon.signal(signal.SIGKILL)   # gone without a DISCONNECT: the sessions stay, for a while
    daemon.wait(10)
    time.sleep(4)
    before = len(daemon.log())
    daemon.start()
    log = daemon.log()[before:]
    assert "rule shared: connected to" in log and "(session new)" in log.split("rule shared: connected")[1].split("\n")[0]
    assert "(session resumed)" in log.split("rule plain: connected")[1].split("\n")[0]


def test_a_shared_subscription_under_mqtt_3_is_warned_of(broker, daemon_factory):
    daemon = daemon_factory([function("who", "tools.version")], [rule("shared", "$share/g/in", "who", "out")],
                            files={"fn/tools.py": TOOLS},
                            hub={"address": broker.address, "clientid": "oef-v3", "protocol": "3.1.1"})
    assert "rule shared: a shared subscription under MQTT 3.1.1 has a session without expiry" in daemon.log()


def test_ordered_rules_keep_per_topic_order(broker, daemon_factory, collector):
    daemon_factory([function("jitter", "tools.jitter", instance={"max": 4})],
                   [rule("r1", "dev/+", "jitter", "out", ordered=True)], files={"fn/tools.py": TOOLS})
    client = Collector(broker, [], inflight=0)
    try:
        infos = [client.client.publish(f"dev/{topic}", json.dumps({"seq": seq}), 1)
                 for seq in range(30) for topic in ("a", "b", "c")]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.close()
    wait_until(lambda: len(collector.on("out")) == 90, timeout=30, message="90 answers")
    answers = [json.loads(m.payload) for m in collector.on("out")]
    for topic in ("dev/a", "dev/b", "dev/c"):
        assert [a["seq"] for a in answers if a["topic"] == topic] == list(range(30))


def make_certificates(directory: str) -> dict:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    with open(os.path.join(directory, "san.cnf"), "w") as fh:
        fh.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem")
    return {name: os.path.join(directory, name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_with_client_certificates_and_passwords(tmp_path):
    directory = tmp_path / "tls"
    directory.mkdir()
    certs = make_certificates(str(directory))
    passwords = directory / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "edge", "right-password"], check=True)
    # The broker's first listener is plain, for the test's own clients; the daemon uses the TLS one.
    tls_port = __import__("tests.helpers", fromlist=["free_port"]).free_port()
    broker = Broker(str(directory), extra=textwrap.dedent(f"""\
        allow_anonymous false
        password_file {passwords}
        listener {tls_port} 127.0.0.1
        cafile {certs['ca.pem']}
        certfile {certs['server.pem']}
        keyfile {certs['server.key']}
        require_certificate true
        """)).start()
    daemons = []
    try:
        code = tmp_path / "fn"
        code.mkdir()
        (code / "tools.py").write_text(TOOLS)

        def start(password: str) -> DaemonProcess:
            run_dir = tmp_path / f"d{len(daemons)}"
            run_dir.mkdir()
            daemon = DaemonProcess(str(run_dir), {
                "hub": {"address": f"ssl://127.0.0.1:{tls_port}", "clientid": f"oef-tls{len(daemons)}",
                        "username": "edge", "password": password, "ca": certs["ca.pem"],
                        "cert": certs["client.pem"], "key": certs["client.key"], "interval": "2s"},
                "functions": [function("echo", "tools.echo", codedir=str(code))],
                "rules": [rule("r1", "in", "echo", "out")],
                "logger": {"level": "debug"}})
            daemons.append(daemon)
            return daemon.start(wait=password == "right-password")

        start("right-password")
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        received = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-test-client")
        client.username_pw_set("edge", "right-password")
        client.on_message = lambda c, u, m: received.append(m)
        client.connect("127.0.0.1", broker.port)
        client.subscribe("out", 1)
        client.loop_start()
        try:
            time.sleep(0.3)
            client.publish("in", b'{"over": "tls"}', 1).wait_for_publish(5)
            wait_until(lambda: received, message="the answer over TLS")
            assert json.loads(received[0].payload) == {"over": "tls"}
        finally:
            client.disconnect()
            client.loop_stop()
        # Wrong credentials: refused and logged; the daemon keeps running and retrying.
        wrong = start("wrong-password")
        wait_until(lambda: "refused the connection" in wrong.log(), message="the refusal")
        assert wrong.process.poll() is None
    finally:
        for daemon in daemons:
            daemon.stop()
        broker.stop()


def test_a_qos1_flood_is_answered_in_full_while_intake_pauses(broker, daemon_factory, collector):
    """Intake pausing for a full queue must not hold up publishing: every message is answered."""
    daemon_factory([function("echo", "tools.echo", instance={"max": 2})],
                   [rule("r1", "flood", "echo", "flood/out")], files={"fn/tools.py": TOOLS},
                   hub={"address": broker.address, "clientid": "oef-flood", "buffer": {"max": 50}})
    client = Collector(broker, [], inflight=0)
    try:
        infos = [client.client.publish("flood", json.dumps({"seq": i}), 1) for i in range(3000)]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.close()
    wait_until(lambda: len(collector.on("flood/out")) >= 3000, timeout=90, message="3000 answers")
    assert {json.loads(m.payload)["seq"] for m in collector.on("flood/out")} == set(range(3000))


@pytest.mark.broker_config("max_inflight_messages 0\n")   # enough arrives to hold intake
def test_a_reload_while_intake_waits_for_room_loses_nothing(broker, daemon_factory, collector):
    daemon = daemon_factory([function("slow", "main.handler", codedir="v", env={"V": "1"},
                                      instance={"max": 1})],
                            [rule("r1", "in", "slow", "out")],
                            files={"v/main.py": "import os, time\ndef handler(event, context):\n"
                                                "    time.sleep(0.01)\n    return event\n"})
    client = Collector(broker, [], inflight=0)
    try:
        infos = [client.client.publish("in", json.dumps({"seq": i}), 1) for i in range(300)]
        wait_until(lambda: "pausing intake" in daemon.log(), message="intake to wait for room")
        write_config(daemon, lambda config: config["functions"][0]["env"].update({"V": "2"}))
        daemon.signal(signal.SIGHUP)
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.close()
    wait_until(lambda: len({json.loads(m.payload)["seq"] for m in collector.on("out")}) == 300,
               timeout=60, message="every message answered across the reload")
