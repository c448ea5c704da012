"""HTTPRoute status for the routes the mesh serves: ``status.parents[]`` per parentRef, as Gateway API asks.

In ambient mode an HTTPRoute takes effect through the waypoint of the Service (or ServiceEntry) it names as
parent (GAMMA); those parents are this controller's, and each gets an entry with ``controllerName`` and two
conditions, the ones ``kubectl describe httproute`` users read first:

* ``Accepted``: ``True`` when the parent exists, else ``False``/``NoMatchingParent`` naming it;
* ``ResolvedRefs``: ``True`` when every backendRef names an existing Service or ServiceEntry the route may
  use, else ``False`` naming each one: ``InvalidKind`` for kinds the mesh cannot route to,
  ``RefNotPermitted`` for another namespace's backend no ReferenceGrant there lets the route use (mirrors
  included), ``BackendNotFound`` for the rest.

Parents that are Gateways belong to an ingress controller (istiopy runs waypoints only), so they get no entry
from us; entries other controllers wrote are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from istiopy.mesh.ambient import reference_permitted
from istiopy.mesh.resources.core import Service
from istiopy.mesh.resources.gateway import BackendObjectReference, HTTPRoute, ParentReference
from istiopy.mesh.resources.networking import ServiceEntry
from istiopy.mesh.store import ConfigStore
from istiopy.operator.waypoints import _condition

__all__ = ["MESH_PARENT_KINDS", "desired_route_status"]

MESH_PARENT_KINDS = {("", "Service"), ("core", "Service"), ("networking.istio.io", "ServiceEntry")}


def _exists(store: ConfigStore, group: str, kind: str, namespace: str, name: str) -> bool:
    if (group, kind) in (("", "Service"), ("core", "Service")):
        return store.get_typed(Service, namespace, name) is not None
    if (group, kind) == ("networking.istio.io", "ServiceEntry"):
        return store.get_typed(ServiceEntry, namespace, name) is not None
    return False


def _ref_name(ref: ParentReference | BackendObjectReference, route_ns: str) -> str:
    return f"{ref.kind} {ref.namespace or route_ns}/{ref.name}"


def _resolved_refs(store: ConfigStore, route: HTTPRoute) -> tuple[bool, str, str]:
    missing, invalid, refused = [], [], []
    for rule in route.spec.rules:
        mirrors = [f.request_mirror.backend_ref for f in rule.filters if f.request_mirror is not None]
        for ref in [*rule.backend_refs, *mirrors]:
            ns = ref.namespace or route.namespace
            if (ref.group, ref.kind) not in MESH_PARENT_KINDS:
                invalid.append(f"{ref.group or 'core'}/{ref.kind} {ns}/{ref.name}")
            elif not reference_permitted(
                store, "HTTPRoute", route.namespace, ref.group, ref.kind, ns, ref.name
            ):
                refused.append(_ref_name(ref, route.namespace))
            elif not _exists(store, ref.group, ref.kind, ns, ref.name):
                missing.append(_ref_name(ref, route.namespace))
    if invalid:
        return False, "InvalidKind", "backendRefs of a kind the mesh cannot route to: " + ", ".join(invalid)
    if refused:
        return (
            False,
            "RefNotPermitted",
            "no ReferenceGrant in the backend's namespace lets this route use: " + ", ".join(refused),
        )
    if missing:
        return False, "BackendNotFound", "backend not found: " + ", ".join(missing)
    return True, "ResolvedRefs", "all backendRefs resolved"


def desired_route_status(
    store: ConfigStore,
    route: HTTPRoute,
    old: Mapping[str, Any],
    generation: int | None,
    controller: str,
) -> dict[str, Any]:
    """The status ``route`` should carry: our parents' entries, then every other controller's unchanged."""
    old_parents = list(old.get("parents") or [])
    ours_before = {
        repr(sorted((p.get("parentRef") or {}).items())): p
        for p in old_parents
        if p.get("controllerName") == controller
    }
    resolved = _resolved_refs(store, route)
    parents: list[dict[str, Any]] = []
    seen: set[str] = set()
    for ref in route.spec.parent_refs:
        if (ref.group, ref.kind) not in MESH_PARENT_KINDS:
            continue
        parent_ref = ref.model_dump(by_alias=True, exclude_none=True, mode="json")
        key = repr(sorted(parent_ref.items()))
        if key in seen:
            continue
        seen.add(key)
        prev = list((ours_before.get(key) or {}).get("conditions") or [])
        ns = ref.namespace or route.namespace
        if _exists(store, ref.group, ref.kind, ns, ref.name):
            accepted = _condition("Accepted", True, "Accepted", "route attached", generation, prev)
        else:
            message = f"parent {_ref_name(ref, route.namespace)} not found"
            accepted = _condition("Accepted", False, "NoMatchingParent", message, generation, prev)
        refs = _condition("ResolvedRefs", *resolved, generation, prev)
        entry = {"parentRef": parent_ref, "controllerName": controller, "conditions": [accepted, refs]}
        parents.append(entry)
    parents += [p for p in old_parents if p.get("controllerName") != controller]
    return {"parents": parents}
