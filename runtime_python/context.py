"""The context handed to handlers: OpenEdge's keys, as a dict."""
from __future__ import annotations


class Context(dict):
    """One invocation's context. OpenEdge handlers read it as a dict: `context['functionName']`."""

    def __init__(self, function_name: str, instance_id: str, request_id: str,
                 topic: str = "", qos: int = 0, timestamp_ms: int = 0) -> None:
        super().__init__(
            functionName=function_name,
            functionInvokeID=request_id,
            invokeid=request_id,
            functionInstanceID=instance_id,
            messageQOS=qos,
            messageTopic=topic,
            messageTimestamp=timestamp_ms,
        )
