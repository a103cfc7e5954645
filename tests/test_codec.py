"""The runtime's event decoding and result encoding, and the supervisor's error envelope."""
from __future__ import annotations

import base64
import json

import pytest

from openedge_function.errors import (FunctionTimeout, HandlerError, MessageTooLarge, Packet,
                                      build_envelope)
from runtime_python.codec import BYTES, JSON, NONE, decode_event, encode_result


@pytest.mark.parametrize("payload, event", [
    (b'{"a": 1}', {"a": 1}),
    (b"[1, 2]", [1, 2]),
    (b"42", 42),
    (b'"text"', "text"),
    (b"", {}),
    (b"not json", b"not json"),
    (b"\xff\xfe\x00", b"\xff\xfe\x00"),
    ('{"城市": "北京"}'.encode("utf-8"), {"城市": "北京"}),
])
def test_decode_event(payload, event):
    assert decode_event(payload) == event


def test_encode_result():
    assert encode_result(None) == (NONE, b"")
    assert encode_result(b"\x00\x01") == (BYTES, b"\x00\x01")
    assert encode_result(bytearray(b"ab")) == (BYTES, b"ab")
    assert encode_result({"k": "你好"}) == (JSON, '{"k": "你好"}'.encode("utf-8"))
    assert encode_result("hi") == (JSON, b'"hi"')
    assert encode_result([1, 2.5, True]) == (JSON, b"[1, 2.5, true]")
    with pytest.raises(TypeError):
        encode_result({1, 2})


def test_envelope_fields_and_packet():
    payload = b'{"id":1,"device":"111"}'
    packet = Packet("t", payload, 1, False, True, 17)
    error = HandlerError("ZeroDivisionError", "division by zero", ['  File "sayhi.py", line 12, in handler'])
    envelope = json.loads(build_envelope(error, "req-1", "sayhi", packet))
    assert envelope == {
        "errorMessage": "division by zero",
        "errorType": "ZeroDivisionError",
        "stackTrace": ['  File "sayhi.py", line 12, in handler'],
        "requestId": "req-1",
        "functionName": "sayhi",
        "packet": {"Message": {"Topic": "t", "Payload": base64.b64encode(payload).decode(),
                               "QOS": 1, "Retain": False}, "Dup": True, "ID": 17},
    }


def test_envelope_error_types_and_unicode():
    assert json.loads(build_envelope(FunctionTimeout("late"), "r", "f", None))["errorType"] == "FunctionTimeout"
    assert json.loads(build_envelope(MessageTooLarge("big"), "r", "f", None))["errorType"] == "MessageTooLarge"
    raw = build_envelope(HandlerError("ValueError", "mauvais café ☕"), "r", "f", None)
    assert "mauvais café ☕".encode("utf-8") in raw
