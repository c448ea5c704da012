"""The C engine with several worker threads: connections, their streams and relays are sharded over the
threads (each object lives on one), and many of them at once still move exact byte streams both ways.
Also the ``ISTIOPY_WORKER_THREADS`` setting and FastPool's spreading of concurrent streams."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from istiopy.api.identity import SpiffeId
from istiopy.dataplane import fastpath
from istiopy.dataplane.fastpath import FastPath, FastPool
from istiopy.dataplane.hbone import Accept, ConnectRequest, Decision, PoolKey, TcpStream, hbone_headers
from istiopy.testing.certs import TestCA
from istiopy.testing.servers import echo as echo_app

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def test_worker_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fastpath.WORKER_THREADS_ENV, raising=False)
    assert fastpath.worker_threads() == fastpath.DEFAULT_WORKER_THREADS == 2
    monkeypatch.setenv(fastpath.WORKER_THREADS_ENV, " 5 ")
    assert fastpath.worker_threads() == 5
    for bad in ("0", "17", "-1", "two", "1.5"):
        monkeypatch.setenv(fastpath.WORKER_THREADS_ENV, bad)
        with pytest.raises(ValueError, match="ISTIOPY_WORKER_THREADS"):
            fastpath.worker_threads()


async def test_engine_rejects_a_bad_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.WORKER_THREADS_ENV, "lots")
    with pytest.raises(ValueError, match="ISTIOPY_WORKER_THREADS"):
        FastPath()
    with pytest.raises(ValueError, match="threads"):
        fastpath._ext.Engine(threads=0)
    monkeypatch.setenv(fastpath.WORKER_THREADS_ENV, "3")
    fp = FastPath()
    try:
        assert fp.threads == 3
        assert len(fp.thread_stats()) == 3
    finally:
        await fp.close()


@dataclass
class Side:
    """A C HBONE server (fp.serve) in front of an echo app, both on one engine."""

    fp: FastPath
    ca: TestCA
    hbone_addr: tuple[str, int]
    app_addr: tuple[str, int]


@pytest.fixture
async def side() -> AsyncIterator[Side]:
    ca = TestCA()
    fp = FastPath(threads=3)
    app = await asyncio.start_server(echo_app, "127.0.0.1", 0)
    app_addr = app.sockets[0].getsockname()[:2]
    cert = ca.issue(SERVER_ID)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)

    async def on_connect(req: ConnectRequest) -> Decision:
        r, w = await asyncio.open_connection(req.host, req.port)
        return Accept(TcpStream(r, w))

    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        loop = asyncio.get_running_loop()
        while True:
            s, _ = await loop.sock_accept(lsock)
            t = asyncio.ensure_future(fp.serve(s, cert.bundle, on_connect))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    tasks.add(asyncio.ensure_future(accept_loop()))
    try:
        yield Side(fp, ca, lsock.getsockname()[:2], app_addr)
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fp.close()
        lsock.close()
        app.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    """Send ``size`` random bytes and a FIN; the echo must return exactly them, then EOF."""
    payload = os.urandom(size)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(-1), 60)
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    writer.close()


async def test_tunnels_and_relays_spread_over_threads_and_keep_bytes_exact(side: Side) -> None:
    fp = side.fp
    bundle = side.ca.issue(CLIENT_ID).bundle
    conns = []
    for _ in range(6):  # 6 client + 6 server connections on one 3-thread engine
        sock = socket.create_connection(side.hbone_addr)
        conns.append(await fp.connect(sock, bundle, expected={SpiffeId.parse(SERVER_ID)}))
    authority = f"{side.app_addr[0]}:{side.app_addr[1]}"

    async def tunnel(i: int) -> None:
        app, eng = socket.socketpair()
        st = await conns[i % len(conns)].open(eng, authority, hbone_headers(("127.0.0.1", 4242)))
        reader, writer = await asyncio.open_connection(sock=app)
        await _exchange(reader, writer, 512 * 1024 + i * 4099)
        result = await asyncio.wait_for(st.result(), 30)
        assert result.error is None
        assert result.a_to_b == result.b_to_a == 512 * 1024 + i * 4099

    async def spliced(i: int) -> None:
        a_app, a_eng = socket.socketpair()
        b_eng, b_app = socket.socketpair()
        done = asyncio.ensure_future(fp.relay(a_eng, b_eng))
        ra, wa = await asyncio.open_connection(sock=a_app)
        rb, wb = await asyncio.open_connection(sock=b_app)
        echo = asyncio.ensure_future(echo_app(rb, wb))  # b's app echoes: both directions carry the payload
        await _exchange(ra, wa, 768 * 1024 + i)
        await echo
        result = await asyncio.wait_for(done, 30)
        assert (result.a_to_b, result.b_to_a, result.error) == (768 * 1024 + i, 768 * 1024 + i, None)

    await asyncio.gather(*(tunnel(i) for i in range(18)), *(spliced(i) for i in range(6)))

    per_thread = fp.thread_stats()
    assert len(per_thread) == 3
    for t in per_thread:  # every thread got connections (client or server side) and relays, and moved bytes
        assert t["conns_total"] >= 1, per_thread
        assert t["relays_total"] >= 1, per_thread
        assert t["bytes_up"] + t["bytes_down"] + t["bytes_spliced"] > 0, per_thread
    total = fp.stats()
    for k in ("conns_total", "streams_total", "relays_total", "bytes_up", "bytes_down", "bytes_spliced"):
        assert total[k] == sum(t[k] for t in per_thread), k
    assert total["conns_total"] == 12
    assert total["relays_total"] == 6
    assert total["streams_total"] == 36  # 18 client streams + their 18 server streams
    for c in conns:
        c.close()


async def test_pool_spreads_concurrent_streams_but_reuses_one_connection_sequentially(
    side: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fastpath.WORKER_THREADS_ENV, "2")
    bundle = side.ca.issue(CLIENT_ID).bundle
    key = PoolKey(CLIENT_ID, SERVER_ID, side.hbone_addr[0])
    authority = f"{side.app_addr[0]}:{side.app_addr[1]}"
    expected = {SpiffeId.parse(SERVER_ID)}

    Held = tuple[asyncio.StreamReader, asyncio.StreamWriter, fastpath.FastStream]

    async def stream(pool: FastPool) -> Held:
        headers = hbone_headers(("127.0.0.1", 1))
        st = await pool.open_stream(
            key, side.hbone_addr, authority, headers, bundle, expected_identities=expected
        )
        app, eng = socket.socketpair()
        st.attach(eng)
        reader, writer = await asyncio.open_connection(sock=app)
        return reader, writer, st

    sequential = FastPool()
    try:
        for _ in range(3):
            reader, writer, st = await stream(sequential)
            await _exchange(reader, writer, 10000)
            assert (await asyncio.wait_for(st.result(), 10)).error is None
        assert sequential.connection_count(key) == 1
    finally:
        await sequential.close()

    concurrent = FastPool()
    try:
        held = [await stream(concurrent) for _ in range(4)]  # all open at once
        assert concurrent.connection_count(key) == 2  # one per engine thread
        assert concurrent._fp is not None
        assert sorted(t["conns_active"] for t in concurrent._fp.thread_stats()) == [1, 1]
        for reader, writer, st in held:
            await _exchange(reader, writer, 100000)
            assert (await asyncio.wait_for(st.result(), 10)).error is None
    finally:
        await concurrent.close()
