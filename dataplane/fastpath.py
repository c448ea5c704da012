"""The C byte path of ztunnel-py (``istiopy.dataplane._fastpath``) and the switch between it and its twin.

Split of work, and why:

* Python keeps every *decision*: which pod and certificate, RBAC on a CONNECT, which pooled connection a
  stream uses, the expected peer identities, metrics export. These change rarely and need the mesh state.
* The C engine keeps every *byte* of an established tunnel: epoll worker threads, without the GIL, own
  the sockets, the TLS 1.3 records (OpenSSL, handshake included, with the PEM certificates Python gives it)
  and the HTTP/2 framing and flow control of HBONE streams (nghttp2). Plain-to-plain legs are spliced
  (zero copy). ``$ISTIOPY_WORKER_THREADS`` (1..16, default 2 like upstream ztunnel's workers) sets how many
  threads; each new connection or relay goes to the least busy one and stays there with all its streams
  (sharded, not locked), and :class:`FastPool` spreads concurrent streams over up to that many connections
  per key so they can use more than one thread. Python learns the peer SPIFFE id after the handshake and
  applies policy before any stream flows; it gets byte counts when a relay ends and live counters from
  :meth:`FastPath.stats`.
* kTLS is not used: this kernel offers no ``tls`` ULP (``/proc/sys/net/ipv4/tcp_available_ulp``), and
  with HTTP/2 framing inside the records the win would be small next to the framing work anyway.

The pure-Python path (:mod:`istiopy.dataplane.hbone`) stays the reference twin; :func:`byte_path` picks one
from ``--byte-path`` / ``ISTIOPY_BYTE_PATH`` (``c`` or ``python``). The ``ztunnel-py`` CLI defaults to ``c``
when the extension is built; an in-process ``ProxyConfig`` defaults to ``python`` unless the variable says
otherwise, so the ztunnel suites exercise the twin and ``tests/fastpath`` re-runs them on ``c``. ztunnel-py's
core swaps in :class:`FastHboneServer`, :class:`FastPool` and :func:`relay` for their ``hbone`` namesakes.
If the extension failed to build, ``c`` falls back to ``python`` with a warning — the package still
installs, and ``tests/fastpath`` fails on purpose so ``make test`` shows it.

Both paths speak the same wire format, so a C client talks to a Python server and vice versa; the tests
in ``tests/fastpath`` run the same HBONE scenarios against every pairing.

Usage::

    fp = FastPath()                                  # one engine (thread) per event loop
    conn = await fp.connect(sock, bundle, expected={dst_id})   # mTLS + h2, peer checked in Python
    stream = await conn.open(app_sock, "10.0.0.5:8080", hbone_headers(src))  # HboneError on non-200
    result = await stream.result()                   # RelayResult(a_to_b=app->tunnel, b_to_a=back)
    await fp.serve(accepted_sock, bundle, on_connect)   # inbound: same on_connect as HboneServer
    await fp.relay(sock_a, sock_b)                   # plain TCP legs: splice
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import warnings
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle, PeerIdentityError
from istiopy.dataplane import tunnel
from istiopy.dataplane.extension import BYTE_PATH_ENV, load_extension
from istiopy.dataplane.tunnel import (
    DEFAULT_MAX_STREAMS,
    ConnectRequest,
    Decision,
    HboneError,
    Reject,
    RelayResult,
    TcpStream,
    parse_authority,
)

log = logging.getLogger(__name__)

BYTE_PATHS = ("c", "python")
WORKER_THREADS_ENV = "ISTIOPY_WORKER_THREADS"
DEFAULT_WORKER_THREADS = 2
MAX_WORKER_THREADS = 16
# FastPool opens another connection for a key (up to one per worker thread) only once every connection
# already carries this many streams: sequential use stays on one connection, concurrent load spreads.
SPREAD_AT_STREAMS = 2

_ext: Any
_import_error: str | None


try:
    _ext = load_extension()
    _import_error = None
except ImportError as e:  # the build degraded to Python (see setup.py OptionalBuildExt)
    _ext = None
    _import_error = str(e)

__all__ = [
    "BYTE_PATHS",
    "BYTE_PATH_ENV",
    "DEFAULT_WORKER_THREADS",
    "WORKER_THREADS_ENV",
    "FastConn",
    "FastPath",
    "FastStream",
    "available",
    "byte_path",
    "import_error",
    "worker_threads",
]


def available() -> bool:
    """Whether the C extension imported."""
    return _ext is not None


def import_error() -> str | None:
    return _import_error


def byte_path(flag: str | None = None) -> str:
    """The byte path to use: ``flag``, else ``$ISTIOPY_BYTE_PATH``, else ``c`` when built; ``c`` without the
    extension degrades to ``python`` with a warning (a proxy that cannot relay at all helps nobody)."""
    want = (flag or os.environ.get(BYTE_PATH_ENV) or ("c" if available() else "python")).lower()
    if want not in BYTE_PATHS:
        raise ValueError(f"byte path must be one of {BYTE_PATHS}, not {want!r}")
    if want == "c" and not available():
        warnings.warn(f"C byte path unavailable ({_import_error}); using the Python path", stacklevel=2)
        return "python"
    return want


def client_tls(roots_pem: str, *, client_cert: tuple[str, str] | None = None) -> Any:
    """The control-plane TLS client (xDS, CA) on the extension's own OpenSSL: a ``tls_stream.TlsClient``
    for ``grpc_h2`` channels (``tls=`` of ``DeltaXdsClient.connect``/``CaClient.connect``), verifying the
    server against ``roots_pem`` and its name, offering ALPN h2, presenting ``client_cert`` when given.
    With it the C-path node proxy never loads Python's ``ssl`` (see ``istiopy.dataplane.launch``)."""
    if _ext is None:
        raise RuntimeError(f"the C extension is not available: {_import_error}")
    chain, key = client_cert if client_cert is not None else (None, None)
    return _ext.TlsClientContext(
        roots_pem.encode(),
        chain.encode() if chain is not None else None,
        key.encode() if key is not None else None,
        (b"h2",),
    )


def worker_threads(value: str | None = None) -> int:
    """How many engine threads: ``value``, else ``$ISTIOPY_WORKER_THREADS``, else 2 (upstream ztunnel's
    default worker count). A bad value is an error naming the variable, not a silent default: a proxy
    started with a typo should say so."""
    raw = value if value is not None else os.environ.get(WORKER_THREADS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_WORKER_THREADS
    try:
        n = int(raw.strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKER_THREADS:
        raise ValueError(f"{WORKER_THREADS_ENV} must be an integer 1..{MAX_WORKER_THREADS}, not {raw!r}")
    return n


def _take_fd(obj: socket.socket | TcpStream) -> tuple[int, bytes]:
    """Detach a socket (or the socket under an asyncio TcpStream) for the engine, which then owns the fd.

    A TcpStream's transport may already have read bytes into its reader; they are returned so the engine
    sends them first (nothing the app sent is lost).
    """
    if isinstance(obj, socket.socket):
        return obj.detach(), b""
    transport = obj.writer.transport
    transport.pause_reading()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    buffered = bytes(getattr(obj.reader, "_buffer", b""))  # no public peek; bytes must not be lost
    transport.abort()
    return fd, buffered


class FastStream:
    """One relay owned by the engine: an HBONE CONNECT stream or a plain splice pair."""

    def __init__(self, fp: FastPath, rid: int) -> None:
        self._fp = fp
        self.id = rid
        self.status: asyncio.Future[int] = fp._loop.create_future()
        self.done: asyncio.Future[RelayResult] = fp._loop.create_future()

    async def result(self) -> RelayResult:
        """Wait for the end: ``a_to_b`` is app->tunnel (or socket a->b), ``b_to_a`` the other way."""
        return await asyncio.shield(self.done)

    def reset(self) -> None:
        """Abort: RST to the app, RST_STREAM(CANCEL) to the peer."""
        if not self.done.done() and self._fp._engine is not None:
            self._fp._engine.reset(self.id)

    def attach(self, app: socket.socket | TcpStream) -> None:
        """Hand the app side of a stream opened with ``app=None`` to the engine (bytes flow from now on).
        A TcpStream's ``reset`` is redirected here, so callers that keep it (policy re-checks) still work."""
        fd, buffered = _take_fd(app)
        if isinstance(app, TcpStream):
            app.reset = self.reset  # type: ignore[method-assign]
        self._fp._require().attach(self.id, fd, buffered)

    # ByteStream-ish surface for callers that only close or reset what they were given
    async def aclose(self) -> None:
        self.reset()


class FastConn:
    """A client HBONE connection in the engine (mTLS and h2 done in C; identity checked here)."""

    def __init__(self, fp: FastPath, cid: int) -> None:
        self._fp = fp
        self.id = cid
        self.peer_identity: SpiffeId | None = None
        self.up: asyncio.Future[str | None] = fp._loop.create_future()
        self.down: asyncio.Future[str] = fp._loop.create_future()
        self.streams: set[FastStream] = set()
        self.max_streams = DEFAULT_MAX_STREAMS

    @property
    def closed(self) -> bool:
        return self.down.done()

    def usable(self) -> bool:
        return not self.closed and len(self.streams) < self.max_streams

    async def open(
        self, app: socket.socket | TcpStream | None, authority: str, headers: Sequence[tuple[str, str]] = ()
    ) -> FastStream:
        """Send CONNECT ``authority``; on 200 the engine relays ``app`` (which it now owns) to the stream,
        or, with ``app=None``, keeps the stream for :meth:`FastStream.attach`. Any other answer raises
        :class:`HboneError` with the status (the app side is reset by the engine)."""
        if self.closed:
            raise HboneError(f"connection closed: {self.down.result()}")
        fd, buffered = _take_fd(app) if app is not None else (-1, b"")
        if buffered:
            raise HboneError("app bytes already consumed by asyncio; pass a plain socket")
        eng = self._fp._require()
        rid = eng.open(self.id, fd, [(":method", "CONNECT"), (":authority", authority), *headers])
        st = self._fp._register(rid)
        self.streams.add(st)
        st.done.add_done_callback(lambda _f: self.streams.discard(st))
        status_wait = asyncio.ensure_future(st.status)
        waiting: list[asyncio.Future[Any]] = [status_wait, st.done]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if status_wait.done() and not status_wait.cancelled():
            status = status_wait.result()
            if status == 200:
                return st
            raise HboneError(f"CONNECT {authority} answered {status}", status)
        status_wait.cancel()
        raise HboneError(f"CONNECT {authority} failed: {st.done.result().error}")

    def close(self) -> None:
        """GOAWAY and close (open streams are reset)."""
        if not self.closed and self._fp._engine is not None:
            self._fp._engine.close_conn(self.id)


OnConnect = Callable[[ConnectRequest], Awaitable[Decision]]


class _ServerConn:
    def __init__(self, fp: FastPath, cid: int, on_connect: OnConnect, peer: Any, local: Any) -> None:
        self.fp = fp
        self.id = cid
        self.on_connect = on_connect
        self.peer_addr = peer
        self.local_addr = local
        self.peer_identity: SpiffeId | None = None
        self.trust_domain: str | None = None
        self.up: asyncio.Future[str | None] = fp._loop.create_future()
        self.down: asyncio.Future[str] = fp._loop.create_future()
        self.tasks: set[asyncio.Task[None]] = set()

    def identify(self, peer: str | None) -> None:
        """Set at the handshake, before any request of this connection is decided (same event batch)."""
        try:
            ident = SpiffeId.parse(peer) if peer else None
        except ValueError:
            ident = None
        if ident is not None and self.trust_domain is not None and ident.trust_domain != self.trust_domain:
            ident = None
        self.peer_identity = ident

    def request(self, sid: int, rid: int, hdrs: list[tuple[str, str]]) -> None:
        st = self.fp._register(rid)
        t = asyncio.ensure_future(self._decide(sid, st, dict(hdrs)))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _decide(self, sid: int, st: FastStream, hdrs: dict[str, str]) -> None:
        """The same answers as the Python server: 400 bad request, 401 policy, 503 dial failure."""
        eng = self.fp._require()
        if self.peer_identity is None:  # no acceptable client identity: the connection is being reset
            eng.reject(self.id, sid, 401)
            return
        if hdrs.get(":method") != "CONNECT":
            eng.reject(self.id, sid, 400)
            return
        try:
            host, port = parse_authority(hdrs.get(":authority"))
        except ValueError:
            eng.reject(self.id, sid, 400)
            return
        req = ConnectRequest(
            authority=hdrs[":authority"],
            host=host,
            port=port,
            headers={k: v for k, v in hdrs.items() if not k.startswith(":")},
            peer_identity=self.peer_identity,
            peer_addr=self.peer_addr,
            local_addr=self.local_addr,
            stream=st,  # type: ignore[arg-type]  # reset() is all a handler may use
        )
        try:
            decision = await self.on_connect(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the dial failed: 503, as the Python path
            log.debug("HBONE upstream for %s failed: %s", req.authority, e)
            decision = Reject(503, str(e))
        if isinstance(decision, Reject):
            eng.reject(self.id, sid, decision.status)
            return
        upstream: Any = decision.upstream
        if st.done.done():  # the client gave up while we dialed
            upstream.reset()
            return
        fd, buffered = _take_fd(upstream)
        if isinstance(upstream, TcpStream):  # callers keep it to reset on policy change: reach the engine
            upstream.reset = st.reset  # type: ignore[method-assign]
        eng.accept(st.id, self.id, sid, fd, buffered)
        result = await st.result()
        if decision.on_done is not None:
            # a_to_b: stream -> app (as the Python server's relay(stream, upstream))
            decision.on_done(RelayResult(result.b_to_a, result.a_to_b, result.error))


class FastPath:
    """One C engine bound to the running event loop; events of all its threads arrive through one eventfd.
    ``threads``: worker threads (default :func:`worker_threads`)."""

    def __init__(self, threads: int | None = None) -> None:
        if _ext is None:
            raise RuntimeError(f"C byte path unavailable: {_import_error}")
        self.threads = worker_threads() if threads is None else worker_threads(str(threads))
        self._loop = asyncio.get_running_loop()
        self._engine: Any = _ext.Engine(threads=self.threads)
        self._fd = self._engine.fileno()
        self._streams: dict[int, FastStream] = {}
        self._conns: dict[int, FastConn | _ServerConn] = {}
        self._tls: dict[tuple[int, bool], tuple[CertBundle, Any]] = {}
        self._loop.add_reader(self._fd, self._drain)

    def _require(self) -> Any:
        if self._engine is None:
            raise RuntimeError("FastPath closed")
        return self._engine

    def _register(self, rid: int) -> FastStream:
        st = self._streams.get(rid)
        if st is None:
            st = self._streams[rid] = FastStream(self, rid)
        return st

    def tls_config(self, bundle: CertBundle, server: bool) -> Any:
        """The engine's TLS context for ``bundle`` (cached per bundle object: rotation makes a new one)."""
        key = (id(bundle), server)
        hit = self._tls.get(key)
        if hit is not None and hit[0] is bundle:
            return hit[1]
        cfg = _ext.TlsConfig(
            bundle.served_chain_pem.encode(), bundle.key_pem.encode(), bundle.roots_pem.encode(), server
        )
        self._tls[key] = (bundle, cfg)
        return cfg

    def _drain(self) -> None:
        if self._engine is None:
            return
        for ev in self._engine.events():
            kind = ev[0]
            if kind == "done":
                _, rid, up, down, reason = ev
                st = self._streams.pop(rid, None)
                if st is not None and not st.done.done():
                    err = ConnectionResetError(reason) if reason else None
                    st.done.set_result(RelayResult(up, down, err))
                if st is not None and not st.status.done():
                    st.status.cancel()
            elif kind == "response":
                st = self._streams.get(ev[1])
                if st is not None and not st.status.done():
                    st.status.set_result(ev[2])
            elif kind == "up":
                c = self._conns.get(ev[1])
                if c is not None and not c.up.done():
                    c.up.set_result(ev[2])
                if isinstance(c, _ServerConn):
                    c.identify(ev[2])
            elif kind == "down":
                c = self._conns.pop(ev[1], None)
                if c is not None:
                    if not c.up.done():
                        c.up.set_exception(ConnectionError(ev[2]))
                    if not c.down.done():
                        c.down.set_result(ev[2])
            elif kind == "request":
                c = self._conns.get(ev[1])
                if isinstance(c, _ServerConn):
                    c.request(ev[2], ev[3], ev[4])
                else:
                    self._engine.reject(ev[1], ev[2], 400)

    async def relay(self, a: socket.socket | TcpStream, b: socket.socket | TcpStream) -> RelayResult:
        """Splice two plain sockets (the engine owns them); same semantics as ``hbone.relay``."""
        fa, ba = _take_fd(a)
        fb, bb = _take_fd(b)
        if ba or bb:  # bytes already in asyncio buffers: write them ahead before handing over
            for fd, data in ((fb, ba), (fa, bb)):
                with socket.socket(fileno=os.dup(fd)) as s:
                    s.setblocking(True)
                    if data:
                        s.sendall(data)
        st = self._register(self._require().relay(fa, fb))
        for side in (a, b):
            if isinstance(side, TcpStream):
                side.reset = st.reset  # type: ignore[method-assign]
        return await st.result()

    async def connect(
        self,
        sock: socket.socket,
        bundle: CertBundle,
        expected: Collection[SpiffeId] | None = None,
        handshake_timeout: float = 10.0,
    ) -> FastConn:
        """mTLS (TLS 1.3, ALPN h2) and HTTP/2 on a connected socket; the server's identity must be one of
        ``expected`` (:class:`PeerIdentityError` otherwise, before any stream)."""
        cfg = self.tls_config(bundle, server=False)
        cid = self._require().conn(sock.detach(), cfg, False)
        conn = FastConn(self, cid)
        self._conns[cid] = conn
        try:
            peer = await asyncio.wait_for(asyncio.shield(conn.up), handshake_timeout)
        except (ConnectionError, TimeoutError) as e:
            conn.close()
            raise HboneError(f"HBONE handshake failed: {e}") from e
        ident = SpiffeId.parse(peer) if peer else None
        if ident is None or (expected is not None and ident not in expected):
            conn.close()
            raise PeerIdentityError(f"peer identity {ident} not in {sorted(map(str, expected or ()))}")
        conn.peer_identity = ident
        return conn

    async def serve(
        self,
        sock: socket.socket,
        bundle: CertBundle,
        on_connect: OnConnect,
        *,
        trust_domain: str | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        """Serve one accepted HBONE connection until it ends (as ``HboneServer.handle_socket``)."""
        try:
            peer, local = sock.getpeername(), sock.getsockname()
        except OSError:
            sock.close()
            return
        cid = self._require().conn(sock.detach(), self.tls_config(bundle, server=True), True)
        sc = _ServerConn(self, cid, on_connect, peer, local)
        sc.trust_domain = trust_domain
        self._conns[cid] = sc
        try:
            try:
                ident_s = await asyncio.wait_for(asyncio.shield(sc.up), handshake_timeout)
                if sc.peer_identity is None:
                    raise PeerIdentityError(f"client identity {ident_s} not accepted")
            except (ConnectionError, TimeoutError, ValueError) as e:
                log.debug("HBONE handshake from %s failed: %r", peer, e)
                self._require().reset(cid)
                return
            await asyncio.shield(sc.down)
        finally:
            for t in list(sc.tasks):
                t.cancel()
            if not sc.down.done() and self._engine is not None:
                self._engine.close_conn(cid)

    def stats(self) -> dict[str, int]:
        """Engine counters: connections, streams, relays (active/total) and bytes each way."""
        return dict(self._require().stats())

    def thread_stats(self) -> list[dict[str, int]]:
        """:meth:`stats` per worker thread: which threads carry the connections, relays and bytes."""
        return [dict(d) for d in self._require().thread_stats()]

    async def close(self) -> None:
        """Stop the engine thread: every socket it owns is closed (with RST)."""
        if self._engine is None:
            return
        eng, self._engine = self._engine, None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        await asyncio.to_thread(eng.close)
        for st in self._streams.values():
            if not st.done.done():
                st.done.set_result(RelayResult(0, 0, ConnectionResetError("engine closed")))
        for c in self._conns.values():
            if not c.down.done():
                c.down.set_result("engine closed")
            if not c.up.done():
                c.up.set_exception(ConnectionError("engine closed"))
                c.up.exception()
        self._streams.clear()
        self._conns.clear()


# ---------------------------------------------------------------------------------------------------------
# Drop-in replacements for the pure-Python HboneServer / HbonePool / relay, used by ztunnel-py's core when
# its byte path is "c". One engine per event loop, shared and reference-counted by its users.

_engines: dict[int, tuple[FastPath, int]] = {}


def _acquire() -> FastPath:
    loop = asyncio.get_running_loop()
    key = id(loop)
    fp, n = _engines.get(key, (None, 0))
    if fp is None or fp._engine is None or fp._loop is not loop:  # ids of dead loops get reused
        fp, n = FastPath(), 0
    _engines[key] = (fp, n + 1)
    return fp


async def _release(fp: FastPath) -> None:
    key = id(fp._loop)
    cur, n = _engines.get(key, (None, 0))
    if cur is not fp:
        return
    if n <= 1:
        _engines.pop(key, None)
        await fp.close()
    else:
        _engines[key] = (fp, n - 1)


# A picker may return an awaitable: the first connection to a pod whose certificate is still being issued
# waits for it (bounded by the handshake timeout) instead of being refused.
BundlePicker = CertBundle | Callable[[str], CertBundle | Awaitable[CertBundle]]


class FastHboneServer:
    """``HboneServer`` with the byte path in C: the same ``on_connect`` decisions, status codes and
    ``Accept.on_done`` byte counts; ``bundle`` may pick a certificate by local (destination) IP."""

    def __init__(
        self,
        on_connect: OnConnect,
        bundle: BundlePicker,
        *,
        trust_domain: str | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.on_connect = on_connect
        self.bundle = bundle
        self.trust_domain = trust_domain
        self.handshake_timeout = handshake_timeout
        self._fp: FastPath | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self.handshake_failures = 0

    @property
    def connections(self) -> int:
        return self._fp.stats()["conns_active"] if self._fp is not None and self._fp._engine else 0

    async def serve(self, sock: socket.socket) -> asyncio.Task[None]:
        if self._fp is None:
            self._fp = _acquire()
        sock.setblocking(False)
        self._listeners.append(sock)
        t = asyncio.ensure_future(self._accept_loop(sock))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                s, _ = await loop.sock_accept(lsock)
            except OSError:
                return  # listener closed
            t = asyncio.ensure_future(self.handle_socket(s))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def handle_socket(self, sock: socket.socket) -> None:
        if self._fp is None:
            self._fp = _acquire()
        try:
            local = sock.getsockname()
            picked = self.bundle if isinstance(self.bundle, CertBundle) else self.bundle(local[0])
            if isinstance(picked, CertBundle):
                bundle = picked
            else:
                bundle = await asyncio.wait_for(picked, self.handshake_timeout)
        except (OSError, ConnectionError, LookupError, ValueError, TimeoutError) as e:
            self.handshake_failures += 1
            log.debug("HBONE connection refused before the handshake: %r", e)
            sock.close()
            return
        await self._fp.serve(
            sock,
            bundle,
            self.on_connect,
            trust_domain=self.trust_domain,
            handshake_timeout=self.handshake_timeout,
        )

    async def close(self) -> None:
        for ls in self._listeners:
            ls.close()
        self._listeners.clear()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fp is not None:
            fp, self._fp = self._fp, None
            await _release(fp)


Dialer = Callable[[tuple[str, int]], Awaitable[socket.socket]]


class FastPool:
    """``HbonePool`` with the byte path in C: connections per key, at most ``max_streams_per_conn``
    streams each, closed after ``idle_timeout`` without streams. Concurrent streams spread over up to one
    connection per engine thread (see ``SPREAD_AT_STREAMS``); one stream at a time reuses one connection.
    ``open_stream`` returns a :class:`FastStream` already answered 200, whose app side :func:`relay`
    attaches."""

    def __init__(
        self,
        max_streams_per_conn: int = DEFAULT_MAX_STREAMS,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.max_streams = max_streams_per_conn
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._fp: FastPath | None = None
        self._conns: dict[Any, list[FastConn]] = {}
        self._locks: dict[Any, asyncio.Lock] = {}
        self._idle: dict[int, asyncio.TimerHandle] = {}

    def connection_count(self, key: Any = None) -> int:
        lists = [self._conns.get(key, [])] if key is not None else list(self._conns.values())
        return sum(1 for cs in lists for c in cs if not c.closed)

    async def _conn(
        self,
        key: Any,
        dst: tuple[str, int],
        bundle: CertBundle,
        expected: Collection[SpiffeId] | None,
        connect: Dialer | None,
    ) -> FastConn:
        if self._fp is None:
            self._fp = _acquire()
        async with self._locks.setdefault(key, asyncio.Lock()):
            live = [c for c in self._conns.get(key, []) if not c.closed]
            self._conns[key] = live
            # the least busy usable connection, unless all are busy and another thread could take a new one
            usable = [c for c in live if len(c.streams) < self.max_streams]
            best = min(usable, key=lambda c: len(c.streams), default=None)
            if best is not None and (len(best.streams) < SPREAD_AT_STREAMS or len(live) >= self._fp.threads):
                return best
            if connect is not None:
                sock = await asyncio.wait_for(connect(dst), self.connect_timeout)
            else:
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET)
                sock.setblocking(False)
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, dst), self.connect_timeout)
                except BaseException:
                    sock.close()
                    raise
            c = await self._fp.connect(sock, bundle, expected, handshake_timeout=self.connect_timeout)
            c.max_streams = self.max_streams
            live.append(c)
            return c

    async def open_stream(
        self,
        key: Any,
        dst: tuple[str, int],
        authority: str,
        headers: Sequence[tuple[str, str]],
        bundle: CertBundle,
        *,
        expected_identities: Collection[SpiffeId] | None = None,
        connect: Dialer | None = None,
    ) -> FastStream:
        conn = await self._conn(key, dst, bundle, expected_identities, connect)
        timer = self._idle.pop(conn.id, None)
        if timer is not None:
            timer.cancel()
        st = await conn.open(None, authority, headers)
        st.done.add_done_callback(functools.partial(self._idle_check, conn))
        return st

    def _idle_check(self, conn: FastConn, _done: object) -> None:
        # runs before FastConn drops the stream from conn.streams (callback order): defer one tick
        asyncio.get_running_loop().call_soon(self._maybe_idle, conn)

    def _maybe_idle(self, conn: FastConn) -> None:
        if conn.closed or conn.streams or self._fp is None:
            return
        old = self._idle.pop(conn.id, None)
        if old is not None:
            old.cancel()
        self._idle[conn.id] = self._fp._loop.call_later(self.idle_timeout, self._close_idle, conn)

    def _close_idle(self, conn: FastConn) -> None:
        self._idle.pop(conn.id, None)
        if not conn.streams:
            conn.close()

    async def close(self) -> None:
        for t in self._idle.values():
            t.cancel()
        self._idle.clear()
        for cs in self._conns.values():
            for c in cs:
                c.close()
        self._conns.clear()
        if self._fp is not None:
            fp, self._fp = self._fp, None
            await _release(fp)


async def relay(a: Any, b: Any, *, splice: bool = False) -> RelayResult:
    """``hbone.relay`` that hands the bytes to C when it can: a :class:`FastStream` on either side is
    attached to the other (an app socket); two plain TCP legs are spliced when ``splice``; anything else
    runs the Python relay. Byte counts keep ``hbone.relay``'s meaning (a_to_b: from ``a`` to ``b``)."""
    if isinstance(b, FastStream):
        b.attach(a)
        return await b.result()  # up (app -> tunnel) is a -> b
    if isinstance(a, FastStream):
        a.attach(b)
        r = await a.result()
        return RelayResult(r.b_to_a, r.a_to_b, r.error)
    if splice and available() and isinstance(a, TcpStream) and isinstance(b, TcpStream):
        fp = _acquire()
        try:
            return await fp.relay(a, b)
        finally:
            await _release(fp)
    return await tunnel.relay(a, b)
