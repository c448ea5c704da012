"""Status of Istio resources: why a config is invalid or has no effect, written where users look.

The findings are the model's own (``mesh.analysis`` diagnostics, ``mesh.authz`` ztunnel conditions), so what
``kubectl get -o yaml`` shows is what the data plane got. Shape, close to upstream istiod's:

* ``conditions``: ``Accepted`` (``False``/``Invalid`` naming every bad field when the model refuses the
  object; the store then keeps its last good version) and, for AuthorizationPolicies that reach ztunnel,
  ``ZtunnelAccepted``;
* ``validationMessages``: one per diagnostic, ``{type: {code, name}, level, field, message}`` - upstream
  has code/name/level; the field path and message are ours, so the reason is actionable.

HTTPRoutes get Gateway API's ``status.parents`` instead (``operator/route_status.py``).

Writes go through the ``status`` subresource as merge patches, only when the content (ignoring timestamps)
differs from what the watch last saw, so the status writer never loops on its own updates.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from istiopy.mesh.ambient import MeshSettings
from istiopy.mesh.analysis import Diagnostic, analyze
from istiopy.mesh.authz import ztunnel_condition, ztunnel_policy
from istiopy.mesh.meta import ResourceKey
from istiopy.mesh.resources.gateway import HTTPRoute
from istiopy.mesh.resources.security import AuthorizationPolicy
from istiopy.mesh.store import ConfigStore
from istiopy.operator.kubeapi import ApiError, KubeApi
from istiopy.operator.route_status import desired_route_status
from istiopy.operator.sources import SOURCE, KubeSource, WatchedKind
from istiopy.operator.waypoints import _condition, comparable

__all__ = ["StatusWriter", "desired_status"]

log = logging.getLogger(__name__)

ISTIO_GROUPS = ("networking.istio.io", "security.istio.io")
_LEVEL = {"Error": "ERROR", "Warning": "WARNING", "Info": "INFO"}


def _message(d: Diagnostic) -> dict[str, Any]:
    return {
        "type": {"code": d.code, "name": d.reason} if d.code else {"name": d.reason},
        "level": _LEVEL.get(d.severity, "WARNING"),
        "field": d.field,
        "message": d.message,
    }


def desired_status(
    store: ConfigStore,
    key: ResourceKey,
    diagnostics: list[Diagnostic],
    invalid_message: str | None,
    generation: int | None,
    old: Mapping[str, Any],
    settings: MeshSettings,
) -> dict[str, Any]:
    """The status one Istio resource should carry."""
    old_conditions = list(old.get("conditions") or [])
    conditions = []
    if invalid_message is not None:
        conditions.append(
            _condition("Accepted", False, "Invalid", invalid_message, generation, old_conditions)
        )
    else:
        conditions.append(_condition("Accepted", True, "Accepted", "valid", generation, old_conditions))
    res = store.get(*key)
    if isinstance(res, AuthorizationPolicy):
        zp = ztunnel_policy(res, settings)
        cond = ztunnel_condition(zp)
        if cond is not None:
            message = cond.message
            if zp.field_path and zp.message:
                message = f"{zp.field_path}: {message}"
            conditions.append(
                _condition(cond.type, cond.status == "True", cond.reason, message, generation, old_conditions)
            )
    status: dict[str, Any] = {
        "conditions": conditions,
        "validationMessages": [_message(d) for d in diagnostics],
    }
    if generation is not None:
        status["observedGeneration"] = str(generation)
    return status


class StatusWriter:
    """Leader-only: recomputes diagnostics after changes and patches the statuses that differ."""

    def __init__(
        self,
        api: KubeApi,
        store: ConfigStore,
        source: KubeSource,
        settings: MeshSettings,
        controller: str = "istio.io/mesh-controller",
    ) -> None:
        self.api = api
        self.store = store
        self.source = source
        self.settings = settings
        self.controller = controller
        self._kinds: dict[str, WatchedKind] = {wk.kind: wk for wk in source.kinds if wk.group in ISTIO_GROUPS}
        self._routes = next((wk for wk in source.kinds if wk.cls is HTTPRoute), None)
        self.writes = 0

    async def sync(self) -> None:
        by_key: dict[ResourceKey, list[Diagnostic]] = {}
        for d in analyze(self.store, self.settings):
            by_key.setdefault(d.resource, []).append(d)
        keys: set[ResourceKey] = set()
        for kind in self._kinds:
            for res in self.store.list(kind):
                if self.store.source_of(res.key) == SOURCE:
                    keys.add(res.key)
        keys.update(k for k in self.source.invalid if k.kind in self._kinds)
        for key in sorted(keys):
            wk = self._kinds[key.kind]
            inv = self.source.invalid.get(key)
            stored = self.store.get(*key)
            meta = self.source.raw_meta.get(key) or {}
            generation = meta.get("generation")
            if generation is None and stored is not None:
                generation = stored.metadata.generation
            old = self.source.statuses.get(key) or {}
            want = desired_status(
                self.store,
                key,
                by_key.get(key, []),
                inv.message if inv is not None else None,
                generation,
                old,
                self.settings,
            )
            await self._write(wk, key, want, old)
        if self._routes is not None:
            for route in self.store.list_typed(HTTPRoute):
                if self.store.source_of(route.key) != SOURCE:
                    continue
                old = self.source.statuses.get(route.key) or {}
                meta = self.source.raw_meta.get(route.key) or {}
                generation = meta.get("generation", route.metadata.generation)
                want = desired_route_status(self.store, route, old, generation, self.controller)
                await self._write(self._routes, route.key, want, old)

    async def _write(
        self, wk: WatchedKind, key: ResourceKey, want: dict[str, Any], old: Mapping[str, Any]
    ) -> None:
        if comparable(want) == comparable(old):
            return
        try:
            await self.api.merge_patch(wk.object_path(key.namespace, key.name, "status"), {"status": want})
            self.writes += 1
            self.source.statuses[key] = want
        except ApiError as e:
            if not e.not_found:
                log.warning("status of %s not written: %s", key, e)
