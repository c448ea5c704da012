"""One RPC on a connection: message framing, flow-control acknowledgement, deadline and final status."""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from istiopy.api.grpc_h2.status import RESET_TO_GRPC, RpcError, StatusCode, received_metadata, status_from

if TYPE_CHECKING:
    from istiopy.api.grpc_h2.connection import Connection

PREFIX = struct.Struct(">BI")  # the gRPC message prefix: compressed flag, length


class Call:
    """One RPC: write request messages, read response messages, see the final status.

    ``read`` returns the next message, or None once the server ended the call with OK; any other ending
    raises :class:`RpcError` (messages that arrived before it are still returned first).
    """

    def __init__(self, conn: Connection, stream_id: int, max_message: int, deadline: float | None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._max_message = max_message
        self._messages: collections.deque[bytes] = collections.deque()
        self._buf = bytearray()
        self._unacked = 0  # received bytes not yet acknowledged to the peer
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._http_status = 0
        self._trailers: list[tuple[bytes, bytes]] = []
        self._status: RpcError | None = None
        self._half_closed = False
        self._write_lock = asyncio.Lock()  # a message waiting for window must not interleave with another
        self._deadline_timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            self._deadline_timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    # -- public ----------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._status is not None

    @property
    def status(self) -> RpcError | None:
        """The final status (code OK included) once the call ended, else None."""
        return self._status

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return received_metadata(self._headers or [])

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return received_metadata(self._trailers)

    async def write(self, message: bytes) -> None:
        """Send one message; waits for flow-control window. Raises RpcError if the call already ended."""
        await self._send(PREFIX.pack(0, len(message)) + message, end_stream=False)

    async def done_writing(self) -> None:
        """Half-close: no more messages from us; responses keep coming."""
        await self._send(b"", end_stream=True)

    async def read(self) -> bytes | None:
        while True:
            if self._messages:
                msg = self._messages.popleft()
                if not self._messages:
                    self._ack()
                return msg
            if self._status is not None:
                if self._status.code == StatusCode.OK:
                    return None
                raise self._status
            self._readable.clear()
            await self._readable.wait()

    def cancel(self, details: str = "cancelled by the client") -> None:
        """Abandon the call: RST_STREAM(CANCEL) to the server, ``CANCELLED`` locally."""
        if self._status is None:
            self._conn.reset(self.stream_id, ErrorCodes.CANCEL)
            self._finish(RpcError(StatusCode.CANCELLED, details))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (msg := await self.read()) is not None:
            yield msg

    # -- sending ---------------------------------------------------------------------------------------
    async def _send(self, data: bytes, *, end_stream: bool) -> None:
        async with self._write_lock:
            await self._send_locked(data, end_stream=end_stream)

    async def _send_locked(self, data: bytes, *, end_stream: bool) -> None:
        if self._half_closed:
            raise RpcError(StatusCode.INTERNAL, "write after done_writing")
        view = memoryview(data)
        while True:
            if self._status is not None:
                if self._status.code == StatusCode.OK:  # the server finished first: nothing to send to
                    return
                raise self._status
            window = self._conn.send_window(self.stream_id)
            if window <= 0 and view:
                self._writable.clear()
                await self._writable.wait()
                continue
            chunk, view = view[:window], view[window:]
            last = end_stream and not view
            self._conn.send_data(self.stream_id, bytes(chunk), end_stream=last)
            if last:
                self._half_closed = True
            await self._conn.drain()
            if not view:
                return

    # -- events from the connection ---------------------------------------------------------------------
    def _on_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        status = dict(headers).get(b":status", b"0")
        self._http_status = int(status) if status.isdigit() else 0
        if self._http_status != 200 or b"grpc-status" in dict(headers):
            return  # decided when the stream ends (trailers-only or an HTTP error)
        ctype = dict(headers).get(b"content-type", b"")
        if not ctype.startswith(b"application/grpc"):
            self._conn.reset(self.stream_id, ErrorCodes.CANCEL)
            self._finish(
                RpcError(StatusCode.UNKNOWN, f"response content-type {ctype.decode()!r} is not gRPC")
            )

    def _on_data(self, data: bytes, flow_len: int) -> None:
        if self._status is not None or self._http_status != 200:  # ended, or an HTTP error page
            self._conn.ack(self.stream_id, flow_len)
            return
        self._unacked += flow_len
        self._buf += data
        while len(self._buf) >= 5:
            flag, length = PREFIX.unpack_from(self._buf)
            if flag != 0:
                what = "a compressed" if flag == 1 else f"a flag {flag}"
                return self._fail_local(
                    StatusCode.INTERNAL,
                    f"received {what} message; this client accepts only uncompressed (identity) messages",
                )
            if length > self._max_message:
                return self._fail_local(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"received message of {length} bytes, larger than the limit {self._max_message}",
                )
            if len(self._buf) < 5 + length:
                break
            self._messages.append(bytes(self._buf[5 : 5 + length]))
            del self._buf[: 5 + length]
        if not self._messages:  # the bytes complete a message in progress: let the peer send the rest
            self._ack()
        else:
            self._readable.set()

    def _on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self._trailers = trailers

    def _on_end(self) -> None:
        if self._status is not None:
            return
        status = status_from(self._trailers or self._headers or [], self._http_status)
        if status.code == StatusCode.OK and self._buf:
            status = RpcError(StatusCode.INTERNAL, f"stream ended inside a message ({len(self._buf)} bytes)")
        self._finish(status)

    def _on_reset(self, error_code: int) -> None:
        try:
            code = RESET_TO_GRPC.get(ErrorCodes(error_code), StatusCode.INTERNAL)
        except ValueError:
            code = StatusCode.INTERNAL
        self._finish(RpcError(code, f"stream reset by the server (HTTP/2 error {error_code})"))

    def _fail_local(self, code: StatusCode, details: str) -> None:
        self._conn.reset(self.stream_id, ErrorCodes.CANCEL)
        self._finish(RpcError(code, details))

    def _expire(self) -> None:
        if self._status is None:
            self._conn.reset(self.stream_id, ErrorCodes.CANCEL)
            self._finish(RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _finish(self, status: RpcError) -> None:
        if self._status is not None:
            return
        self._status = status
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        # No more data comes on this stream: return its window share to the connection now.
        self._ack()
        self._readable.set()
        self._writable.set()
        self._conn.forget(self.stream_id)

    def _ack(self) -> None:
        if self._unacked:
            self._conn.ack(self.stream_id, self._unacked)
            self._unacked = 0
