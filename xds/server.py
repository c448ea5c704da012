"""The ADS gRPC server (grpcio ``aio``): ``StreamAggregatedResources`` and ``DeltaAggregatedResources``.

Each stream is one ``Connection``: a reader task feeding requests into the sans-I/O core
(``xds/stream.py``) and a writer task sending what the core says the client is owed. The two meet only in
the core's state and an ``asyncio.Event``, so a slow client never makes the push pipeline wait, and a client
that stops reading holds at most one response in flight: the write times out after ``send_timeout`` and the
stream is closed (the client reconnects and resyncs, keeping its last config meanwhile).

Responses are pre-encoded bytes (see ``cache.CachedResource``), so the method handlers are registered with
an identity response serializer instead of the servicer base class of ``ads_pb2_grpc``.

Authentication: ``authenticate`` is called once per stream with the peer, its verified client certificate
(TLS with client certificates), the call metadata (e.g. ``authorization: Bearer <token>``) and the node; it
returns the proxy's identity or raises ``AuthenticationError``. The default accepts every client with no
identity, which is what a plaintext development listener means.

Listeners: TLS (server cert/key/CA as PEM bytes, from the CA) on ``tls_address``; plaintext only when
``plaintext_address`` is set explicitly.

Debug types (``xds/debugxds.py``: ``istio.io/debug/syncz`` for ``istioctl proxy-status``) are answered on a
SotW stream straight from the server's connections, outside the snapshot machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from istiopy.xds import types
from istiopy.xds.cache import Snapshot, TypedResources
from istiopy.xds.debugxds import DEBUG_TYPES, ProxySync, debug_refusal, instance_id, syncz_response
from istiopy.xds.proxy import Proxy
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import UnknownType
from istiopy.xds.stream import DeltaStream, Kind, ProtocolError, RequestOutcome, SotwStream

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class AuthenticationError(Exception):
    """The stream's caller could not be authenticated; the message is sent to the client."""


@dataclass(frozen=True)
class AuthRequest:
    """What an authenticator sees of a stream."""

    peer: str
    peer_cert_pem: bytes | None
    metadata: Mapping[str, str]
    node: Any


Authenticator = Callable[[AuthRequest], Awaitable[str | None]]


async def allow_all(request: AuthRequest) -> str | None:
    """The development default: anyone may connect, with no identity."""
    return None


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS material as PEM bytes. ``client_ca_pem`` set + ``require_client_cert`` = mutual TLS."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None
    require_client_cert: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.client_ca_pem,
            require_client_auth=self.require_client_cert,
        )


@dataclass
class ServerOptions:
    """Listener and stream settings; defaults follow istiod (15012 TLS, 15010 plaintext when enabled)."""

    tls: TlsConfig | None = None
    tls_address: str = "0.0.0.0:15012"
    plaintext_address: str | None = None
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    max_message_bytes: int = 200 * 1024 * 1024
    send_timeout: float = 10.0
    max_resource_names: int = 100_000
    max_concurrent_streams: int = 10_000
    # istiod's KEEPALIVE_MAX_SERVER_CONNECTION_AGE: after this many seconds a connection gets a GOAWAY, and
    # its streams ``max_connection_age_grace`` seconds to end, so proxies reconnect (spreading over replicas
    # that came up later). None: connections live as long as their clients keep them.
    max_connection_age: float | None = None
    max_connection_age_grace: float = 10.0
    # A proxy authenticated as spiffe://<td>/ns/<ns>/sa/<sa> may only claim namespace <ns> in its node
    # (istiod's checkConnectionIdentity): config is chosen by the node's claims, so they must be backed.
    check_node_identity: bool = True
    # Debug types (``istio.io/debug/syncz``, what ``istioctl proxy-status`` asks for) list every proxy, so
    # only identities in istiod's namespace may read them (see ``debugxds``).
    debug_namespace: str = "istio-system"
    grpc_options: list[tuple[str, Any]] = field(default_factory=list)
    # Other gRPC services sharing the listeners (istiod mounts the CA's IstioCertificateService on 15012,
    # as upstream does); each is called with the server before it starts.
    extra_services: list[Callable[[aio.Server], None]] = field(default_factory=list)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.so_reuseport", 0),
            *(
                [
                    ("grpc.max_connection_age_ms", int(self.max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace * 1000)),
                ]
                if self.max_connection_age
                else []
            ),
            *self.grpc_options,
        ]


class StreamClosed(Exception):
    """Ends a connection with a gRPC status (raised inside its tasks, turned into ``context.abort``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_conn_ids = itertools.count(1)


class Connection:
    """One ADS stream: the sans-I/O core plus the proxy it serves and the two tasks driving it."""

    def __init__(self, server: XdsServer, context: aio.ServicerContext[Any, Any], delta: bool) -> None:
        self.id = next(_conn_ids)
        self.server = server
        self.context = context
        self.delta = delta
        prefix = f"{server.instance}-{self.id}-"
        max_names = server.options.max_resource_names
        self.stream: SotwStream | DeltaStream = (
            DeltaStream(prefix, max_names) if delta else SotwStream(prefix, max_names)
        )
        self.proxy: Proxy | None = None
        self.peer = context.peer()
        self.connected_at = time.time()
        self._wake = asyncio.Event()
        self._debug_out: list[bytes] = []  # answers to debug requests, sent ahead of xDS responses
        self._debug_nonces: set[str] = set()
        self._update_times: dict[str, float] = {}
        self._unwatch: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    # ------------------------------------------------------------------------------ PushTarget
    def watched_types(self) -> list[str]:
        return self.stream.subscribed_types()

    def update(self, typed: list[TypedResources], trigger_time: float | None) -> None:
        """Take new resources from the pipeline (never blocks).

        The proxy's snapshot lives in the pipeline's ``SnapshotCache`` under its node id; setting it there
        reaches this connection (and any other stream of the same proxy) through the cache watch.
        """
        now = time.perf_counter()
        for t in typed:
            self._update_times.setdefault(t.type_url, now)
        cache = self.server.pipeline.cache
        if self.proxy is None:
            self._on_snapshot("", self.stream.snapshot.with_types(typed, trigger_time))
            return
        base = cache.get_snapshot(self.proxy.id) or self.stream.snapshot
        cache.set_snapshot(self.proxy.id, base.with_types(typed, trigger_time))

    def _on_snapshot(self, key: str, snapshot: Snapshot) -> None:
        """Cache watcher; a snapshot set from another thread is handed over to the event loop."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._on_snapshot, key, snapshot)
            return
        self.stream.set_snapshot(snapshot)
        self._wake.set()

    def close(self) -> None:
        """Stop watching the cache; the last stream of a proxy drops its snapshot (bounded memory)."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.proxy is not None and not any(
            c.proxy is not None and c.proxy.id == self.proxy.id
            for c in self.server.connections.values()
            if c is not self
        ):
            self.server.pipeline.cache.clear_snapshot(self.proxy.id)

    # ---------------------------------------------------------------------------------- driving
    async def serve(self, requests: Any) -> None:
        reader = asyncio.create_task(self._read(requests), name=f"xds-read-{self.id}")
        writer = asyncio.create_task(self._write(), name=f"xds-write-{self.id}")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in done:
            exc = task.exception()
            if isinstance(exc, StreamClosed):
                self.server.metrics.stream_errors.labels(exc.code.name.lower()).inc()
                log.warning("closing xDS stream %s (%s): %s", self.id, self.describe(), exc.message)
                await self.context.abort(exc.code, exc.message)
            elif exc is not None:
                raise exc

    def describe(self) -> str:
        return f"proxy {self.proxy.id!r} from {self.peer}" if self.proxy else f"peer {self.peer}"

    async def _read(self, requests: Any) -> None:
        async for req in requests:
            await self._handle(req)

    async def _handle(self, req: Any) -> None:
        server = self.server
        now = time.monotonic()
        if not self.delta and req.type_url in DEBUG_TYPES:
            await self._debug(req)
            return
        try:
            outcome = self.stream.handle_request(req, now)
        except ProtocolError as e:
            raise StreamClosed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if self.proxy is None:
            await self._identify()
        self._record(outcome, now)
        missing = self.stream.missing_types()
        if missing:
            assert self.proxy is not None
            typed = []
            for type_url in missing:
                try:
                    typed.append(server.pipeline.generate(type_url, self.proxy))
                except UnknownType as e:
                    raise StreamClosed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
                except Exception as e:
                    log.exception("generating %s for %s failed", type_url, self.describe())
                    raise StreamClosed(
                        grpc.StatusCode.INTERNAL, f"generating {type_url} failed: {e}"
                    ) from None
            self.update(typed, None)
        elif outcome.kind in (Kind.INITIAL, Kind.SUBSCRIPTION, Kind.ACK, Kind.NACK):
            self._wake.set()

    async def _debug(self, req: Any) -> None:
        """Answer a debug request (``istioctl proxy-status``) from the server's connections, once."""
        if req.response_nonce in self._debug_nonces:
            return  # the client's ACK of an answer (istioctl's first request carries a nonce of its own)
        if self.proxy is None:
            await self._identify(req.node if req.HasField("node") else None)
        assert self.proxy is not None
        refusal = debug_refusal(self.proxy.identity, self.server.options.debug_namespace)
        if refusal:
            raise StreamClosed(grpc.StatusCode.PERMISSION_DENIED, refusal)
        proxies = [
            ProxySync(c.proxy.id, c.proxy.metadata, c.stream.status())
            for c in self.server.connections.values()
            if c.proxy is not None and c.stream.subscribed_types()
        ]
        nonce = os.urandom(8).hex()
        self._debug_nonces.add(nonce)
        self._debug_out.append(
            syncz_response(
                proxies,
                list(req.resource_names),
                instance_id(self.server.instance),
                nonce=nonce,
                version=str(int(time.time())),
            )
        )
        self._wake.set()

    async def _identify(self, node: Any = None) -> None:
        node = node if node is not None else self.stream.node
        if node is None or not node.id:
            raise StreamClosed(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
        cert = None
        auth = self.context.auth_context()
        certs = list(auth.get("x509_pem_cert") or ()) if auth else []
        if certs:
            cert = certs[0]
        metadata = {
            k: v if isinstance(v, str) else v.decode(errors="replace")
            for k, v in (self.context.invocation_metadata() or ())
        }
        try:
            identity = await self.server.authenticate(AuthRequest(self.peer, cert, metadata, node))
        except AuthenticationError as e:
            raise StreamClosed(grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {e}") from None
        except Exception as e:
            log.exception("authenticator failed for peer %s", self.peer)
            raise StreamClosed(
                grpc.StatusCode.INTERNAL, f"authentication error: {type(e).__name__}"
            ) from None
        proxy = Proxy.from_node(node, identity)
        if self.server.options.check_node_identity:
            problem = identity_mismatch(proxy)
            if problem:
                raise StreamClosed(grpc.StatusCode.UNAUTHENTICATED, problem)
        self.proxy = proxy
        cache = self.server.pipeline.cache
        existing = cache.get_snapshot(self.proxy.id)
        if existing is not None:  # another stream of this proxy, or a snapshot set from outside
            self.stream.set_snapshot(existing)
        self._unwatch = cache.watch(self.proxy.id, self._on_snapshot)
        self.server.pipeline.attach(self)
        log.info(
            "xDS %s stream %s connected: %s", "delta" if self.delta else "sotw", self.id, self.describe()
        )

    def _record(self, outcome: RequestOutcome, now: float) -> None:
        for listener in self.server.request_listeners:
            listener(self, outcome, now)
        m = self.server.metrics
        label = m.label(outcome.type_url)
        if outcome.kind is Kind.NACK:
            m.rejects.labels(label).inc()
            log.warning(
                "xDS NACK from %s for %s version %s: %s",
                self.describe(),
                label,
                outcome.version,
                outcome.error,
            )
        elif outcome.kind is Kind.ACK and outcome.trigger_time is not None:
            m.convergence.observe(max(0.0, now - outcome.trigger_time))
        elif outcome.kind is Kind.STALE:
            m.stale_requests.labels(label).inc()

    async def _write(self) -> None:
        server = self.server
        timeout = server.options.send_timeout
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._debug_out:
                try:
                    await asyncio.wait_for(self.context.write(self._debug_out.pop(0)), timeout)
                except TimeoutError:
                    raise StreamClosed(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"client did not read a debug answer within {timeout}s",
                    ) from None
            async with server.pipeline.push_semaphore:
                try:
                    responses = self.stream.responses(time.monotonic())
                except ProtocolError as e:
                    raise StreamClosed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
                for resp in responses:
                    data = resp.encode()
                    try:
                        await asyncio.wait_for(self.context.write(data), timeout)
                    except TimeoutError:
                        server.metrics.write_timeouts.inc()
                        raise StreamClosed(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"client did not read a {types.short_name(resp.type_url)} response "
                            f"({len(data)} bytes) within {timeout}s",
                        ) from None
                    label = server.metrics.label(resp.type_url)
                    server.metrics.pushes.labels(label).inc()
                    started = self._update_times.pop(resp.type_url, None)
                    if started is not None:
                        server.metrics.push_time.labels(label).observe(time.perf_counter() - started)

    def syncz(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "proxy": self.proxy.id if self.proxy else None,
            "kind": self.proxy.kind if self.proxy else None,
            "identity": self.proxy.identity if self.proxy else None,
            "peer": self.peer,
            "delta": self.delta,
            "connected_at": self.connected_at,
            "types": self.stream.status(),
        }


class XdsServer:
    """The ADS endpoint(s). ``start`` binds; ``ports`` tells which ports were bound (port 0 allowed)."""

    def __init__(
        self,
        pipeline: PushPipeline,
        options: ServerOptions | None = None,
        authenticate: Authenticator = allow_all,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = pipeline.metrics
        self.options = options or ServerOptions()
        self.authenticate = authenticate
        self.connections: dict[int, Connection] = {}
        # Called with (connection, outcome, monotonic now) for every request: ACK/NACK tracking for status
        # writers and benchmarks. Must not block.
        self.request_listeners: list[Callable[[Connection, RequestOutcome, float], None]] = []
        self.instance = os.urandom(3).hex()
        self.ports: dict[str, int] = {}
        self._server: aio.Server | None = None

    async def start(self) -> dict[str, int]:
        """Bind the listeners and start serving; returns ``{"tls": port, "plaintext": port}`` as bound."""
        opts = self.options
        if opts.tls is None and opts.plaintext_address is None:
            raise ValueError("xDS server needs TLS material or an explicitly enabled plaintext address")
        server = aio.server(options=opts.channel_options())
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, request_deserializer=_discovery().DiscoveryRequest.FromString
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=_discovery().DeltaDiscoveryRequest.FromString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
        for mount in opts.extra_services:
            mount(server)
        if opts.tls is not None:
            self.ports["tls"] = _bound(
                server.add_secure_port(opts.tls_address, opts.tls.credentials()), opts.tls_address
            )
        if opts.plaintext_address is not None:
            self.ports["plaintext"] = _bound(
                server.add_insecure_port(opts.plaintext_address), opts.plaintext_address
            )
        await server.start()
        self._server = server
        return dict(self.ports)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, give streams ``grace`` seconds, then cancel them. Clients keep their config."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _sotw(self, requests: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await self._serve(requests, context, delta=False)

    async def _delta(self, requests: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await self._serve(requests, context, delta=True)

    async def _serve(self, requests: Any, context: aio.ServicerContext[Any, Any], delta: bool) -> None:
        conn = Connection(self, context, delta)
        self.connections[conn.id] = conn
        self.metrics.connected.inc()
        try:
            await conn.serve(requests)
        finally:
            self.pipeline.detach(conn)
            conn.close()
            self.connections.pop(conn.id, None)
            self.metrics.connected.dec()
            log.info("xDS stream %s closed: %s", conn.id, conn.describe())

    def syncz(self) -> list[dict[str, Any]]:
        return [c.syncz() for c in sorted(self.connections.values(), key=lambda c: c.id)]


def identity_mismatch(proxy: Proxy) -> str:
    """Why the node's claimed namespace is not backed by its SPIFFE identity, or '' when it is (or when
    there is no SPIFFE identity to check against)."""
    ident = proxy.identity or ""
    if not ident.startswith("spiffe://"):
        return ""
    parts = ident[len("spiffe://") :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return f"identity {ident!r} is not of the form spiffe://<trust domain>/ns/<namespace>/sa/<account>"
    if proxy.namespace and proxy.namespace != parts[2]:
        return f"identity {ident!r} may not claim namespace {proxy.namespace!r} (node {proxy.id!r})"
    return ""


def _bound(port: int, address: str) -> int:
    if port == 0:
        raise OSError(f"could not bind xDS listener on {address}")
    return port


def _discovery() -> Any:
    from envoy.service.discovery.v3 import discovery_pb2

    return discovery_pb2
