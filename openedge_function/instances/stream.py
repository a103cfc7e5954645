"""The supervisor's end of one instance's socket, on the data plane's loop: the key and the
instance's answer to prove it serves, then every invocation as one write and one read (a batch
each way; runtime_python/wire.py has the framing)."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from runtime_python._pb import function_pb2 as pb
from runtime_python.wire import LENGTH

from ..errors import InstanceCrashed


class StreamBroken(Exception):
    """The instance's stream ended during an invocation: the process died, or `cancel()`."""


class _Link(asyncio.Protocol):
    """The connection: writes a frame, hands the frame that answers it to the one waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._waiter: Optional[asyncio.Future] = None
        self.transport: Any = None
        self.ended: Optional[str] = None   # why the connection ended, once it has

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer and len(data) >= LENGTH.size and len(data) == LENGTH.size + LENGTH.unpack_from(data)[0]:
            message = data[LENGTH.size:]   # a whole frame in one read, as answers mostly come
        else:
            buffer += data
            if len(buffer) < LENGTH.size:
                return
            size = LENGTH.unpack_from(buffer)[0]
            if len(buffer) < LENGTH.size + size:
                return
            message = bytes(buffer[LENGTH.size:LENGTH.size + size])
            del buffer[:LENGTH.size + size]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        else:   # an answer no one asked for: the instance is not ours to trust
            self.transport.abort()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.ended = str(exc) if exc else "the instance closed its stream"
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamBroken(self.ended))

    def exchange(self, message: bytes) -> "asyncio.Future[bytes]":
        """Write a frame; the answering frame's message. The future raises StreamBroken."""
        waiter = self._loop.create_future()
        if self.ended is not None:
            waiter.set_exception(StreamBroken(self.ended))
            return waiter
        self._waiter = waiter
        self.transport.write(LENGTH.pack(len(message)) + message)
        return waiter


class Stream:
    """The connection to one instance's Unix socket."""

    def __init__(self, instance_id: str, socket_path: str, key: str) -> None:
        self._instance_id = instance_id
        self._path = socket_path
        self._key = key.encode()   # the instance serves only the connection that opens with it
        self._link: Optional[_Link] = None

    async def open(self, ready_timeout: float) -> None:
        """Connect and check that the runtime answers. Raises InstanceCrashed."""
        loop = asyncio.get_running_loop()
        try:
            _, link = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Link(loop), self._path), max(5.0, ready_timeout))
            self._link = link
            hello = await asyncio.wait_for(link.exchange(self._key), max(5.0, ready_timeout))
            pb.PingResponse.FromString(hello)
        except (OSError, asyncio.TimeoutError, StreamBroken, ValueError) as exc:
            raise InstanceCrashed(f"instance {self._instance_id} does not answer: "
                                  f"{str(exc) or type(exc).__name__}") from None

    async def invoke(self, batch: Any) -> Any:
        """Run the invocations of an InvokeBatch, one after the other; their responses in order.
        Raises StreamBroken."""
        link = self._link
        if link is None:
            raise StreamBroken(f"instance {self._instance_id} has no stream")
        try:
            answer = await link.exchange(batch.SerializeToString())
        except asyncio.CancelledError:
            link.transport.abort()   # what the instance answers now has no one to read it
            raise StreamBroken(f"instance {self._instance_id}: the invocation was cancelled") from None
        try:
            return pb.ResultBatch.FromString(answer).responses
        except ValueError as exc:   # protobuf's DecodeError
            link.transport.abort()
            raise StreamBroken(f"instance {self._instance_id} sent what is not a result: {exc}") from None

    def cancel(self) -> None:
        """End the stream: the invocation waiting on it raises at once."""
        if self._link is not None:
            self._link.transport.abort()

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.abort()
