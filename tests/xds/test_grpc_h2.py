"""The h2-based gRPC client (``istiopy.api.grpc_h2``) against a real grpcio server (generic handlers).

Covers what the node proxy's xDS and CA clients rely on: unary calls with status, details, metadata and
deadlines; bidi streams with many and large messages (flow control both ways), half-close and aborts; mutual
TLS with a host-name override; connection loss and lazy reconnect; many calls multiplexed on one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from xds_harness import make_pki

from istiopy.api.grpc_h2 import (
    Channel,
    RpcError,
    StatusCode,
    client_ssl_context,
    encode_timeout,
    parse_target,
)
from istiopy.api.tls_stream import TlsFactory
from istiopy.dataplane import fastpath

# Both TLS clients a channel takes: Python's ssl, and the C extension's own OpenSSL (the node proxy's).
TLS_CLIENTS = [
    pytest.param(client_ssl_context, id="ssl-module"),
    pytest.param(fastpath.client_tls, id="fastpath-openssl"),
]

SVC = "test.Svc"
BIG = 8 * 1024 * 1024


@dataclass
class Seen:
    """What the server observed, for assertions on the client's wire behaviour."""

    metadata: list[dict[str, Any]] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    peer_certs: list[bool] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    flooded: int = 0  # messages the Flood handler got past flow control


Ctx = grpc.aio.ServicerContext[Any, Any]


def handler(seen: Seen) -> grpc.GenericRpcHandler:
    async def echo(req: bytes, ctx: Ctx) -> bytes:
        seen.metadata.append(dict(ctx.invocation_metadata() or ()))
        seen.peer_certs.append(bool(ctx.auth_context().get("x509_pem_cert")))
        return req

    async def fail(req: bytes, ctx: Ctx) -> bytes:
        ctx.set_trailing_metadata((("why", "because"), ("blob-bin", b"\x00\xff")))
        await ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: caf\u00e9 100% gone\nreally")
        raise AssertionError("unreachable")

    async def slow(req: bytes, ctx: Ctx) -> bytes:
        seen.time_remaining.append(ctx.time_remaining())
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise
        return b""

    async def big(req: bytes, ctx: Ctx) -> bytes:
        return bytes(range(256)) * (int(req) // 256)

    async def bidi_echo(
        it: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for m in it:
            yield m

    async def total(
        it: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        n = 0
        async for m in it:  # ends only when the client half-closes
            n += len(m)
        yield str(n).encode()
        yield b"after half-close"

    async def abort_on_stop(
        it: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for m in it:
            if m == b"stop":
                await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "told to stop")
            yield m

    async def hold(it: AsyncIterator[bytes], ctx: Ctx) -> AsyncIterator[bytes]:
        yield b"held"
        try:
            async for _ in it:
                pass
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise

    async def flood(it: AsyncIterator[bytes], ctx: Ctx) -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"f" * (1 << 20)
            seen.flooded += 1

    uu, ss = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SVC,
        {
            "Echo": uu(echo),
            "Fail": uu(fail),
            "Slow": uu(slow),
            "Big": uu(big),
            "BidiEcho": ss(bidi_echo),
            "Total": ss(total),
            "AbortOnStop": ss(abort_on_stop),
            "Hold": ss(hold),
            "Flood": ss(flood),
        },
    )


@dataclass
class Server:
    server: grpc.aio.Server
    port: int
    seen: Seen


async def start_server(
    port: int = 0, creds: grpc.ServerCredentials | None = None, options: Sequence[tuple[str, Any]] = ()
) -> Server:
    seen = Seen()
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    opts += options
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers((handler(seen),))
    addr = f"127.0.0.1:{port}"
    bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    await server.start()
    return Server(server, bound, seen)


@pytest.fixture
async def srv() -> AsyncIterator[Server]:
    s = await start_server()
    try:
        yield s
    finally:
        await s.server.stop(0)


@pytest.fixture
async def chan(srv: Server) -> AsyncIterator[Channel]:
    ch = Channel(f"127.0.0.1:{srv.port}", max_receive_message_bytes=64 << 20)
    try:
        yield ch
    finally:
        await ch.close()


# ------------------------------------------------------------------------------------------------ unary
async def test_unary_ok_and_metadata_reach_the_server(
    srv: Server, chan: Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    md = [("authorization", "Bearer s3cr3t"), ("clusterid", "Kubernetes"), ("trace-bin", b"\x01\x02\xff")]
    assert await chan.unary_unary(f"/{SVC}/Echo", b"hello", metadata=md) == b"hello"
    assert await chan.unary_unary(f"/{SVC}/Echo", b"") == b""  # an empty message is still a message
    seen = srv.seen.metadata[0]
    assert seen["authorization"] == "Bearer s3cr3t"
    assert "s3cr3t" not in caplog.text  # hpack's debug log would print header values
    assert seen["clusterid"] == "Kubernetes"
    assert seen["trace-bin"] == b"\x01\x02\xff"
    assert "istiopy-grpc-h2" in seen["user-agent"]


async def test_unary_error_status_details_and_trailers(chan: Channel) -> None:
    with pytest.raises(RpcError) as ei:
        await chan.unary_unary(f"/{SVC}/Fail", b"x")
    assert ei.value.code == StatusCode.NOT_FOUND
    assert ei.value.details == "no such thing: caf\u00e9 100% gone\nreally"  # percent-decoded
    assert ("why", "because") in ei.value.trailers
    assert ("blob-bin", b"\x00\xff") in ei.value.trailers
    with pytest.raises(RpcError) as ei:
        await chan.unary_unary(f"/{SVC}/Nope", b"x")
    assert ei.value.code == StatusCode.UNIMPLEMENTED


async def test_deadline_is_sent_and_enforced(srv: Server, chan: Channel) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RpcError) as ei:
        await chan.unary_unary(f"/{SVC}/Slow", b"", timeout=0.5)
    assert ei.value.code == StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - t0 < 3
    [remaining] = srv.seen.time_remaining
    assert remaining is not None  # the server got grpc-timeout ...
    assert 0 < remaining <= 0.5  # ... with our deadline
    async with asyncio.timeout(5):
        await srv.seen.cancelled.wait()
    assert await chan.unary_unary(f"/{SVC}/Echo", b"still fine") == b"still fine"


def test_timeout_encoding_and_targets() -> None:
    assert encode_timeout(0.5) == "500000u"
    assert encode_timeout(1000.0) == "1000000m"
    assert encode_timeout(10**6) == "1000000S"
    assert len(encode_timeout(10**12)) <= 9
    assert parse_target("dns:///istiod.istio-system.svc:15012").authority == "istiod.istio-system.svc:15012"
    t = parse_target("[::1]:15010")
    assert (t.host, t.port) == ("::1", 15010)
    assert parse_target("istiod").port == 443
    with pytest.raises(ValueError, match="port 'x'"):
        parse_target("host:x")


async def test_large_unary_response_flows_through_windows(chan: Channel) -> None:
    reply = await chan.unary_unary(f"/{SVC}/Big", str(BIG).encode(), timeout=30)
    assert len(reply) == BIG
    assert reply[:256] == bytes(range(256))


async def test_receive_limit_is_enforced(srv: Server) -> None:
    async with Channel(f"127.0.0.1:{srv.port}", max_receive_message_bytes=1000) as ch:
        with pytest.raises(RpcError) as ei:
            await ch.unary_unary(f"/{SVC}/Big", b"4096")
        assert ei.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "4096 bytes" in ei.value.details
        assert await ch.unary_unary(f"/{SVC}/Echo", b"ok") == b"ok"  # the connection is fine


async def test_many_concurrent_calls_share_one_connection(chan: Channel) -> None:
    async def one(i: int) -> bytes:
        return await chan.unary_unary(f"/{SVC}/Echo", str(i).encode() * 100)

    replies = await asyncio.gather(*(one(i) for i in range(300)))
    assert replies == [str(i).encode() * 100 for i in range(300)]
    assert chan.connects == 1


# ------------------------------------------------------------------------------------------------- bidi
async def test_bidi_many_messages_both_ways(chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/BidiEcho")
    got: list[bytes] = []

    async def reader() -> None:
        async for m in call:
            got.append(m)

    r = asyncio.create_task(reader())
    for i in range(2000):
        await call.write(b"m%d" % i)
    await call.done_writing()
    async with asyncio.timeout(20):
        await r
    assert got == [b"m%d" % i for i in range(2000)]
    assert call.status is not None
    assert call.status.code == StatusCode.OK


async def test_bidi_messages_larger_than_every_window(chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/BidiEcho", timeout=60)
    payloads = [bytes([i]) * (BIG + i) for i in range(3)]  # 8 MiB each: twice the stream window
    for p in payloads:
        await call.write(p)
        assert await call.read() == p
    await call.done_writing()
    assert await call.read() is None


async def test_concurrent_writers_on_one_call_keep_messages_whole(chan: Channel) -> None:
    """Writers racing on one stream, each message bigger than a window: none is torn or interleaved."""
    call = await chan.stream_stream(f"/{SVC}/BidiEcho", timeout=60)
    payloads = {bytes([i]) * (5 << 20) for i in range(4)}

    async def read_all() -> set[bytes | None]:
        # Read while the writers write: a bidi client that stops reading until all its writes are done
        # can deadlock on flow control once the echoes outgrow the windows (any gRPC stack would).
        return {await call.read() for _ in payloads}

    reader = asyncio.create_task(read_all())
    await asyncio.gather(*(call.write(p) for p in payloads))
    assert await reader == payloads
    await call.done_writing()
    assert await call.read() is None


async def test_half_close_lets_the_server_answer(chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/Total")
    for _ in range(10):
        await call.write(b"x" * 1000)
    await call.done_writing()
    assert await call.read() == b"10000"
    assert await call.read() == b"after half-close"
    assert await call.read() is None
    with pytest.raises(RpcError, match="after done_writing"):
        await call.write(b"late")


async def test_server_abort_ends_the_stream_with_its_status(chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/AbortOnStop")
    await call.write(b"one")
    assert await call.read() == b"one"
    await call.write(b"stop")
    with pytest.raises(RpcError) as ei:
        await call.read()  # the server aborts instead of echoing "stop"
    assert ei.value.code == StatusCode.PERMISSION_DENIED
    assert ei.value.details == "told to stop"
    with pytest.raises(RpcError):
        await call.write(b"more")


async def test_cancel_resets_the_stream(srv: Server, chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/Hold")
    assert await call.read() == b"held"
    call.cancel()
    with pytest.raises(RpcError) as ei:
        await call.read()
    assert ei.value.code == StatusCode.CANCELLED
    async with asyncio.timeout(5):
        await srv.seen.cancelled.wait()  # the server saw RST_STREAM(CANCEL)
    assert await chan.unary_unary(f"/{SVC}/Echo", b"next") == b"next"


async def test_a_reader_that_stops_holds_the_server_back(srv: Server, chan: Channel) -> None:
    """Received data is acknowledged as the reader takes it: 64 MiB do not pile up in the client."""
    call = await chan.stream_stream(f"/{SVC}/Flood")
    assert len(await call.read() or b"") == 1 << 20
    await asyncio.sleep(1.0)  # not reading: the windows fill and the server's writes wait
    assert srv.seen.flooded < 16
    got = 1
    while (m := await call.read()) is not None:
        assert len(m) == 1 << 20
        got += 1
    assert got == 64
    assert srv.seen.flooded == 64


# -------------------------------------------------------------------------------------------------- TLS
@pytest.mark.parametrize("tls", TLS_CLIENTS)
async def test_mutual_tls_with_server_name_override(tls: TlsFactory) -> None:
    pki = make_pki()
    creds = grpc.ssl_server_credentials(
        [(pki.server_key_pem, pki.server_cert_pem)], root_certificates=pki.ca_pem, require_client_auth=True
    )
    s = await start_server(creds=creds)
    client_cert = (pki.client_cert_pem.decode(), pki.client_key_pem.decode())
    try:
        ctx = tls(pki.ca_pem.decode(), client_cert=client_cert)
        # Dial the IP, verify the certificate for the mesh name (what grpc's ssl_target_name_override does).
        async with Channel(
            f"127.0.0.1:{s.port}", ssl_context=ctx, server_name="istiod.istio-system.svc"
        ) as ch:
            assert await ch.unary_unary(f"/{SVC}/Echo", b"secure") == b"secure"
        assert s.seen.peer_certs == [True]
        # A name the certificate does not carry is refused by the client.
        async with Channel(f"127.0.0.1:{s.port}", ssl_context=ctx, server_name="evil.example") as ch:
            with pytest.raises(RpcError) as ei:
                await ch.unary_unary(f"/{SVC}/Echo", b"x")
            assert ei.value.code == StatusCode.UNAVAILABLE
            assert "certificate" in ei.value.details.lower()
        # Without a client certificate the server refuses the handshake.
        async with Channel(
            f"127.0.0.1:{s.port}", ssl_context=tls(pki.ca_pem.decode()), server_name="localhost"
        ) as ch:
            with pytest.raises(RpcError) as ei:
                await ch.unary_unary(f"/{SVC}/Echo", b"x", timeout=5)
            assert ei.value.code == StatusCode.UNAVAILABLE
    finally:
        await s.server.stop(0)


@pytest.mark.parametrize("tls", TLS_CLIENTS)
async def test_tls_streams_carry_large_messages_both_ways_and_close_cleanly(tls: TlsFactory) -> None:
    """Flow control through the TLS layer (the writer waits for the socket, the reader holds back) and a
    clean close: what the xDS stream of the node proxy does over hours."""
    pki = make_pki()
    creds = grpc.ssl_server_credentials([(pki.server_key_pem, pki.server_cert_pem)])
    s = await start_server(creds=creds)
    try:
        ch = Channel(
            f"127.0.0.1:{s.port}",
            ssl_context=tls(pki.ca_pem.decode()),
            server_name="localhost",
            max_receive_message_bytes=64 << 20,
        )
        call = await ch.stream_stream(f"/{SVC}/BidiEcho")
        payloads = [bytes([i]) * (3 << 20) for i in range(4)]

        async def send() -> None:
            for p in payloads:
                await call.write(p)
            await call.done_writing()

        sender = asyncio.ensure_future(send())
        got = [m async for m in _messages(call)]
        await sender
        assert got == payloads
        assert await ch.unary_unary(f"/{SVC}/Echo", b"again") == b"again"  # same connection, still good
        assert ch.connects == 1
        await ch.close()
    finally:
        await s.server.stop(0)


async def _messages(call: Any) -> AsyncIterator[bytes]:
    while (m := await call.read()) is not None:
        yield m


def test_fastpath_tls_client_rejects_bad_pem() -> None:
    with pytest.raises(ValueError, match="roots_pem"):
        fastpath.client_tls("not a certificate")
    pki = make_pki()
    with pytest.raises(ValueError, match="key_pem"):
        fastpath.client_tls(
            pki.ca_pem.decode(), client_cert=(pki.client_cert_pem.decode(), pki.server_key_pem.decode())
        )


# ------------------------------------------------------------------------------------------ connections
async def test_server_restart_unavailable_then_reconnects() -> None:
    s = await start_server()
    port = s.port
    ch = Channel(f"127.0.0.1:{port}")
    try:
        assert await ch.unary_unary(f"/{SVC}/Echo", b"a") == b"a"
        await s.server.stop(0)
        with pytest.raises(RpcError) as ei:
            await ch.unary_unary(f"/{SVC}/Echo", b"b")
        assert ei.value.code == StatusCode.UNAVAILABLE
        s = await start_server(port)
        assert await ch.unary_unary(f"/{SVC}/Echo", b"c") == b"c"
        assert ch.connects == 2
    finally:
        await ch.close()
        await s.server.stop(0)


@dataclass
class Relay:
    """A TCP relay in front of a server that a test can cut (RST) or freeze (a silent, half-dead peer)."""

    server: asyncio.Server
    port: int
    conns: list[asyncio.StreamWriter] = field(default_factory=list)
    frozen: asyncio.Event = field(default_factory=asyncio.Event)

    def cut(self) -> None:
        for w in self.conns:
            w.transport.abort()


async def start_relay(upstream_port: int) -> Relay:
    relay: Relay

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream_port)
        relay.conns.extend([w, uw])

        async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await a.read(65536):
                    if relay.frozen.is_set():
                        continue  # swallow: nothing gets through, nothing is closed
                    b.write(data)
                    await b.drain()

        await asyncio.gather(pump(r, uw), pump(ur, w))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    relay = Relay(server, server.sockets[0].getsockname()[1])
    return relay


async def test_connection_loss_fails_open_calls_unavailable(srv: Server) -> None:
    """The connection is cut mid-call: every open call fails with UNAVAILABLE, the next call re-dials."""
    relay = await start_relay(srv.port)
    ch = Channel(f"127.0.0.1:{relay.port}")
    try:
        calls = [await ch.stream_stream(f"/{SVC}/Hold") for _ in range(3)]
        for c in calls:
            assert await c.read() == b"held"
        relay.cut()
        for c in calls:
            with pytest.raises(RpcError) as ei:
                async with asyncio.timeout(5):
                    await c.read()
            assert ei.value.code == StatusCode.UNAVAILABLE
        assert await ch.unary_unary(f"/{SVC}/Echo", b"again") == b"again"  # lazily re-dialled
        assert ch.connects == 2
    finally:
        await ch.close()
        relay.server.close()


async def test_keepalive_detects_a_silent_peer() -> None:
    """With keepalive on, a peer that stops answering (no FIN, no RST) fails the open call in time."""
    # grpc servers answer frequent pings with GOAWAY(too_many_pings) unless told to accept them.
    ping_opts = [("grpc.http2.min_ping_interval_without_data_ms", 10), ("grpc.http2.max_ping_strikes", 0)]
    srv = await start_server(options=ping_opts)
    relay = await start_relay(srv.port)
    ch = Channel(f"127.0.0.1:{relay.port}", keepalive_time=0.2, keepalive_timeout=0.5)
    try:
        call = await ch.stream_stream(f"/{SVC}/Hold")
        assert await call.read() == b"held"
        await asyncio.sleep(0.5)  # pings answered: the call is unaffected
        assert not call.done
        relay.frozen.set()
        with pytest.raises(RpcError) as ei:
            async with asyncio.timeout(5):
                await call.read()
        assert ei.value.code == StatusCode.UNAVAILABLE
        assert "keepalive" in ei.value.details
    finally:
        await ch.close()
        relay.cut()
        relay.server.close()
        await srv.server.stop(0)


async def test_closed_channel_cancels_calls_and_refuses_new_ones(chan: Channel) -> None:
    call = await chan.stream_stream(f"/{SVC}/Hold")
    assert await call.read() == b"held"
    await chan.close()
    with pytest.raises(RpcError) as ei:
        await call.read()
    assert ei.value.code == StatusCode.CANCELLED
    with pytest.raises(RpcError) as ei:
        await chan.unary_unary(f"/{SVC}/Echo", b"x")
    assert ei.value.code == StatusCode.CANCELLED


def test_wire_clients_import_neither_grpc_nor_cryptography() -> None:
    code = (
        "import sys, istiopy.api.grpc_h2 as g; a = {'grpc', 'cryptography'} & set(sys.modules);"
        "import istiopy.api.xds_client, istiopy.api.ca_client; b = 'grpc' in sys.modules;"
        "print(sorted(a), b)"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False", out.stdout + out.stderr


# ------------------------------------------------------------------------------- a raw HTTP/2 peer (h2)
async def raw_h2_server() -> tuple[asyncio.Server, int]:
    """A misbehaving peer grpcio cannot play: HTTP errors, compressed messages, GOAWAY before answering."""
    import h2.config
    import h2.connection
    import h2.events

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        w.write(conn.data_to_send())
        while data := await r.read(65536):
            for ev in conn.receive_data(data):
                if not isinstance(ev, h2.events.RequestReceived):
                    continue
                sid, path = ev.stream_id, dict(ev.headers or [])[":path"]
                if path.endswith("/Http503"):
                    conn.send_headers(sid, [(":status", "503"), ("content-type", "text/plain")])
                    conn.send_data(sid, b"busy, come back later", end_stream=True)
                elif path.endswith("/Compressed"):
                    conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                    conn.send_data(sid, b"\x01\x00\x00\x00\x03abc")
                    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                elif path.endswith("/GoAway"):
                    conn.close_connection(last_stream_id=0)
            w.write(conn.data_to_send())
            await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_http_errors_compression_and_goaway_from_a_raw_peer() -> None:
    server, port = await raw_h2_server()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(RpcError) as ei:
                await ch.unary_unary("/raw.Svc/Http503", b"")
            assert ei.value.code == StatusCode.UNAVAILABLE  # the gRPC mapping of HTTP 503
            assert "503" in ei.value.details
            with pytest.raises(RpcError) as ei:
                await ch.unary_unary("/raw.Svc/Compressed", b"")
            assert ei.value.code == StatusCode.INTERNAL
            assert "compressed" in ei.value.details
            with pytest.raises(RpcError) as ei:
                await ch.unary_unary("/raw.Svc/GoAway", b"", timeout=5)
            assert ei.value.code == StatusCode.UNAVAILABLE  # never processed: safe to retry
            assert "GOAWAY" in ei.value.details
            with pytest.raises(RpcError):  # the next call dials a new connection
                await ch.unary_unary("/raw.Svc/Http503", b"")
            assert ch.connects == 2
    finally:
        server.close()


async def test_graceful_goaway_moves_new_calls_to_a_new_connection() -> None:
    """grpc's max_connection_age sends GOAWAY; the open call finishes, later calls use a fresh connection."""
    seen = Seen()
    opts = [("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 10_000)]
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers((handler(seen),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Channel(f"127.0.0.1:{port}") as ch:
            call = await ch.stream_stream(f"/{SVC}/BidiEcho")
            await call.write(b"before")
            assert await call.read() == b"before"
            await asyncio.sleep(1.0)  # past the connection's max age: the server sent GOAWAY
            assert await ch.unary_unary(f"/{SVC}/Echo", b"new") == b"new"
            assert ch.connects == 2
            await call.write(b"after")  # the old connection still carries the call it had
            assert await call.read() == b"after"
            await call.done_writing()
            assert await call.read() is None
    finally:
        await server.stop(0)
