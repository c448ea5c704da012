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

from istiopy.mesh.analysis import (
    MESH_BACKEND_KINDS,
    REF_MESSAGES,
    REF_REASONS,
    http_route_ref_problems,
    mesh_object_exists,
)
from istiopy.mesh.resources.gateway import HTTPRoute, ParentReference
from istiopy.mesh.store import ConfigStore
from istiopy.operator.waypoints import _condition

__all__ = ["MESH_PARENT_KINDS", "desired_route_status"]

MESH_PARENT_KINDS = MESH_BACKEND_KINDS


def _ref_name(ref: ParentReference, route_ns: str) -> str:
    return f"{ref.kind} {ref.namespace or route_ns}/{ref.name}"


def _resolved_refs(store: ConfigStore, route: HTTPRoute) -> tuple[bool, str, str]:
    """ResolvedRefs: the most telling reason any backend has, naming every backend with that reason."""
    problems = http_route_ref_problems(store, route)
    for reason in REF_REASONS:
        named = list(dict.fromkeys(what for _, r, what in problems if r == reason))
        if named:
            return False, reason, REF_MESSAGES[reason].format(", ".join(named))
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
        if mesh_object_exists(store, ref.group, ref.kind, ns, ref.name):
            accepted = _condition("Accepted", True, "Accepted", "route attached", generation, prev)
        else:
            message = f"parent {_ref_name(ref, route.namespace)} not found"
            accepted = _condition("Accepted", False, "NoMatchingParent", message, generation, prev)
        refs = _condition("ResolvedRefs", *resolved, generation, prev)
        entry = {"parentRef": parent_ref, "controllerName": controller, "conditions": [accepted, refs]}
        parents.append(entry)
    parents += [p for p in old_parents if p.get("controllerName") != controller]
    return {"parents": parents}
