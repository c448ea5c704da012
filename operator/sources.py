"""The Kubernetes config source: kopf watch handlers that feed API objects into the ``ConfigStore``.

Every watched object goes through ``mesh.kinds.parse`` (the one door for untrusted documents) and into the
store under source ``kube``, exactly as the file source does for YAML. Design choices, each answering a
known kopf pain point (reference anchors 1.5):

* Only ``@kopf.on.event`` handlers: they are read-only, so kopf keeps no finalizers and writes no
  state annotations on user objects (the persistence storages are in-memory as a second guard).
* Watch timeouts are explicit (server and client side), so a silently dead stream is re-established
  instead of freezing the mesh.
* An invalid object is logged and remembered (its status gets a condition naming the field); it never
  stops the handler or the other objects. Like the file source, an object that *becomes* invalid keeps
  its last good version in the store: a typo must not silently drop a DENY policy.
* A periodic resync lists every kind and drops what the store still holds but the API server no longer
  has: kopf re-lists after a ``410 Gone`` without reporting deletions it missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

import istiopy.mesh.resources  # noqa: F401  (registers every kind with mesh.kinds)
from istiopy.mesh.errors import InvalidResource, UnknownKind
from istiopy.mesh.kinds import parse, registered
from istiopy.mesh.meta import Resource, ResourceKey
from istiopy.mesh.store import ConfigStore
from istiopy.operator.kubeapi import ApiError, KubeApi, resource_path

__all__ = ["SOURCE", "InvalidObject", "KubeSource", "WatchedKind", "watched_kinds"]

log = logging.getLogger(__name__)

SOURCE = "kube"
_CORE_GROUPS = {"", "discovery.k8s.io"}
_CONFIG_GROUPS = ("networking.istio.io", "security.istio.io", "gateway.networking.k8s.io")


@dataclass(frozen=True)
class WatchedKind:
    """One watched resource type: what kopf watches and which model class reads it."""

    group: str
    version: str
    plural: str
    kind: str
    cls: type[Resource]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def list_path(self) -> str:
        return resource_path(self.group, self.version, self.plural)

    def object_path(self, namespace: str, name: str, subresource: str | None = None) -> str:
        ns = namespace if self.cls.NAMESPACED else None
        return resource_path(self.group, self.version, self.plural, ns, name, subresource)


def watched_kinds() -> list[WatchedKind]:
    """Every model kind from Kubernetes core, discovery, Istio and Gateway API, at its preferred version."""
    out = []
    for cls in registered():
        if cls.GROUP in _CORE_GROUPS or cls.GROUP in _CONFIG_GROUPS:
            out.append(WatchedKind(cls.GROUP, cls.VERSIONS[0], cls.PLURAL, cls.KIND, cls))
    return out


@dataclass(frozen=True)
class InvalidObject:
    """An object the API server holds but the model refuses: where it is and why (field paths)."""

    kind: WatchedKind
    namespace: str
    name: str
    generation: int | None
    error: InvalidResource

    @property
    def message(self) -> str:
        return "; ".join(str(e) for e in self.error.errors)


class _MemoryProgress(kopf.ProgressStorage):  # type: ignore[misc]
    """Handler progress in memory only: the operator never annotates user objects."""

    def __init__(self) -> None:
        super().__init__()
        self._data: dict[tuple[str, str], Any] = {}

    @staticmethod
    def _uid(body: Any) -> str:
        return str(body.get("metadata", {}).get("uid", ""))

    def fetch(self, *, key: Any, body: Any) -> Any:
        return self._data.get((self._uid(body), str(key)))

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        self._data[(self._uid(body), str(key))] = record

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        self._data.pop((self._uid(body), str(key)), None)

    def touch(self, *, body: Any, patch: Any, value: str | None) -> None:
        pass

    def clear(self, *, essence: Any) -> Any:
        return essence


class _MemoryDiffBase(kopf.DiffBaseStorage):  # type: ignore[misc]
    """Last-handled essences in memory only (kopf's default writes them into an annotation)."""

    def __init__(self) -> None:
        super().__init__()
        self._data: dict[str, Any] = {}

    def fetch(self, *, body: Any) -> Any:
        return self._data.get(str(body.get("metadata", {}).get("uid", "")))

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        self._data[str(body.get("metadata", {}).get("uid", ""))] = essence


def operator_settings(server_timeout: int, client_timeout: int) -> kopf.OperatorSettings:
    """kopf settings for a read-mostly, annotation-free, self-healing watcher embedded in istiod."""
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = server_timeout
    settings.watching.client_timeout = client_timeout
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    settings.persistence.progress_storage = _MemoryProgress()
    settings.persistence.diffbase_storage = _MemoryDiffBase()
    settings.posting.enabled = False  # no kopf Events in user namespaces
    settings.peering.standalone = True  # leadership is our own Lease, not KopfPeering CRDs
    settings.peering.mandatory = False
    # kopf SIGKILLs its own thread (here: istiod's main thread) if cancelled without its stop flag;
    # istiod cancels components on shutdown, so that safety net would kill the whole control plane.
    settings.process.ultimate_exiting_timeout = None
    return settings


Listener = Callable[[], None]


class KubeSource:
    """Registers the watch handlers in a kopf registry and applies events to ``store``.

    ``statuses`` keeps the last seen ``status`` of every config object, so the status writer can skip
    writes that would change nothing (and never loops on its own updates). ``on_change`` is called after
    every event that changed something the leader reconciles (including managed Deployments).
    """

    def __init__(self, store: ConfigStore, api: KubeApi) -> None:
        self.store = store
        self.api = api
        self.kinds = watched_kinds()
        self.invalid: dict[ResourceKey, InvalidObject] = {}
        self.statuses: dict[ResourceKey, Mapping[str, Any]] = {}
        self.raw_meta: dict[ResourceKey, Mapping[str, Any]] = {}
        self.deployments: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.listeners: list[Listener] = []
        self.events = 0

    # --------------------------------------------------------------------------------------- kopf wiring
    def register(self, registry: kopf.OperatorRegistry) -> None:
        for wk in self.kinds:
            kopf.on.event(
                group=wk.group, version=wk.version, plural=wk.plural, registry=registry, id=f"feed-{wk.kind}"
            )(self._handler(wk))
        kopf.on.event(
            group="apps",
            version="v1",
            plural="deployments",
            labels={"gateway.istio.io/managed": "istio.io-mesh-controller"},
            registry=registry,
            id="waypoint-deployments",
        )(self._on_deployment)

    def _handler(self, wk: WatchedKind) -> Callable[..., Any]:
        async def on_event(event: Mapping[str, Any], **_: Any) -> None:
            self.handle(wk, event.get("type"), event.get("object") or {})

        return on_event

    async def _on_deployment(self, event: Mapping[str, Any], **_: Any) -> None:
        obj = event.get("object") or {}
        md = obj.get("metadata") or {}
        key = (str(md.get("namespace", "")), str(md.get("name", "")))
        if event.get("type") == "DELETED":
            self.deployments.pop(key, None)
        else:
            self.deployments[key] = obj
        self._notify()

    # -------------------------------------------------------------------------------------------- events
    def handle(self, wk: WatchedKind, etype: str | None, raw: Mapping[str, Any]) -> None:
        """Apply one watch event (``etype`` None is kopf's initial listing). Never raises for bad input."""
        self.events += 1
        # The API server writes empty lists as null (an EndpointSlice without endpoints); for core objects
        # null and absent mean the same, and the model only knows absent.
        obj = _without_nulls(raw) if wk.group in _CORE_GROUPS else dict(raw)
        obj.setdefault("apiVersion", wk.api_version)
        obj.setdefault("kind", wk.kind)
        md = obj.get("metadata") or {}
        key = ResourceKey(
            wk.kind, str(md.get("namespace", "")) if wk.cls.NAMESPACED else "", str(md.get("name"))
        )
        if etype == "DELETED":
            self.store.delete(key)
            self.invalid.pop(key, None)
            self.statuses.pop(key, None)
            self.raw_meta.pop(key, None)
            self._notify()
            return
        if wk.group in _CONFIG_GROUPS:
            self.statuses[key] = obj.get("status") or {}
            self.raw_meta[key] = md
        try:
            res = parse(obj, source=f"{SOURCE}:{key}")
        except InvalidResource as e:
            gen = md.get("generation")
            old = self.invalid.get(key)
            if old is None or old.message != "; ".join(str(x) for x in e.errors):
                kept = " (keeping its last good version)" if self.store.get(*key) is not None else ""
                log.warning("invalid %s: %s%s", key, "; ".join(str(x) for x in e.errors), kept)
            self.invalid[key] = InvalidObject(wk, key.namespace, key.name, gen, e)
            self._notify()
            return
        except UnknownKind:
            return
        except Exception:  # a model bug must not stop the feed of every other object
            log.exception("cannot read %s", key)
            return
        if self.invalid.pop(key, None) is not None:
            log.info("%s is valid again", key)
        self.store.apply(res, SOURCE)
        self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    # -------------------------------------------------------------------------------------------- resync
    async def resync(self) -> int:
        """List every kind and drop store entries the API server no longer has; returns how many.

        An object newer than the list (higher resourceVersion) is kept: the watch added it after the list.
        """
        dropped = 0
        for wk in self.kinds:
            try:
                listing = await self.api.request("GET", wk.list_path())
            except ApiError as e:
                if e.status not in (404,):
                    log.debug("resync of %s skipped: %s", wk.plural, e)
                continue
            list_rv = _rv(listing.get("metadata", {}).get("resourceVersion"))
            present = set()
            for item in listing.get("items") or []:
                md = item.get("metadata") or {}
                present.add((str(md.get("namespace", "")) if wk.cls.NAMESPACED else "", str(md.get("name"))))
            for res in self.store.list(wk.kind):
                if self.store.source_of(res.key) != SOURCE:
                    continue
                if (res.key.namespace, res.key.name) in present:
                    continue
                if _rv(res.metadata.resource_version) > list_rv:
                    continue
                log.info("resync: %s is gone from the API server", res.key)
                self.store.delete(res.key)
                dropped += 1
        if dropped:
            self._notify()
        return dropped

    async def run_resync(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.resync()
            except Exception:
                log.exception("resync failed")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _rv(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
