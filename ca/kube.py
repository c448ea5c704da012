"""Kubernetes-mode root persistence and trust-bundle publication over two tiny API protocols.

The semantics live here (create-once race handling for the root Secret, one ConfigMap per mesh namespace);
the I/O is a few calls the Kubernetes engineer wires to ``kubernetes_asyncio``:

* :class:`SecretApi` - read / create a Secret (``create`` reports AlreadyExists as False);
* :class:`ConfigMapApi` - server-side apply (or create-or-update) of a ConfigMap's data.

:class:`SecretRootStore` is the :class:`~istiopy.ca.authority.RootStore` for Secret ``istio-ca-secret``;
:class:`ConfigMapTrustBundlePublisher` is the :class:`~istiopy.ca.bundle.TrustBundlePublisher` for
ConfigMap ``istio-ca-root-cert``; :class:`TrustBundleSync` keeps that ConfigMap right in every namespace
for the life of istiod (new namespaces, failed writes retried, deleted or edited copies restored).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from istiopy.ca.authority import CaMaterial, CaMaterialError, material_from_files, material_to_files
from istiopy.ca.bundle import CONFIGMAP_KEY, CONFIGMAP_NAME

log = logging.getLogger(__name__)

CA_SECRET_NAME = "istio-ca-secret"


class SecretApi(Protocol):
    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        """The Secret's decoded ``data``, or None when it does not exist."""
        ...

    async def create(self, namespace: str, name: str, data: Mapping[str, bytes]) -> bool:
        """Create it; False when it already exists (HTTP 409), so a racing replica can read the winner."""
        ...


class ConfigMapApi(Protocol):
    async def apply(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        """Create the ConfigMap or make its ``data`` equal to ``data``."""
        ...


class SecretRootStore:
    """The self-signed root in Secret ``istio-ca-secret`` of the control-plane namespace.

    Replicas starting together each generate a root and try to create the Secret; exactly one create
    succeeds and everyone, the losers included, uses what the Secret holds afterwards.
    """

    def __init__(self, api: SecretApi, namespace: str, name: str = CA_SECRET_NAME) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name

    async def load(self) -> CaMaterial | None:
        data = await self.api.read(self.namespace, self.name)
        if data is None:
            return None
        try:
            return material_from_files(dict(data))
        except CaMaterialError as e:
            raise CaMaterialError(f"Secret {self.namespace}/{self.name} is unusable: {e}") from e

    async def create(self, material: CaMaterial) -> CaMaterial:
        if await self.api.create(self.namespace, self.name, material_to_files(material)):
            log.info("CA: created Secret %s/%s with a new self-signed root", self.namespace, self.name)
            return material
        stored = await self.load()
        if stored is None:
            raise CaMaterialError(f"Secret {self.namespace}/{self.name} exists but cannot be read")
        log.info("CA: another replica created Secret %s/%s first; using its root", self.namespace, self.name)
        return stored


class ConfigMapTrustBundlePublisher:
    """Writes ConfigMap ``istio-ca-root-cert`` (key ``root-cert.pem``) into every mesh namespace.

    ``namespaces`` is called on every publish, so namespaces created later get the bundle on the next
    publish (istiod calls ``publish`` again on namespace add events).
    """

    def __init__(self, api: ConfigMapApi, namespaces: Callable[[], Iterable[str]]) -> None:
        self.api = api
        self.namespaces = namespaces

    async def publish(self, roots_pem: str) -> None:
        failed: list[str] = []
        for ns in sorted(set(self.namespaces())):
            try:
                await self.api.apply(ns, CONFIGMAP_NAME, {CONFIGMAP_KEY: roots_pem})
            except Exception as e:  # one broken namespace must not keep the others from their bundle
                log.error("CA: publishing %s to namespace %s failed: %s", CONFIGMAP_NAME, ns, e)
                failed.append(ns)
        if failed:
            raise RuntimeError(f"trust bundle not published to: {', '.join(failed)}")


class TrustBundleSync:
    """Keeps ConfigMap ``istio-ca-root-cert`` in every namespace ``namespaces()`` lists, for as long as
    :meth:`run` runs: everywhere at start, in each namespace :meth:`namespace_added` names, and everywhere
    again every ``resync`` seconds, so a copy someone deleted or edited comes back (istiod does that on the
    ConfigMap's own events; a periodic server-side apply gets there without a ConfigMap watch). A write that
    fails (API server unavailable, an admission policy, a namespace being deleted) is logged and retried for
    that namespace alone, backing off from ``retry_initial`` to ``retry_max`` seconds, and writes go out
    ``parallel`` at a time: one bad or slow namespace never holds up the others, and a transient failure
    does not leave pods without the mesh's roots."""

    def __init__(
        self,
        api: ConfigMapApi,
        namespaces: Callable[[], Iterable[str]],
        roots_pem: Callable[[], str],
        *,
        resync: float = 300.0,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        parallel: int = 8,
    ) -> None:
        self.api = api
        self.namespaces = namespaces
        self.roots_pem = roots_pem
        self.resync = resync
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._due: dict[str, float] = {}  # namespace -> when to write it (monotonic)
        self._delay: dict[str, float] = {}  # namespace -> its next retry delay
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(parallel)
        self.writes = 0
        self.failures = 0

    def namespace_added(self, namespace: str) -> None:
        """Write to ``namespace`` now (call from the event loop)."""
        self._due[namespace] = 0.0
        self._wake.set()

    async def run(self) -> None:
        next_resync = 0.0
        while True:
            now = time.monotonic()
            listed = set(self.namespaces())
            if now >= next_resync:
                for ns in listed:
                    self._due.setdefault(ns, 0.0)
                next_resync = now + self.resync
            due = sorted(n for n, t in self._due.items() if t <= now)
            for ns in due:
                if ns not in listed:  # deleted meanwhile: nothing to keep there
                    self._due.pop(ns, None)
                    self._delay.pop(ns, None)
            await asyncio.gather(*(self._write(ns) for ns in due if ns in listed))
            wake_at = min([next_resync, *self._due.values()])
            self._wake.clear()
            timeout = max(0.0, wake_at - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _write(self, ns: str) -> None:
        try:
            async with self._slots:
                await self.api.apply(ns, CONFIGMAP_NAME, {CONFIGMAP_KEY: self.roots_pem()})
        except Exception as e:  # retried below; never ends the loop
            self.failures += 1
            delay = self._delay.get(ns, self.retry_initial)
            self._delay[ns] = min(delay * 2, self.retry_max)
            self._due[ns] = time.monotonic() + delay
            log.warning("CA: %s not published to %s (retry in %.0f s): %s", CONFIGMAP_NAME, ns, delay, e)
            return
        self.writes += 1
        self._due.pop(ns, None)
        self._delay.pop(ns, None)
