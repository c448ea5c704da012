"""A small gRPC client over HTTP/2 (``h2``) on asyncio, for the node proxy's two gRPC clients.

Why not grpcio: the node proxy must stay small (issue 8, <= 40 MB RSS with 1000 workloads) and grpcio costs
~9 MB at import plus its threads and arenas at run time, while ``h2`` is already loaded for HBONE. The
control plane (the servers) keeps grpcio; this module only speaks the client side of the gRPC HTTP/2
protocol, and imports neither grpc nor cryptography.

What it does::

    channel = Channel("istiod.istio-system.svc:15012", ssl_context=client_ssl_context(roots_pem),
                      server_name="istiod.istio-system.svc")
    reply = await channel.unary_unary("/pkg.Service/Method", request_bytes, metadata=[("k", "v")], timeout=5)
    call = await channel.stream_stream("/pkg.Service/Bidi")
    await call.write(b"..."); await call.done_writing()
    while (msg := await call.read()) is not None: ...     # None: the server ended with status OK
    call.cancel()                                         # RST_STREAM(CANCEL)
    await channel.close()

* One connection per channel (TLS with ALPN ``h2``, or plaintext), multiplexing every call. A connection
  that died or got a GOAWAY is replaced on the next call (lazy reconnect); losing it fails its open calls
  with ``UNAVAILABLE``. After a GOAWAY the calls the server accepted run to their end (grpc's max
  connection age and graceful stop depend on that); the others fail with ``UNAVAILABLE``. Optional
  keepalive PINGs find a peer that went silent; the server's PINGs are answered (by h2).
* Messages are bytes (callers serialize); the 5-byte length prefix is added and parsed here. Compressed
  messages are refused: we advertise ``grpc-accept-encoding: identity`` only.
* Flow control both ways: received DATA is acknowledged as it is needed to complete a message and, once
  whole messages are queued, only as the reader takes them, so a slow reader holds back the server instead
  of buffering without bound; sending waits for the peer's stream and connection windows.
* Errors are :class:`RpcError` with a :class:`StatusCode` (the standard numbers) and the server's
  percent-decoded ``grpc-message``; an HTTP status other than 200 without ``grpc-status`` maps to a code as
  the gRPC HTTP mapping says.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import enum
import logging
import math
import os
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import Frame, GoAwayFrame

__all__ = [
    "Call",
    "Channel",
    "Metadata",
    "RpcError",
    "StatusCode",
    "client_ssl_context",
    "parse_target",
]

log = logging.getLogger(__name__)
# hpack logs every header it encodes at DEBUG, values included (our bearer tokens); a node proxy run with
# --log-level debug must not write credentials to its log, so its debug output is off.
logging.getLogger("hpack").setLevel(logging.INFO)

USER_AGENT = "istiopy-grpc-h2/1"
STREAM_WINDOW = 4 * 1024 * 1024  # what one stream may have in flight towards us
CONN_WINDOW = 16 * 1024 * 1024  # ... and all streams of a connection together
MAX_HEADER_LIST_SIZE = 64 * 1024
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
READ_CHUNK = 256 * 1024
CONNECT_TIMEOUT = 20.0
_H2_DEFAULT_WINDOW = 65535
_PREFIX = struct.Struct(">BI")
# Never put these in the HPACK table (RFC 7541 7.1.3): a credential must not outlive its request there.
_SENSITIVE = frozenset({"authorization", "proxy-authorization", "cookie"})
_Header = tuple[str, str] | NeverIndexedHeaderTuple


class StatusCode(enum.IntEnum):
    """gRPC status codes, with their standard numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


Metadata = Sequence[tuple[str, str | bytes]]


class RpcError(Exception):
    """A call ended with a status other than OK: ``code``, the server's ``details`` and its trailers."""

    def __init__(self, code: StatusCode, details: str = "", trailers: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.trailers: tuple[tuple[str, str | bytes], ...] = tuple(trailers)


# HTTP status -> gRPC code when the response carries no grpc-status (gRPC's http-grpc-status-mapping).
_HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}

# RST_STREAM error code -> gRPC code (gRPC's HTTP/2 transport mapping).
_RESET_TO_GRPC = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


# ------------------------------------------------------------------------------------------------ TLS
@contextlib.contextmanager
def _memory_file(text: str) -> Iterator[str]:
    """A path reading back ``text`` (``ssl`` loads keys only from files): an anonymous memfd on Linux."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("istiopy-grpc-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    import tempfile  # pragma: no cover - non-Linux fallback: a private directory removed at once

    with tempfile.TemporaryDirectory(prefix="istiopy-grpc-") as d:  # pragma: no cover
        p = os.path.join(d, "f.pem")
        with open(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(text)
        yield p


def client_ssl_context(
    roots_pem: str | bytes | None = None, *, client_cert: tuple[str, str] | None = None
) -> ssl.SSLContext:
    """A TLS client context for gRPC: verifies the server against ``roots_pem`` (system roots when None)
    and its host name (see ``Channel(server_name=...)``), offers ALPN ``h2``, and presents
    ``client_cert = (chain_pem, key_pem)`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if roots_pem:
        ctx.load_verify_locations(cadata=roots_pem.decode() if isinstance(roots_pem, bytes) else roots_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Accept what grpc (BoringSSL) accepts: Python 3.13+ turns on OpenSSL's strict X.509 checks by default.
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    ctx.set_alpn_protocols(["h2"])
    if client_cert is not None:
        chain_pem, key_pem = client_cert
        with _memory_file(chain_pem) as chain_path, _memory_file(key_pem) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    return ctx


# ------------------------------------------------------------------------------------------------ target
@dataclass(frozen=True)
class Target:
    """Where a channel dials (TCP ``host``/``port`` or Unix socket ``path``) and its ``:authority``."""

    host: str
    port: int
    path: str
    authority: str


def parse_target(target: str) -> Target:
    """``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:``/``ipv6:`` prefixes or ``unix:path``
    (the forms gRPC accepts that we use); the port defaults to 443 as in gRPC."""
    t = target
    if t.startswith(("unix://", "unix:")):
        path = t.removeprefix("unix://") if t.startswith("unix://") else t.removeprefix("unix:")
        if not path:
            raise ValueError(f"target {target!r}: empty unix socket path")
        return Target("", 0, path, "localhost")
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(prefix):
            t = t.removeprefix(prefix)
            break
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"target {target!r}: bad bracketed IPv6 address")
        port_s = rest[1:] if rest else "443"
        authority = t if rest else f"[{host}]:443"
    elif t.count(":") == 1:
        host, port_s = t.split(":")
        authority = t
    elif ":" in t:  # a bare IPv6 address
        host, port_s, authority = t, "443", f"[{t}]:443"
    else:
        host, port_s, authority = t, "443", f"{t}:443"
    if not host:
        raise ValueError(f"target {target!r}: empty host")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"target {target!r}: port {port_s!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"target {target!r}: port {port} out of range")
    return Target(host, port, "", authority)


def encode_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value: at most 8 digits and a unit, rounded up so the server never cuts early."""
    micros = max(1, math.ceil(seconds * 1_000_000))
    for value, unit in (
        (micros, "u"),
        (math.ceil(micros / 1000), "m"),
        (math.ceil(micros / 1_000_000), "S"),
        (math.ceil(micros / 60_000_000), "M"),
    ):
        if value < 100_000_000:
            return f"{value}{unit}"
    return f"{min(99_999_999, math.ceil(micros / 3_600_000_000))}H"


def _metadata_headers(metadata: Metadata) -> list[_Header]:
    out: list[_Header] = []
    for key, value in metadata:
        k = key.lower()
        if k.startswith(":") or k in ("content-type", "te", "grpc-timeout"):
            raise ValueError(f"metadata key {key!r} is reserved")
        if k.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((k, base64.b64encode(raw).decode().rstrip("=")))
        elif isinstance(value, bytes):
            raise ValueError(f"metadata {key!r}: bytes values need a key ending in '-bin'")
        elif k in _SENSITIVE:
            out.append(NeverIndexedHeaderTuple(k, value))
        else:
            out.append((k, value))
    return out


def _received_metadata(headers: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for k, v in headers:
        key = k.decode("ascii", "replace")
        if key.startswith(":"):
            continue
        if key.endswith("-bin"):
            raw = v + b"=" * (-len(v) % 4)
            with contextlib.suppress(ValueError):
                out.append((key, base64.b64decode(raw)))
                continue
        out.append((key, v.decode("utf-8", "replace")))
    return tuple(out)


def _status_from(headers: Sequence[tuple[bytes, bytes]], http_status: int) -> RpcError:
    """The final status from the trailers (or trailers-only headers); OK is an RpcError with code OK."""
    md = dict(headers)
    meta = _received_metadata(headers)
    raw = md.get(b"grpc-status")
    if raw is None:
        if http_status != 200:
            code = _HTTP_TO_GRPC.get(http_status, StatusCode.UNKNOWN)
            return RpcError(code, f"HTTP status {http_status} without grpc-status", meta)
        return RpcError(StatusCode.INTERNAL, "the server ended the call without grpc-status", meta)
    try:
        code = StatusCode(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    details = urllib.parse.unquote(md.get(b"grpc-message", b"").decode("ascii", "replace"), errors="replace")
    return RpcError(code, details, meta)


# ------------------------------------------------------------------------------------------------ call
class Call:
    """One RPC: write request messages, read response messages, see the final status.

    ``read`` returns the next message, or None once the server ended the call with OK; any other ending
    raises :class:`RpcError` (messages that arrived before it are still returned first).
    """

    def __init__(self, conn: _Connection, stream_id: int, max_message: int, deadline: float | None) -> None:
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
        return _received_metadata(self._headers or [])

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return _received_metadata(self._trailers)

    async def write(self, message: bytes) -> None:
        """Send one message; waits for flow-control window. Raises RpcError if the call already ended."""
        await self._send(_PREFIX.pack(0, len(message)) + message, end_stream=False)

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
            flag, length = _PREFIX.unpack_from(self._buf)
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
        status = _status_from(self._trailers or self._headers or [], self._http_status)
        if status.code == StatusCode.OK and self._buf:
            status = RpcError(StatusCode.INTERNAL, f"stream ended inside a message ({len(self._buf)} bytes)")
        self._finish(status)

    def _on_reset(self, error_code: int) -> None:
        try:
            code = _RESET_TO_GRPC.get(ErrorCodes(error_code), StatusCode.INTERNAL)
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


# ------------------------------------------------------------------------------------------ connection
class _GracefulH2Connection(h2.connection.H2Connection):
    """h2 treats any received GOAWAY as the end: it drops queued output, moves to CLOSED and then rejects
    every later frame as a protocol error. RFC 9113 6.8 lets the streams up to ``last_stream_id`` finish,
    and grpc servers rely on it (max connection age, graceful shutdown: GOAWAY, then the open calls end
    normally). So a GOAWAY here only reports ``ConnectionTerminated``; :class:`_Connection` opens no new
    streams on this connection and fails those the server will not process."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _Connection:
    """One HTTP/2 connection: a reader task turns frames into call events; calls write through it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        keepalive_time: float | None,
        keepalive_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        self.h2 = _GracefulH2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - _H2_DEFAULT_WINDOW)
        self.calls: dict[int, Call] = {}
        self.dead = False
        self.goaway = False
        self.error = ""
        self._slot_freed = asyncio.Event()
        self._ping_acks: dict[bytes, asyncio.Future[None]] = {}
        self.flush()
        self._task = asyncio.create_task(self._run(), name="grpc-h2-reader")
        self._closer: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        if keepalive_time:
            self._keepalive = asyncio.create_task(self._ping_loop(keepalive_time, keepalive_timeout))

    @property
    def usable(self) -> bool:
        return not self.dead and not self.goaway

    # -- output ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.dead and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        if self.dead:
            return  # the calls were failed with the reason already
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            self._lost(f"write failed: {e}")

    def send_window(self, stream_id: int) -> int:
        if self.dead:
            return 0
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except h2.exceptions.ProtocolError:
            return 0

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        if self.dead:
            return
        try:
            if data:
                self.h2.send_data(stream_id, data, end_stream=end_stream)
            elif end_stream:
                self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return  # the call is ending; its status says why
        self.flush()

    def ack(self, stream_id: int, n: int) -> None:
        if n <= 0 or self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, ValueError):
            self.h2.acknowledge_received_data(n, stream_id)
        self.flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        if self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        self._slot_freed.set()
        if self.goaway and not self.calls:
            self._close_soon()

    # -- calls -----------------------------------------------------------------------------------------
    async def open_call(self, headers: list[_Header], max_message: int, deadline: float | None) -> Call:
        while self.usable and self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if not self.usable:
            raise RpcError(StatusCode.UNAVAILABLE, self.error or "connection is going away")
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        call = Call(self, sid, max_message, deadline)
        self.calls[sid] = call
        self.flush()
        return call

    # -- input -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    reason = f"server broke HTTP/2: {e}"
                    self.flush()  # the GOAWAY h2 prepared
                    break
                for ev in events:
                    self._dispatch(ev)
                self.flush()
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            reason = f"connection lost: {e}"
        finally:
            self._lost(reason)

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_headers(_bytes_headers(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            fcl = ev.flow_controlled_length or 0
            if (c := self.calls.get(sid)) is not None:
                c._on_data(ev.data or b"", fcl)
            else:
                self.ack(sid, fcl)  # a call we already finished: keep the connection window open
        elif isinstance(ev, h2.events.TrailersReceived):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_trailers(_bytes_headers(ev.headers))
        elif isinstance(ev, h2.events.StreamEnded):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_end()
        elif isinstance(ev, h2.events.StreamReset):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_reset(int(ev.error_code or 0))
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = self.calls.values() if not ev.stream_id else [self.calls.get(ev.stream_id)]
            for c in targets:
                if c is not None:
                    c._writable.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for c in self.calls.values():
                c._writable.set()
            self._slot_freed.set()
        elif isinstance(ev, h2.events.PingAckReceived):
            fut = self._ping_acks.pop(ev.ping_data or b"", None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            self.error = f"server sent GOAWAY ({_error_name(ev.error_code)})"
            last = ev.last_stream_id or 0
            for sid, c in list(self.calls.items()):
                if sid > last:  # never processed: safe to retry elsewhere
                    c._finish(RpcError(StatusCode.UNAVAILABLE, self.error))
            self._slot_freed.set()
            if not self.calls:
                self._close_soon()

    async def _ping_loop(self, interval: float, ack_within: float) -> None:
        while not self.dead:
            await asyncio.sleep(interval)
            data = os.urandom(8)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._ping_acks[data] = fut
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.ping(data)
            self.flush()
            try:
                await asyncio.wait_for(fut, ack_within)
            except TimeoutError:
                self._lost(f"keepalive ping not acknowledged within {ack_within}s")
                return

    # -- teardown --------------------------------------------------------------------------------------
    def _close_soon(self) -> None:
        """After a GOAWAY, once the last call ended: the channel dials a new connection for the next one."""
        if self._closer is None and not self.dead:
            self._closer = asyncio.get_running_loop().create_task(self.close("server sent GOAWAY"))

    def _lost(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.error = reason
        for c in list(self.calls.values()):
            c._finish(RpcError(StatusCode.UNAVAILABLE, reason))
        self.calls.clear()
        self._slot_freed.set()
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        self.writer.close()

    async def close(self, reason: str = "channel closed") -> None:
        """GOAWAY, then close; calls still open fail with CANCELLED."""
        for c in list(self.calls.values()):
            c._finish(RpcError(StatusCode.CANCELLED, reason))
        if not self.dead:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.flush()
        self._lost(reason)
        if self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (Exception, asyncio.CancelledError):
            self.writer.transport.abort()


def _bytes_headers(headers: Sequence[tuple[bytes | str, bytes | str]] | None) -> list[tuple[bytes, bytes]]:
    """h2 hands headers over as bytes (``header_encoding=None``); normalise the type for mypy and us."""
    return [
        (k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
        for k, v in headers or []
    ]


def _error_name(code: object) -> str:
    try:
        return ErrorCodes(int(code)).name  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return str(code)


# ------------------------------------------------------------------------------------------------ channel
class Channel:
    """A lazily connected gRPC channel to ``target``: TLS when ``ssl_context`` is given, else plaintext.

    ``server_name`` overrides the name the TLS handshake sends (SNI) and verifies, and ``:authority``
    (what grpc's ``ssl_target_name_override`` does). ``keepalive_time`` sends a PING every that many
    seconds and drops the connection if no ACK arrives within ``keepalive_timeout`` (off by default:
    grpc servers answer pings they did not allow with GOAWAY ENHANCE_YOUR_CALM).
    """

    def __init__(
        self,
        target: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
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
        self._conn: _Connection | None = None
        self._dial_lock = asyncio.Lock()
        self._closed = False

    @property
    def authority(self) -> str:
        return self.server_name or self._target.authority

    async def _connection(self, deadline: float | None) -> _Connection:
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

    async def _dial(self, limit: float, deadline_bound: bool) -> _Connection:
        t = self._target
        ctx = self.ssl_context
        try:
            async with asyncio.timeout(limit):
                if t.path:
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
        except (OSError, ssl.SSLError) as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {self.target}: {e}") from e
        if ctx is not None:
            tls = writer.get_extra_info("ssl_object")
            alpn = tls.selected_alpn_protocol() if tls is not None else None
            if alpn not in (None, "h2"):
                writer.close()
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.target} negotiated ALPN {alpn!r}, not h2")
        return _Connection(
            reader, writer, keepalive_time=self.keepalive_time, keepalive_timeout=self.keepalive_timeout
        )

    def _headers(self, method: str, metadata: Metadata, timeout: float | None) -> list[_Header]:
        if not method.startswith("/"):
            raise ValueError(f"method {method!r} must look like /package.Service/Method")
        headers: list[_Header] = [
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
        headers.extend(_metadata_headers(metadata))
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
            await call._send(_PREFIX.pack(0, len(request)) + request, end_stream=True)
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
