"""Errors of the daemon, and the error envelope published for a failed invocation. Depends on
nothing else in the daemon.

OpenEdgeFunctionError                 base of everything the daemon raises on purpose
├── ConfigError                       application.yml is wrong: names file, field and value
├── ServerError                       the HTTP server cannot listen
└── InvocationError                   one message could not be answered with a result
    ├── HandlerError                  the handler raised: errorType is the exception's class
    ├── ResultEncodingError           the handler's result could not be encoded
    ├── FunctionTimeout               ran past instance.timeout; the instance was killed
    ├── MemoryLimitExceeded           RSS past instance.memory; the instance was killed
    ├── PoisonMessage                 in flight at each of the daemon's last crashes: not run again
    ├── InstanceCrashed               the instance process died during the invocation
    ├── FunctionLoadError             the handler or initializer could not be loaded
    ├── MessageTooLarge               payload over instance.message.length.max
    ├── MessageExpired                MQTT 5: expired while it waited; acknowledged, not run
    ├── ResultTooLarge                the result, as a publish, is over what the broker takes
    ├── PublishRefused                MQTT 5: the broker refused the result (PUBACK reason code)
    └── ResponseRefused               MQTT 5: the request's response topic is not one to answer on
"""
from __future__ import annotations

import base64
import json
from typing import Any, Optional, Sequence

__all__ = [
    "OpenEdgeFunctionError", "ConfigError", "ConfigErrors", "ServerError", "InvocationError", "HandlerError",
    "ResultEncodingError", "FunctionTimeout", "MemoryLimitExceeded", "PoisonMessage", "InstanceCrashed",
    "FunctionLoadError", "MessageTooLarge", "MessageExpired", "ResultTooLarge", "PublishRefused",
    "ResponseRefused", "Packet", "build_envelope", "brief", "error_of",
]


class OpenEdgeFunctionError(Exception):
    """Base class of the daemon's own errors."""


class ConfigError(OpenEdgeFunctionError):
    """A configuration error: the file, the field path and what is wrong with its value."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class ConfigErrors(ConfigError):
    """Every error found in one configuration file, the first one's fields on the object."""

    def __init__(self, errors: "list[ConfigError]") -> None:
        first = errors[0]
        super().__init__(first.file, first.field, first.message)
        self.errors = list(errors)
        self.args = ("\n".join(str(error) for error in self.errors),)

    def __str__(self) -> str:
        return self.args[0]


class ServerError(OpenEdgeFunctionError):
    """The HTTP server cannot start (its address is taken, say)."""


class InvocationError(OpenEdgeFunctionError):
    """An invocation ended without a result; `error_type` is what the envelope says."""

    error_type = "InvocationError"

    def __init__(self, message: str, stack_trace: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.stack_trace = list(stack_trace)


class HandlerError(InvocationError):
    """The handler raised; the envelope carries the exception's own class name."""

    def __init__(self, error_type: str, message: str, stack_trace: Sequence[str] = ()) -> None:
        super().__init__(message, stack_trace)
        self.error_type = error_type


class ResultEncodingError(InvocationError):
    error_type = "ResultEncodingError"


class FunctionTimeout(InvocationError):
    error_type = "FunctionTimeout"


class MemoryLimitExceeded(InvocationError):
    error_type = "MemoryLimitExceeded"


class PoisonMessage(InvocationError):
    """In flight at each of the daemon's last crashes: answered instead of run again."""
    error_type = "PoisonMessage"


class InstanceCrashed(InvocationError):
    error_type = "InstanceCrashed"


class FunctionLoadError(InvocationError):
    error_type = "FunctionLoadError"


class MessageTooLarge(InvocationError):
    error_type = "MessageTooLarge"


class MessageExpired(InvocationError):
    """An MQTT 5 message whose expiry interval ran out while it waited: not run, not answered."""
    error_type = "MessageExpired"


class ResultTooLarge(InvocationError):
    """The result is over the largest publish the broker takes (hub.maxsize, or its CONNACK's
    Maximum Packet Size): not sent; this envelope goes instead."""
    error_type = "ResultTooLarge"


class PublishRefused(InvocationError):
    """An MQTT 5 broker answered the result's PUBLISH with a failure reason code."""
    error_type = "PublishRefused"


class ResponseRefused(InvocationError):
    """An MQTT 5 request asked for its answer on a topic the rule does not answer on (see
    replies.py): not run; this envelope goes to the rule's error topic instead."""
    error_type = "ResponseRefused"


def brief(error: InvocationError, length: int = 1024) -> InvocationError:
    """`error` for an envelope that must be small: its message cut to `length` characters, no
    stack trace."""
    message = error.message
    if len(message) > length:
        message = message[:length] + f"... ({len(message) - length} more characters cut)"
    short = InvocationError(message)
    short.error_type = error.error_type
    return short


def error_of(response: Any) -> InvocationError:
    """The error an instance's ERROR response (error_type, error_message, stack_trace) stands for."""
    if response.error_type == ResultEncodingError.error_type:
        return ResultEncodingError(response.error_message)
    return HandlerError(response.error_type, response.error_message, response.stack_trace)


class Packet:
    """The input message as the envelope's `packet` shows it (OpenEdge's layout)."""

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "mid")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, mid: int) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.mid = mid

    def as_dict(self) -> dict:
        return {
            "Message": {
                "Topic": self.topic,
                "Payload": base64.b64encode(self.payload).decode("ascii"),
                "QOS": self.qos,
                "Retain": self.retain,
            },
            "Dup": self.dup,
            "ID": self.mid,
        }


def build_envelope(error: InvocationError, request_id: str, function_name: str,
                   packet: Optional[Packet]) -> bytes:
    """The JSON error envelope published in place of a result (UTF-8, non-ASCII kept)."""
    envelope = {
        "errorMessage": error.message,
        "errorType": error.error_type,
        "stackTrace": error.stack_trace,
        "requestId": request_id,
        "functionName": function_name,
    }
    if packet is not None:
        envelope["packet"] = packet.as_dict()
    return json.dumps(envelope, ensure_ascii=False).encode("utf-8")


# The HTTP status that answers each error type (the invoke API, and calls between functions).
HTTP_STATUS = {
    "UnknownFunction": 404, "MessageTooLarge": 413, "QueueFull": 429, "Unauthorized": 401,
    "FunctionTimeout": 504, "InvokeTimeout": 504, "InvokeDeadlock": 508, "Unavailable": 503,
    "MethodNotAllowed": 405, "HeadersTooLarge": 431, "BadRequest": 400, "NotAnEventFunction": 400,
    "NotAnHttpFunction": 400, "NotFound": 404,
}
