"""Turns a checked CSR plus an authenticated identity into a workload certificate.

The CSR contributes only its public key. Everything else (the SPIFFE URI SAN, key usages, lifetime,
serial) is decided here, so a CSR cannot smuggle in a CA flag, a DNS name or a second identity: a CSR that
*asks* for any of those is refused outright rather than silently trimmed, so a misbehaving client finds
out at once.

Lifetimes follow the issue's rules: a requested ``validity_duration`` of zero or less, or above the
maximum (90 days by default), is an error. (Upstream istiod substitutes the 24 h default for values
<= 0; we refuse instead, because a client that forgets the field should learn about it, and every mesh
client we ship always sends it. ``default_ttl`` is what our own in-process issuance uses.)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from istiopy.api.identity import SpiffeId, uri_sans
from istiopy.ca.authority import CaMaterial, cert_to_pem, hash_for

DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=90)
MAX_CSR_BYTES = 16 * 1024  # a P-521 or RSA 8192 CSR is < 3 KiB; anything far bigger is abuse
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Clock = Callable[[], float]

LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


class SigningError(ValueError):
    """A request the CA will not sign. ``reason`` is a short stable label (metrics, logs, tests)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Signer:
    """Signs workload, serving and bootstrap certificates with a :class:`CaMaterial`."""

    def __init__(
        self,
        material: CaMaterial,
        *,
        default_ttl: dt.timedelta = DEFAULT_TTL,
        max_ttl: dt.timedelta = MAX_TTL,
        max_csr_bytes: int = MAX_CSR_BYTES,
        backdate: dt.timedelta = dt.timedelta(0),
        clock: Clock = time.time,
    ) -> None:
        material.validate()
        self.material = material
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.max_csr_bytes = max_csr_bytes
        self.backdate = backdate
        self._clock = clock
        self._chain_pem = material.issuer_chain_pem
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(material.signing_key.public_key())
        self._hash = hash_for(material.signing_key)

    @property
    def chain_pem(self) -> list[str]:
        """Signing certificate up to the root, the part of every response after the leaf."""
        return list(self._chain_pem)

    # ------------------------------------------------------------------------------------------- checks
    def check_ttl(self, seconds: int) -> dt.timedelta:
        if seconds <= 0:
            raise SigningError("ttl-invalid", f"validity_duration must be positive, got {seconds} s")
        max_s = int(self.max_ttl.total_seconds())
        if seconds > max_s:
            raise SigningError(
                "ttl-too-long", f"validity_duration {seconds} s exceeds the maximum of {max_s} s"
            )
        return dt.timedelta(seconds=seconds)

    def check_csr(self, csr_pem: str | bytes, identity: SpiffeId) -> PublicKey:
        """Parse and vet a CSR for ``identity``; returns its public key."""
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        if len(data) > self.max_csr_bytes:
            raise SigningError(
                "csr-too-large", f"CSR is {len(data)} bytes, the limit is {self.max_csr_bytes}"
            )
        if not data.strip():
            raise SigningError("csr-parse", "empty CSR")
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise SigningError("csr-parse", f"CSR is not a PEM certificate request: {e}") from None
        try:
            if not csr.is_signature_valid:
                raise SigningError("csr-signature", "CSR signature does not verify (not signed by its key)")
        except (ValueError, InvalidSignature) as e:
            raise SigningError("csr-signature", f"CSR signature cannot be checked: {e}") from None
        try:
            key = csr.public_key()
        except ValueError as e:
            raise SigningError("csr-key", f"CSR public key unreadable: {e}") from None
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
                raise SigningError("csr-key", f"unsupported EC curve {key.curve.name}")
        elif isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise SigningError("csr-key", f"RSA key of {key.key_size} bits is too small (minimum 2048)")
        else:
            raise SigningError("csr-key", f"unsupported key type {type(key).__name__}")
        try:
            bc: x509.BasicConstraints | None = csr.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            bc = None
        except ValueError as e:
            raise SigningError("csr-parse", f"CSR extensions unreadable: {e}") from None
        if bc is not None and bc.ca:
            raise SigningError(
                "csr-extension", "CSR asks for a CA certificate; only leaf certificates are issued"
            )
        try:
            san_ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return key  # no SAN: the identity comes from the caller alone, as upstream does
        except ValueError as e:
            raise SigningError("csr-parse", f"CSR extensions unreadable: {e}") from None
        names = list(san_ext.value)
        others = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            kinds = sorted({type(n).__name__ for n in others})
            raise SigningError(
                "csr-san",
                f"CSR asks for {', '.join(kinds)} SANs; only the SPIFFE URI SAN {identity} is allowed",
            )
        uris = uri_sans(csr)
        if len(uris) != 1:
            raise SigningError("csr-san", f"CSR asks for {len(uris)} URI SANs; only {identity} is allowed")
        if uris[0] != identity.uri:
            raise SigningError(
                "csr-identity", f"CSR asks for {uris[0]} but the caller may only get {identity}"
            )
        return key

    # -------------------------------------------------------------------------------------------- signs
    def sign_csr(self, csr_pem: str | bytes, identity: SpiffeId, ttl_seconds: int) -> list[str]:
        """Vet and sign; returns the response chain (leaf first, root last)."""
        ttl = self.check_ttl(ttl_seconds)
        key = self.check_csr(csr_pem, identity)
        leaf = self.issue_workload(key, identity, ttl)
        return [cert_to_pem(leaf), *self._chain_pem]

    def _builder(
        self,
        key: PublicKey,
        ttl: dt.timedelta,
        not_before: dt.datetime | None,
        subject: x509.Name | None = None,
    ) -> x509.CertificateBuilder:
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC).replace(microsecond=0)
        start = not_before or (now - self.backdate)
        end = now + ttl
        ca_end = self.material.signing_cert.not_valid_after_utc
        end = min(end, ca_end)  # never outlive the issuer: the chain would stop verifying first anyway
        return (
            x509.CertificateBuilder()
            .subject_name(subject or x509.Name([]))
            .issuer_name(self.material.signing_cert.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki, critical=False)
        )

    def issue_workload(
        self, key: PublicKey, identity: SpiffeId, ttl: dt.timedelta, *, not_before: dt.datetime | None = None
    ) -> x509.Certificate:
        """A mesh workload certificate: one critical SPIFFE URI SAN, TLS client+server usages."""
        b = (
            self._builder(key, ttl, not_before)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(LEAF_EKU, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
            )
        )
        return b.sign(self.material.signing_key, self._hash)

    def issue_serving(
        self,
        key: PublicKey,
        dns_names: Sequence[str],
        ips: Sequence[str] = (),
        identity: SpiffeId | None = None,
        ttl: dt.timedelta | None = None,
    ) -> x509.Certificate:
        """The control plane's own TLS serving cert (port 15012): DNS/IP SANs, as gRPC clients check
        host names; optionally also istiod's SPIFFE id for mesh peers."""
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if identity is not None:
            sans.append(x509.UniformResourceIdentifier(identity.uri))
        subject = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]) if dns_names else x509.Name([])
        )
        b = (
            self._builder(key, ttl or self.default_ttl, None, subject)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(LEAF_EKU, critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=not dns_names)
        )
        return b.sign(self.material.signing_key, self._hash)

    def issue_bootstrap(
        self, key: PublicKey, identity: SpiffeId, node: str, ttl: dt.timedelta | None = None
    ) -> x509.Certificate:
        """A standalone-mode credential for a node proxy: its SPIFFE id plus the node it runs on.

        The node name goes in the subject (``CN=<node>``, ``OU=istiopy-node``), never in a SAN, so the
        certificate still carries exactly one identity; workload certificates have an empty subject and
        therefore can never claim a node.
        """
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, BOOTSTRAP_OU),
                x509.NameAttribute(NameOID.COMMON_NAME, node),
            ]
        )
        b = (
            self._builder(key, ttl or dt.timedelta(days=365), None, subject)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False
            )
        )
        return b.sign(self.material.signing_key, self._hash)


BOOTSTRAP_OU = "istiopy-node"


def bootstrap_node(cert: x509.Certificate) -> str | None:
    """The node a bootstrap certificate was issued for, or None for any other certificate."""
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(ous) == 1 and ous[0].value == BOOTSTRAP_OU and len(cns) == 1:
        v = cns[0].value
        return v if isinstance(v, str) else v.decode()
    return None
