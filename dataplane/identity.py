"""Certificates for the workloads on this node: the proxy asks ``identity -> (chain, key, roots)``.

Why a layer over :class:`istiopy.api.ca_client.CertificateManager`: ztunnel is a *shared* proxy, so it asks
the CA on behalf of each local workload (``ImpersonatedIdentity``), and several pods may share one identity.
This module reference-counts identities by the local workloads that need them (``set_local``), prefetches a
certificate as soon as a workload appears on the node (so the first connection does not wait for the CA),
forgets identities nobody uses any more, keeps one ready ``SSLContext`` per identity and direction that is
reloaded in place when the certificate rotates (half-life, done by the manager), and renders the
``certificates`` part of ``/config_dump`` including the Initializing/Unavailable states upstream shows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from istiopy.api.ca_client import CaClient, CertificateManager
from istiopy.api.identity import SpiffeId
from istiopy.api.pki import PkiBackend
from istiopy.api.tls import CertBundle, client_context, load_bundle, server_context
from istiopy.dataplane import pki

if TYPE_CHECKING:  # contexts exist only on the Python byte path; the C path never imports ssl
    import ssl

log = logging.getLogger("istiopy.ztunnel.identity")

Fetcher = Callable[[SpiffeId], Awaitable[CertBundle]]


def ca_fetcher(
    client: CaClient,
    *,
    ttl_seconds: int = 86400,
    impersonate: bool = True,
    backend: PkiBackend | None = None,
) -> Fetcher:
    """Adapt a CA client: node proxies request with ``ImpersonatedIdentity`` (shared-proxy mode).

    The client's keys, CSRs and chain checks switch to the data plane's backend (``dataplane.pki``:
    OpenSSL in C), so the node proxy does not load ``cryptography``.
    """
    client.pki = backend or pki.backend()

    async def fetch(identity: SpiffeId) -> CertBundle:
        return await client.fetch(identity, ttl_seconds=ttl_seconds, impersonate=impersonate)

    return fetch


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SecretManager:
    """Per-identity certificates and TLS contexts for the proxy."""

    def __init__(self, fetcher: Fetcher, **manager_kw: object) -> None:
        self._errors: dict[SpiffeId, str] = {}
        self._fetcher = fetcher
        self.manager = CertificateManager(self._fetch, **manager_kw)  # type: ignore[arg-type]
        self.manager.subscribe(self._rotated)
        self._local: dict[str, SpiffeId] = {}  # local workload uid -> identity
        self._server_ctx: dict[SpiffeId, ssl.SSLContext] = {}
        self._client_ctx: dict[SpiffeId, ssl.SSLContext] = {}
        self._roots: dict[SpiffeId, str] = {}
        self._forgetting: set[asyncio.Task[None]] = set()

    async def _fetch(self, identity: SpiffeId) -> CertBundle:
        try:
            bundle = await self._fetcher(identity)
        except Exception as e:
            self._errors[identity] = str(e)
            raise
        self._errors.pop(identity, None)
        return bundle

    def _rotated(self, identity: SpiffeId, bundle: CertBundle | None) -> None:
        """Reload live contexts with the new certificate so later handshakes use it."""
        if bundle is None:
            self._server_ctx.pop(identity, None)
            self._client_ctx.pop(identity, None)
            return
        if self._roots.get(identity, bundle.roots_pem) != bundle.roots_pem:
            # OpenSSL cannot drop trust anchors from a context: a root change means new contexts.
            self._server_ctx.pop(identity, None)
            self._client_ctx.pop(identity, None)
        self._roots[identity] = bundle.roots_pem
        for ctx in (self._server_ctx.get(identity), self._client_ctx.get(identity)):
            if ctx is not None:
                load_bundle(ctx, bundle)

    # ---- which identities are needed ----------------------------------------------------------

    def set_local(self, workloads: Iterable[tuple[str, SpiffeId]]) -> None:
        """Declare the local workloads (uid, identity): new identities are prefetched, unused ones forgotten.

        Must be called from the event loop (it starts background fetches).
        """
        new = dict(workloads)
        wanted = set(new.values())
        before = set(self._local.values())
        self._local = new
        for ident in sorted(wanted - before):
            log.info("prefetching certificate for %s", ident)
            self.manager.track(ident)
        for ident in sorted(before - wanted):
            log.info("no local workload uses %s any more; dropping its certificate", ident)
            self._server_ctx.pop(ident, None)
            self._client_ctx.pop(ident, None)
            self._errors.pop(ident, None)
            task = asyncio.get_running_loop().create_task(self.manager.forget(ident))
            self._forgetting.add(task)  # keep a reference until done (the loop holds tasks only weakly)
            task.add_done_callback(self._forgetting.discard)

    def add_local(self, uid: str, identity: SpiffeId) -> None:
        self.set_local([*self._local.items(), (uid, identity)])

    def remove_local(self, uid: str) -> None:
        self.set_local([(u, i) for u, i in self._local.items() if u != uid])

    @property
    def local_identities(self) -> set[SpiffeId]:
        return set(self._local.values())

    # ---- what the proxy asks -----------------------------------------------------------------

    async def fetch(self, identity: SpiffeId) -> CertBundle:
        """``identity -> (chain, key, roots)``: the current certificate, fetched now if missing."""
        return await self.manager.get(identity)

    def current(self, identity: SpiffeId) -> CertBundle | None:
        return self.manager.current(identity)

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """TLS 1.3 server context (client cert required) serving ``identity``'s certificate."""
        ctx = self._server_ctx.get(identity)
        if ctx is None:
            bundle = await self.fetch(identity)
            ctx = self._server_ctx.setdefault(identity, server_context(bundle))
            self._roots[identity] = bundle.roots_pem
        return ctx

    def server_context_nowait(self, identity: SpiffeId) -> ssl.SSLContext | None:
        """The server context if a certificate is at hand; None starts a fetch (callers may await it)."""
        ctx = self._server_ctx.get(identity)
        if ctx is None:
            bundle = self.current(identity)
            if bundle is None:
                self.manager.track(identity)  # a needed-but-missing identity is fetched right away
                return None
            ctx = self._server_ctx.setdefault(identity, server_context(bundle))
            self._roots[identity] = bundle.roots_pem
        return ctx

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """TLS 1.3 client context presenting ``identity``'s certificate (no SNI, peer checked by caller)."""
        ctx = self._client_ctx.get(identity)
        if ctx is None:
            bundle = await self.fetch(identity)
            ctx = self._client_ctx.setdefault(identity, client_context(bundle))
            self._roots[identity] = bundle.roots_pem
        return ctx

    async def close(self) -> None:
        await asyncio.gather(*self._forgetting, return_exceptions=True)
        await self.manager.close()

    # ---- /config_dump ------------------------------------------------------------------------

    def dump(self) -> list[dict[str, object]]:
        """The ``certificates`` list of ``/config_dump`` (identity, state, certChain), upstream's shape."""
        out: list[dict[str, object]] = []
        for ident in sorted(set(self.manager.identities()) | self.local_identities):
            bundle = self.manager.current(ident)
            if bundle is not None:
                state = "Available"
                chain = [
                    {
                        "pem": pem,
                        "serialNumber": str(info.serial_number),
                        "validFrom": _rfc3339(info.not_before),
                        "expirationTime": _rfc3339(info.not_after),
                    }
                    for pem, info in zip(bundle.chain_pem, bundle.infos, strict=True)
                ]
            else:
                err = self._errors.get(ident)
                state = f"Unavailable: {err}" if err else "Initializing"
                chain = []
            out.append({"identity": str(ident), "state": state, "certChain": chain})
        return out
