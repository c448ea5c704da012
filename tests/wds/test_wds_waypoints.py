"""Waypoint binding: labels on the object and its namespace, ``none``, waypoint-for, cross-namespace use."""

from __future__ import annotations

from wds_helpers import pod, store_from

from istiopy.api.gen import workload_pb2 as wl
from istiopy.mesh.ambient import pod_waypoint, service_waypoint
from istiopy.mesh.resources.core import Pod, Service
from istiopy.mesh.store import ConfigStore
from istiopy.xds.wds import generate_addresses


def gw(name: str, ns: str, for_: str | None = None, from_: str = "Same") -> str:
    labels = f"labels: {{istio.io/waypoint-for: {for_}}}" if for_ else "labels: {}"
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}, {labels}}}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes: {{namespaces: {{from: {from_}}}}}
"""


def ns(name: str, labels: str = "") -> str:
    return f"""
---
apiVersion: v1
kind: Namespace
metadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient{", " + labels if labels else ""}}}}}
"""


def svc(name: str, namespace: str, labels: str = "", ip: str = "10.96.0.10") -> str:
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}
spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{port: 80}}]}}
"""


def service_wp(store: ConfigStore, namespace: str, name: str) -> wl.GatewayAddress | None:
    for n, a in generate_addresses(store):
        if n == f"{namespace}/{name}.{namespace}.svc.cluster.local":
            return a.service.waypoint if a.service.HasField("waypoint") else None
    raise AssertionError(f"no service {namespace}/{name}")


def workload_wp(store: ConfigStore, namespace: str, name: str) -> wl.GatewayAddress | None:
    for n, a in generate_addresses(store):
        if n == f"Kubernetes//Pod/{namespace}/{name}":
            return a.workload.waypoint if a.workload.HasField("waypoint") else None
    raise AssertionError(f"no workload {namespace}/{name}")


def hostname_address(namespace: str, name: str) -> wl.GatewayAddress:
    return wl.GatewayAddress(
        hostname=wl.NamespacedHostname(namespace=namespace, hostname=f"{name}.{namespace}.svc.cluster.local"),
        hbone_mtls_port=15008,
    )


def test_service_label_binds_service_waypoint() -> None:
    store = store_from(ns("a") + gw("wp", "a") + svc("web", "a", "istio.io/use-waypoint: wp"))
    assert service_wp(store, "a", "web") == hostname_address("a", "wp")


def test_namespace_label_applies_to_services_and_object_none_opts_out() -> None:
    store = store_from(
        ns("a", "istio.io/use-waypoint: wp")
        + gw("wp", "a")
        + svc("web", "a")
        + svc("db", "a", "istio.io/use-waypoint: none", ip="10.96.0.11")
    )
    assert service_wp(store, "a", "web") == hostname_address("a", "wp")
    assert service_wp(store, "a", "db") is None


def test_object_label_wins_over_namespace_label() -> None:
    store = store_from(
        ns("a", "istio.io/use-waypoint: wp")
        + gw("wp", "a")
        + gw("special", "a")
        + svc("web", "a", "istio.io/use-waypoint: special")
    )
    assert service_wp(store, "a", "web") == hostname_address("a", "special")


def test_service_on_workload_only_waypoint_gets_none_and_a_reason() -> None:
    store = store_from(ns("a") + gw("wp", "a", "workload") + svc("web", "a", "istio.io/use-waypoint: wp"))
    assert service_wp(store, "a", "web") is None
    binding = service_waypoint(store, store.get_typed(Service, "a", "web"))
    assert binding.reason == "UnsupportedTrafficType"
    assert binding.requested == "a/wp"
    assert "workload" in (binding.message or "")


def test_workload_waypoint_binding_rules() -> None:
    store = store_from(
        ns("a", "istio.io/use-waypoint: svc-wp")
        + gw("svc-wp", "a")  # service (default)
        + gw("wl-wp", "a", "workload")
        + gw("all-wp", "a", "all")
        + pod("inherits", "a", "10.0.0.1")
        + pod("labelled-wl", "a", "10.0.0.2", {"istio.io/use-waypoint": "wl-wp"})
        + pod("labelled-all", "a", "10.0.0.3", {"istio.io/use-waypoint": "all-wp"})
        + pod("labelled-svc", "a", "10.0.0.4", {"istio.io/use-waypoint": "svc-wp"})
        + pod("waypoint-pod", "a", "10.0.0.5", {"gateway.networking.k8s.io/gateway-name": "wl-wp"})
    )
    # A workload inheriting a service-only waypoint from its namespace silently has none.
    assert workload_wp(store, "a", "inherits") is None
    inherited = pod_waypoint(store, store.get_typed(Pod, "a", "inherits"))
    assert inherited.reason is None
    assert workload_wp(store, "a", "labelled-wl") == hostname_address("a", "wl-wp")
    assert workload_wp(store, "a", "labelled-all") == hostname_address("a", "all-wp")
    # A direct label naming a service-only waypoint is a mismatch: no waypoint, and a reason.
    assert workload_wp(store, "a", "labelled-svc") is None
    direct = pod_waypoint(store, store.get_typed(Pod, "a", "labelled-svc"))
    assert direct.reason == "UnsupportedTrafficType"
    # The waypoint's own pods never use a waypoint.
    assert workload_wp(store, "a", "waypoint-pod") is None


def test_unknown_waypoint_gives_no_waypoint_and_a_reason() -> None:
    store = store_from(ns("a") + svc("web", "a", "istio.io/use-waypoint: missing"))
    assert service_wp(store, "a", "web") is None
    binding = service_waypoint(store, store.get_typed(Service, "a", "web"))
    assert binding.reason == "WaypointNotFound"
    assert binding.requested == "a/missing"


def test_non_waypoint_gateway_is_not_a_waypoint() -> None:
    store = store_from(
        ns("a")
        + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: a}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
"""
        + svc("web", "a", "istio.io/use-waypoint: ingress")
    )
    assert service_wp(store, "a", "web") is None


def test_cross_namespace_waypoint_needs_allowed_routes() -> None:
    shared_labels = "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra"
    closed_labels = "istio.io/use-waypoint: closed, istio.io/use-waypoint-namespace: infra"
    store = store_from(
        ns("a")
        + ns("infra")
        + gw("shared", "infra", from_="All")
        + gw("closed", "infra")
        + svc("web", "a", shared_labels)
        + svc("db", "a", closed_labels, ip="10.96.0.11")
    )
    assert service_wp(store, "a", "web") == hostname_address("infra", "shared")
    assert service_wp(store, "a", "db") is None
    binding = service_waypoint(store, store.get_typed(Service, "a", "db"))
    assert binding.reason == "AttachmentDenied"


def test_waypoint_for_from_gateway_class_label() -> None:
    store = store_from(
        ns("a")
        + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint, labels: {istio.io/waypoint-for: all}}
spec: {controllerName: istio.io/mesh-controller}
"""
        + gw("wp", "a")
        + pod("p", "a", "10.0.0.1", {"istio.io/use-waypoint": "wp"})
    )
    assert workload_wp(store, "a", "p") == hostname_address("a", "wp")


def test_waypoint_pods_are_hbone_even_when_not_captured() -> None:
    store = store_from(
        ns("a")
        + gw("wp", "a")
        + pod(
            "wp-abc",
            "a",
            "10.0.0.9",
            {"gateway.networking.k8s.io/gateway-name": "wp", "istio.io/dataplane-mode": "none"},
        )
        + pod(
            "gw-of-nothing",
            "a",
            "10.0.0.8",
            {"gateway.networking.k8s.io/gateway-name": "x", "istio.io/dataplane-mode": "none"},
        )
    )
    got = {
        a.workload.name: a.workload.tunnel_protocol
        for _, a in generate_addresses(store)
        if a.HasField("workload")
    }
    assert got == {"wp-abc": wl.HBONE, "gw-of-nothing": wl.NONE}


def test_the_waypoints_own_service_never_uses_a_waypoint() -> None:
    store = store_from(
        ns("a", "istio.io/use-waypoint: waypoint")
        + gw("waypoint", "a")
        + """
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: a}
spec:
  clusterIP: 10.96.0.40
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: v1
kind: Service
metadata: {name: managed, namespace: a, labels: {gateway.istio.io/managed: istio.io-mesh-controller}}
spec: {clusterIP: 10.96.0.41, ports: [{port: 15008}]}
"""
        + svc("web", "a", ip="10.96.0.42")
    )
    assert service_wp(store, "a", "waypoint") is None
    assert service_wp(store, "a", "managed") is None
    assert service_wp(store, "a", "web") == hostname_address("a", "waypoint")
