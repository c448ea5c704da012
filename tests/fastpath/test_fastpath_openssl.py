"""The C byte path on its private, static OpenSSL (tools/openssl/build.sh, issue 8: newer AES-GCM code) next
to Python's ``ssl`` on the system OpenSSL, in one process: the extension reports the OpenSSL it runs on,
keeps that OpenSSL's symbols to itself, and its TLS still interoperates with the Python byte path's TLS in
both directions."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import re
import socket
import ssl
from pathlib import Path

import pytest

from istiopy.api.identity import SpiffeId
from istiopy.dataplane import fastpath
from istiopy.dataplane.fastpath import FastPath
from istiopy.dataplane.hbone import (
    Accept,
    ConnectRequest,
    Decision,
    HbonePool,
    HboneServer,
    PoolKey,
    RelayResult,
    TcpStream,
    hbone_headers,
    relay,
)
from istiopy.testing.certs import TestCA

ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def _pinned_version() -> str:
    found = re.search(r"^OPENSSL_VERSION=(\S+)", (ROOT / "tools/openssl/build.sh").read_text(), re.M)
    assert found
    return found.group(1)


def _static_dir() -> Path:
    """Where setup.py looks for the static OpenSSL (same rule)."""
    if d := os.environ.get("ISTIOPY_OPENSSL_DIR"):
        return Path(d)
    cache = os.environ.get("ISTIOPY_CACHE") or os.path.expanduser("~/.cache/istiopy")
    return Path(cache) / "openssl" / _pinned_version()


def _static_build() -> bool:
    """Whether the extension under test was linked against the static OpenSSL (the ASan build of
    ``make test-asan``, loaded through ISTIOPY_FASTPATH_SO, stays on the system one)."""
    if os.environ.get("ISTIOPY_FASTPATH_SO"):
        return False
    return all((_static_dir() / "lib" / n).is_file() for n in ("libssl.a", "libcrypto.a"))


def test_openssl_version_is_the_linked_one() -> None:
    assert fastpath.available(), fastpath.import_error()
    version = fastpath._ext.openssl_version()
    assert version.startswith("OpenSSL "), version
    if _static_build():
        assert version.split()[1] == _pinned_version(), version
        assert version != ssl.OPENSSL_VERSION  # the ssl module is still on the system OpenSSL
        # hidden: the extension neither exports OpenSSL's symbols nor depends on the system libssl.so
        # (dlsym on its handle searches it and its dependencies only)
        lib = ctypes.CDLL(fastpath._ext.__file__)
        assert not hasattr(lib, "SSL_new")
        assert not hasattr(lib, "OpenSSL_version")
    else:
        assert version == ssl.OPENSSL_VERSION


@pytest.mark.parametrize("client", ["c", "python"])
async def test_tls_interop_with_the_python_path(client: str) -> None:
    """A C client to a Python (system OpenSSL) server, and a Python client to a C server: HBONE over
    mTLS moves an exact byte stream both ways, the peers' identities checked on both sides."""
    ca = TestCA()
    server_cert = ca.issue(SERVER_ID)
    client_cert = ca.issue(CLIENT_ID)
    fp = FastPath()
    results: list[RelayResult] = []
    peers: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    host, port = app.sockets[0].getsockname()[:2]

    async def on_connect(req: ConnectRequest) -> Decision:
        peers.append(str(req.peer_identity))
        r, w = await asyncio.open_connection(req.host, req.port)
        return Accept(TcpStream(r, w), on_done=results.append)

    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    hbone_addr = lsock.getsockname()[:2]
    tasks: set[asyncio.Task[None]] = set()
    py_server: HboneServer | None = None
    pool = HbonePool()
    if client == "c":
        py_server = HboneServer(on_connect, server_cert.server_context())
        await py_server.serve(lsock)
    else:

        async def accept_loop() -> None:
            loop = asyncio.get_running_loop()
            while True:
                s, _ = await loop.sock_accept(lsock)
                tasks.add(asyncio.ensure_future(fp.serve(s, server_cert.bundle, on_connect)))

        tasks.add(asyncio.ensure_future(accept_loop()))
    app_sock, engine_side = _tcp_pair()
    try:
        headers = hbone_headers(("127.0.0.1", 4242))
        if client == "c":
            sock = socket.create_connection(hbone_addr)
            conn = await fp.connect(sock, client_cert.bundle, expected={SpiffeId.parse(SERVER_ID)})
            st = await conn.open(engine_side, f"{host}:{port}", headers)
            done: asyncio.Future[RelayResult] = asyncio.ensure_future(st.result())
        else:
            stream = await pool.open_stream(
                PoolKey(CLIENT_ID, SERVER_ID, hbone_addr[0]),
                hbone_addr,
                f"{host}:{port}",
                headers,
                client_cert.client_context(),
                expected_identities={SpiffeId.parse(SERVER_ID)},
            )
            engine_side.setblocking(False)
            done = asyncio.ensure_future(relay(await TcpStream.from_socket(engine_side), stream))
        reader, writer = await asyncio.open_connection(sock=app_sock)
        payload = os.urandom(2 * 1024 * 1024 + 5)  # several TLS records and stream windows
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        writer.close()
        await asyncio.wait_for(done, 10)
        assert peers == [CLIENT_ID]
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if py_server is not None:
            await py_server.close()
        await pool.close()
        await fp.close()
        lsock.close()
        app.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b
