"""The two cryptographic operations a mesh client needs, behind a small pluggable interface.

A client makes a key plus a CSR for its SPIFFE identity, and checks that what the CA returned chains to
its trust roots and belongs to that key. :class:`CryptographyBackend` does both with ``cryptography``,
imported only when a method runs, so merely importing the client costs nothing; the node proxy plugs in
an OpenSSL-backed implementation (``istiopy.dataplane.pki``) and never loads ``cryptography`` at all.

Both backends deal in PEM text only, so keys and certificates cross the interface without library types.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cryptography import x509


class PkiBackend(Protocol):
    """Key/CSR creation and chain verification. Failures raise ``ValueError`` saying what is wrong."""

    def new_key_csr(self, uri: str) -> tuple[str, str]:
        """A fresh ECDSA P-256 key (PKCS#8 PEM) and a PEM CSR: empty subject, one critical URI SAN."""
        ...

    def verify_chain(self, chain_pems: Sequence[str], roots_pems: Sequence[str], key_pem: str) -> None:
        """Check ``chain_pems`` (leaf first, one PEM certificate each) chains to one of ``roots_pems``
        and that the leaf certifies ``key_pem``'s public key. Validity times are not checked here: the
        certificate manager tracks expiry, and every handshake checks them again."""
        ...


class CryptographyBackend:
    """:class:`PkiBackend` on ``cryptography`` (the control plane's library, loaded on first use)."""

    def new_key_csr(self, uri: str) -> tuple[str, str]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem.decode(), csr.public_bytes(serialization.Encoding.PEM).decode()

    def verify_chain(self, chain_pems: Sequence[str], roots_pems: Sequence[str], key_pem: str) -> None:
        from cryptography.hazmat.primitives import serialization

        chain = [_load_cert(p, f"certificate #{i}") for i, p in enumerate(chain_pems)]
        roots = [_load_cert(p, f"root #{i}") for i, p in enumerate(roots_pems)]
        if not chain:
            raise ValueError("empty certificate chain")
        if not roots:
            raise ValueError("no trust roots to verify the chain against")
        try:
            key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"private key: {e}") from None
        if chain[0].public_key() != key.public_key():
            raise ValueError("leaf certificate is for a different key")
        verify_signatures(chain, roots)


def _load_cert(pem: str, what: str) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as e:
        raise ValueError(f"{what}: not a PEM certificate: {e}") from None


def verify_signatures(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
    """Each ``cryptography`` certificate is signed by the next, and the last is (or is signed by) a root.

    A light structural check on what the CA sent, so a misconfigured CA is caught at fetch time rather
    than as handshake failures on the data path. Full path validation still happens in every handshake.
    """
    from cryptography.exceptions import InvalidSignature

    if not chain:
        raise ValueError("empty certificate chain")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ValueError(
                f"certificate chain is broken at {child.subject.rfc4514_string()!r}: {e or 'bad signature'}"
            ) from None
    if not roots:
        return
    last = chain[-1]
    for root in roots:
        if last == root:
            return
        try:
            last.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise ValueError("certificate chain does not end at a trusted root")
