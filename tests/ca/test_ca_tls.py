"""Real TLS 1.3 mTLS between peers holding certificates from our CA (api/tls.py contexts)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from ca_helpers import APP, OTHER, TD
from cryptography.hazmat.primitives.asymmetric import ec

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import (
    CertBundle,
    PeerIdentityError,
    client_context,
    peer_identity,
    private_key_pem,
    server_context,
    verify_peer_identity,
)
from istiopy.ca.authority import cert_to_pem, generate_root
from istiopy.ca.service import CertificateAuthority
from istiopy.ca.signer import Signer


@asynccontextmanager
async def echo_server(ctx: ssl.SSLContext, seen: list[SpiffeId]) -> AsyncIterator[int]:
    """A TLS server that records each client's SPIFFE id and echoes one line."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            tls = writer.get_extra_info("ssl_object")
            seen.append(peer_identity(tls))
            writer.write(await reader.readline())
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(port: int, ctx: ssl.SSLContext) -> tuple[SpiffeId, ssl.SSLObject]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    try:
        tls = writer.get_extra_info("ssl_object")
        ident = peer_identity(tls)
        writer.write(b"ping\n")
        await writer.drain()
        line = await reader.readline()
        if not line:  # TLS 1.3: a server refusing our certificate shows up as EOF after the handshake
            raise ConnectionResetError("server closed the connection")
        assert line == b"ping\n"
        return ident, tls
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ssl.SSLError, ConnectionError):
            pass


async def test_mtls_peers_see_each_others_spiffe_ids(ca: CertificateAuthority) -> None:
    server_b, client_b = ca.issue_workload(APP), ca.issue_workload(OTHER)
    seen: list[SpiffeId] = []
    async with echo_server(server_context(server_b), seen) as port:
        ident, tls = await handshake(port, client_context(client_b))
    assert ident == APP
    assert seen == [OTHER]
    assert tls.version() == "TLSv1.3"
    assert tls.selected_alpn_protocol() == "h2"
    assert tls.server_hostname is None  # no SNI sent
    assert verify_peer_identity(tls, {APP}) == APP


async def test_wrong_expected_identity_is_refused_after_handshake(ca: CertificateAuthority) -> None:
    seen: list[SpiffeId] = []
    async with echo_server(server_context(ca.issue_workload(APP)), seen) as port:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(ca.issue_workload(OTHER)), server_hostname=""
        )
        with pytest.raises(PeerIdentityError, match="not one of the expected"):
            verify_peer_identity(writer.get_extra_info("ssl_object"), {OTHER})
        writer.close()


def foreign_bundle(identity: SpiffeId) -> CertBundle:
    """A certificate from an unrelated root, otherwise exactly like ours."""
    other = generate_root("evil.example")
    signer = Signer(other)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = signer.issue_workload(key.public_key(), identity, dt.timedelta(hours=1))
    return CertBundle(private_key_pem(key), (cert_to_pem(leaf), cert_to_pem(other.root)), other.roots_pem)


async def test_client_from_foreign_root_is_refused(ca: CertificateAuthority) -> None:
    seen: list[SpiffeId] = []
    async with echo_server(server_context(ca.issue_workload(APP)), seen) as port:
        # The foreign client trusts our root (so only the server's check can fail).
        evil = foreign_bundle(OTHER)
        evil = CertBundle(evil.key_pem, evil.chain_pem, ca.roots_pem)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(port, client_context(evil))
    assert seen == []


async def test_server_from_foreign_root_is_refused(ca: CertificateAuthority) -> None:
    evil = foreign_bundle(APP)
    evil = CertBundle(evil.key_pem, evil.chain_pem, ca.roots_pem)
    seen: list[SpiffeId] = []
    async with echo_server(server_context(evil), seen) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, client_context(ca.issue_workload(OTHER)))


async def test_expired_certificate_is_refused(ca: CertificateAuthority) -> None:
    # The same CA, issuing as if it were two hours ago: a one-hour certificate that expired an hour ago.
    two_hours_ago = time.time() - 7200
    past_signer = Signer(ca.material, clock=lambda: two_hours_ago)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = past_signer.issue_workload(key.public_key(), APP, dt.timedelta(hours=1))
    expired = CertBundle(private_key_pem(key), (cert_to_pem(leaf), *ca.signer.chain_pem), ca.roots_pem)
    assert expired.expired(dt.datetime.now(dt.UTC).timestamp())
    seen: list[SpiffeId] = []
    async with echo_server(server_context(expired), seen) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            await handshake(port, client_context(ca.issue_workload(OTHER)))
    async with echo_server(server_context(ca.issue_workload(OTHER)), seen) as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(port, client_context(expired))
    assert seen == []


def test_spiffe_id_parser_is_strict() -> None:
    assert SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/app") == APP
    for bad in (
        "spiffe://cluster.local/ns/default/sa",
        "spiffe://cluster.local/ns/default/sa/app/extra",
        "spiffe://cluster.local/namespace/default/sa/app",
        "http://cluster.local/ns/default/sa/app",
        "spiffe:///ns/default/sa/app",
        "spiffe://cluster.local/ns//sa/app",
        "spiffe://Cluster.Local/ns/default/sa/app",
    ):
        with pytest.raises(ValueError):
            SpiffeId.parse(bad)
