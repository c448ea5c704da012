"""Root of trust: persistence across restarts, RSA option, plug-in cacerts chains, trust bundle file."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from ca_helpers import APP, OTHER, TD
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry

from istiopy.api.ca_client import CaClient, verify_chain
from istiopy.api.tls import client_context, peer_identity, server_context
from istiopy.ca.auth import StaticTokenAuthenticator, TokenEntry
from istiopy.ca.authority import (
    CaMaterialError,
    DirectoryRootStore,
    KeyType,
    generate_intermediate,
    generate_root,
    load_plugin_cacerts,
    write_cacerts,
)
from istiopy.ca.bundle import FileTrustBundlePublisher
from istiopy.ca.server import serve
from istiopy.ca.service import CaConfig, CertificateAuthority, start_authority


async def tls_roundtrip(server_bundle_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """One mTLS connection; returns the SPIFFE id the client saw."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(str(peer_identity(writer.get_extra_info("ssl_object"))))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_bundle_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="")
        ident = str(peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"x\n")
        assert await reader.readline() == b"x\n"
        writer.close()
        return ident
    finally:
        server.close()
        await server.wait_closed()


async def test_restart_reuses_root_and_old_certs_verify(tmp_path: Path) -> None:
    cfg = CaConfig(root_dir=tmp_path / "root")
    first = await start_authority(cfg)
    old = first.issue_workload(APP)
    assert (tmp_path / "root" / "ca-key.pem").stat().st_mode & 0o777 == 0o600

    second = await start_authority(cfg)  # "restart": a fresh object from the same directory
    assert second.material.root == first.material.root
    assert second.material.signing_key.public_key() == first.material.signing_key.public_key()
    new = second.issue_workload(OTHER)
    verify_chain(list(old.certificates), [second.material.root])
    # A pre-restart cert and a post-restart cert complete mTLS with each other.
    assert await tls_roundtrip(server_context(old), client_context(new)) == str(APP)


async def test_concurrent_first_starts_agree_on_one_root(tmp_path: Path) -> None:
    cfg = CaConfig(root_dir=tmp_path / "root")
    cas = await asyncio.gather(*(start_authority(cfg) for _ in range(5)))
    assert len({ca.material.root.serial_number for ca in cas}) == 1


async def test_rsa_root_option(tmp_path: Path) -> None:
    ca = await start_authority(CaConfig(root_dir=tmp_path / "r", key_type=KeyType.RSA_2048))
    root = ca.material.root
    assert isinstance(root.public_key(), rsa.RSAPublicKey)
    assert root.public_key().key_size == 2048
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert lifetime.days >= 3650
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    a, b = ca.issue_workload(APP), ca.issue_workload(OTHER)
    assert isinstance(a.leaf.public_key(), ec.EllipticCurvePublicKey)  # leaves stay P-256
    assert await tls_roundtrip(server_context(a), client_context(b)) == str(APP)


async def test_default_root_is_ecdsa_p256_ten_years(ca: CertificateAuthority) -> None:
    root = ca.material.root
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 3650


async def test_plugin_cacerts_signs_as_intermediate_and_serves_full_chain(tmp_path: Path) -> None:
    root = generate_root("example.org root")
    inter = generate_intermediate(root, "cluster-1 intermediate")
    write_cacerts(inter, tmp_path / "cacerts")
    ca = await start_authority(CaConfig(cacerts_dir=tmp_path / "cacerts", root_dir=tmp_path / "unused"))
    assert ca.material.plugged_in
    assert ca.material.signing_cert == inter.signing_cert
    assert not (tmp_path / "unused").exists()  # no self-signed root was made
    bundle = ca.issue_workload(APP)
    # chain: leaf, intermediate, root (root last)
    assert bundle.certificates[1] == inter.signing_cert
    assert bundle.certificates[-1] == root.root
    assert len(bundle.certificates) == 3
    assert ca.roots_pem == root.roots_pem
    verify_chain(bundle.certificates, [root.root])
    # Peers trusting only the root handshake (the intermediate travels in the chain).
    other = ca.issue_workload(OTHER)
    assert await tls_roundtrip(server_context(bundle), client_context(other)) == str(APP)


async def test_plugin_ca_over_grpc(tmp_path: Path) -> None:
    root = generate_root("example.org root")
    inter = generate_intermediate(root, "cluster-1 intermediate")
    write_cacerts(inter, tmp_path / "cacerts")
    ca = await start_authority(CaConfig(cacerts_dir=tmp_path / "cacerts"))
    token = "x" * 32
    servicer = ca.servicer([StaticTokenAuthenticator({token: TokenEntry(APP)})], None, CollectorRegistry())
    serving = ca.issue_serving()
    server, port = await serve(servicer, serving.served_chain_pem, serving.key_pem, ca.roots_pem)
    client = CaClient.connect(f"127.0.0.1:{port}", ca.roots_pem, token_source=lambda: token)
    try:
        got = await client.fetch(APP)
        assert [c.subject for c in got.certificates[1:]] == [inter.signing_cert.subject, root.root.subject]
        assert got.roots_pem == root.roots_pem
    finally:
        await client.close()
        await server.stop(None)


def test_plugin_cacerts_mismatched_files_are_refused(tmp_path: Path) -> None:
    root = generate_root("r")
    inter = generate_intermediate(root, "i")
    write_cacerts(inter, tmp_path / "ok")
    # Key of another CA
    stranger = generate_intermediate(root, "j")
    write_cacerts(inter, tmp_path / "bad-key")
    (tmp_path / "bad-key" / "ca-key.pem").write_bytes((tmp_path / "ok" / "ca-key.pem").read_bytes())
    write_cacerts(stranger, tmp_path / "tmp")
    (tmp_path / "bad-key" / "ca-key.pem").write_bytes((tmp_path / "tmp" / "ca-key.pem").read_bytes())
    with pytest.raises(CaMaterialError, match="does not match"):
        load_plugin_cacerts(tmp_path / "bad-key")
    # Root that did not sign the chain
    write_cacerts(inter, tmp_path / "bad-root")
    (tmp_path / "bad-root" / "root-cert.pem").write_text(generate_root("other").roots_pem)
    with pytest.raises(CaMaterialError, match=r"does not lead to root-cert\.pem"):
        load_plugin_cacerts(tmp_path / "bad-root")
    # Missing file
    (tmp_path / "ok" / "ca-key.pem").unlink()
    with pytest.raises(CaMaterialError, match=r"lacks ca-key\.pem"):
        load_plugin_cacerts(tmp_path / "ok")


async def test_root_store_load_on_empty_dir_is_none(tmp_path: Path) -> None:
    assert await DirectoryRootStore(tmp_path / "nothing").load() is None


async def test_trust_bundle_file_is_published(tmp_path: Path) -> None:
    out = tmp_path / "bundle" / "root-cert.pem"
    ca = await start_authority(
        CaConfig(root_dir=tmp_path / "root"), publishers=[FileTrustBundlePublisher(out)]
    )
    assert out.read_text() == ca.roots_pem
    assert x509.load_pem_x509_certificate(out.read_bytes()) == ca.material.root
    assert ca.config.trust_domain == TD
