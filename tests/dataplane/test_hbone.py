"""HBONE over real TLS on loopback: CONNECT, relay, half-close, reset, refusals, pooling, abuse."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from h2.errors import ErrorCodes

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import PeerIdentityError
from istiopy.dataplane.hbone import (
    STREAM_WINDOW,
    Accept,
    ConnectRequest,
    Decision,
    HboneError,
    HbonePool,
    HboneServer,
    PoolKey,
    Reject,
    StreamReset,
    TcpStream,
    build_baggage,
    hbone_headers,
    parse_authority,
)
from istiopy.testing.certs import TestCA
from istiopy.testing.servers import echo as echo_app

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(pred: Callable[[], bool], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


@dataclass
class Env:
    """A running HBONE server in front of loopback apps, plus a client pool and contexts."""

    server: HboneServer
    port: int
    pool: HbonePool
    client_ctx: ssl.SSLContext
    echo_port: int
    apps: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
    app_port: int
    requests: list[ConnectRequest] = field(default_factory=list)
    deny: set[int] = field(default_factory=set)

    async def open(self, target_port: int, **kw: object) -> object:
        return await self.pool.open_stream(
            PoolKey(CLIENT_ID, SERVER_ID, "127.0.0.1"),
            ("127.0.0.1", self.port),
            f"127.0.0.1:{target_port}",
            hbone_headers(("10.0.0.1", 4242), baggage=build_baggage(namespace="default", workload_name="c")),
            self.client_ctx,
            expected_identities={SpiffeId.parse(SERVER_ID)},
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
async def env(ca: TestCA) -> AsyncIterator[Env]:
    echo = await asyncio.start_server(echo_app, "127.0.0.1", 0, backlog=4096)
    apps: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def park(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await apps.put((r, w))

    app = await asyncio.start_server(park, "127.0.0.1", 0)
    holder: list[Env] = []

    async def on_connect(req: ConnectRequest) -> Decision:
        e = holder[0]
        e.requests.append(req)
        if req.port in e.deny:
            return Reject(401, "denied")
        r, w = await asyncio.open_connection(req.host, req.port)  # ConnectionRefused -> 503
        return Accept(TcpStream(r, w))

    server = HboneServer(on_connect, ca.issue(SERVER_ID).server_context())
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    lsock.setblocking(False)
    await server.serve(lsock)
    pool = HbonePool()
    e = Env(
        server,
        lsock.getsockname()[1],
        pool,
        ca.issue(CLIENT_ID).client_context(),
        echo.sockets[0].getsockname()[1],
        apps,
        app.sockets[0].getsockname()[1],
    )
    holder.append(e)
    try:
        yield e
    finally:
        await pool.close()
        await server.close()
        while not apps.empty():
            apps.get_nowait()[1].close()
        for s in (echo, app):
            s.close()
            await s.wait_closed()


async def read_all(stream: object) -> bytes:
    out = bytearray()
    while chunk := await stream.read():  # type: ignore[attr-defined]
        out += chunk
    return bytes(out)


async def test_echo_roundtrip_identities_and_headers(env: Env) -> None:
    s = await env.open(env.echo_port)
    assert s.status == 200  # type: ignore[attr-defined]
    assert s.peer_identity == SpiffeId.parse(SERVER_ID)  # type: ignore[attr-defined]
    await s.write(b"hello hbone")  # type: ignore[attr-defined]
    await s.close_write()  # type: ignore[attr-defined]
    assert await read_all(s) == b"hello hbone"
    req = env.requests[0]
    assert req.peer_identity == SpiffeId.parse(CLIENT_ID)
    assert (req.host, req.port) == ("127.0.0.1", env.echo_port)
    assert req.headers["forwarded"] == 'for="10.0.0.1:4242"'
    assert req.headers["baggage"] == "k8s.namespace.name=default,k8s.deployment.name=c"
    assert req.headers["traceparent"].startswith("00-")
    await eventually(lambda: env.server.streams == 0)


async def test_large_transfer_both_ways_respects_flow_control(env: Env) -> None:
    s = await env.open(env.echo_port)
    payload = os.urandom(3 * 1024 * 1024) * 4  # 12 MiB: several stream windows

    async def send() -> None:
        for i in range(0, len(payload), 1 << 20):
            await s.write(payload[i : i + (1 << 20)])  # type: ignore[attr-defined]
        await s.close_write()  # type: ignore[attr-defined]

    sender = asyncio.create_task(send())
    got = await read_all(s)
    await sender
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_half_close_both_directions(env: Env) -> None:
    s = await env.open(env.app_port)
    app_r, app_w = await asyncio.wait_for(env.apps.get(), 5)
    await s.write(b"request")  # type: ignore[attr-defined]
    await s.close_write()  # type: ignore[attr-defined]
    assert await app_r.read() == b"request"  # app sees EOF (FIN) after the data...
    app_w.write(b"response after client FIN")  # ...and can still answer
    await app_w.drain()
    assert await s.read() == b"response after client FIN"  # type: ignore[attr-defined]
    app_w.write_eof()
    assert await s.read() == b""  # type: ignore[attr-defined]
    app_w.close()
    await eventually(lambda: env.server.streams == 0)


async def test_client_reset_resets_app_connection(env: Env) -> None:
    s = await env.open(env.app_port)
    app_r, app_w = await asyncio.wait_for(env.apps.get(), 5)
    await s.write(b"x")  # type: ignore[attr-defined]
    assert await app_r.readexactly(1) == b"x"
    s.reset()  # type: ignore[attr-defined]
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(app_r.read(), 5)
    app_w.close()


async def test_app_reset_resets_stream(env: Env) -> None:
    s = await env.open(env.app_port)
    _, app_w = await asyncio.wait_for(env.apps.get(), 5)
    sock = app_w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    app_w.transport.abort()
    with pytest.raises(StreamReset) as err:
        await asyncio.wait_for(read_all(s), 5)
    assert err.value.code == ErrorCodes.CONNECT_ERROR  # RFC 9113 8.5: a TCP reset is a CONNECT_ERROR
    await eventually(lambda: env.server.streams == 0)


async def test_refusals_401_503(env: Env) -> None:
    env.deny.add(env.echo_port)
    with pytest.raises(HboneError) as err:
        await env.open(env.echo_port)
    assert err.value.status == 401
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(HboneError) as err:
        await env.open(dead_port)
    assert err.value.status == 503
    # the connection survived both refusals and still tunnels
    env.deny.clear()
    s = await env.open(env.echo_port)
    await s.close_write()  # type: ignore[attr-defined]
    assert await read_all(s) == b""
    assert env.pool.connection_count() == 1


@pytest.mark.parametrize("authority", ["nohostport", "host:0", "host:99999", ":80", "a b:80", "[::1:80"])
async def test_bad_authority_is_400(env: Env, authority: str) -> None:
    with pytest.raises(HboneError) as err:
        await env.pool.open_stream(
            PoolKey(CLIENT_ID, SERVER_ID, "127.0.0.1"),
            ("127.0.0.1", env.port),
            authority,
            [],
            env.client_ctx,
        )
    assert err.value.status == 400


def test_parse_authority() -> None:
    assert parse_authority("10.0.0.1:80") == ("10.0.0.1", 80)
    assert parse_authority("[fd00::1]:8080") == ("fd00::1", 8080)
    assert parse_authority("echo.ns.svc.cluster.local:80") == ("echo.ns.svc.cluster.local", 80)
    for bad in [None, "", "x", "x:", "x:y", "fd00::1:80", "[zz]:80"]:
        with pytest.raises(ValueError):
            parse_authority(bad)


# --- raw clients: what a broken or hostile peer does ------------------------------------------------------


async def raw_tls(
    env: Env, ctx: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", env.port, ssl=ctx or env.client_ctx, server_hostname="")


async def read_until_closed(reader: asyncio.StreamReader) -> list[h2.events.Event]:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    events: list[h2.events.Event] = []
    with contextlib.suppress(ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
        while data := await asyncio.wait_for(reader.read(65536), 10):
            events += conn.receive_data(data)
    return events


async def test_non_connect_is_400(env: Env) -> None:
    r, w = await raw_tls(env)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x:1")], True)
    w.write(c.data_to_send())
    status = None
    while status is None:
        for ev in c.receive_data(await asyncio.wait_for(r.read(65536), 5)):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[b":status"]
        w.write(c.data_to_send())
    assert status == b"400"
    w.close()


async def test_garbage_does_not_crash_server(env: Env) -> None:
    before = env.server.handshake_failures
    # garbage instead of a TLS ClientHello (not a TLS record type: refused at once, no waiting for more)
    r, w = await asyncio.open_connection("127.0.0.1", env.port)
    w.write(b"GARBAGE!" * 512)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(r.read(), 10) == b""
    w.close()
    # valid TLS, garbage instead of the HTTP/2 preface: GOAWAY and close
    r, w = await raw_tls(env)
    w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" + os.urandom(1024))
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while await asyncio.wait_for(r.read(65536), 10):
            pass
    w.close()
    assert env.server.handshake_failures > before
    s = await env.open(env.echo_port)  # the server still works
    await s.write(b"ok")  # type: ignore[attr-defined]
    await s.close_write()  # type: ignore[attr-defined]
    assert await read_all(s) == b"ok"


async def test_foreign_client_certificate_is_refused(env: Env) -> None:
    foreign = TestCA().issue(CLIENT_ID)
    before = env.server.handshake_failures

    async def attempt() -> None:
        r, w = await raw_tls(env, foreign.client_context())
        # TLS 1.3: the client may only learn of the rejection on its first read
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not await asyncio.wait_for(r.read(1), 10):
            raise ConnectionResetError("closed")

    with pytest.raises((ssl.SSLError, ConnectionError)):
        await attempt()
    await eventually(lambda: env.server.handshake_failures > before)


async def test_wrong_server_identity_is_refused_by_client(env: Env) -> None:
    with pytest.raises(PeerIdentityError):
        await env.pool.open_stream(
            PoolKey(CLIENT_ID, "other", "127.0.0.1"),
            ("127.0.0.1", env.port),
            f"127.0.0.1:{env.echo_port}",
            [],
            env.client_ctx,
            expected_identities={SpiffeId.parse("spiffe://cluster.local/ns/x/sa/y")},
        )


async def test_huge_header_block_is_refused(env: Env) -> None:
    r, w = await raw_tls(env)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    encode = c.encoder.encode
    c.encoder.encode = lambda headers, huffman=True: encode(headers, huffman=False)  # type: ignore[method-assign]
    c.initiate_connection()
    c.send_headers(
        1, [(":method", "CONNECT"), (":authority", f"127.0.0.1:{env.echo_port}"), ("x-big", "a" * 200_000)]
    )
    w.write(c.data_to_send())
    events = await read_until_closed(r)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
    w.close()
    await eventually(lambda: env.server.connections == 0)


async def test_client_ignoring_stream_limit_gets_streams_refused(env: Env) -> None:
    r, w = await raw_tls(env)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    for i in range(1000):  # sent before the server's SETTINGS arrive: the client does not know the limit
        c.send_headers(2 * i + 1, [(":method", "CONNECT"), (":authority", f"127.0.0.1:{env.echo_port}")])
    w.write(c.data_to_send())
    ok, refused, other = set(), set(), []
    while len(ok) + len(refused) < 1000:
        data = await asyncio.wait_for(r.read(65536), 10)
        assert data, "server closed the connection"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                ok.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                assert ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                refused.add(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                other.append(ev)
        w.write(c.data_to_send())
    assert not other  # no GOAWAY: only the excess streams were refused
    assert len(ok) == 100
    assert len(refused) == 900
    # the accepted streams work
    sid = min(ok)
    c.send_data(sid, b"still here", end_stream=True)
    w.write(c.data_to_send())
    echoed = b""
    while not echoed.endswith(b"still here"):
        for ev in c.receive_data(await asyncio.wait_for(r.read(65536), 10)):
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                echoed += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
        w.write(c.data_to_send())
    w.close()
    await eventually(lambda: env.server.connections == 0 and env.server.streams == 0)


@pytest.mark.slow  # a thousand real TLS+HTTP/2 streams: ~6 s on 2 cores
async def test_1000_streams_pooled_within_limit_and_no_fd_leak(ca: TestCA) -> None:
    async def run() -> None:
        echo = await asyncio.start_server(echo_app, "127.0.0.1", 0, backlog=4096)
        echo_port = echo.sockets[0].getsockname()[1]
        peak: list[int] = [0]
        server_holder: list[HboneServer] = []

        async def on_connect(req: ConnectRequest) -> Decision:
            peak[0] = max(peak[0], max(c.active_streams for c in server_holder[0]._conns))
            r, w = await asyncio.open_connection(req.host, req.port)
            return Accept(TcpStream(r, w))

        server = HboneServer(on_connect, ca.issue(SERVER_ID).server_context())
        server_holder.append(server)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(512)
        lsock.setblocking(False)
        await server.serve(lsock)
        pool = HbonePool(max_streams_per_conn=100)
        key = PoolKey(CLIENT_ID, SERVER_ID, "127.0.0.1")
        ctx = ca.issue(CLIENT_ID).client_context()
        streams = await asyncio.gather(
            *[
                pool.open_stream(
                    key, ("127.0.0.1", lsock.getsockname()[1]), f"127.0.0.1:{echo_port}", [], ctx
                )
                for _ in range(1000)
            ]
        )
        assert pool.connection_count(key) >= 10
        assert peak[0] <= 100

        async def use(i: int) -> bytes:
            s = streams[i]
            await s.write(b"%d" % i)
            await s.close_write()
            return await read_all(s)

        outs = await asyncio.gather(*[use(i) for i in range(1000)])
        assert outs == [b"%d" % i for i in range(1000)]
        await pool.close()
        await server.close()
        echo.close()
        await echo.wait_closed()

    before = fd_count()
    await run()
    await eventually(lambda: fd_count() <= before)


async def test_pool_reuses_and_idles_out(ca: TestCA, env: Env) -> None:
    env.pool.idle_timeout = 0.2
    key = PoolKey(CLIENT_ID, SERVER_ID, "127.0.0.1")
    a = await env.open(env.echo_port)
    b = await env.open(env.echo_port)
    assert env.pool.connection_count(key) == 1
    assert env.server.connections == 1
    for s in (a, b):
        await s.close_write()  # type: ignore[attr-defined]
        await read_all(s)
    await eventually(lambda: env.pool.connection_count(key) == 0)
    await eventually(lambda: env.server.connections == 0)


async def _never(_: ConnectRequest) -> Decision:  # pragma: no cover - type helper
    raise AssertionError


_: Callable[[ConnectRequest], Awaitable[Decision]] = _never


async def test_slow_app_bounds_buffers_and_stalls_the_writer(env: Env) -> None:
    """An app that does not read: the tunnel buffers at most a stream window, the client's write waits."""
    s = await env.open(env.app_port)
    _, app_w = await asyncio.wait_for(env.apps.get(), 5)
    server_stream = env.requests[-1].stream
    sent = 0
    chunk = b"z" * (1 << 20)

    async def flood() -> None:
        nonlocal sent
        for _ in range(64):  # 64 MiB: far more than every window and socket buffer together
            await s.write(chunk)  # type: ignore[attr-defined]
            sent += len(chunk)

    writer = asyncio.create_task(flood())
    last = -1
    while sent != last:  # wait until the writer stops making progress
        last = sent
        await asyncio.sleep(0.3)
    assert not writer.done()
    assert sent < 32 * (1 << 20)
    assert server_stream._buffered <= STREAM_WINDOW
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer
    s.reset()  # type: ignore[attr-defined]
    app_w.close()


async def test_connection_flood_is_bounded(ca: TestCA) -> None:
    async def on_connect(req: ConnectRequest) -> Decision:
        return Reject(401)

    server = HboneServer(
        on_connect, ca.issue(SERVER_ID).server_context(), max_connections=2, handshake_timeout=1.0
    )
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    await server.serve(lsock)
    port = lsock.getsockname()[1]
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # never say hello
    await eventually(lambda: len(server._handlers) == 2)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed at once
    assert server.refused_connections == 1
    w.close()
    for sr, _ in silent:  # the silent ones are dropped when their handshake time is up
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(sr.read(), 10) == b""
    for _, sw in silent:
        sw.close()
    assert server.handshake_failures == 2
    await eventually(lambda: len(server._handlers) == 0)
    await server.close()


async def test_pool_recovers_after_server_goes_away(ca: TestCA) -> None:
    echo = await asyncio.start_server(echo_app, "127.0.0.1", 0, backlog=4096)
    echo_port = echo.sockets[0].getsockname()[1]

    async def on_connect(req: ConnectRequest) -> Decision:
        r, w = await asyncio.open_connection(req.host, req.port)
        return Accept(TcpStream(r, w))

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    lsock.listen(16)
    server = HboneServer(on_connect, ca.issue(SERVER_ID).server_context())
    await server.serve(lsock)
    pool = HbonePool()
    key = PoolKey(CLIENT_ID, SERVER_ID, "127.0.0.1")
    ctx = ca.issue(CLIENT_ID).client_context()
    s = await pool.open_stream(key, ("127.0.0.1", port), f"127.0.0.1:{echo_port}", [], ctx)
    await server.close()  # the peer node's proxy restarts
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(read_all(s), 10)
    await eventually(lambda: pool.connection_count(key) == 0)
    lsock2 = socket.socket()
    lsock2.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock2.bind(("127.0.0.1", port))
    lsock2.listen(16)
    server2 = HboneServer(on_connect, ca.issue(SERVER_ID).server_context())
    await server2.serve(lsock2)
    s2 = await pool.open_stream(key, ("127.0.0.1", port), f"127.0.0.1:{echo_port}", [], ctx)
    await s2.write(b"again")
    await s2.close_write()
    assert await read_all(s2) == b"again"
    await pool.close()
    await server2.close()
    echo.close()
    await echo.wait_closed()


async def test_rapid_reset_cannot_pile_up_upstream_dials(ca: TestCA) -> None:
    """CVE-2023-44487 shape: open and reset streams in a loop; handlers stay bounded per connection."""
    in_flight = 0
    peak = 0
    release = asyncio.Event()

    async def on_connect(req: ConnectRequest) -> Decision:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await release.wait()  # a slow upstream dial
        finally:
            in_flight -= 1
        return Reject(503)

    server = HboneServer(on_connect, ca.issue(SERVER_ID).server_context())
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    await server.serve(lsock)
    _, w = await asyncio.open_connection(
        "127.0.0.1", lsock.getsockname()[1], ssl=ca.issue(CLIENT_ID).client_context(), server_hostname=""
    )
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    for i in range(1000):
        sid = 2 * i + 1
        c.send_headers(sid, [(":method", "CONNECT"), (":authority", "127.0.0.1:9")])
        c.reset_stream(sid)
    w.write(c.data_to_send())
    await w.drain()
    await eventually(lambda: server.refused_streams > 0)
    assert peak <= 2 * server.max_concurrent_streams
    release.set()
    await eventually(lambda: in_flight == 0)
    w.close()
    await server.close()
