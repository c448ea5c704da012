"""A throwaway mesh CA for tests: a root and SPIFFE workload certificates as the mesh issues them.

Why here and not ``istiopy.ca``: data-plane tests need real mTLS without running the CA server; the
certificates look like ours (ECDSA P-256, a single critical URI SAN with the SPIFFE id, no CN) so the
HBONE code paths under test see exactly what production gives them.

Public API::

    ca = TestCA()
    cert = ca.issue("spiffe://cluster.local/ns/default/sa/a")   # -> WorkloadCert (PEM in memory)
    cert.bundle                           # istiopy.api.tls.CertBundle (key, chain leaf..root, roots)
    server_ctx = cert.server_context()    # istiopy.api.tls.server_context: TLS 1.3, ALPN h2, client cert
    client_ctx = cert.client_context()    # istiopy.api.tls.client_context: no SNI/hostname check
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from istiopy.api import tls

__all__ = ["TestCA", "WorkloadCert"]


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class WorkloadCert:
    """One issued identity, in memory, with context factories from ``istiopy.api.tls``."""

    identity: str
    bundle: tls.CertBundle

    def server_context(self) -> ssl.SSLContext:
        """Context for the HBONE listener side."""
        return tls.server_context(self.bundle)

    def client_context(self) -> ssl.SSLContext:
        """Context for the HBONE dialer side."""
        return tls.client_context(self.bundle)


class TestCA:
    """A self-signed root that issues workload certificates (nothing is written to disk)."""

    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"istiopy test {trust_domain}")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.root_pem = _pem(self.cert)

    def issue(self, identity: str) -> WorkloadCert:
        """A leaf for ``identity`` (a SPIFFE URI) signed by this root, usable as client and server."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        bundle = tls.CertBundle(tls.private_key_pem(key), (_pem(cert), self.root_pem), self.root_pem)
        return WorkloadCert(identity, bundle)
