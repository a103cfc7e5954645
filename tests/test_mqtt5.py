"""MQTT 5 request/response: response topic, correlation data, user properties, content type and
message expiry, end to end through a real mosquitto."""
from __future__ import annotations

import json
import time

from tests.helpers import V5Client, function, rule, wait_until


REPLIER = """
import time

def handler(event, context):
    if event == b"raw":
        return b"bytes!"
    if event.get("sleep"):
        time.sleep(event["sleep"])
    context.set_user_property("handled-by", context["functionName"])
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    return {"props": context["userProperties"], "ct": context.content_type, "n": event.get("n")}
"""


def test_mqtt5_request_response_with_correlation_properties_and_expiry(broker, daemon_factory):
    daemon = daemon_factory(
        [function("f", "h.handler", instance={"max": 1})],
        [rule("r", "req", "f", "default/out", error={"topic": "default/err", "qos": 1})],
        files={"fn/h.py": REPLIER},
        hub={"address": broker.address, "clientid": "oef-v5", "protocol": 5})
    client = V5Client(broker, ["my/resp", "default/#"])
    try:
        client.request("req", b'{"n": 1}', ResponseTopic="my/resp", CorrelationData=b"\x01\x02",
                       UserProperty=[("k", "v"), ("trace", "abc")], ContentType="application/json")
        client.request("req", b'{"fail": true}', ResponseTopic="my/resp", CorrelationData=b"f")
        client.request("req", b'{"n": 3}')
        client.request("req", b"raw", ResponseTopic="my/resp", CorrelationData=b"r")
        wait_until(lambda: len(client.on("my/resp")) == 3 and client.on("default/out"), 20)
        replies = {m.properties.CorrelationData: m for m in client.on("my/resp")}

        answer = replies[b"\x01\x02"]
        assert json.loads(answer.payload) == {"props": {"k": "v", "trace": "abc"},
                                              "ct": "application/json", "n": 1}
        assert answer.properties.ContentType == "application/json"
        assert ("handled-by", "f") in answer.properties.UserProperty

        envelope = replies[b"f"]
        assert json.loads(envelope.payload)["errorType"] == "RuntimeError"
        assert envelope.properties.ContentType == "application/json"
        assert ("handled-by", "f") in envelope.properties.UserProperty

        assert replies[b"r"].payload == b"bytes!"
        assert replies[b"r"].properties.ContentType == "application/octet-stream"

        plain = client.on("default/out")
        assert len(plain) == 1 and json.loads(plain[0].payload)["n"] == 3
        assert plain[0].properties.ContentType == "application/json"
        assert not client.on("default/err"), "an outcome with a response topic went elsewhere too"

        # Expiry: a request that waits longer than it lives is not run.
        client.request("req", b'{"sleep": 2.5}', ResponseTopic="my/resp", CorrelationData=b"slow")
        time.sleep(0.3)
        client.request("req", b'{"n": 5}', ResponseTopic="my/resp", CorrelationData=b"late",
                       MessageExpiryInterval=1)
        client.request("req", b'{"n": 6}', ResponseTopic="my/resp", CorrelationData=b"after")
        wait_until(lambda: any(m.properties.CorrelationData == b"after" for m in client.on("my/resp")), 20)
        correlations = [m.properties.CorrelationData for m in client.on("my/resp")]
        assert b"slow" in correlations and b"late" not in correlations
        assert "acknowledged, not run" in daemon.log()
    finally:
        client.close()


def test_protocol_auto_speaks_mqtt5_with_a_broker_that_does(broker, daemon_factory):
    """hub.protocol: auto is MQTT 5 with mosquitto (and 3.1.1 with a broker that refuses 5:
    tests/test_cluster.py, NATS's MQTT listener)."""
    daemon = daemon_factory([function("f", "h.handler")], [rule("r", "req", "f", "default/out")],
                            files={"fn/h.py": REPLIER},
                            hub={"address": broker.address, "clientid": "oef-auto", "protocol": "auto"})
    client = V5Client(broker, ["my/resp"])
    try:
        client.request("req", b'{"n": 7}', ResponseTopic="my/resp", CorrelationData=b"c")
        wait_until(lambda: client.on("my/resp"), 20, message="the answer on the response topic")
        answer = client.on("my/resp")[0]
        assert json.loads(answer.payload)["n"] == 7 and answer.properties.CorrelationData == b"c"
    finally:
        client.close()
    assert "does not speak MQTT 5" not in daemon.log()


def test_packets_decode_as_paho_decodes_them_with_the_tables_shared():
    """The daemon has paho build its Properties and ReasonCodes on tables shared by all: what a
    packet decodes to is what paho's own classes give, and using them leaves the tables as built."""
    import struct

    import paho.mqtt._packet as paho_packet
    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode

    import openedge_function.broker  # noqa: F401  (installs the shared tables)

    assert paho_packet.Properties is not PahoProperties and paho_packet.ReasonCode is not PahoReasonCode
    names_before = dict(PahoProperties(PacketTypes.PUBLISH).names)

    sent = PahoProperties(PacketTypes.PUBLISH)
    sent.ContentType, sent.ResponseTopic, sent.CorrelationData = "application/json", "re/ply", b"\x01\x02"
    sent.UserProperty = [("a", "1"), ("b", "2")]
    sent.MessageExpiryInterval = 30
    topic, payload = b"in/x", b'{"n": 1}'
    for props in (sent.pack(), b"\x00"):
        packet = struct.pack("!H", len(topic)) + topic + struct.pack("!H", 7) + props + payload
        decoded = paho_packet.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
        expected = PahoProperties(PacketTypes.PUBLISH)
        expected.unpack(props)
        assert isinstance(decoded.properties, PahoProperties)
        assert decoded.properties.json() == expected.json() and str(decoded.properties) == str(expected)
        assert (decoded.mid, decoded.topic, decoded.payload) == (7, topic, payload)
        assert decoded.properties.pack() == props

    plain = paho_packet.decode_puback(0x40, b"\x00\x09", MQTTProtocolVersion.MQTTv311)
    assert (plain.mid, plain.reason.value, repr(plain.reason)) == (9, 0, "ReasonCode(Puback, 'Success')")
    assert plain.properties.isEmpty()
    refused = paho_packet.decode_puback(0x40, b"\x00\x0a\x97\x00", MQTTProtocolVersion.MQTTv5)
    assert refused.reason.is_failure and str(refused.reason) == "Quota exceeded"
    assert refused.reason == PahoReasonCode(PacketTypes.PUBACK, "Quota exceeded")
    assert str(paho_packet.ReasonCode(PacketTypes.DISCONNECT)) == "Normal disconnection"
    assert str(paho_packet.ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")) == "Granted QoS 1"
    assert paho_packet.ReasonCode(PacketTypes.SUBACK, "Granted QoS 1").value == 1
    assert dict(PahoProperties(PacketTypes.PUBLISH).names) == names_before
    assert paho_packet.Properties(PacketTypes.PUBLISH).names == names_before
