"""SDS for Envoy waypoints: the ``default`` (workload certificate) and ``ROOTCA`` (trust anchors) secrets.

Envoy gets its key and certificate through the xDS server, never from files. The CA issues a key and
certificate for the waypoint's authenticated identity in-process, keeps it, and re-issues it half way
through its lifetime. Listeners (istiod's push trigger) hear which identity was re-issued so that the
proxies holding it are pushed the new ``default`` secret; Envoy swaps it without a restart.

:meth:`WaypointSecrets.generate` has the xDS generator shape ``(store, proxy) -> [(name, Secret)]`` and is
deterministic between rotations (it returns the cached certificate), which is what content-hash
versioning needs. :func:`generator_fields` gives the keyword arguments for ``xds.registry.Generator``
(``ca`` must not import ``xds``; istiod does the wiring).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from istiopy.api.identity import InvalidSpiffeId, SpiffeId
from istiopy.api.tls import CertBundle
from istiopy.ca.service import CertificateAuthority
from istiopy.mesh.meta import ResourceKey
from istiopy.mesh.store import Change

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
# Kind of the synthetic store-less change announcing a re-issued certificate (see rotation_change).
ROTATION_KIND = "WorkloadCertificate"


class ProxyLike(Protocol):
    """The parts of ``xds.proxy.Proxy`` the generator reads."""

    @property
    def identity(self) -> str | None: ...

    @property
    def namespace(self) -> str: ...

    def meta(self, key: str, default: str = "") -> str: ...


def workload_secret(bundle: CertBundle, name: str = WORKLOAD_SECRET) -> Any:
    """``Secret{tls_certificate}``: leaf and intermediates (not the root) plus the private key, inline."""
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=bundle.served_chain_pem.encode()),
            private_key=base_pb2.DataSource(inline_bytes=bundle.key_pem.encode()),
        ),
    )


def root_secret(roots_pem: str, name: str = ROOT_SECRET) -> Any:
    """``Secret{validation_context}``: the mesh trust anchors."""
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem.encode())
        ),
    )


def secret_resources(bundle: CertBundle) -> list[tuple[str, Any]]:
    """Both secrets for one workload bundle, as ``(name, message)`` pairs."""
    return [(WORKLOAD_SECRET, workload_secret(bundle)), (ROOT_SECRET, root_secret(bundle.roots_pem))]


RotationListener = Callable[[SpiffeId], None]


class WaypointSecrets:
    """Per-identity certificates for proxies served over SDS, re-issued at half lifetime.

    ``trust_node_metadata``: when the xDS server did not authenticate the proxy (``proxy.identity`` is
    None), derive the identity from its claimed namespace and ``SERVICE_ACCOUNT`` metadata. Only for tests
    and trusted single-host set-ups: a claimed identity is no identity.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        ttl: dt.timedelta | None = None,
        trust_node_metadata: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.ttl = ttl
        self.trust_node_metadata = trust_node_metadata
        self._clock = clock
        self._bundles: dict[SpiffeId, CertBundle] = {}
        self._generation: dict[SpiffeId, int] = {}
        self._listeners: list[RotationListener] = []
        self._wake = asyncio.Event()

    def subscribe(self, listener: RotationListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def identity_of(self, proxy: ProxyLike) -> SpiffeId | None:
        try:
            if proxy.identity:
                return SpiffeId.parse(proxy.identity)
            if self.trust_node_metadata and proxy.meta("SERVICE_ACCOUNT") and proxy.namespace:
                return SpiffeId(self.ca.config.trust_domain, proxy.namespace, proxy.meta("SERVICE_ACCOUNT"))
        except InvalidSpiffeId as e:
            log.warning("SDS: proxy identity unusable: %s", e)
        return None

    def bundle_for(self, identity: SpiffeId) -> CertBundle:
        """The current bundle, issuing one when there is none or it has expired.

        Rotation before expiry happens only in :meth:`rotate_due` / :meth:`rotate`, which tell the
        listeners: a generator that rotated silently would change its output without a push.
        """
        b = self._bundles.get(identity)
        if b is None or b.expired(self._clock()):
            b = self._issue(identity)
        return b

    def _issue(self, identity: SpiffeId) -> CertBundle:
        b = self.ca.issue_workload(identity, self.ttl)
        self._bundles[identity] = b
        self._generation[identity] = self._generation.get(identity, 0) + 1
        self._wake.set()
        log.info("SDS: issued certificate for %s valid until %s", identity, b.leaf.not_valid_after_utc)
        return b

    def rotate(self, identity: SpiffeId) -> CertBundle:
        """Re-issue now (e.g. after a root change) and tell the listeners."""
        b = self._issue(identity)
        for listener in list(self._listeners):
            try:
                listener(identity)
            except Exception:
                log.exception("SDS rotation listener failed for %s", identity)
        return b

    def generate(self, store: object, proxy: ProxyLike) -> list[tuple[str, Any]]:
        """The xDS generator: both secrets for the proxy's identity (none for an unidentified proxy)."""
        ident = self.identity_of(proxy)
        if ident is None:
            return []
        return secret_resources(self.bundle_for(ident))

    def scope(self, proxy: ProxyLike) -> Hashable:
        """Proxies with the same identity share the same secrets. The issue generation is part of the
        scope because the push pipeline caches output per store version, and a rotation changes no
        store content: a new generation is a new cache key."""
        ident = self.identity_of(proxy)
        return ("sds", str(ident), self._generation.get(ident, 0) if ident else 0)

    def affects(self, change: Change, proxy: ProxyLike) -> bool:
        """Only a rotation of this proxy's own identity changes its secrets."""
        if change.key.kind != ROTATION_KIND:
            return False
        ident = self.identity_of(proxy)
        return ident is not None and (change.key.namespace, change.key.name) == (
            ident.namespace,
            ident.service_account,
        )

    def rotate_due(self) -> list[SpiffeId]:
        """Re-issue every bundle past its refresh time (half its lifetime); returns the identities rotated."""
        now = self._clock()
        due = [i for i, b in self._bundles.items() if now >= b.refresh_at]
        for ident in due:
            self.rotate(ident)
        return due

    def next_refresh(self) -> float | None:
        return min((b.refresh_at for b in self._bundles.values()), default=None)

    async def run(self) -> None:
        """Rotate on time forever (istiod runs this as a task and cancels it on shutdown)."""
        while True:
            self._wake.clear()
            self.rotate_due()
            nxt = self.next_refresh()
            delay = 3600.0 if nxt is None else max(0.0, nxt - self._clock())
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that races
            # with the event being set, and this task must stop when istiod cancels it.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def forget(self, identities: Iterable[SpiffeId]) -> None:
        for ident in identities:
            self._bundles.pop(ident, None)


def rotation_change(identity: SpiffeId) -> Change:
    """A change to hand to the push pipeline (``pipeline.push([rotation_change(i)])``) after ``identity``
    was re-issued: certificates are not store content, so nothing else would trigger the push."""
    return Change(
        "update",
        ResourceKey(ROTATION_KIND, identity.namespace, identity.service_account),
        None,
        None,
        0,
        "ca",
    )


def generator_fields(secrets: WaypointSecrets) -> dict[str, Any]:
    """Keyword arguments for ``istiopy.xds.registry.Generator`` serving SDS to waypoints and gateways."""
    return {
        "type_url": SECRET_TYPE_URL,
        "generate": secrets.generate,
        "affects": secrets.affects,
        "scope": secrets.scope,
        "proxy_kinds": frozenset({"waypoint", "router"}),
        "name": "ca.sds",
    }
