"""The node proxy's PKI backends: the OpenSSL extension and the cryptography default behave alike.

Real parts throughout: CSRs are vetted and signed by our CA's signer or its gRPC server, bundles are
used for real TLS handshakes, and the import check runs ztunnel-py's certificate path in a fresh
interpreter to prove it never loads ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from istiopy.api.ca_client import CaClient, CaClientError
from istiopy.api.identity import SpiffeId
from istiopy.api.pki import CryptographyBackend, PkiBackend
from istiopy.api.tls import CertBundle, peer_identity
from istiopy.ca.auth import StaticTokenAuthenticator, TokenEntry
from istiopy.ca.authority import cert_to_pem, generate_root
from istiopy.ca.server import serve
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.ca.signer import Signer
from istiopy.dataplane import pki
from istiopy.dataplane.identity import SecretManager, ca_fetcher

A = SpiffeId("cluster.local", "ns1", "a")
B = SpiffeId("cluster.local", "ns1", "b")
BACKENDS = ["openssl", "cryptography"]


def make_backend(name: str) -> PkiBackend:
    if name == "cryptography":
        return CryptographyBackend()
    c = pki.c_backend()
    assert c is not None, "istiopy.dataplane._fastpath is not built (setup.py build_ext --inplace)"
    return c


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority(CaConfig(), generate_root("cluster.local"))


@pytest.fixture(scope="module")
def stranger() -> CertificateAuthority:
    """Another mesh's CA: same trust domain, different root."""
    return CertificateAuthority(CaConfig(), generate_root("cluster.local"))


@dataclass
class Issued:
    key_pem: str
    chain: list[str]  # leaf first, root last, one PEM each


def issue(authority: CertificateAuthority, backend: PkiBackend, identity: SpiffeId) -> Issued:
    key_pem, csr_pem = backend.new_key_csr(identity.uri)
    return Issued(key_pem, authority.signer.sign_csr(csr_pem, identity, 3600))


def test_extension_is_built_and_chosen() -> None:
    assert isinstance(pki.backend(), pki.OpenSslBackend)


def test_fallback_without_the_extension(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import istiopy.dataplane

    monkeypatch.setitem(sys.modules, "istiopy.dataplane._fastpath", None)  # import raises ImportError
    monkeypatch.delattr(istiopy.dataplane, "_fastpath", raising=False)
    with caplog.at_level(logging.WARNING, logger="istiopy.ztunnel.pki"):
        assert isinstance(pki.backend(), CryptographyBackend)
    assert "not built" in caplog.text


@pytest.mark.parametrize("name", BACKENDS)
def test_csr_is_p256_with_one_critical_uri_san(name: str) -> None:
    key_pem, csr_pem = make_backend(name).new_key_csr(A.uri)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert [e.oid for e in csr.extensions] == [x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(A.uri)]
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == csr.public_key()
    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, what ssl and Envoy load


def test_c_backend_refuses_uris_that_are_not_ia5() -> None:
    c = make_backend("openssl")
    with pytest.raises(ValueError, match="printable ASCII"):
        c.new_key_csr("spiffe://cluster.local/ns/\u00e9/sa/x")
    with pytest.raises(ValueError, match="empty URI"):
        c.new_key_csr("")


@pytest.mark.parametrize("maker", BACKENDS)
@pytest.mark.parametrize("checker", BACKENDS)
def test_ca_signs_each_backends_csr_and_both_verify(
    authority: CertificateAuthority, maker: str, checker: str
) -> None:
    got = issue(authority, make_backend(maker), A)
    make_backend(checker).verify_chain(got.chain, [authority.roots_pem], got.key_pem)
    make_backend(checker).verify_chain(got.chain[:1], [authority.roots_pem], got.key_pem)  # leaf only
    bundle = CertBundle(got.key_pem, tuple(got.chain), authority.roots_pem)
    assert bundle.identity == A
    assert bundle.not_after - bundle.not_before == 3600


def _bad_inputs(
    authority: CertificateAuthority, stranger: CertificateAuthority
) -> dict[str, tuple[list[str], list[str], str]]:
    c = make_backend("openssl")
    good = issue(authority, c, A)
    foreign = issue(stranger, c, A)
    other_key, _ = c.new_key_csr(A.uri)
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    roots = [authority.roots_pem]
    return {
        "other-root": (foreign.chain, roots, foreign.key_pem),
        "other-root-leaf-only": (foreign.chain[:1], roots, foreign.key_pem),
        "different-key": (good.chain, roots, other_key),
        "garbage-leaf": ([garbage, *good.chain[1:]], roots, good.key_pem),
        "garbage-root": (good.chain, [garbage], good.key_pem),
        "not-pem": (["hello"], roots, good.key_pem),
        "garbage-key": (good.chain, roots, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        "empty-chain": ([], roots, good.key_pem),
        "no-roots": (good.chain, [], good.key_pem),
    }


# What each backend says; the shared words are what an operator greps for.
EXPECTED = {
    "other-root": {
        "openssl": "does not verify at depth 1: self-signed certificate in certificate chain",
        "cryptography": "does not end at a trusted root",
    },
    "other-root-leaf-only": {
        "openssl": "does not verify at depth 0: unable to get local issuer certificate",
        "cryptography": "does not end at a trusted root",
    },
    "different-key": {
        "openssl": "leaf certificate is for a different key",
        "cryptography": "for a different key",
    },
    "garbage-leaf": {"openssl": "certificate #0: not a PEM certificate", "cryptography": "certificate #0"},
    "garbage-root": {"openssl": "root #0: not a PEM certificate", "cryptography": "root #0"},
    "not-pem": {"openssl": "certificate #0: not a PEM certificate", "cryptography": "certificate #0"},
    "garbage-key": {"openssl": "private key", "cryptography": "private key"},
    "empty-chain": {"openssl": "empty certificate chain", "cryptography": "empty certificate chain"},
    "no-roots": {"openssl": "no trust roots", "cryptography": "no trust roots"},
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_both_backends_reject_the_same_bad_inputs(
    authority: CertificateAuthority, stranger: CertificateAuthority, name: str, case: str
) -> None:
    chain, roots, key = _bad_inputs(authority, stranger)[case]
    with pytest.raises(ValueError, match=EXPECTED[case][name]):
        make_backend(name).verify_chain(chain, roots, key)


@pytest.mark.parametrize("name", BACKENDS)
def test_client_checks_identity_key_and_root(
    authority: CertificateAuthority, stranger: CertificateAuthority, name: str
) -> None:
    """CaClient's backstop on what a CA returns, with each backend plugged in."""
    client = CaClient.connect("127.0.0.1:9", authority.roots_pem)  # never dialled: _bundle is local
    client.pki = make_backend(name)
    good = issue(authority, client.pki, A)
    assert client._bundle(good.key_pem, A, good.chain).identity == A
    with pytest.raises(CaClientError, match=r"for spiffe://cluster\.local/ns/ns1/sa/a, requested .*/sa/b"):
        client._bundle(good.key_pem, B, good.chain)
    other_key, _ = client.pki.new_key_csr(A.uri)
    with pytest.raises(CaClientError, match="different key"):
        client._bundle(other_key, A, good.chain)
    foreign = issue(stranger, client.pki, A)
    with pytest.raises(CaClientError, match="cannot use"):
        client._bundle(foreign.key_pem, A, foreign.chain)
    with pytest.raises(CaClientError, match="unparsable"):
        client._bundle(good.key_pem, A, ["-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"])


@pytest.mark.parametrize("name", BACKENDS)
def test_validity_times_are_left_to_the_manager(authority: CertificateAuthority, name: str) -> None:
    """Both backends check signatures and key only: an expired leaf still verifies (expiry is
    CertBundle.expired's job, and every handshake checks times again)."""
    key_pem, _ = make_backend(name).new_key_csr(A.uri)
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    in_2020 = dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp()
    old = Signer(authority.material, clock=lambda: in_2020).issue_workload(
        key.public_key(), A, dt.timedelta(hours=1)
    )
    chain = [cert_to_pem(old), *authority.signer.chain_pem]
    make_backend(name).verify_chain(chain, [authority.roots_pem], key_pem)
    bundle = CertBundle(key_pem, tuple(chain), authority.roots_pem)
    assert bundle.not_after == in_2020 + 3600
    assert bundle.expired(time.time())


@pytest.fixture
async def ca_server(authority: CertificateAuthority) -> AsyncIterator[tuple[int, dict[SpiffeId, str]]]:
    tokens = {A: secrets.token_hex(8), B: secrets.token_hex(8)}
    auth = StaticTokenAuthenticator({tok: TokenEntry(ident) for ident, tok in tokens.items()})
    servicer = authority.servicer([auth], None)
    serving = authority.issue_serving(["istiod.istio-system.svc"], ["127.0.0.1"])
    server, port = await serve(servicer, serving.served_chain_pem, serving.key_pem, authority.roots_pem)
    try:
        yield port, tokens
    finally:
        await server.stop(None)


async def test_node_proxy_gets_certificates_over_grpc_and_handshakes(
    authority: CertificateAuthority, ca_server: tuple[int, dict[SpiffeId, str]]
) -> None:
    """ztunnel-py's wiring end to end: SecretManager -> CaClient on the C backend -> real CA -> real mTLS."""
    port, tokens = ca_server
    managers: dict[SpiffeId, SecretManager] = {}
    clients = []
    for ident, tok in tokens.items():
        client = CaClient.connect(f"127.0.0.1:{port}", authority.roots_pem, token_source=lambda t=tok: t)
        clients.append(client)
        managers[ident] = SecretManager(ca_fetcher(client, ttl_seconds=600, impersonate=False))
        assert isinstance(client.pki, pki.OpenSslBackend)
    try:
        server_ctx = await managers[A].server_context(A)
        client_ctx = await managers[B].client_context(B)
        assert (await managers[A].fetch(A)).identity == A
        seen: list[SpiffeId] = []

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            obj = writer.get_extra_info("ssl_object")
            assert isinstance(obj, ssl.SSLObject)
            seen.append(peer_identity(obj))
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=server_ctx)
        async with srv:
            sport = srv.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", sport, ssl=client_ctx, server_hostname=""
            )
            obj = writer.get_extra_info("ssl_object")
            assert isinstance(obj, ssl.SSLObject)
            assert peer_identity(obj) == A
            assert await reader.read() == b"ok"
            writer.close()
        assert seen == [B]
        dump = {d["identity"]: d for d in managers[A].dump()}
        assert dump[str(A)]["state"] == "Available"
    finally:
        for m in managers.values():
            await m.close()
        for c in clients:
            await c.close()


CHILD = r"""
import json, sys
from istiopy.api.tls import CertBundle, client_context, server_context
from istiopy.api.ca_client import CaClient
from istiopy.dataplane import pki
from istiopy.dataplane.identity import SecretManager, ca_fetcher
from istiopy.api.identity import SpiffeId

data = json.load(sys.stdin)
backend = pki.backend()
key_pem, csr_pem = backend.new_key_csr(data["uri"])
backend.verify_chain(data["chain"], [data["roots"]], data["key"])
client = CaClient.connect("127.0.0.1:9", data["roots"])
ca_fetcher(client)
bundle = client._bundle(data["key"], SpiffeId.parse(data["uri"]), data["chain"])
server_context(bundle), client_context(bundle)
print(json.dumps({
    "backend": type(backend).__name__,
    "identity": str(bundle.identity),
    "refresh_at": bundle.refresh_at,
    "served": bundle.served_chain_pem == data["chain"][0],
    "cryptography": sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"),
}))
"""


def test_node_proxy_certificate_path_never_imports_cryptography(authority: CertificateAuthority) -> None:
    got = issue(authority, make_backend("openssl"), A)
    payload = json.dumps({"uri": A.uri, "chain": got.chain, "roots": authority.roots_pem, "key": got.key_pem})
    out = subprocess.run(
        [sys.executable, "-P", "-c", CHILD],
        input=payload,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout)
    bundle = CertBundle(got.key_pem, tuple(got.chain), authority.roots_pem)
    assert result == {
        "backend": "OpenSslBackend",
        "identity": A.uri,
        "refresh_at": bundle.refresh_at,
        "served": True,
        "cryptography": [],
    }
