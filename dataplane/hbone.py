"""HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mutual TLS (the pure-Python byte path).

Public API (stable; the ztunnel core plugs policy and dialing in through ``on_connect``)::

    # server (inbound, port 15008)
    async def on_connect(req: ConnectRequest) -> Decision:      # RBAC + dial the app here
        if not allowed(req.peer_identity, req.host, req.port):
            return Reject(401, "denied by policy")
        sock = await sockets.async_connect_in_netns(pod_fd, (req.host, req.port))   # 503 if it raises
        return Accept(await TcpStream.from_socket(sock), on_done=record_metrics)
    server = HboneServer(on_connect, ssl_context_or_picker)
    await server.serve(listening_socket)          # or: await server.handle_socket(accepted_socket)
    await server.close()

    # client (outbound): pooled per (src identity, dst identity, dst ip), <=100 streams per connection
    pool = HbonePool(max_streams_per_conn=100, idle_timeout=300.0)
    stream = await pool.open_stream(PoolKey(src_id, dst_id, dst_ip), (dst_ip, 15008), "10.0.0.5:8080",
                                    hbone_headers(src_addr=("10.0.0.4", 51234)), client_ctx,
                                    expected_identities={dst_id}, connect=dial_from_pod_netns)
    result = await relay(TcpStream(reader, writer), stream)   # -> RelayResult(a_to_b, b_to_a, error)
    await pool.close()

* ``ByteStream`` is the small interface both sides of a relay implement: ``read``, ``write``,
  ``close_write`` (half-close), ``reset`` (abortive close), ``aclose``. ``HboneStream`` (one CONNECT stream)
  and ``TcpStream`` (an asyncio TCP connection) implement it; ``relay`` pumps bytes between any two. The later
  C byte path replaces ``relay`` (and ``TcpStream``) behind the same names.
* Semantics mirrored on purpose: END_STREAM <-> TCP FIN (``shutdown(SHUT_WR)``), RST_STREAM <-> TCP RST
  (``SO_LINGER`` 0), status 200 then bytes, 400 for a non-CONNECT request or a bad ``:authority``, 401 when
  ``on_connect`` rejects, 503 when it raises (the upstream dial failed).
* Flow control is real: received DATA is acknowledged to the peer only once the reader consumed it, so a
  stream buffers at most its window (4 MiB) and a connection at most 16 MiB, whatever the peer does.
* A peer that breaks HTTP/2 (garbage, a header block over 64 KiB) gets a GOAWAY and its connection closed;
  streams beyond the advertised SETTINGS_MAX_CONCURRENT_STREAMS (100) are refused one by one with
  RST_STREAM(REFUSED_STREAM) while the client's other streams carry on.

Why h2 (sans-IO) with our own asyncio loop instead of an HTTP framework: HBONE needs CONNECT streams as raw
byte pipes with half-close and reset, which request/response frameworks hide.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Collection, Hashable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import PeerIdentityError, peer_identity, verify_peer_identity

# The shared vocabulary lives in ``tunnel`` (the C byte path uses it without importing this module and h2);
# re-exported so ``hbone.Accept is tunnel.Accept`` and existing callers keep their imports.
from istiopy.dataplane.tunnel import (
    CONN_WINDOW,
    DEFAULT_MAX_STREAMS,
    HBONE_PORT,
    READ_CHUNK,
    STREAM_WINDOW,
    Accept,
    ByteStream,
    ConnectRequest,
    Decision,
    HboneError,
    OnConnect,
    PoolKey,
    Reject,
    RelayResult,
    TcpStream,
    build_baggage,
    hbone_headers,
    new_traceparent,
    parse_authority,
    relay,
)

__all__ = [
    "CONN_WINDOW",
    "DEFAULT_MAX_STREAMS",
    "HBONE_PORT",
    "STREAM_WINDOW",
    "Accept",
    "ByteStream",
    "ConnectRequest",
    "Decision",
    "HboneError",
    "HbonePool",
    "HboneServer",
    "HboneStream",
    "PoolKey",
    "Reject",
    "RelayResult",
    "StreamReset",
    "TcpStream",
    "build_baggage",
    "hbone_headers",
    "new_traceparent",
    "parse_authority",
    "relay",
]

log = logging.getLogger(__name__)

MAX_HEADER_LIST_SIZE = 64 * 1024
# Control frames we owe a peer that does not read (PING/SETTINGS acks) may not pile up beyond this.
MAX_PENDING_WRITE = 8 * 1024 * 1024
CLOSE_TIMEOUT = 2.0
_H2_DEFAULT_WINDOW = 65535


class StreamReset(ConnectionResetError):
    """The stream was reset (by the peer or locally); ``code`` is the HTTP/2 error code."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset ({ErrorCodes(code).name if code in _CODES else code})")
        self.code = code


_CODES = {int(c) for c in ErrorCodes}


# ---------------------------------------------------------------------------------------------------------
# HTTP/2 connection engine shared by client and server


class HboneStream:
    """One CONNECT stream: a ``ByteStream`` with the request/response headers attached."""

    def __init__(self, conn: _Conn, stream_id: int, request_headers: dict[str, str]) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request_headers = request_headers
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self._response: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._buf: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._recv_ready = asyncio.Event()
        self._send_ready = asyncio.Event()
        self._local_closed = False
        self._remote_closed = False
        self._reset_code: int | None = None
        self._finished = False
        self.on_finished: Callable[[HboneStream], None] | None = None

    # -- facts -----------------------------------------------------------------------------------------
    @property
    def peer_identity(self) -> SpiffeId | None:
        """The SPIFFE id the TLS peer proved (server side: the client; client side: the server)."""
        return self._conn.peer_identity

    @property
    def reset_code(self) -> int | None:
        """The HTTP/2 error code if the stream was reset (either side), else None."""
        return self._reset_code

    @property
    def finished(self) -> bool:
        """True once both directions ended or the stream was reset."""
        return self._finished

    # -- ByteStream ------------------------------------------------------------------------------------------
    async def read(self, n: int = READ_CHUNK) -> bytes:
        while not self._buf:
            # END_STREAM then RST_STREAM(NO_ERROR) is a complete response whose sender no longer wants our
            # bytes (RFC 9113 8.1: the response must not be discarded); Envoy ends a CONNECT that way when
            # its side closed first. Our read direction ended cleanly: EOF, not a reset.
            if self._remote_closed and self._reset_code in (None, ErrorCodes.NO_ERROR):
                return b""
            if self._reset_code is not None:
                raise StreamReset(self._reset_code)
            if self._conn.dead:
                raise ConnectionResetError("HBONE connection lost")
            self._recv_ready.clear()
            await self._recv_ready.wait()
        chunk = self._buf[0]
        if len(chunk) <= n:
            self._buf.popleft()
            out = chunk
        else:
            out, self._buf[0] = chunk[:n], chunk[n:]
        self._buffered -= len(out)
        self._conn.ack_data(self.stream_id, len(out))
        return out

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        h2c = self._conn.h2
        while view:
            self._check_writable()
            try:
                window = min(h2c.local_flow_control_window(self.stream_id), h2c.max_outbound_frame_size)
            except h2.exceptions.ProtocolError as e:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, "stream closed") from e
            if window <= 0:
                self._send_ready.clear()
                await self._send_ready.wait()
                continue
            n = min(window, len(view))
            try:
                h2c.send_data(self.stream_id, view[:n].tobytes())
            except h2.exceptions.ProtocolError as e:
                raise StreamReset(ErrorCodes.STREAM_CLOSED, "stream closed") from e
            view = view[n:]
            self._conn.flush()
            await self._conn.drain()

    async def close_write(self) -> None:
        if self._local_closed or self._reset_code is not None or self._conn.dead:
            return
        self._local_closed = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.h2.end_stream(self.stream_id)
        self._conn.flush()
        self._maybe_finish()

    def reset(self, code: int = ErrorCodes.CONNECT_ERROR) -> None:
        """Abort the stream. The default code is CONNECT_ERROR: for a CONNECT stream a reset means the
        tunneled TCP connection broke (RFC 9113 section 8.5), which is what Envoy sends too."""
        if self._finished:
            return
        if self._reset_code is None:
            self._reset_code = int(code)
            if not self._conn.dead:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._conn.h2.reset_stream(self.stream_id, code)
                self._conn.flush()
        self._wake()
        self._maybe_finish()

    async def aclose(self) -> None:
        if not self._finished and not (self._local_closed and self._remote_closed):
            self.reset(ErrorCodes.CANCEL)

    def __repr__(self) -> str:
        return f"HboneStream(id={self.stream_id}, status={self.status}, reset={self._reset_code})"

    # -- engine callbacks ------------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._reset_code is not None:
            raise StreamReset(self._reset_code)
        if self._conn.dead:
            raise ConnectionResetError("HBONE connection lost")
        if self._local_closed:
            raise BrokenPipeError("write after close_write")

    def _wake(self) -> None:
        self._recv_ready.set()
        self._send_ready.set()
        if not self._response.done():
            self._response.set_exception(StreamReset(self._reset_code or ErrorCodes.CANCEL))
            self._response.exception()  # mark retrieved: nobody may be waiting

    def _feed(self, data: bytes, flow_controlled: int) -> None:
        if flow_controlled > len(data):  # padding is never handed to the reader: give it back now
            self._conn.ack_data(self.stream_id, flow_controlled - len(data))
        if self._reset_code is not None:
            self._conn.ack_data(self.stream_id, len(data))
            return
        if data:
            self._buf.append(data)
            self._buffered += len(data)
        self._recv_ready.set()

    def _on_end(self) -> None:
        self._remote_closed = True
        self._recv_ready.set()
        self._maybe_finish()

    def _on_reset(self, code: int) -> None:
        if self._reset_code is None:
            self._reset_code = int(code)
        self._wake()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._finished:
            return
        if self._reset_code is not None or (self._local_closed and self._remote_closed) or self._conn.dead:
            self._finished = True
            self._conn.stream_finished(self)
            if self.on_finished is not None:
                cb, self.on_finished = self.on_finished, None
                cb(self)


class _NoStreamLimit:
    """``local_settings`` as h2 sees it while it opens a stream we are about to refuse (see below)."""

    max_concurrent_streams = 2**31 - 1

    def __init__(self, inner: h2.settings.Settings) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def __getitem__(self, key: object) -> object:
        return self._inner[key]  # type: ignore[index]


class _ServerH2Connection(h2.connection.H2Connection):
    """h2 treats a HEADERS frame beyond our advertised SETTINGS_MAX_CONCURRENT_STREAMS as a connection error
    (GOAWAY: every stream of the client dies). RFC 9113 5.1.2 allows refusing just that stream, which is what
    a proxy wants: the excess stream is opened (so HPACK and stream-id state stay exact) and immediately
    reset with REFUSED_STREAM, and the client's other streams carry on."""

    def _receive_headers_frame(self, frame: object) -> tuple[list[object], list[h2.events.Event]]:  # type: ignore[override]
        sid = getattr(frame, "stream_id", 0)
        if sid in self.streams or self.open_inbound_streams < self.local_settings.max_concurrent_streams:
            return super()._receive_headers_frame(frame)  # type: ignore[arg-type,return-value]
        settings = self.local_settings
        self.local_settings = _NoStreamLimit(settings)  # type: ignore[assignment]
        try:
            frames, events = super()._receive_headers_frame(frame)  # type: ignore[arg-type]
        finally:
            self.local_settings = settings
        self._prepare_for_sending(frames)
        self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        return [], [e for e in events if getattr(e, "stream_id", None) != sid]


class _Conn:
    """An HTTP/2 connection over an established TLS stream: frames in, events to streams, frames out."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client_side: bool,
        max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
        peer_identity: SpiffeId | None = None,
        on_request: Callable[[HboneStream], None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client_side = client_side
        self.peer_identity = peer_identity
        self.on_request = on_request
        cfg = h2.config.H2Configuration(
            client_side=client_side, header_encoding="utf-8", validate_inbound_headers=True
        )
        self.h2 = h2.connection.H2Connection(cfg) if client_side else _ServerH2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            },
        )
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - _H2_DEFAULT_WINDOW)
        self.streams: dict[int, HboneStream] = {}
        self.dead = False
        self.goaway = False
        self.error: BaseException | None = None
        self.closed = asyncio.Event()
        self.handlers = 0  # server: stream handler tasks still running for this connection
        self._task: asyncio.Task[None] | None = None
        self.flush()

    # -- output ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.dead and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        if self.dead:
            raise ConnectionResetError("HBONE connection lost")
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise ConnectionResetError("HBONE connection lost") from e

    def ack_data(self, stream_id: int, n: int) -> None:
        if n <= 0 or self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, ValueError):
            self.h2.acknowledge_received_data(n, stream_id)
        self.flush()

    @property
    def remote_max_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def stream_finished(self, stream: HboneStream) -> None:
        self.streams.pop(stream.stream_id, None)

    # -- client ----------------------------------------------------------------------------------------
    async def open_stream(
        self, authority: str, headers: Sequence[tuple[str, str]], response_timeout: float
    ) -> HboneStream:
        if self.dead or self.goaway:
            raise ConnectionResetError("HBONE connection not usable")
        sid = self.h2.get_next_available_stream_id()
        req = [(":method", "CONNECT"), (":authority", authority), *headers]
        self.h2.send_headers(sid, req)  # TooManyStreamsError if the server's limit is reached
        stream = HboneStream(self, sid, {k: v for k, v in req})
        self.streams[sid] = stream
        self.flush()
        try:
            status = await asyncio.wait_for(asyncio.shield(stream._response), response_timeout)
        except BaseException:
            stream.reset(ErrorCodes.CANCEL)
            raise
        if status != 200:
            stream.reset(ErrorCodes.CANCEL) if not stream._remote_closed else stream._on_reset(0)
            raise HboneError(f"HBONE CONNECT {authority} answered {status}", status)
        return stream

    # -- server ----------------------------------------------------------------------------------------
    def respond(self, stream: HboneStream, status: int, *, end_stream: bool) -> None:
        if stream.finished or self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.send_headers(stream.stream_id, [(":status", str(status))], end_stream=end_stream)
        stream.status = status
        if end_stream:
            stream._local_closed = True
            if not stream._remote_closed:  # we are done with this stream; do not wait for the client's end
                stream.reset(ErrorCodes.NO_ERROR)
        self.flush()
        stream._maybe_finish()

    # -- input loop ------------------------------------------------------------------------------------
    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run())
        return self._task

    async def run(self) -> None:
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.debug("HBONE peer broke HTTP/2: %s", e)
                    self.error = e
                    self.flush()  # the GOAWAY h2 prepared
                    break
                for ev in events:
                    self._dispatch(ev)
                self.flush()
                transport = self.writer.transport
                if transport.get_write_buffer_size() > MAX_PENDING_WRITE:
                    self.error = ConnectionError("peer does not read")
                    break
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.error = e
        finally:
            await self._teardown()

    async def close(self) -> None:
        """GOAWAY, then close the transport; open streams fail with ConnectionResetError."""
        if not self.dead:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.flush()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        else:
            await self._teardown()

    async def _teardown(self) -> None:
        if self.dead:
            return
        self.dead = True
        for s in list(self.streams.values()):
            s._wake()
            s._maybe_finish()
        self.streams.clear()
        self.writer.close()
        try:  # a polite TLS close_notify exchange, but a silent peer cannot hold us
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        except (Exception, asyncio.CancelledError):
            self.writer.transport.abort()
        self.closed.set()

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev)
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                hdrs = _header_dict(ev.headers or [])
                try:
                    s.status = int(hdrs.get(":status", "0"))
                except ValueError:
                    s.status = 0
                s.response_headers = hdrs
                if not s._response.done():
                    s._response.set_result(s.status)
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            s = self.streams.get(sid)
            data = ev.data or b""
            fcl = ev.flow_controlled_length or 0
            if s is None:
                self.ack_data(sid, fcl)
            else:
                s._feed(data, fcl)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                if not s._response.done():  # END_STREAM without response headers
                    s._response.set_exception(HboneError("stream ended without a response"))
                    s._response.exception()
                s._on_end()
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                s._on_reset(int(ev.error_code or 0))
        elif isinstance(ev, h2.events.WindowUpdated):
            if not ev.stream_id:
                for s in self.streams.values():
                    s._send_ready.set()
            elif (s := self.streams.get(ev.stream_id)) is not None:
                s._send_ready.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for s in self.streams.values():
                s._send_ready.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id or 0
            for sid, s in list(self.streams.items()):
                if self.client_side and sid > last:
                    s._on_reset(ErrorCodes.REFUSED_STREAM)

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id or 0
        stream = HboneStream(self, sid, _header_dict(ev.headers or []))
        self.streams[sid] = stream
        if ev.stream_ended:
            stream._remote_closed = True
        if self.on_request is None or self.goaway:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        self.on_request(stream)


def _header_dict(headers: Sequence[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        ks = k.decode("latin-1") if isinstance(k, bytes) else k
        vs = v.decode("latin-1") if isinstance(v, bytes) else v
        out[ks.lower()] = f"{out[ks.lower()]},{vs}" if ks.lower() in out else vs
    return out


# ---------------------------------------------------------------------------------------------------------
# Server


# A picker may return an awaitable (a certificate still being issued): the handshake waits for it, bounded
# by the handshake timeout.
ContextPicker = ssl.SSLContext | Callable[[str], ssl.SSLContext | Awaitable[ssl.SSLContext]]


class HboneServer:
    """Terminates HBONE: mTLS (TLS 1.3, ALPN h2, client cert required), CONNECT streams, relay.

    ``ssl_context`` may be a callable taking the local (original destination) IP, so one listener can serve
    the certificate of whichever pod the client dialed (no SNI in HBONE). ``trust_domain`` pins client
    identities to one trust domain when set. At most ``max_connections`` connections (including those
    still handshaking within ``handshake_timeout``) are served at once; more are closed on accept.
    """

    def __init__(
        self,
        on_connect: OnConnect,
        ssl_context: ContextPicker,
        *,
        max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
        handshake_timeout: float = 10.0,
        max_connections: int = 4096,
        trust_domain: str | None = None,
    ) -> None:
        self.on_connect = on_connect
        self.ssl_context = ssl_context
        self.max_concurrent_streams = max_concurrent_streams
        self.handshake_timeout = handshake_timeout
        self.trust_domain = trust_domain
        self._listeners: list[socket.socket] = []
        self._accepters: list[asyncio.Task[None]] = []
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshake_failures = 0
        self.max_connections = max_connections
        self.refused_connections = 0
        self.refused_streams = 0

    @property
    def connections(self) -> int:
        """Open HTTP/2 connections (for tests and metrics)."""
        return len(self._conns)

    @property
    def streams(self) -> int:
        """Open CONNECT streams across all connections."""
        return sum(c.active_streams for c in self._conns)

    async def serve(self, sock: socket.socket) -> asyncio.Task[None]:
        """Accept connections on a listening socket (e.g. one created inside a pod's netns) until closed.

        Returns the accept-loop task; ``close()`` stops it and closes the listening socket.
        """
        sock.setblocking(False)
        self._listeners.append(sock)
        task = asyncio.create_task(self._accept_loop(sock))
        self._accepters.append(task)
        return task

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if lsock.fileno() < 0:
                    return
                log.warning("HBONE accept failed: %s", e)
                await asyncio.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            if len(self._handlers) >= self.max_connections:  # bounded: a flood cannot exhaust fds/memory
                self.refused_connections += 1
                sock.close()
                continue
            t = asyncio.create_task(self.handle_socket(sock))
            self._handlers.add(t)
            t.add_done_callback(self._handlers.discard)

    async def close(self) -> None:
        """Stop listening and close every connection (their streams are reset)."""
        for t in self._accepters:
            t.cancel()
        await asyncio.gather(*self._accepters, return_exceptions=True)
        self._accepters.clear()
        for ls in self._listeners:
            ls.close()
        self._listeners.clear()
        await asyncio.gather(*(c.close() for c in list(self._conns)), return_exceptions=True)
        for t in list(self._tasks) + list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)

    async def handle_socket(self, sock: socket.socket) -> None:
        """Serve one accepted TCP connection to the end (TLS handshake, HTTP/2, streams); closes ``sock``.

        TLS is set up on the raw socket before anything reads from it: an upgrade of an already-reading
        stream would race with a client that sends its ClientHello at once.
        """
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setblocking(False)
            try:
                local = sock.getsockname()
                peer = sock.getpeername()
            except OSError:
                sock.close()
                return
            ctx = self.ssl_context if isinstance(self.ssl_context, ssl.SSLContext) else None
            try:
                if ctx is None:
                    picked = self.ssl_context(local[0])  # type: ignore[operator]
                    ctx = (
                        picked
                        if isinstance(picked, ssl.SSLContext)
                        else await asyncio.wait_for(picked, self.handshake_timeout)
                    )
                reader = asyncio.StreamReader(limit=READ_CHUNK)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
                )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                tls = writer.get_extra_info("ssl_object")
                if tls is None or tls.selected_alpn_protocol() != "h2":
                    raise PeerIdentityError("client did not negotiate ALPN h2")
                ident = peer_identity(tls, self.trust_domain)
            except (ssl.SSLError, ConnectionError, OSError, TimeoutError, ValueError, LookupError) as e:
                self.handshake_failures += 1
                log.debug("HBONE handshake from %s failed: %r", peer, e)
                if writer is not None:
                    writer.transport.abort()
                else:
                    sock.close()
                return
            conn = _Conn(
                reader,
                writer,
                client_side=False,
                max_concurrent_streams=self.max_concurrent_streams,
                peer_identity=ident,
            )
            conn.on_request = lambda stream, c=conn: self._spawn(c, stream)
            self._conns.add(conn)
            await conn.run()
        finally:
            if conn is not None:
                self._conns.discard(conn)
                await conn.close()
            elif writer is not None and not writer.is_closing():
                writer.transport.abort()

    def _spawn(self, conn: _Conn, stream: HboneStream) -> None:
        # Streams reset right after opening ("rapid reset") do not count against the concurrency limit, but
        # their handlers (dialing upstream) still run: bound the handlers per connection as well.
        if conn.handlers >= 2 * self.max_concurrent_streams:
            self.refused_streams += 1
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        conn.handlers += 1
        t = asyncio.create_task(self._serve_stream(conn, stream))
        self._tasks.add(t)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            conn.handlers -= 1

        t.add_done_callback(done)

    async def _serve_stream(self, conn: _Conn, stream: HboneStream) -> None:
        upstream: ByteStream | None = None
        try:
            hdrs = stream.request_headers
            if hdrs.get(":method") != "CONNECT":
                conn.respond(stream, 400, end_stream=True)
                return
            try:
                host, port = parse_authority(hdrs.get(":authority"))
            except ValueError:
                conn.respond(stream, 400, end_stream=True)
                return
            req = ConnectRequest(
                authority=hdrs[":authority"],
                host=host,
                port=port,
                headers={k: v for k, v in hdrs.items() if not k.startswith(":")},
                peer_identity=conn.peer_identity,
                peer_addr=conn.writer.get_extra_info("peername"),
                local_addr=conn.writer.get_extra_info("sockname"),
                stream=stream,
            )
            try:
                decision = await self.on_connect(req)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("HBONE upstream for %s failed: %s", req.authority, e)
                decision = Reject(503, str(e))
            if isinstance(decision, Reject):
                conn.respond(stream, decision.status, end_stream=True)
                return
            upstream = decision.upstream
            if stream.finished:  # the client gave up while we were dialing
                upstream.reset()
                return
            conn.respond(stream, 200, end_stream=False)
            result = await relay(stream, upstream)
            upstream = None
            if decision.on_done is not None:
                try:
                    decision.on_done(result)
                except Exception:
                    log.exception("HBONE on_done callback failed")
        finally:
            if upstream is not None:
                upstream.reset()
            if not stream.finished:
                stream.reset(ErrorCodes.CANCEL)


# ---------------------------------------------------------------------------------------------------------
# Client pool


Dialer = Callable[[tuple[str, int]], Awaitable[socket.socket]]


class _Entry:
    def __init__(self, key: Hashable, ready: asyncio.Task[_Conn]) -> None:
        self.key = key
        self.ready = ready
        self.reserved = 0
        self.capacity: int | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.conn: _Conn | None = None

    def usable(self, max_streams: int) -> bool:
        if self.ready.done() and (self.ready.cancelled() or self.ready.exception() is not None):
            return False
        c = self.conn
        if c is not None and (c.dead or c.goaway):
            return False
        cap = max_streams if self.capacity is None else self.capacity
        if c is not None:
            cap = min(cap, c.remote_max_streams)
        return self.reserved < cap


async def _default_dial(addr: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


class HbonePool:
    """Outbound HBONE connections, pooled by key, each carrying at most ``max_streams_per_conn`` streams.

    A connection is closed after ``idle_timeout`` seconds without streams. ``open_stream`` dials with
    ``connect`` (default: a plain socket in the caller's netns; the proxy passes a dialer that creates a
    marked socket in the source pod's netns), handshakes without SNI and checks the server's SPIFFE id.
    """

    def __init__(
        self,
        *,
        max_streams_per_conn: int = DEFAULT_MAX_STREAMS,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        response_timeout: float = 10.0,
    ) -> None:
        self.max_streams = max_streams_per_conn
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self._entries: dict[Hashable, list[_Entry]] = {}
        self._closed = False

    def connection_count(self, key: Hashable | None = None) -> int:
        """Live (or connecting) pooled connections, for one key or all."""
        groups = [self._entries.get(key, [])] if key is not None else list(self._entries.values())
        return sum(1 for g in groups for e in g if e.conn is None or not e.conn.dead)

    async def open_stream(
        self,
        key: Hashable,
        dst: tuple[str, int],
        authority: str,
        headers: Sequence[tuple[str, str]],
        ssl_context: ssl.SSLContext,
        *,
        expected_identities: Collection[SpiffeId] | None = None,
        connect: Dialer | None = None,
    ) -> HboneStream:
        """A CONNECT stream to ``authority`` through ``dst`` that the server answered 200 on.

        Raises HboneError (with ``status``) on a non-200 answer, PeerIdentityError if the server is not one
        of ``expected_identities``, OSError/TimeoutError if it cannot be reached.
        """
        if self._closed:
            raise RuntimeError("pool closed")
        for _ in range(8):
            entry = self._pick(key)
            if entry is None:
                entry = self._new_entry(key, dst, ssl_context, expected_identities, connect)
            entry.reserved += 1
            if entry.idle is not None:
                entry.idle.cancel()
                entry.idle = None
            released = False

            def release(_: object = None, e: _Entry = entry) -> None:
                nonlocal released
                if not released:
                    released = True
                    self._release(e)

            try:
                conn = await asyncio.shield(entry.ready)
                stream = await conn.open_stream(authority, headers, self.response_timeout)
            except h2.exceptions.TooManyStreamsError:
                entry.capacity = max(entry.reserved - 1, 1)
                release()
                continue
            except BaseException:
                release()
                raise
            stream.on_finished = release
            if stream.finished:
                release()
            return stream
        raise HboneError("could not find a pooled connection with stream capacity")

    async def close(self) -> None:
        """Close every pooled connection (open streams are reset)."""
        self._closed = True
        entries = [e for g in self._entries.values() for e in g]
        self._entries.clear()
        for e in entries:
            if e.idle is not None:
                e.idle.cancel()
            if not e.ready.done():
                e.ready.cancel()
        await asyncio.gather(*(e.ready for e in entries), return_exceptions=True)
        await asyncio.gather(*(e.conn.close() for e in entries if e.conn is not None), return_exceptions=True)

    def _pick(self, key: Hashable) -> _Entry | None:
        for e in self._entries.get(key, []):
            if e.usable(self.max_streams):
                return e
        return None

    def _new_entry(
        self,
        key: Hashable,
        dst: tuple[str, int],
        ctx: ssl.SSLContext,
        expected: Collection[SpiffeId] | None,
        connect: Dialer | None,
    ) -> _Entry:
        holder: list[_Entry] = []

        async def establish() -> _Conn:
            conn = await self._dial(dst, ctx, expected, connect)
            entry = holder[0]
            entry.conn = conn
            task = conn.start()
            task.add_done_callback(lambda _t: self._drop(entry))
            return conn

        entry = _Entry(key, asyncio.ensure_future(establish()))
        holder.append(entry)
        entry.ready.add_done_callback(lambda t: self._drop(entry) if t.cancelled() or t.exception() else None)
        self._entries.setdefault(key, []).append(entry)
        return entry

    async def _dial(
        self,
        dst: tuple[str, int],
        ctx: ssl.SSLContext,
        expected: Collection[SpiffeId] | None,
        connect: Dialer | None,
    ) -> _Conn:
        sock = await asyncio.wait_for((connect or _default_dial)(dst), self.connect_timeout)
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock,
                ssl=ctx,
                server_hostname="",  # HBONE sends no SNI
                ssl_handshake_timeout=self.connect_timeout,
                limit=READ_CHUNK,
            )
        except BaseException:
            sock.close()
            raise
        try:
            tls = writer.get_extra_info("ssl_object")
            if tls is None or tls.selected_alpn_protocol() != "h2":
                raise PeerIdentityError("server did not negotiate ALPN h2")
            ident = verify_peer_identity(tls, expected) if expected is not None else peer_identity(tls)
        except BaseException:
            writer.transport.abort()
            raise
        return _Conn(
            reader, writer, client_side=True, max_concurrent_streams=self.max_streams, peer_identity=ident
        )

    def _release(self, entry: _Entry) -> None:
        entry.reserved -= 1
        if entry.reserved <= 0 and entry.conn is not None and not entry.conn.dead and not self._closed:
            loop = asyncio.get_running_loop()
            entry.idle = loop.call_later(self.idle_timeout, self._idle_close, entry)

    def _idle_close(self, entry: _Entry) -> None:
        entry.idle = None
        if entry.reserved <= 0 and entry.conn is not None:
            self._drop(entry)
            conn = entry.conn
            t = asyncio.ensure_future(conn.close())
            t.add_done_callback(lambda d: d.cancelled() or d.exception())

    def _drop(self, entry: _Entry) -> None:
        group = self._entries.get(entry.key)
        if group and entry in group:
            group.remove(entry)
            if not group:
                del self._entries[entry.key]


def _fd_count() -> int:
    """Open fds of this process (tests use it to prove nothing leaks)."""
    return len(os.listdir("/proc/self/fd"))
