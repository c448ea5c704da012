"""The C byte path against its pure-Python twin: every HBONE scenario runs C->C, C->Python and Python->C
over real TLS 1.3 on loopback, so the two implementations must agree on the wire and in behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from h2.errors import ErrorCodes

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import PeerIdentityError
from istiopy.dataplane import fastpath
from istiopy.dataplane.fastpath import FastPath
from istiopy.dataplane.hbone import (
    Accept,
    ConnectRequest,
    Decision,
    HboneError,
    HbonePool,
    HboneServer,
    PoolKey,
    Reject,
    RelayResult,
    StreamReset,
    TcpStream,
    hbone_headers,
    relay,
)
from istiopy.testing.certs import TestCA
from istiopy.testing.servers import echo as echo_app

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
PAIRS = [("c", "c"), ("c", "python"), ("python", "c")]


def test_extension_is_built() -> None:
    """`make test` must fail when the build silently degraded to the Python path."""
    assert fastpath.available(), fastpath.import_error()
    if os.environ.get("ISTIOPY_FASTPATH_SO"):  # make test-asan: the sanitizer build is the one under test
        assert fastpath._ext.__file__ == os.environ["ISTIOPY_FASTPATH_SO"]
    assert fastpath.byte_path("c") == "c"
    assert fastpath.byte_path("python") == "python"
    with pytest.raises(ValueError):
        fastpath.byte_path("rust")


def test_extension_is_current() -> None:
    """A failed rebuild leaves the previous .so in place (and only a warning): catch the stale build."""
    so = Path(fastpath._ext.__file__)
    sources = Path(fastpath.__file__).parent / "_c"
    # only this extension's sources: other extensions' files may share the folder (pki.c)
    newest = max((sources / n).stat().st_mtime for n in ("engine.c", "engine.h", "module.c"))
    assert so.stat().st_mtime >= newest, (
        f"{so} is older than {sources}: the C build failed (pip install -e .)"
    )


def test_byte_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.BYTE_PATH_ENV, "python")
    assert fastpath.byte_path() == "python"
    monkeypatch.setenv(fastpath.BYTE_PATH_ENV, "c")
    assert fastpath.byte_path() == "c"


@dataclass
class Mesh:
    """A client side and a server side of HBONE, each C or Python, plus an upstream app."""

    client: str
    server: str
    ca: TestCA
    fp: FastPath
    app_addr: tuple[str, int]
    hbone_addr: tuple[str, int]
    pool: HbonePool
    decisions: list[ConnectRequest] = field(default_factory=list)
    results: list[RelayResult] = field(default_factory=list)
    policy: Callable[[ConnectRequest], Awaitable[Decision | None]] | None = None

    async def open(
        self, authority: str | None = None, expect: str = SERVER_ID
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Awaitable[RelayResult]]:
        """An app connection through the tunnel: returns the app's reader/writer and the relay's end."""
        authority = authority or f"{self.app_addr[0]}:{self.app_addr[1]}"
        app, engine_side = _tcp_pair()  # TCP, not AF_UNIX: resets must be real RSTs
        headers = hbone_headers(("127.0.0.1", 4242))
        cert = self.ca.issue(CLIENT_ID)
        if self.client == "c":
            conn = await self._c_conn(cert.bundle, expect)
            try:
                st = await conn.open(engine_side, authority, headers)
            except BaseException:
                app.close()
                raise
            done: Awaitable[RelayResult] = st.result()
        else:
            stream = await self.pool.open_stream(
                PoolKey(CLIENT_ID, expect, self.hbone_addr[0]),
                self.hbone_addr,
                authority,
                headers,
                cert.client_context(),
                expected_identities={SpiffeId.parse(expect)},
            )
            engine_side.setblocking(False)
            done = asyncio.ensure_future(relay(await TcpStream.from_socket(engine_side), stream))
        reader, writer = await asyncio.open_connection(sock=app)
        return reader, writer, done

    _conns: dict[str, fastpath.FastConn] = field(default_factory=dict)

    async def _c_conn(self, bundle: object, expect: str) -> fastpath.FastConn:
        c = self._conns.get(expect)
        if c is not None and c.usable():
            return c
        sock = socket.create_connection(self.hbone_addr)
        c = await self.fp.connect(sock, bundle, expected={SpiffeId.parse(expect)})  # type: ignore[arg-type]
        self._conns[expect] = c
        return c


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-client-{p[1]}-server")
async def mesh(request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    client, server = request.param
    ca = TestCA()
    fp = FastPath()
    app = await asyncio.start_server(echo_app, "127.0.0.1", 0)
    app_addr = app.sockets[0].getsockname()[:2]
    server_cert = ca.issue(SERVER_ID)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    mesh = Mesh(client, server, ca, fp, app_addr, lsock.getsockname()[:2], HbonePool())

    async def on_connect(req: ConnectRequest) -> Decision:
        mesh.decisions.append(req)
        d = await mesh.policy(req) if mesh.policy is not None else None
        if d is not None:
            return d
        r, w = await asyncio.open_connection(req.host, req.port)
        return Accept(TcpStream(r, w), on_done=mesh.results.append)

    tasks: set[asyncio.Task[None]] = set()
    py_server: HboneServer | None = None
    if server == "python":
        py_server = HboneServer(on_connect, server_cert.server_context())
        await py_server.serve(lsock)
    else:

        async def accept_loop() -> None:
            loop = asyncio.get_running_loop()
            while True:
                s, _ = await loop.sock_accept(lsock)
                t = asyncio.ensure_future(fp.serve(s, server_cert.bundle, on_connect))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        tasks.add(asyncio.ensure_future(accept_loop()))
    try:
        yield mesh
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if py_server is not None:
            await py_server.close()
        await mesh.pool.close()
        await fp.close()
        lsock.close()
        app.close()


async def test_echo_large_both_ways(mesh: Mesh) -> None:
    reader, writer, done = await mesh.open()
    payload = os.urandom(3 * 1024 * 1024 + 17)  # larger than a stream window: flow control must work
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(-1), 30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    writer.close()
    result = await asyncio.wait_for(done, 10)
    assert result.error is None
    assert (result.a_to_b, result.b_to_a) == (len(payload), len(payload))
    await _eventually(lambda: len(mesh.results) == 1)
    assert (mesh.results[0].a_to_b, mesh.results[0].b_to_a) == (len(payload), len(payload))
    assert mesh.decisions[0].peer_identity == SpiffeId.parse(CLIENT_ID)
    assert mesh.decisions[0].headers["forwarded"] == 'for="127.0.0.1:4242"'


async def test_half_close_keeps_other_direction(mesh: Mesh) -> None:
    """Client FIN arrives as EOF at the app, whose later reply still comes back (END_STREAM <-> FIN)."""
    reader, writer, done = await mesh.open()
    writer.write(b"ping")
    writer.write_eof()  # the echo app replies after EOF, then closes
    assert await asyncio.wait_for(reader.read(-1), 10) == b"ping"
    writer.close()
    assert (await asyncio.wait_for(done, 10)).error is None


async def test_many_streams_multiplexed(mesh: Mesh) -> None:
    async def one(i: int) -> bytes:
        reader, writer, done = await mesh.open()
        msg = f"stream {i} ".encode() * 1000
        writer.write(msg)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 20)
        writer.close()
        await asyncio.wait_for(done, 10)
        return got if got == msg else b"mismatch"

    got = await asyncio.gather(*(one(i) for i in range(30)))
    assert all(g != b"mismatch" for g in got)
    if mesh.client == "c":
        assert len(mesh._conns) == 1  # one pooled connection carried all 30 streams


async def test_policy_reject_is_an_http_status(mesh: Mesh) -> None:
    async def deny(_r: ConnectRequest) -> Decision:
        return Reject(401, "denied")

    mesh.policy = deny
    with pytest.raises(HboneError) as e:
        await mesh.open()
    assert e.value.status == 401


async def test_dial_failure_is_503(mesh: Mesh) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(HboneError) as e:
        await mesh.open(authority=f"127.0.0.1:{port}")
    assert e.value.status == 503


async def test_bad_authority_is_400(mesh: Mesh) -> None:
    with pytest.raises(HboneError) as e:
        await mesh.open(authority="no-port")
    assert e.value.status == 400


async def test_app_reset_crosses_the_tunnel(mesh: Mesh) -> None:
    """An RST from the client app becomes RST_STREAM, then an RST at the server's app side."""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    watchers: set[asyncio.Task[None]] = set()

    async def watched_upstream(_r: ConnectRequest) -> Decision:
        listener = socket.create_server(("127.0.0.1", 0))
        up = socket.create_connection(listener.getsockname())
        app, _ = listener.accept()
        listener.close()
        app.setblocking(False)

        async def watch() -> None:
            loop = asyncio.get_running_loop()
            try:
                while await loop.sock_recv(app, 4096):
                    pass
                outcome.set_result("eof")
            except ConnectionResetError:
                outcome.set_result("reset")
            app.close()

        watchers.add(asyncio.ensure_future(watch()))
        up.setblocking(False)
        return Accept(await TcpStream.from_socket(up), on_done=mesh.results.append)

    mesh.policy = watched_upstream
    _reader, writer, done = await mesh.open()
    writer.write(b"x")
    await writer.drain()
    await _eventually(lambda: len(mesh.decisions) == 1)
    await asyncio.sleep(0.1)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    result = await asyncio.wait_for(done, 10)
    assert result.error is not None
    assert await asyncio.wait_for(outcome, 10) == "reset"
    if mesh.server == "python":  # the Python server sees the code the (C or Python) client sent
        await _eventually(lambda: len(mesh.results) == 1)
        error = mesh.results[0].error
        assert isinstance(error, StreamReset), error
        assert error.code == ErrorCodes.CONNECT_ERROR  # RFC 9113 8.5


async def test_back_pressure_reaches_the_sending_app(mesh: Mesh) -> None:
    """A destination that never reads stops the sender: buffers are bounded by flow-control windows and
    socket buffers, so the sending app's writes stall long before 96 MiB (no unbounded queue anywhere)."""
    held: list[socket.socket] = []

    async def never_reads(_r: ConnectRequest) -> Decision:
        listener = socket.create_server(("127.0.0.1", 0))
        up = socket.create_connection(listener.getsockname())
        app, _ = listener.accept()  # accepted and never read
        listener.close()
        held.append(app)
        up.setblocking(False)
        return Accept(await TcpStream.from_socket(up))

    mesh.policy = never_reads
    _reader, writer, done = await mesh.open()
    chunk = b"z" * (1 << 20)
    written = 0
    try:
        while written < 96 << 20:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 2.0)
            except TimeoutError:
                break
            written += len(chunk)
        assert written >= 4 << 20, "the tunnel did not carry bytes at all"
        assert written < 96 << 20, "the tunnel swallowed everything: no back-pressure"
    finally:
        writer.transport.abort()
        for a in held:
            a.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(done, 10)


async def test_wrong_server_identity_is_refused(mesh: Mesh) -> None:
    other = "spiffe://cluster.local/ns/default/sa/someone-else"
    with pytest.raises((PeerIdentityError, HboneError)):
        await mesh.open(expect=other)
    assert mesh.decisions == []


async def test_counters_from_c(mesh: Mesh) -> None:
    reader, writer, done = await mesh.open()
    writer.write(b"a" * 10000)
    writer.write_eof()
    assert len(await asyncio.wait_for(reader.read(-1), 10)) == 10000
    writer.close()
    await asyncio.wait_for(done, 10)
    stats = mesh.fp.stats()
    assert stats["streams_total"] >= 1
    assert stats["bytes_up"] >= 10000
    assert stats["bytes_down"] >= 10000
    await _eventually(lambda: mesh.fp.stats()["streams_active"] == 0)


# ---- plain relay (splice) ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _engine() -> AsyncIterator[FastPath]:
    fp = FastPath()
    try:
        yield fp
    finally:
        await fp.close()


async def test_splice_relay_bytes_and_half_close() -> None:
    async with _engine() as fp:
        a_app, a_eng = socket.socketpair()
        b_eng, b_app = socket.socketpair()
        done = asyncio.ensure_future(fp.relay(a_eng, b_eng))
        ra, wa = await asyncio.open_connection(sock=a_app)
        rb, wb = await asyncio.open_connection(sock=b_app)
        payload = os.urandom(2 * 1024 * 1024)
        wa.write(payload)
        wa.write_eof()
        assert await asyncio.wait_for(rb.read(-1), 10) == payload  # FIN crossed after the bytes
        wb.write(b"reply after the half-close")
        wb.write_eof()
        assert await asyncio.wait_for(ra.read(-1), 10) == b"reply after the half-close"
        result = await asyncio.wait_for(done, 10)
        assert (result.a_to_b, result.b_to_a, result.error) == (len(payload), 26, None)
        assert fp.stats()["bytes_spliced"] >= len(payload)
        wa.close()
        wb.close()


async def test_splice_relay_reset_propagates() -> None:
    async with _engine() as fp:
        la = socket.create_server(("127.0.0.1", 0))
        lb = socket.create_server(("127.0.0.1", 0))
        a_app = socket.create_connection(la.getsockname())
        a_eng, _ = la.accept()
        b_eng = socket.create_connection(lb.getsockname())
        b_app, _ = lb.accept()
        done = asyncio.ensure_future(fp.relay(a_eng, b_eng))
        a_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a_app.close()
        result = await asyncio.wait_for(done, 10)
        assert result.error is not None
        b_app.settimeout(5)
        with pytest.raises(ConnectionResetError):
            b_app.recv(10)
        for s in (la, lb, b_app):
            s.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


async def _eventually(pred: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)
