"""asyncio streams over a sans-I/O TLS client session that is not Python's ``ssl`` module.

Why: ztunnel-py's C byte path links its own OpenSSL. Running its control-plane TLS (xDS, CA) on that one
too (``istiopy.dataplane.fastpath.client_tls``) means the node proxy never loads Python's ``ssl`` and the
system OpenSSL beside it (~4-6 MB of RSS). The session object does all of TLS; this module only moves
bytes between it, the socket and a ``StreamReader``/``StreamWriter`` pair, the way ``asyncio.sslproto``
does for ``ssl.SSLObject``.

    reader, writer = await open_connection("istiod", 15012, tls, server_hostname="istiod.istio-system.svc")
    writer.get_extra_info("alpn")  # the negotiated protocol ("h2"), also set for stdlib TLS by grpc_h2
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable


class TlsSession(Protocol):
    """One client session over memory: ciphertext in with ``feed``, out with ``take``."""

    @property
    def peer_closed(self) -> bool: ...
    def feed(self, data: bytes) -> None: ...
    def handshake(self) -> bool: ...
    def read(self) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def take(self) -> bytes: ...
    def close_notify(self) -> None: ...
    def alpn(self) -> str | None: ...


@runtime_checkable
class TlsClient(Protocol):
    """What makes sessions (roots, client certificate and ALPN fixed): ``session(server_hostname)``."""

    def session(self, server_hostname: str, /) -> TlsSession: ...


class TlsFactory(Protocol):
    """Builds the client TLS of a gRPC channel from PEM: ``grpc_h2.client_ssl_context`` (Python's ``ssl``)
    or the node proxy's ``fastpath.client_tls``; returns an ``ssl.SSLContext`` or a :class:`TlsClient`."""

    def __call__(self, roots_pem: str, *, client_cert: tuple[str, str] | None = None) -> Any: ...


class _AppTransport(asyncio.Transport):
    """The transport the stream protocol sees: plaintext in, plaintext out."""

    def __init__(self, tls: _TlsProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.send(bytes(data))

    def is_closing(self) -> bool:
        return self._tls.closing

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "alpn":
            return self._tls.session.alpn()
        if name == "tls_session":
            return self._tls.session
        return self._tls.raw.get_extra_info(name, default) if self._tls.raw is not None else default

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close (close_notify ends both directions for most peers)

    def pause_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.raw is not None and self._tls.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.raw is not None:
            self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size() if self._tls.raw is not None else 0


class _TlsProtocol(asyncio.Protocol):
    """The socket's protocol: feeds the session, completes the handshake, hands plaintext up."""

    def __init__(self, session: TlsSession, app: asyncio.Protocol, ready: asyncio.Future[None]) -> None:
        self.session = session
        self.app = app
        self.ready = ready
        self.raw: asyncio.Transport | None = None
        self.transport = _AppTransport(self)
        self.up = False
        self.closing = False
        self._eof = False

    # -- from the socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        try:
            self.session.feed(data)
        except ConnectionError as e:
            self._fail(e)
            return
        self._step()

    def eof_received(self) -> bool:
        if not self.up:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
        else:
            self.app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if not self.ready.done():
            lost = exc or ConnectionResetError("connection closed during the TLS handshake")
            self.ready.set_exception(lost)
        elif self.up:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # -- from the stream
    def send(self, data: bytes) -> None:
        if self.closing or self.raw is None:
            return
        try:
            self.session.write(data)
        except ConnectionError as e:
            self._fail(e)
            return
        self._flush()

    def close(self) -> None:
        if self.closing or self.raw is None:
            return
        self.closing = True
        if self.up:
            self.session.close_notify()
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    # -- the state machine
    def _step(self) -> None:
        try:
            if not self.up:
                if not self.session.handshake():
                    self._flush()
                    return
                self.up = True
                self._flush()
                self.app.connection_made(self.transport)
                if not self.ready.done():
                    self.ready.set_result(None)
            plain = self.session.read()
        except ConnectionError as e:
            self._flush()  # the alert, if any, tells the peer why
            self._fail(e)
            return
        if plain:
            self.app.data_received(plain)
        self._flush()
        if self.session.peer_closed and not self.closing and not self._eof:
            self._eof = True
            self.app.eof_received()

    def _flush(self) -> None:
        out = self.session.take()
        if out and self.raw is not None and not self.raw.is_closing():
            self.raw.write(out)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.abort()


async def open_connection(
    host: str,
    port: int,
    tls: TlsClient,
    *,
    server_hostname: str,
    path: str = "",
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` with TLS from ``tls`` (TCP ``host:port``, or the Unix socket ``path``).

    Raises ``OSError`` (``ConnectionError`` for TLS failures, naming the reason) when the handshake fails.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    app = asyncio.StreamReaderProtocol(reader, loop=loop)
    ready: asyncio.Future[None] = loop.create_future()
    proto = _TlsProtocol(tls.session(server_hostname), app, ready)
    if path:
        await loop.create_unix_connection(lambda: proto, path)
    else:
        await loop.create_connection(lambda: proto, host, port)
    try:
        await ready
    except BaseException:
        proto.abort()
        raise
    return reader, asyncio.StreamWriter(proto.transport, app, reader, loop)
