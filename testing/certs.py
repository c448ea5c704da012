"""A throwaway mesh CA for tests: a root and SPIFFE workload certificates as the mesh issues them.

Why here and not ``istiopy.ca``: data-plane tests need real mTLS without running the CA server; the
certificates look like ours (ECDSA P-256, a single critical URI SAN with the SPIFFE id, no CN) so the
HBONE code paths under test see exactly what production gives them.

Public API::

    ca = TestCA()
    cert = ca.issue("spiffe://cluster.local/ns/default/sa/a")   # -> WorkloadCert (PEM paths on disk)
    server_ctx = cert.server_context()    # TLS 1.3, ALPN h2, client cert required, trusts ca
    client_ctx = cert.client_context()    # TLS 1.3, ALPN h2, no hostname check (SAN checked by HBONE)
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TestCA", "WorkloadCert", "mtls_context"]


def mtls_context(cert_file: str, key_file: str, ca_file: str, *, server: bool) -> ssl.SSLContext:
    """An HBONE-style context: TLS 1.3 only, ALPN h2, peer certificate required, no hostname matching."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False
    return ctx


@dataclass
class WorkloadCert:
    """One issued identity: PEM files on disk plus context factories."""

    identity: str
    cert_file: str
    key_file: str
    ca_file: str

    def server_context(self) -> ssl.SSLContext:
        """Context for the HBONE listener side."""
        return mtls_context(self.cert_file, self.key_file, self.ca_file, server=True)

    def client_context(self) -> ssl.SSLContext:
        """Context for the HBONE dialer side."""
        return mtls_context(self.cert_file, self.key_file, self.ca_file, server=False)


class TestCA:
    """A self-signed root that issues workload certificates; files live in a private temp directory."""

    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self._dir = tempfile.TemporaryDirectory(prefix="istiopy-ca-")
        self.dir = Path(self._dir.name)
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
        self.ca_file = str(self.dir / "root.pem")
        Path(self.ca_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._n = 0

    def issue(self, identity: str) -> WorkloadCert:
        """A leaf for ``identity`` (a SPIFFE URI) signed by this root, usable as client and server."""
        self._n += 1
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
        cert_file = self.dir / f"w{self._n}.pem"
        key_file = self.dir / f"w{self._n}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return WorkloadCert(identity, str(cert_file), str(key_file), self.ca_file)
