"""The channel: dials lazily, replaces a dead or departing connection, builds request headers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h2.exceptions

from istiopy.api.grpc_h2.call import PREFIX, Call
from istiopy.api.grpc_h2.connection import READ_CHUNK, Connection
from istiopy.api.grpc_h2.status import (
    Header,
    Metadata,
    RpcError,
    StatusCode,
    encode_timeout,
    metadata_headers,
)
from istiopy.api.grpc_h2.target import parse_target
from istiopy.api.tls_stream import TlsClient, open_connection

if TYPE_CHECKING:
    import ssl

USER_AGENT = "istiopy-grpc-h2/1"
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
CONNECT_TIMEOUT = 20.0


class Channel:
    """A lazily connected gRPC channel to ``target``: TLS when ``ssl_context`` is given, else plaintext.

    ``ssl_context`` is an ``ssl.SSLContext`` or a :class:`~istiopy.api.tls_stream.TlsClient` (TLS from
    another OpenSSL than Python's: the node proxy's own, so it never loads the ``ssl`` module).

    ``server_name`` overrides the name the TLS handshake sends (SNI) and verifies, and ``:authority``
    (what grpc's ``ssl_target_name_override`` does). ``keepalive_time`` sends a PING every that many
    seconds and drops the connection if no ACK arrives within ``keepalive_timeout`` (off by default:
    grpc servers answer pings they did not allow with GOAWAY ENHANCE_YOUR_CALM).
    """

    def __init__(
        self,
        target: str,
        *,
        ssl_context: ssl.SSLContext | TlsClient | None = None,
        server_name: str | None = None,
        user_agent: str = USER_AGENT,
        max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE,
        connect_timeout: float = CONNECT_TIMEOUT,
        keepalive_time: float | None = None,
        keepalive_timeout: float = 20.0,
    ) -> None:
        self.target = target
        self._target = parse_target(target)
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.user_agent = user_agent
        self.max_receive_message_bytes = max_receive_message_bytes
        self.connect_timeout = connect_timeout
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.connects = 0
        self._conn: Connection | None = None
        self._dial_lock = asyncio.Lock()
        self._closed = False

    @property
    def authority(self) -> str:
        return self.server_name or self._target.authority

    async def _connection(self, deadline: float | None) -> Connection:
        if self._closed:
            raise RpcError(StatusCode.CANCELLED, "channel closed")
        async with self._dial_lock:
            if self._conn is not None and self._conn.usable:
                return self._conn
            loop = asyncio.get_running_loop()
            timeout = self.connect_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - loop.time())
                if timeout <= 0:
                    raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before connecting")
            self._conn = await self._dial(timeout, deadline is not None and timeout < self.connect_timeout)
            self.connects += 1
            return self._conn

    async def _dial(self, limit: float, deadline_bound: bool) -> Connection:
        t = self._target
        ctx = self.ssl_context
        try:
            async with asyncio.timeout(limit):
                if isinstance(ctx, TlsClient):
                    reader, writer = await open_connection(
                        t.host,
                        t.port,
                        ctx,
                        server_hostname=self.server_name or (t.host if not t.path else "localhost"),
                        path=t.path,
                        limit=READ_CHUNK,
                    )
                elif t.path:
                    reader, writer = await asyncio.open_unix_connection(
                        t.path, ssl=ctx, server_hostname=(self.server_name or "localhost") if ctx else None
                    )
                else:
                    reader, writer = await asyncio.open_connection(
                        t.host,
                        t.port,
                        ssl=ctx,
                        server_hostname=(self.server_name or t.host) if ctx else None,
                        limit=READ_CHUNK,
                    )
        except TimeoutError:
            if deadline_bound:
                msg = f"deadline exceeded connecting to {self.target}"
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, msg) from None
            raise RpcError(StatusCode.UNAVAILABLE, f"timed out connecting to {self.target}") from None
        except OSError as e:  # ssl.SSLError and TlsError are OSErrors
            raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {self.target}: {e}") from e
        if ctx is not None:
            alpn = _alpn(writer)
            if alpn not in (None, "h2"):
                writer.close()
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.target} negotiated ALPN {alpn!r}, not h2")
        return Connection(
            reader, writer, keepalive_time=self.keepalive_time, keepalive_timeout=self.keepalive_timeout
        )

    def _headers(self, method: str, metadata: Metadata, timeout: float | None) -> list[Header]:
        if not method.startswith("/"):
            raise ValueError(f"method {method!r} must look like /package.Service/Method")
        headers: list[Header] = [
            (":method", "POST"),
            (":scheme", "https" if self.ssl_context is not None else "http"),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", self.user_agent),
            ("grpc-accept-encoding", "identity"),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", encode_timeout(timeout)))
        headers.extend(metadata_headers(metadata))
        return headers

    async def stream_stream(
        self,
        method: str,
        *,
        metadata: Metadata = (),
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, sent as grpc-timeout
    ) -> Call:
        """Start a call (request headers sent); write, half-close and read on the returned :class:`Call`."""
        headers = self._headers(method, metadata, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        conn = await self._connection(deadline)
        try:
            return await conn.open_call(headers, self.max_receive_message_bytes, deadline)
        except h2.exceptions.ProtocolError as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"cannot open a stream: {e}") from e

    async def unary_unary(
        self,
        method: str,
        request: bytes,
        *,
        metadata: Metadata = (),
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, sent as grpc-timeout
    ) -> bytes:
        """One request, one response; raises :class:`RpcError` for any status but OK."""
        call = await self.stream_stream(method, metadata=metadata, timeout=timeout)
        try:
            await call._send(PREFIX.pack(0, len(request)) + request, end_stream=True)
            reply = await call.read()
            if reply is None:
                raise RpcError(StatusCode.INTERNAL, "the server sent no response message")
            if await call.read() is not None:
                raise RpcError(StatusCode.INTERNAL, "the server sent more than one response message")
            return reply
        finally:
            call.cancel()  # a no-op when the call ended; otherwise (error, task cancelled) reset it

    async def close(self) -> None:
        """Close the connection; open calls end with CANCELLED. A closed channel refuses new calls."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _alpn(writer: asyncio.StreamWriter) -> Any:
    """The negotiated ALPN protocol of either kind of TLS stream."""
    tls = writer.get_extra_info("ssl_object")
    if tls is not None:
        return tls.selected_alpn_protocol()
    return writer.get_extra_info("alpn")
