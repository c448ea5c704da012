"""The CreateCertificate service over real gRPC/TLS: authentication, impersonation, bad input, metrics."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from ca_helpers import APP, OTHER, TD, ZTUNNEL, CaHarness, pod
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from istiopy.api.ca_client import CaClient, CaClientError, build_csr, generate_key
from istiopy.api.gen import ca_pb2
from istiopy.api.grpc_h2 import RpcError, StatusCode
from istiopy.api.identity import SpiffeId, identity_of
from istiopy.ca.auth import (
    AuthenticationError,
    Caller,
    KubeJwtAuthenticator,
    RequestCredentials,
    StaticTokenAuthenticator,
    TokenEntry,
    TokenReview,
)
from istiopy.ca.node_auth import ImpersonationDenied, NodeAuthorizer
from istiopy.ca.server import serve
from istiopy.ca.service import CertificateAuthority
from istiopy.mesh.store import ConfigStore


def token_client(h: CaHarness, token: str | None = None) -> CaClient:
    tok = token if token is not None else next(iter(h.tokens))
    # Token callers still present a TLS client certificate: this server requires one (standalone mode).
    c = h.client_with_cert(h.ca.issue_workload(SpiffeId(TD, "default", "anything")))
    c.token_source = lambda: tok
    return c


async def raw_call(
    client: CaClient,
    csr: str,
    ttl: int = 3600,
    metadata: dict[str, object] | None = None,
) -> ca_pb2.IstioCertificateResponse:
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    if metadata:
        s = struct_pb2.Struct()
        s.update(metadata)
        req.metadata.CopyFrom(s)
    return await client.create_certificate(req)


# ------------------------------------------------------------------------------------------ issuance
async def test_token_caller_gets_certificate_with_only_spiffe_san(harness: CaHarness) -> None:
    bundle = await token_client(harness).fetch(APP, ttl_seconds=3600)
    leaf = bundle.leaf
    assert bundle.identity == APP
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(APP.uri)]
    assert leaf.subject == x509.Name([])
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    assert not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert bundle.not_after - bundle.not_before == 3600
    # chain: leaf first, root last
    assert bundle.certificates[-1] == harness.ca.material.root
    assert len(bundle.chain_pem) == 2
    assert harness.issued() == 1


async def test_serials_are_random(harness: CaHarness) -> None:
    c = token_client(harness)
    serials = {(await c.fetch(APP)).leaf.serial_number for _ in range(4)}
    assert len(serials) == 4
    assert all(s.bit_length() > 64 for s in serials)


async def test_bootstrap_cert_caller_gets_its_own_identity(harness: CaHarness) -> None:
    bundle = await harness.bootstrap_client(ZTUNNEL, "node-a").fetch(ZTUNNEL)
    assert bundle.identity == ZTUNNEL


async def test_csr_for_another_identity_is_refused(harness: CaHarness) -> None:
    c = token_client(harness)  # authenticated as APP
    with pytest.raises(RpcError) as ei:
        await raw_call(c, build_csr(generate_key(), OTHER))
    assert ei.value.code == StatusCode.INVALID_ARGUMENT
    assert "may only get spiffe://cluster.local/ns/default/sa/app" in ei.value.details
    assert harness.issued() == 0
    assert harness.refused("csr-identity") == 1


async def test_csr_without_san_gets_caller_identity(harness: CaHarness) -> None:
    key = generate_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    resp = await raw_call(token_client(harness), csr.public_bytes(serialization.Encoding.PEM).decode())
    assert identity_of(x509.load_pem_x509_certificate(resp.cert_chain[0].encode())) == APP


async def test_unknown_token_is_unauthenticated(harness: CaHarness) -> None:
    c = token_client(harness, "not-a-known-token-value")
    with pytest.raises(
        CaClientError, match="UNAUTHENTICATED: authentication failed: token: unknown bearer token"
    ):
        await c.fetch(APP)
    assert harness.issued() == 0
    assert harness.registry.get_sample_value("citadel_server_authentication_failure_count_total") == 1


async def test_no_credential_is_unauthenticated(ca: CertificateAuthority, store: ConfigStore) -> None:
    """Token-only server (gRPC does not request client certs): a request without token is refused."""
    registry = CollectorRegistry()
    servicer = ca.servicer([StaticTokenAuthenticator({"t" * 32: TokenEntry(APP)})], store, registry)
    serving = ca.issue_serving()
    server, port = await serve(servicer, serving.served_chain_pem, serving.key_pem, ca.roots_pem)
    client = CaClient.connect(f"127.0.0.1:{port}", ca.roots_pem)
    try:
        with pytest.raises(CaClientError, match="no credential presented"):
            await client.fetch(APP)
        client.token_source = lambda: "t" * 32
        assert (await client.fetch(APP)).identity == APP
    finally:
        await client.close()
        await server.stop(None)


# ---------------------------------------------------------------------------------------- bad input
def csr_with_sans(sans: Sequence[x509.GeneralName], key: ec.EllipticCurvePrivateKey | None = None) -> str:
    k = key or generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
    return b.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("csr_kind", "ttl", "code", "reason", "message"),
    [
        (
            "garbage",
            3600,
            StatusCode.INVALID_ARGUMENT,
            "csr-parse",
            "CSR is not a PEM certificate request",
        ),
        ("empty", 3600, StatusCode.INVALID_ARGUMENT, "csr-parse", "empty CSR"),
        ("extra-uri", 3600, StatusCode.INVALID_ARGUMENT, "csr-san", "CSR asks for 2 URI SANs"),
        ("dns", 3600, StatusCode.INVALID_ARGUMENT, "csr-san", "CSR asks for DNSName SANs"),
        ("ca-flag", 3600, StatusCode.INVALID_ARGUMENT, "csr-extension", "CSR asks for a CA certificate"),
        ("small-rsa", 3600, StatusCode.INVALID_ARGUMENT, "csr-key", "RSA key of 1024 bits is too small"),
        (
            "good",
            0,
            StatusCode.INVALID_ARGUMENT,
            "ttl-invalid",
            "validity_duration must be positive, got 0",
        ),
        ("good", -5, StatusCode.INVALID_ARGUMENT, "ttl-invalid", "must be positive, got -5"),
        (
            "good",
            10**12,
            StatusCode.INVALID_ARGUMENT,
            "ttl-too-long",
            "exceeds the maximum of 7776000 s",
        ),
        ("huge", 3600, StatusCode.RESOURCE_EXHAUSTED, "request-too-large", "request is"),
    ],
)
async def test_bad_input_gets_clear_error_and_nothing_issued(
    harness: CaHarness, csr_kind: str, ttl: int, code: StatusCode, reason: str, message: str
) -> None:
    if csr_kind == "garbage":
        csr = "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n"
    elif csr_kind == "empty":
        csr = ""
    elif csr_kind == "extra-uri":
        csr = csr_with_sans(
            [x509.UniformResourceIdentifier(APP.uri), x509.UniformResourceIdentifier(OTHER.uri)]
        )
    elif csr_kind == "dns":
        csr = csr_with_sans([x509.UniformResourceIdentifier(APP.uri), x509.DNSName("app.default.svc")])
    elif csr_kind == "ca-flag":
        b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        csr = b.sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    elif csr_kind == "small-rsa":
        k = rsa.generate_private_key(65537, 1024)
        b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        csr = b.sign(k, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    elif csr_kind == "huge":
        csr = "A" * (1024 * 1024)
    else:
        csr = build_csr(generate_key(), APP)
    with pytest.raises(RpcError) as ei:
        await raw_call(token_client(harness), csr, ttl)
    assert ei.value.code == code
    assert message in ei.value.details
    assert harness.issued() == 0
    assert harness.refused(reason) == 1


async def test_csr_signed_by_another_key_is_refused(harness: CaHarness) -> None:
    """A CSR whose signature does not match its public key (tampered) is refused."""
    good = x509.load_pem_x509_csr(build_csr(generate_key(), APP).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # flip bits in the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(RpcError) as ei:
        await raw_call(token_client(harness), tampered)
    assert ei.value.code == StatusCode.INVALID_ARGUMENT
    assert harness.issued() == 0


# ------------------------------------------------------------------------------------- impersonation
async def test_trusted_node_proxy_impersonates_pod_on_its_node(harness: CaHarness) -> None:
    zt = harness.bootstrap_client(ZTUNNEL, "node-a")
    bundle = await zt.fetch(APP, impersonate=True)
    assert bundle.identity == APP
    assert harness.issued() == 1


@pytest.mark.parametrize(
    ("caller", "node", "requested", "message"),
    [
        # untrusted account: an ordinary workload asking for another identity
        (APP, "node-a", OTHER.uri, "is not a trusted node account"),
        # the pod of that account runs on another node
        (ZTUNNEL, "node-a", OTHER.uri, "no live pod with service account default/other on node 'node-a'"),
        # a pod named web-1 is on node-a but runs as service account app, not web
        (ZTUNNEL, "node-a", "spiffe://cluster.local/ns/default/sa/web", "service account default/web"),
        # finished pods do not count
        (ZTUNNEL, "node-a", "spiffe://cluster.local/ns/default/sa/finished", "default/finished"),
        # malformed SPIFFE ids
        (ZTUNNEL, "node-a", "spiffe://cluster.local/ns/default/app", "malformed ImpersonatedIdentity"),
        (ZTUNNEL, "node-a", "default/app", "malformed ImpersonatedIdentity"),
        (ZTUNNEL, "node-a", "spiffe://other.domain/ns/default/sa/app", "outside trust domain"),
        # the credential names a node where no ztunnel runs
        (ZTUNNEL, "node-c", APP.uri, "no live pod of istio-system/ztunnel runs on node 'node-c'"),
    ],
)
async def test_impersonation_refused(
    harness: CaHarness, store: ConfigStore, caller: SpiffeId, node: str, requested: str, message: str
) -> None:
    store.apply(pod("web-1", "default", "app", "node-a"))
    client = harness.bootstrap_client(caller, node)
    with pytest.raises(RpcError) as ei:
        await raw_call(client, build_csr(generate_key(), APP), metadata={"ImpersonatedIdentity": requested})
    assert ei.value.code == StatusCode.UNAUTHENTICATED
    details = ei.value.details
    assert details.startswith("request impersonation authentication failure")
    assert message in details
    assert harness.issued() == 0


async def test_impersonation_with_unbound_credential_needs_unique_node(
    harness: CaHarness, store: ConfigStore
) -> None:
    """A ztunnel workload certificate binds no node: accepted only while ztunnel runs on one node."""
    zt = harness.client_with_cert(harness.ca.issue_workload(ZTUNNEL))
    with pytest.raises(CaClientError, match="run on 2 nodes"):
        await zt.fetch(APP, impersonate=True)
    store.delete(pod("ztunnel-b", "istio-system", "ztunnel", "node-b").key)
    assert (await zt.fetch(APP, impersonate=True)).identity == APP


async def test_client_library_rejects_wrong_identity_or_key(harness: CaHarness) -> None:
    """The client's backstop: a chain for another identity, or for another key, is not accepted."""
    c = token_client(harness)
    key = generate_key()
    other = harness.ca.issue_workload(OTHER)
    with pytest.raises(CaClientError, match="different key"):
        c._bundle(key, OTHER, list(other.chain_pem))
    leaf = harness.ca.signer.issue_workload(key.public_key(), OTHER, dt.timedelta(hours=1))
    from istiopy.ca.authority import cert_to_pem

    with pytest.raises(CaClientError, match=r"for spiffe://cluster\.local/ns/default/sa/other, requested"):
        c._bundle(key, APP, [cert_to_pem(leaf), *harness.ca.signer.chain_pem])


# ----------------------------------------------------------------------------- Kubernetes token path
class DictReviewer:
    """A TokenReviewer answering from a table (the Kubernetes integration calls the real API server)."""

    def __init__(self, table: dict[str, TokenReview]) -> None:
        self.table = table
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        self.calls.append((token, tuple(audiences)))
        return self.table.get(token, TokenReview(False, error="token not found"))


async def test_kube_jwt_caller_pod_binds_node(store: ConfigStore) -> None:
    reviewer = DictReviewer(
        {
            "zt-a": TokenReview(
                True,
                "system:serviceaccount:istio-system:ztunnel",
                ("istio-ca",),
                "ztunnel-a",
                "uid-ztunnel-a",
            ),
            "zt-stale": TokenReview(
                True, "system:serviceaccount:istio-system:ztunnel", ("istio-ca",), "ztunnel-a", "old-uid"
            ),
            "user": TokenReview(True, "alice", ("istio-ca",)),
        }
    )
    auth = KubeJwtAuthenticator(reviewer, TD)

    caller = await auth.authenticate(RequestCredentials({"authorization": "Bearer zt-a"}))
    assert caller is not None
    assert caller.identity == ZTUNNEL
    assert caller.pod_name == "ztunnel-a"
    assert reviewer.calls == [("zt-a", ("istio-ca",))]
    nodes = NodeAuthorizer(store, TD)
    assert nodes.authorize(caller, APP.uri) == APP
    with pytest.raises(ImpersonationDenied, match="no live pod with service account default/other"):
        nodes.authorize(caller, OTHER.uri)
    stale = await auth.authenticate(RequestCredentials({"authorization": "Bearer zt-stale"}))
    assert stale is not None
    with pytest.raises(ImpersonationDenied, match="different UID"):
        nodes.authorize(stale, APP.uri)
    with pytest.raises(AuthenticationError, match="not a service account"):
        await auth.authenticate(RequestCredentials({"authorization": "Bearer user"}))
    with pytest.raises(AuthenticationError, match="token not found"):
        await auth.authenticate(RequestCredentials({"authorization": "Bearer nope"}))
    assert await auth.authenticate(RequestCredentials({})) is None


def test_node_authorizer_trusted_accounts_configurable(store: ConfigStore) -> None:
    nodes = NodeAuthorizer(store, TD, trusted_accounts=["kube-system/node-agent"])
    with pytest.raises(ImpersonationDenied, match="trusted: kube-system/node-agent"):
        nodes.authorize(Caller(ZTUNNEL, "test", node="node-a"), APP.uri)


# -------------------------------------------------------------------------------------------- metrics
async def test_metrics_count_requests_issuances_and_refusals(harness: CaHarness) -> None:
    c = token_client(harness)
    await c.fetch(APP)
    with pytest.raises(CaClientError):
        await c.fetch(APP, ttl_seconds=0)
    with pytest.raises(CaClientError):
        await c.fetch(OTHER, impersonate=True)
    r = harness.registry
    assert r.get_sample_value("citadel_server_csr_count_total") == 3
    assert r.get_sample_value("citadel_server_success_cert_issuance_count_total") == 1
    assert harness.refused("ttl-invalid") == 1
    assert harness.refused("impersonation-untrusted-caller") == 1


def test_bootstrap_cert_subject_binds_node(ca: CertificateAuthority) -> None:
    b = ca.issue_bootstrap(ZTUNNEL, "node-a", dt.timedelta(hours=1))
    cns = b.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cns] == ["node-a"]
    assert b.identity == ZTUNNEL


async def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - token: {'a' * 20}\n    identity: {ZTUNNEL}\n    node: node-a\n")
    auth = StaticTokenAuthenticator(path=path)
    caller = await auth.authenticate(RequestCredentials({"authorization": f"Bearer {'a' * 20}"}))
    assert caller == Caller(ZTUNNEL, "token", node="node-a")
    path.write_text(f"tokens:\n  - token: {'b' * 20}\n    identity: {APP}\n")
    os.utime(path, (time.time() + 5, time.time() + 5))  # a distinct mtime even on coarse file systems
    with pytest.raises(AuthenticationError, match="unknown bearer token"):
        await auth.authenticate(RequestCredentials({"authorization": f"Bearer {'a' * 20}"}))
    caller = await auth.authenticate(RequestCredentials({"authorization": f"Bearer {'b' * 20}"}))
    assert caller is not None
    assert caller.identity == APP
    # A broken edit keeps the previous tokens rather than locking everyone out.
    path.write_text("tokens: [{token: short, identity: nope}]\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert await auth.authenticate(RequestCredentials({"authorization": f"Bearer {'b' * 20}"})) is not None


async def test_issuance_and_refusal_are_logged(harness: CaHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="istiopy.ca.server")
    zt = harness.bootstrap_client(ZTUNNEL, "node-a")
    await zt.fetch(APP, impersonate=True)
    with pytest.raises(CaClientError):
        await zt.fetch(OTHER, impersonate=True)
    issued = [r.getMessage() for r in caplog.records if "certificate issued" in r.getMessage()]
    refused = [r.getMessage() for r in caplog.records if "CSR refused" in r.getMessage()]
    who = f"caller={ZTUNNEL} via client-cert (node=node-a)"
    assert issued == [f"certificate issued: {who} identity={APP} ttl=86400s (impersonated)"]
    assert len(refused) == 1
    assert f"{who} identity={OTHER}" in refused[0]
    assert "reason=impersonation-no-pod-on-node" in refused[0]
