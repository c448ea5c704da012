"""Assembling the CA: configuration -> root of trust -> signer -> servicer, plus in-process issuance.

``istiod`` calls :func:`start_authority` once, mounts :meth:`CertificateAuthority.servicer` on its 15012
server, serves that port with :meth:`CertificateAuthority.issue_serving` and registers the SDS generator
(:mod:`istiopy.ca.sds`) with the xDS generator registry.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from istiopy.api.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from istiopy.api.tls import CertBundle, private_key_pem
from istiopy.ca.auth import Authenticator, ClientCertAuthenticator
from istiopy.ca.authority import (
    CA_CERT_FILE,
    CaMaterial,
    DirectoryRootStore,
    KeyType,
    RootStore,
    cert_to_pem,
    load_or_create_root,
    load_plugin_cacerts,
)
from istiopy.ca.bundle import TrustBundlePublisher
from istiopy.ca.node_auth import DEFAULT_TRUSTED_NODE_ACCOUNTS, NodeAuthorizer
from istiopy.ca.server import CaServicer
from istiopy.ca.signer import DEFAULT_TTL, MAX_TTL, Clock, Signer
from istiopy.mesh.store import ConfigStore

log = logging.getLogger(__name__)


@dataclass
class CaConfig:
    """Settings (the upstream environment variable each mirrors in brackets)."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    namespace: str = "istio-system"
    key_type: KeyType = KeyType.EC_P256
    root_dir: Path | None = None  # standalone persistence of the self-signed root
    cacerts_dir: Path | None = None  # plug-in CA (``cacerts`` mount); wins when it holds ca-cert.pem
    default_ttl: dt.timedelta = DEFAULT_TTL  # [DEFAULT_WORKLOAD_CERT_TTL]
    max_ttl: dt.timedelta = MAX_TTL  # [MAX_WORKLOAD_CERT_TTL]
    trusted_node_accounts: Sequence[str] = field(
        default_factory=lambda: list(DEFAULT_TRUSTED_NODE_ACCOUNTS)
    )  # [CA_TRUSTED_NODE_ACCOUNTS]


class CertificateAuthority:
    """A running CA: its material, signer, and factories for what istiod needs from it."""

    def __init__(self, config: CaConfig, material: CaMaterial, clock: Clock = time.time) -> None:
        self.config = config
        self.material = material
        self.signer = Signer(material, default_ttl=config.default_ttl, max_ttl=config.max_ttl, clock=clock)
        self._clock = clock

    @property
    def roots_pem(self) -> str:
        return self.material.roots_pem

    @property
    def istiod_identity(self) -> SpiffeId:
        return SpiffeId(self.config.trust_domain, self.config.namespace, "istiod")

    def servicer(
        self,
        authenticators: Sequence[Authenticator],
        store: ConfigStore | None,
        registry: CollectorRegistry | None = None,
    ) -> CaServicer:
        """The gRPC servicer; ``store`` enables impersonation (None refuses every impersonation)."""
        authorizer = (
            NodeAuthorizer(store, self.config.trust_domain, self.config.trusted_node_accounts)
            if store is not None
            else None
        )
        return CaServicer(self.signer, authenticators, authorizer, registry)

    def client_cert_authenticator(self) -> ClientCertAuthenticator:
        return ClientCertAuthenticator([self.material.signing_cert], self.config.trust_domain, self._clock)

    def _bundle(self, key: ec.EllipticCurvePrivateKey, leaf_pem: str) -> CertBundle:
        return CertBundle(private_key_pem(key), (leaf_pem, *self.signer.chain_pem), self.roots_pem)

    def issue_workload(self, identity: SpiffeId, ttl: dt.timedelta | None = None) -> CertBundle:
        """Key and certificate generated in-process (SDS for waypoints, tests); no CSR round trip."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.signer.issue_workload(key.public_key(), identity, ttl or self.config.default_ttl)
        return self._bundle(key, cert_to_pem(leaf))

    def issue_serving(
        self, dns_names: Iterable[str] = (), ips: Iterable[str] = (), ttl: dt.timedelta | None = None
    ) -> CertBundle:
        """istiod's serving certificate for 15012: ``istiod.<ns>.svc`` etc. plus its SPIFFE id."""
        names = list(dns_names) or [f"istiod.{self.config.namespace}.svc"]
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.signer.issue_serving(key.public_key(), names, list(ips), self.istiod_identity, ttl)
        return self._bundle(key, cert_to_pem(leaf))

    def issue_bootstrap(self, identity: SpiffeId, node: str, ttl: dt.timedelta | None = None) -> CertBundle:
        """A standalone node proxy's client credential for the CA, binding ``node`` (see signer)."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.signer.issue_bootstrap(key.public_key(), identity, node, ttl)
        return self._bundle(key, cert_to_pem(leaf))


async def load_material(config: CaConfig, root_store: RootStore | None = None) -> CaMaterial:
    """Plug-in ``cacerts`` when present, else the stored self-signed root (created on first start)."""
    if config.cacerts_dir is not None and (config.cacerts_dir / CA_CERT_FILE).exists():
        material = load_plugin_cacerts(config.cacerts_dir)
        log.info("CA: signing as plug-in intermediate %s", material.signing_cert.subject.rfc4514_string())
        return material
    if root_store is None:
        if config.root_dir is None:
            raise ValueError("CA needs a root store (Kubernetes Secret) or root_dir (standalone)")
        root_store = DirectoryRootStore(config.root_dir)
    material = await load_or_create_root(root_store, config.trust_domain, config.key_type)
    log.info(
        "CA: self-signed root %s (serial %x)",
        material.root.subject.rfc4514_string(),
        material.root.serial_number,
    )
    return material


async def start_authority(
    config: CaConfig,
    root_store: RootStore | None = None,
    publishers: Sequence[TrustBundlePublisher] = (),
    clock: Clock = time.time,
) -> CertificateAuthority:
    """Load or create the root, publish the trust bundle, and return the ready CA."""
    material = await load_material(config, root_store)
    ca = CertificateAuthority(config, material, clock)
    for pub in publishers:
        await pub.publish(ca.roots_pem)
    return ca
