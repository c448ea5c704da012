"""The C extension's TLS client session over memory (``_fastpath.TlsClientSession``), the node proxy's
control-plane TLS, against Python's ``ssl`` as the server: handshake, host-name and IP checks, data both
ways, close_notify, and hostile input. All in memory (no sockets), so ``make test-asan`` runs it under
AddressSanitizer too; the channel-level tests are in ``test_grpc_h2.py``.
"""

from __future__ import annotations

import os
import random
import ssl
import tempfile
from typing import Any

import pytest
from xds_harness import Pki, make_pki

from istiopy.dataplane import fastpath

Server = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


def _server(pki: Pki, *, require_client_cert: bool = False) -> Server:
    """Python's ssl as the server, over memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as d:  # ssl loads keys from files only
        cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        with open(cert, "wb") as f:
            f.write(pki.server_cert_pem)
        with open(key, "wb") as f:
            f.write(pki.server_key_pem)
        ctx.load_cert_chain(cert, key)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=pki.ca_pem.decode())
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(inc, out, server_side=True), inc, out


def _handshake(client: Any, server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO) -> None:
    """Move bytes between the two until both finished (or one raised)."""
    server_done = False
    for _ in range(20):
        client_done = client.handshake()
        s_in.write(client.take())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        client.feed(s_out.read())
        if client_done and server_done:
            return
    raise AssertionError("handshake did not finish")


def test_handshake_data_both_ways_and_close_notify() -> None:
    pki = make_pki()
    client_cert = (pki.client_cert_pem.decode(), pki.client_key_pem.decode())
    session = fastpath.client_tls(pki.ca_pem.decode(), client_cert=client_cert).session(
        "istiod.istio-system.svc"
    )
    server, s_in, s_out = _server(pki, require_client_cert=True)
    _handshake(session, server, s_in, s_out)
    assert session.alpn() == "h2"
    assert session.version == "TLSv1.3"
    assert server.getpeercert(binary_form=True)  # the client presented its certificate
    payload = bytes(random.Random(7).randrange(256) for _ in range(200_000))
    session.write(payload)
    s_in.write(session.take())
    got = b""
    while len(got) < len(payload):
        got += server.read(65536)
    assert got == payload
    server.write(b"answer" * 10_000)
    session.feed(s_out.read())
    assert session.read() == b"answer" * 10_000
    assert session.read() == b""  # nothing more: no data, no error
    session.close_notify()
    s_in.write(session.take())
    assert server.read(10) == b""  # a clean end (no data would raise SSLWantReadError)
    assert not session.peer_closed  # ours went out; the server has not answered with its own


def test_peer_close_notify_is_seen() -> None:
    pki = make_pki()
    session = fastpath.client_tls(pki.ca_pem.decode()).session("localhost")
    server, s_in, s_out = _server(pki)
    _handshake(session, server, s_in, s_out)
    server.write(b"last words")
    try:
        server.unwrap()  # sends close_notify, then wants the client's
    except ssl.SSLWantReadError:
        pass
    session.feed(s_out.read())
    assert session.read() == b"last words"
    assert session.peer_closed


@pytest.mark.parametrize(
    ("name", "ok"),
    [("localhost", True), ("127.0.0.1", True), ("evil.example", False), ("127.0.0.2", False)],
)
def test_server_name_or_ip_is_verified(name: str, ok: bool) -> None:
    pki = make_pki()
    session = fastpath.client_tls(pki.ca_pem.decode()).session(name)
    server, s_in, s_out = _server(pki)
    if ok:
        _handshake(session, server, s_in, s_out)
        return
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        _handshake(session, server, s_in, s_out)


def test_untrusted_server_is_refused_with_the_reason() -> None:
    # Another CA with the same name: found by name, refused by signature.
    pki, other = make_pki(), make_pki()
    session = fastpath.client_tls(other.ca_pem.decode()).session("localhost")
    server, s_in, s_out = _server(pki)
    with pytest.raises(ConnectionError, match="certificate verify failed: certificate signature failure"):
        _handshake(session, server, s_in, s_out)


def test_hostile_bytes_fail_cleanly() -> None:
    """Garbage, truncated and corrupted server flights end in a TlsError (a ConnectionError) or a wait for
    more bytes, never a crash (``make test-asan`` runs this under AddressSanitizer)."""
    pki = make_pki()
    ctx = fastpath.client_tls(pki.ca_pem.decode())
    first = ctx.session("localhost")
    server, s_in, s_out = _server(pki)
    first.handshake()
    s_in.write(first.take())
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    flight = s_out.read()  # a real server's first flight, to corrupt
    rng = random.Random(1)
    outcomes = {"error": 0, "waiting": 0}
    for i in range(300):
        s = ctx.session("localhost")
        s.handshake()
        s.take()
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif i % 3 == 1:
            data = flight[: rng.randrange(1, len(flight))]
        else:
            corrupt = bytearray(flight)
            for _ in range(rng.randrange(1, 8)):
                corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
            data = bytes(corrupt)
        s.feed(data)
        try:
            done = s.handshake()
        except ConnectionError:
            outcomes["error"] += 1
            continue
        assert done is False, data  # nothing forged completes a handshake
        outcomes["waiting"] += 1
    assert outcomes["error"] > 100, outcomes
    assert outcomes["waiting"] > 0, outcomes
