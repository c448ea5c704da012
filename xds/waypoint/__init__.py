"""The waypoint Envoy configuration: CDS, EDS, LDS and RDS for proxies of kind ``waypoint``.

istiod registers them next to the other generators; a generator for the proxy's own kind wins over one
for every kind, so sidecars and plain Envoys keep ``envoygen``'s config::

    from istiopy.xds.waypoint import register_waypoint_generators
    register_waypoint_generators(registry)       # proxy_kinds={"waypoint"}

Secrets are not generated here: a waypoint gets its certificate from the SDS server of its own launcher
(``istiopy.dataplane.waypoint``, bootstrap cluster ``sds-grpc``), so its private key never leaves it.

Layout and semantics: ``plan`` (what a waypoint serves, memoized per store version), ``envoy``
(listeners/clusters/endpoints), ``routes`` (VirtualService, HTTPRoute), ``policy`` (AuthorizationPolicy,
RequestAuthentication). Anything that would make Envoy NACK is left out and reported by
``istiopy.mesh.waypoint_diagnostics``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from istiopy.mesh.ambient import pod_locality, typed_list
from istiopy.mesh.resources.core import Pod
from istiopy.mesh.store import Change, ConfigStore
from istiopy.xds import types
from istiopy.xds.proxy import Proxy
from istiopy.xds.registry import Generator, GeneratorRegistry
from istiopy.xds.waypoint import envoy as ev
from istiopy.xds.waypoint.plan import WaypointPlan, plan_for, scope

__all__ = [
    "generate_clusters",
    "generate_endpoints",
    "generate_listeners",
    "generate_routes",
    "register_waypoint_generators",
    "waypoint_generators",
]

PROXY_KINDS = frozenset({"waypoint"})


def generate_listeners(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
    plan = plan_for(store, proxy)
    if plan is None:
        return []
    filters: dict[str, list[dict[str, Any]]] = plan.extra.get("filters", {})
    return [
        (ev.CONNECT_TERMINATE, ev.connect_terminate(plan)),
        (ev.MAIN_INTERNAL, ev.main_internal(plan, filters)),
        (ev.CONNECT_ORIGINATE, ev.connect_originate(plan)),
    ]


def generate_clusters(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
    plan = plan_for(store, proxy)
    if plan is None:
        return []
    out: list[tuple[str, Any]] = [
        (ev.MAIN_INTERNAL, ev.main_internal_cluster()),
        (ev.CONNECT_ORIGINATE, ev.connect_originate_cluster(plan)),
        (ev.ENCAP, ev.encap_cluster()),
    ]
    out += [(name, ev.service_cluster(t)) for name, t in sorted(plan.clusters.items())]
    out += [(name, ev.entry_cluster(ec)) for name, ec in sorted(plan.entry_clusters.items())]
    out += sorted(plan.extra.get("clusters", {}).items())
    return out


def generate_endpoints(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
    plan = plan_for(store, proxy)
    if plan is None:
        return []
    locality = proxy_locality(plan, proxy)
    return sorted((t.name, ev.cluster_endpoints(plan, t, locality)) for t in plan.clusters.values())


def proxy_locality(plan: WaypointPlan, proxy: Proxy) -> ev.Locality | None:
    """The waypoint replica's own locality: its pod's node's, as istiod reads it from the registry."""
    if plan.store is None or not proxy.ip:
        return None
    pod = next((p for p in typed_list(plan.store, Pod, plan.wid.namespace) if proxy.ip in p.ips), None)
    return pod_locality(plan.store, pod) if pod is not None else None


def endpoints_scope(proxy: Proxy) -> Hashable:
    """EDS differs per replica (locality priorities are relative to where the replica runs)."""
    return (scope(proxy), proxy.ip)


def generate_routes(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
    plan = plan_for(store, proxy)
    if plan is None:
        return []
    return sorted(plan.extra.get("routes", {}).items())


# What waypoint config is made of (bindings, endpoints, routing, policy); anything else (PeerAuthentication,
# WorkloadEntry, ConfigMaps...) cannot change it. Within these the content hash suppresses resends.
_INPUT_KINDS = frozenset(
    {
        "Namespace",
        "Node",
        "Service",
        "Pod",
        "Gateway",
        "GatewayClass",
        "ServiceEntry",
        "VirtualService",
        "DestinationRule",
        "HTTPRoute",
        "ReferenceGrant",
        "AuthorizationPolicy",
        "RequestAuthentication",
    }
)


def _affects(change: Change, proxy: Proxy) -> bool:
    return change.key.kind in _INPUT_KINDS


def waypoint_generators() -> list[Generator]:
    return [
        Generator(types.CLUSTER, generate_clusters, _affects, scope, PROXY_KINDS, "waypoint-clusters"),
        Generator(
            types.ENDPOINT, generate_endpoints, _affects, endpoints_scope, PROXY_KINDS, "waypoint-endpoints"
        ),
        Generator(types.LISTENER, generate_listeners, _affects, scope, PROXY_KINDS, "waypoint-listeners"),
        Generator(types.ROUTE, generate_routes, _affects, scope, PROXY_KINDS, "waypoint-routes"),
    ]


def register_waypoint_generators(registry: GeneratorRegistry) -> None:
    """Register CDS/EDS/LDS/RDS for ``waypoint`` proxies (SDS comes from the waypoint's own launcher)."""
    for gen in waypoint_generators():
        registry.register(gen)
