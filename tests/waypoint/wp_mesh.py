"""The waypoint test kit (a module name unique across the suite: test modules import it by name).

A real waypoint: our CA, our xDS server with the waypoint generators, the launcher running a real Envoy,
backends behind HBONE terminators, and an HBONE client - all on private loopback addresses.

Topology (one per test module; addresses ``127.<a>.<b>.<n>``, random per module so concurrent runs do not
collide): the waypoint binds ``.1:15008``; each backend "pod" ``.n`` runs an HTTP app on ``:8080`` and
the HBONE server from ``dataplane/hbone.py`` on ``:15008`` (what ztunnel would be). The client opens
CONNECT to the waypoint with ``:authority = <service VIP>:<port>`` exactly as ztunnel does for a service
with a waypoint, then speaks HTTP/1.1 inside the tunnel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from wp_helpers import NS, gateway, namespace

from istiopy.api.ca_client import CaClient
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import client_context, server_context
from istiopy.ca.auth import StaticTokenAuthenticator, TokenEntry, stream_authenticator
from istiopy.ca.server import serve as serve_ca
from istiopy.ca.service import CaConfig, CertificateAuthority, start_authority
from istiopy.dataplane.hbone import (
    Accept,
    ConnectRequest,
    Decision,
    HbonePool,
    HboneServer,
    Reject,
    TcpStream,
)
from istiopy.dataplane.waypoint import WaypointLauncher, WaypointOptions
from istiopy.mesh.meta import Resource
from istiopy.mesh.store import ConfigStore
from istiopy.testing.mesh import Response
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import AuthenticationError, Connection, ServerOptions, TlsConfig, XdsServer
from istiopy.xds.stream import Kind, RequestOutcome
from istiopy.xds.waypoint import register_waypoint_generators

TD = "cluster.local"
WAYPOINT_ID = SpiffeId(TD, NS, "waypoint")
CLIENT_ID = SpiffeId(TD, NS, "client")


@dataclass
class Backend:
    """One pod: an HTTP app that says who it is, counts requests and can misbehave on request."""

    name: str
    ip: str
    hits: int = 0
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many requests
    always_fail: bool = False
    delay: float = 0.0
    runner: web.AppRunner | None = None
    hbone: HboneServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.paths.append(request.path_qs)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        delay = float(request.query.get("delay", self.delay))
        if delay:
            await asyncio.sleep(delay)
        if self.always_fail:
            return web.Response(status=503, text=f"{self.name} failing")
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text=f"{self.name} flaky")
        status = int(request.query.get("status", "200"))
        return web.Response(
            status=status, text=f"{self.name} {request.path_qs}", headers={"x-served-by": self.name}
        )

    def reset(self) -> None:
        self.hits = 0
        self.paths.clear()
        self.headers.clear()
        self.fail_next = 0
        self.always_fail = False
        self.delay = 0.0


class WaypointMesh:
    def __init__(self, tmp: Path, cert_ttl_seconds: int = 24 * 3600) -> None:
        self.tmp = tmp
        self.cert_ttl_seconds = cert_ttl_seconds
        a, b = random.randint(1, 250), random.randint(1, 250)
        self.prefix = f"127.{a}.{b}"
        self.store = ConfigStore()
        self.registry = GeneratorRegistry()
        register_waypoint_generators(self.registry)
        self.pipeline = PushPipeline(self.store, self.registry, debounce_after=0.02, debounce_max=0.5)
        self.server: XdsServer | None = None
        self.outcomes: list[RequestOutcome] = []
        self.validations = 0
        self.backends: dict[str, Backend] = {}
        self.pool = HbonePool(idle_timeout=30.0)
        self._next_ip = 2
        self._clients: dict[SpiffeId, ssl.SSLContext] = {}
        self.ca: CertificateAuthority | None = None
        self.launcher: WaypointLauncher | None = None
        self._ca_server: Any = None
        self._ca_client: CaClient | None = None

    def _record(self, conn: Connection, outcome: RequestOutcome, now: float) -> None:
        self.outcomes.append(outcome)

    @property
    def nacks(self) -> list[RequestOutcome]:
        return [o for o in self.outcomes if o.kind == Kind.NACK]

    @property
    def waypoint_ip(self) -> str:
        return f"{self.prefix}.1"

    def vip(self, n: int) -> str:
        return f"10.{200 + int(self.prefix.split('.')[1]) % 50}.{self.prefix.split('.')[2]}.{n}"

    # --------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.ca = await start_authority(CaConfig(root_dir=self.tmp / "ca-root"))
        token = secrets.token_hex(16)
        servicer = self.ca.servicer([StaticTokenAuthenticator({token: TokenEntry(WAYPOINT_ID)})], None)
        serving = self.ca.issue_serving(["istiod.istio-system.svc"], ["127.0.0.1"])
        self._ca_server, ca_port = await serve_ca(
            servicer, serving.served_chain_pem, serving.key_pem, self.ca.roots_pem
        )
        self._ca_client = CaClient.connect(
            f"127.0.0.1:{ca_port}", self.ca.roots_pem, token_source=lambda: token
        )
        for res in (namespace(), gateway()):
            self.store.apply(res)
        # xDS over mTLS as istiod serves it: the waypoint presents its SDS certificate and is
        # authenticated by the CA's client-certificate check.
        xds_serving = self.ca.issue_serving(["istiod.istio-system.svc"], ["127.0.0.1"])
        tls = TlsConfig(
            cert_pem=xds_serving.served_chain_pem.encode(),
            key_pem=xds_serving.key_pem.encode(),
            client_ca_pem=self.ca.roots_pem.encode(),
            require_client_cert=True,
        )
        self.server = XdsServer(
            self.pipeline,
            ServerOptions(tls=tls, tls_address="127.0.0.1:0"),
            authenticate=stream_authenticator([self.ca.client_cert_authenticator()], AuthenticationError),
        )
        self.server.request_listeners.append(self._record)
        await self.pipeline.start()
        ports = await self.server.start()
        self.xds_port = ports["tls"]
        self.launcher = WaypointLauncher(
            WaypointOptions(
                name="waypoint",
                namespace=NS,
                xds_address=f"127.0.0.1:{self.xds_port}",
                xds_roots_pem=self.ca.roots_pem,
                pod_ip=self.waypoint_ip,
                listen_address=self.waypoint_ip,
                metrics_address="127.0.0.1:0",
                concurrency=1,
                cert_ttl_seconds=self.cert_ttl_seconds,
                workdir=self.tmp / "wp",
                log_level=os.environ.get("WP_ENVOY_LOG", "warning"),
            ),
            self._ca_client,
        )
        (self.tmp / "wp").mkdir()
        await self.launcher.start()

    async def stop(self) -> None:
        await self.pool.close()
        if self.launcher is not None:
            await self.launcher.stop()
        for b in self.backends.values():
            if b.hbone is not None:
                await b.hbone.close()
            if b.runner is not None:
                await b.runner.cleanup()
        if self.server is not None:
            await self.server.stop(0.1)
        await self.pipeline.stop()
        if self._ca_client is not None:
            await self._ca_client.close()
        if self._ca_server is not None:
            await self._ca_server.stop(None)

    # ------------------------------------------------------------------------------------------ model
    async def apply(self, *resources: Resource) -> None:
        for r in resources:
            self.store.apply(r)
        await self.synced()
        await self.validate()

    async def delete(self, *resources: Resource) -> None:
        for r in resources:
            self.store.delete(r.key)
        await self.synced()
        await self.validate()

    async def validate(self) -> None:
        """Every configuration a test makes the waypoint run also passes ``envoy --mode validate``
        (everything the generators produce for it, inlined into the launcher's bootstrap)."""
        from wp_helpers import envoy_validate, validation_bootstrap

        from istiopy.dataplane.waypoint import bootstrap as launcher_bootstrap

        assert self.launcher is not None
        assert self.server is not None
        proxy = next(c.proxy for c in self.server.connections.values() if c.proxy is not None)
        base = launcher_bootstrap(self.launcher.opts, self.launcher.agent_socket)
        ok, out = await asyncio.to_thread(envoy_validate, validation_bootstrap(self.store, proxy, base))
        assert ok, out[-3000:]
        self.validations += 1

    async def synced(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - a polling deadline
        """Until every change is pushed and the waypoint acknowledged (or rejected) all of it."""
        await asyncio.wait_for(self.pipeline.settled(), timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server is not None
            conns = [
                c
                for c in self.server.connections.values()
                if c.proxy is not None and c.proxy.kind == "waypoint"
            ]
            if conns and all(
                not st.pending and not st.must_respond for c in conns for st in c.stream.types.values()
            ):
                await asyncio.sleep(0.15)  # Envoy warms listeners/clusters just after the ACK
                return
            await asyncio.sleep(0.02)
        assert self.server is not None
        states = [
            st.as_dict() | {"pending": len(st.pending)}
            for c in self.server.connections.values()
            for st in c.stream.types.values()
        ]
        raise TimeoutError(f"waypoint did not acknowledge the configuration: {states}; nacks {self.nacks}")

    async def add_pod(
        self, name: str, app: str, labels: dict[str, str] | None = None, sa: str | None = None, ns: str = NS
    ) -> Backend:
        """A backend pod: HTTP app on <ip>:8080 behind an HBONE terminator on <ip>:15008, and its Pod."""
        from wp_helpers import pod

        ip = f"{self.prefix}.{self._next_ip}"
        self._next_ip += 1
        b = Backend(name, ip)
        app_ = web.Application()
        app_.router.add_route("*", "/{tail:.*}", b.handle)
        b.runner = web.AppRunner(app_, access_log=None)
        await b.runner.setup()
        await web.TCPSite(b.runner, ip, 8080).start()
        assert self.ca is not None
        cert = self.ca.issue_workload(SpiffeId(TD, ns, sa or app))

        async def on_connect(req: ConnectRequest) -> Decision:
            if req.host != ip:
                return Reject(400, "wrong pod")
            r, w = await asyncio.open_connection(req.host, req.port)
            return Accept(TcpStream(r, w))

        b.hbone = HboneServer(on_connect, server_context(cert))
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((ip, 15008))
        lsock.listen(128)
        await b.hbone.serve(lsock)
        self.backends[name] = b
        self.store.apply(pod(name, ip, {"app": app, **(labels or {})}, ns=ns, sa=sa or app))
        return b

    def reset_backends(self) -> None:
        for b in self.backends.values():
            b.reset()

    # ----------------------------------------------------------------------------------------- client
    def client_ctx(self, identity: SpiffeId = CLIENT_ID) -> ssl.SSLContext:
        ctx = self._clients.get(identity)
        if ctx is None:
            assert self.ca is not None
            ctx = self._clients[identity] = client_context(self.ca.issue_workload(identity))
        return ctx

    @contextlib.asynccontextmanager
    async def session(self, target: str, identity: SpiffeId = CLIENT_ID) -> AsyncIterator[Session]:
        stream = await self.pool.open_stream(
            ("client", str(identity)),
            (self.waypoint_ip, 15008),
            target,
            [("forwarded", 'for="10.0.0.99:40000"')],
            self.client_ctx(identity),
        )
        try:
            yield Session(stream, target)
        finally:
            stream.reset()

    async def request(
        self,
        target: str,
        path: str = "/",
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        identity: SpiffeId = CLIENT_ID,
        host: str | None = None,
        timeout: float = 20.0,  # noqa: ASYNC109 - a response deadline
        baggage: str | None = None,
    ) -> Response:
        """One HTTP/1.1 request in its own CONNECT stream to the waypoint, :authority = ``target``."""
        connect_headers = [("forwarded", 'for="10.0.0.99:40000"')]
        if baggage:
            connect_headers.append(("baggage", baggage))
        stream = await self.pool.open_stream(
            ("client", str(identity)),
            (self.waypoint_ip, 15008),
            target,
            connect_headers,
            self.client_ctx(identity),
        )
        hdrs = {
            "host": host or target,
            "connection": "close",
            "content-length": str(len(body)),
            **(headers or {}),
        }
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        try:
            await stream.write(head.encode() + body)
            data = b""

            async def read_all() -> bytes:
                buf = b""
                while True:
                    chunk = await stream.read()
                    if not chunk:
                        return buf
                    buf += chunk
                    resp = _parse(buf, complete_only=True)
                    if resp is not None:
                        return buf

            data = await asyncio.wait_for(read_all(), timeout)
        finally:
            stream.reset()
        resp = _parse(data)
        assert resp is not None, f"no HTTP response: {data!r}"
        return resp


def _parse(data: bytes, complete_only: bool = False) -> Response | None:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = (
            headers[k.strip().lower()] + "," if k.strip().lower() in headers else ""
        ) + v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(rest) < n:
            return None if complete_only else Response(status, headers, rest)
        return Response(status, headers, rest[:n])
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, sep2, rest = rest.partition(b"\r\n")
            if not sep2:
                return None if complete_only else Response(status, headers, body)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return Response(status, headers, body)
            if len(rest) < size + 2:
                return None if complete_only else Response(status, headers, body)
            body += rest[:size]
            rest = rest[size + 2 :]
    if status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b"")
    return None if complete_only else Response(status, headers, rest)


class Session:
    """Keep-alive HTTP/1.1 over one CONNECT stream: many requests, one tunnel (Envoy still balances each
    request on its own), for tests that count hundreds of requests."""

    def __init__(self, stream: Any, target: str) -> None:
        self.stream = stream
        self.target = target
        self.buf = b""

    async def request(self, path: str = "/", headers: dict[str, str] | None = None) -> Response:
        hdrs = {"host": self.target, **(headers or {})}
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        await self.stream.write(head.encode())
        while True:
            got = _parse_one(self.buf)
            if got is not None:
                resp, used = got
                self.buf = self.buf[used:]
                return resp
            chunk = await asyncio.wait_for(self.stream.read(), 20)
            if not chunk:
                raise ConnectionError(f"tunnel closed mid-response: {self.buf!r}")
            self.buf += chunk


def _parse_one(data: bytes) -> tuple[Response, int] | None:
    """One complete content-length response at the start of ``data`` and the bytes it used."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    resp = _parse(head + sep, complete_only=False)
    assert resp is not None
    n = int(resp.headers.get("content-length", "0"))
    if len(rest) < n:
        return None
    return Response(resp.status, resp.headers, rest[:n]), len(head) + len(sep) + n


def counts(values: list[str]) -> dict[str, int]:
    return dict(collections.Counter(values))


async def eventually(fn: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await fn()
            if last:
                return last
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {last!r}")
        await asyncio.sleep(0.1)


__all__ = [
    "CLIENT_ID",
    "TD",
    "WAYPOINT_ID",
    "Backend",
    "Response",
    "Session",
    "WaypointMesh",
    "counts",
    "eventually",
]
