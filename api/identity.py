"""SPIFFE identities as the mesh uses them: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Shared by the CA (which issues them), the node proxy (which requests and checks them) and the waypoint
launcher, so the one parser lives in the wire layer. The parser is deliberately strict: exactly five path
segments with the literals ``ns`` and ``sa`` (as ztunnel parses them), because an identity that two parsers
read differently is an authorization bypass waiting to happen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from istiopy.api.der import parse_certificate

if TYPE_CHECKING:  # cryptography costs ~9 MB RSS: the node proxy reads certificates with api.der instead
    from cryptography import x509

SPIFFE_SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# Trust domains: lowercase DNS-ish names (SPIFFE allows a-z 0-9 . - _). Namespaces and service accounts are
# Kubernetes names (DNS subdomains); we also accept uppercase and '_' in neither, so a typo is refused early.
_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]{1,255}$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class InvalidSpiffeId(ValueError):
    """A string or certificate that does not carry exactly one well-formed mesh SPIFFE identity."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    """One workload identity. ``str()`` gives the URI; :meth:`parse` is its inverse."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN_RE.match(self.trust_domain):
            raise InvalidSpiffeId(f"invalid trust domain {self.trust_domain!r}")
        if not _K8S_NAME_RE.match(self.namespace):
            raise InvalidSpiffeId(f"invalid namespace {self.namespace!r}")
        if not _K8S_NAME_RE.match(self.service_account):
            raise InvalidSpiffeId(f"invalid service account {self.service_account!r}")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/<ns>/sa/<sa>``; anything else raises :class:`InvalidSpiffeId`."""
        if not isinstance(uri, str) or not uri.startswith(SPIFFE_SCHEME):
            raise InvalidSpiffeId(f"not a spiffe:// URI: {uri!r}")
        parts = uri[len(SPIFFE_SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise InvalidSpiffeId(
                f"expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>, got {uri!r}"
            )
        return cls(parts[0], parts[2], parts[4])

    @property
    def uri(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """Every URI SAN of a ``cryptography`` certificate or CSR (empty when it has no SAN extension).

    For the control plane, which holds parsed objects; DER bytes go through :func:`identity_of_der`.
    """
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def identity_from_uris(uris: Iterable[str]) -> SpiffeId:
    """The single SPIFFE identity among a certificate's URI SANs; raises if there is none or several."""
    spiffe = [u for u in uris if u.startswith(SPIFFE_SCHEME)]
    if len(spiffe) != 1:
        raise InvalidSpiffeId(f"certificate carries {len(spiffe)} spiffe URI SANs, expected exactly one")
    return SpiffeId.parse(spiffe[0])


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE identity a mesh certificate carries; raises if it carries none or several."""
    return identity_from_uris(uri_sans(cert))


def identity_of_der(der: bytes) -> SpiffeId:
    """:func:`identity_of` for a DER certificate, as ``ssl`` hands out the peer's (no cryptography import).

    Malformed DER raises :class:`InvalidSpiffeId` too: either way the peer has no usable identity.
    """
    try:
        info = parse_certificate(der)
    except ValueError as e:
        raise InvalidSpiffeId(f"unreadable certificate: {e}") from e
    return identity_from_uris(info.uri_sans)
