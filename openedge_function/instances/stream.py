"""The gRPC client of one instance, on the data plane's loop (grpc.aio): a ping to prove it serves,
then one long-lived stream that carries every invocation (a write and a read per batch, not a
call)."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import grpc
import grpc.aio

from runtime_python._pb import function_pb2 as pb
from runtime_python._pb import function_pb2_grpc as pb_grpc
from runtime_python.wire import KEY_HEADER

from ..errors import InstanceCrashed

# Keep-alive pings would only wake idle instances, and bandwidth probes cost a frame per message:
# the socket is local.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.http2.bdp_probe", 0),
]


class StreamBroken(Exception):
    """The instance's stream ended during an invocation: the process died, or `cancel()`."""


class Stream:
    """A channel to one instance's Unix socket, and its Session stream."""

    def __init__(self, instance_id: str, socket_path: str, key: str) -> None:
        self._instance_id = instance_id
        self._target = f"unix:{socket_path}"
        self._metadata = ((KEY_HEADER, key),)   # the instance serves only calls that carry it
        self._channel: Optional[grpc.aio.Channel] = None
        self._call: Any = None

    async def open(self, ready_timeout: float) -> None:
        """Connect, check that the runtime answers, and open the stream. Raises InstanceCrashed."""
        self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        stub = pb_grpc.FunctionStub(self._channel)
        try:
            await stub.Ping(pb.PingRequest(), timeout=max(5.0, ready_timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise InstanceCrashed(f"instance {self._instance_id} does not answer: {exc.code().name}") from None
        self._call = stub.Session(metadata=self._metadata)

    async def invoke(self, batch: Any) -> Any:
        """Run the invocations of an InvokeBatch, one after the other; their responses in order.
        Raises StreamBroken."""
        call = self._call
        if call is None:
            raise StreamBroken(f"instance {self._instance_id} has no stream")
        try:
            await call.write(batch)
            result = await call.read()
        except (Exception, asyncio.CancelledError) as exc:   # AioRpcError; CancelledError after cancel()
            raise StreamBroken(str(exc) or type(exc).__name__) from None
        if result is grpc.aio.EOF:
            raise StreamBroken(f"instance {self._instance_id} ended its stream")
        return result.responses

    def cancel(self) -> None:
        """End the stream: the invocation waiting on it raises at once."""
        if self._call is not None:
            self._call.cancel()

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
